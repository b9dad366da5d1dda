"""``BucketMOOTrainer`` with a DeepSpeed ZeRO-2 config: the Trainer builds the engine and the
integration applies :func:`bucketmoo_kernels.integrations.deepspeed.apply_bucket_moo` to it
(two gloo processes, ``DS_ACCELERATOR=cpu``; runs in the spawn of ``hf_scenarios.py``)."""

import pytest
import torch

from conftest import get
from hf_scenarios import STEPS

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def ds_results(hf_results):
    if "ds_none" not in hf_results[0]:
        pytest.skip("needs pip install 'bucketmoo_kernels[deepspeed]'")
    return hf_results


def test_plain_deepspeed_matches_mean_reference(ds_results):
    run = get(ds_results, "ds_none")
    assert torch.equal(run[0]["params"], run[1]["params"])
    torch.testing.assert_close(run[0]["params"], ds_results[0]["ref_mean"], atol=2e-6, rtol=1e-5)


def test_mgda_param_matches_float64_reference(ds_results):
    run = get(ds_results, "ds_mgda_param")
    assert torch.equal(run[0]["params"], run[1]["params"])
    torch.testing.assert_close(run[0]["params"], ds_results[0]["ref_mgda"], atol=2e-6, rtol=1e-5)
    assert all(res["step"] == STEPS for res in run)


def test_resume_equals_uninterrupted_run(ds_results):
    full = get(ds_results, "ds_mgda_param")
    resumed = get(ds_results, "ds_mgda_resume")
    assert torch.equal(resumed[0]["params"], full[0]["params"])
    assert all(res["step"] == STEPS for res in resumed)


def test_zero3_is_refused_with_what_to_use_instead(ds_results):
    for message in get(ds_results, "ds_misuse_zero3"):
        assert "ZeRO stage 3" in message and "ZeRO stage 2" in message, message
