"""Every number of the distributed front ends stays bit for bit what it was.

``golden_workers.py`` trains a tiny model a few steps through the DDP hook (tasks on ranks
and stashed, every granularity, stateful methods, ``ema``, compression), FSDP2 and DeepSpeed
ZeRO-0/1/2 on 2 gloo processes (one spawn); the SHA-256 of each run's final float32
parameters must equal the one written before the bucket-engine refactor
(``golden/params.json``, main at ee8865d), on both ranks.

A checkpoint written by that main (``golden/state_dict_ee8865d.pt``) must load with
``weights_only=True`` into a state built with its settings and give back the same dict.
"""

from __future__ import annotations

import json

import pytest
import torch

from bucketmoo_kernels.ddp import BucketMOOState
from tests.ddp import golden_workers
from tests.ddp.ddp_helpers import run_distributed


@pytest.fixture(scope="module")
def golden_runs():
    with_deepspeed = True
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with_deepspeed = False
    return run_distributed(golden_workers.all_configs, golden_workers.WORLD, with_deepspeed, timeout_s=300)


def _golden() -> dict:
    return json.loads(golden_workers.GOLDEN_FILE.read_text())["hashes"]


NAMES = sorted(_golden())


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_parameters_equal_the_golden_run(golden_runs, name):
    if name.startswith("ds/") and name not in golden_runs[0]:
        pytest.skip("needs deepspeed (pip install 'bucketmoo_kernels[deepspeed]')")
    for rank, results in enumerate(golden_runs):
        got = results[name]
        if isinstance(got, dict):
            pytest.fail(f"{name} failed on rank {rank}:\n{got['error']}")
        assert got == _golden()[name], f"{name}: rank {rank}'s parameters differ from the golden run"


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_checkpoint_of_main_loads_weights_only():
    saved = torch.load(golden_workers.CHECKPOINT_FILE, weights_only=True)
    assert saved["version"] == 2 and saved["method_states"], "the committed checkpoint holds method states"
    state = BucketMOOState(method=saved["method"], granularity=saved["granularity"], **saved["method_options"])
    state.load_state_dict(saved)
    assert state.step == saved["step"] == 2
    assert state.bucket_layout == saved["bucket_layout"]
    again = state.state_dict()
    for key, value in saved.items():
        assert _equal(again[key], value), f"state_dict()[{key!r}] changed by a load: {again[key]!r} vs {value!r}"
    # the loaded method states are the ones a weight step reads
    index = sorted(saved["method_states"])[0]
    loaded = state.runtime.method_state_for(index).state_dict()
    assert _equal(loaded, saved["method_states"][index])
