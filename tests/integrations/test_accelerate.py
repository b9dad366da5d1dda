"""The Accelerate recipe (``register_bucket_moo`` + ``task_dataloader``) on two gloo processes."""

import pytest
import torch

from conftest import get
from hf_scenarios import STEPS

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_mean_equals_plain_accelerate_bitwise(hf_results):
    plain = get(hf_results, "acc_plain")
    run = get(hf_results, "acc_mean")
    assert torch.equal(run[0]["params"], run[1]["params"])
    assert torch.equal(run[0]["params"], plain[0]["params"])
    assert run[0]["step"] == STEPS


def test_mgda_param_matches_float64_reference(hf_results):
    run = get(hf_results, "acc_mgda_param")
    assert torch.equal(run[0]["params"], run[1]["params"])
    torch.testing.assert_close(run[0]["params"], hf_results[0]["ref_mgda"], atol=2e-6, rtol=1e-5)
    assert run[0]["step"] == STEPS


def test_gradient_accumulation_matches_reference(hf_results):
    # batch 1 x 2 accumulation steps (accelerator.accumulate: no_sync skips the hook) = batch 2
    run = get(hf_results, "acc_mgda_accum")
    assert torch.equal(run[0]["params"], run[1]["params"])
    torch.testing.assert_close(run[0]["params"], hf_results[0]["ref_mgda"], atol=2e-6, rtol=1e-5)
    assert run[0]["step"] == STEPS


def test_state_round_trips_through_save_state(hf_results):
    for res in get(hf_results, "acc_mgda_param"):
        assert res["restored_step"] == STEPS
