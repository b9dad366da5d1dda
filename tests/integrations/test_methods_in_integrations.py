"""Every registered method, with its list-valued options, through what the integrations do
with a ``BucketMOOState`` before training (no process group, no framework import): the state
is built and validated, ``plan_for_state`` hands it the data's ``task_of_rank`` (a
``state_dict`` round trip) and the checkpoint file (``torch.save`` of ``state_dict()``, what
``BucketMOOTrainer`` writes) loads back into an equal state."""

from __future__ import annotations

import io

import pytest
import torch

from bucketmoo_kernels.ddp import BucketMOOState
from bucketmoo_kernels.integrations._common import plan_for_state
from bucketmoo_kernels.methods import available_methods

TASKS = ("de", "fr", "ru")
#: options per method, list-valued where the method has such options (T = 3 tasks)
OPTIONS = {
    "constant": {"weights": [1.0, 2.0, 1.0]}, "upgrad": {"pref_vector": [0.5, 0.25, 0.25]},
    "dualproj": {"pref_vector": [0.2, 0.3, 0.5]}, "config": {"pref_vector": [1.0, 1.0, 2.0]},
    "aligned_mtl": {"pref_vector": [1.0, 2.0, 1.0]}, "pcd": {"tau": [0.1, 0.2]},
    "graddrop": {"leak": [0.0, 0.5, 0.0], "protocol": "allgather"}, "trimmed_mean": {"protocol": "allgather"},
    "mgda": {"solver": "pgd", "tol": 0.0, "ema": 0.5}, "cagrad": {"c": 0.3}, "gradvac": {"beta": 0.3},
}


@pytest.mark.parametrize("method", available_methods())
def test_every_method_and_its_options_survive_the_integration_setup(method):
    state = BucketMOOState(method=method, **OPTIONS.get(method, {}))
    given = {k: v for k, v in OPTIONS.get(method, {}).items() if k != "protocol"}
    assert state.method_options == given
    plan = plan_for_state(TASKS, state, world_size=6)  # the state gets the plan's task_of_rank
    assert plan.task_ids == (0, 0, 1, 1, 2, 2) and state.task_of_rank == plan.task_ids
    assert (state.method, state.method_options) == (method, given)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    restored = BucketMOOState(method="mean")
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False), replace_settings=True)
    assert restored.settings == state.settings


@pytest.mark.parametrize("method, options, words", [
    ("constant", {"weights": [1.0, "x", 1.0]}, "weights"),
    ("upgrad", {"pref_vector": "0.5,0.5"}, "pref_vector"),
    ("config", {"pref_vector": [1.0, float("nan"), 1.0]}, "pref_vector must hold finite"),
    ("pcd", {"tau": [[[0.1]]]}, "tau must be"),
    ("mgda", {"solver": "fast"}, "solver"),
    ("graddrop", {}, "protocol='allgather'"),
])
def test_bad_method_options_fail_at_construction(method, options, words):
    with pytest.raises((TypeError, ValueError), match=words):
        BucketMOOState(method=method, **options)
