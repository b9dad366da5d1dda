"""Checks of ``apply_bucket_moo`` that need neither DeepSpeed nor processes: the refusal of
configurations it does not support (on stand-in engines) and of a missing process group."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from bucketmoo_kernels.ddp import BucketMOOState


def test_no_process_group_is_refused_without_deepspeed_work():
    from bucketmoo_kernels.integrations.deepspeed import apply_bucket_moo

    with pytest.raises(RuntimeError, match="process group"):
        apply_bucket_moo(object(), BucketMOOState(method="mgda"))


def _fake_engine(**over):
    base = dict(zero_offload_optimizer=lambda: None, zero_offload_param=lambda: None, pipeline_parallelism=False,
                has_moe_layers=False, sequence_parallel_size=1, module=torch.nn.Linear(2, 2), zenflow=False,
                is_deepcompile_active=lambda: False, gradient_average=True,
                allreduce_and_copy=None, buffered_allreduce_fallback=None)
    base.update(over)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize("over, stage, needle", [
    ({}, 3, "ZeRO stage 3"),
    ({"zero_offload_optimizer": lambda: object()}, 2, "offload"),
    ({"pipeline_parallelism": True}, 1, "pipeline"),
    ({"has_moe_layers": True}, 2, "MoE"),
    ({"sequence_parallel_size": 2}, 2, "sequence parallelism"),
    ({"module": torch.nn.Embedding(3, 2, sparse=True)}, 0, "sparse"),
    ({"is_deepcompile_active": lambda: True}, 2, "DeepCompile"),
    ({"gradient_average": False}, 0, "sum gradient reduction"),
])
def test_unsupported_configurations_name_the_alternative(over, stage, needle):
    from bucketmoo_kernels.integrations.deepspeed import _check_engine

    with pytest.raises(NotImplementedError, match=needle) as info:
        _check_engine(_fake_engine(**over), BucketMOOState(method="mgda"), stage)
    assert "use " in str(info.value) or "remove" in str(info.value) or "disable" in str(info.value)


def test_missing_deepspeed_names_the_extra(monkeypatch):
    from bucketmoo_kernels.integrations import deepspeed as integration

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    with pytest.raises(ImportError, match=r"pip install 'bucketmoo_kernels\[deepspeed\]'"):
        integration._import_deepspeed()


def test_missing_lightning_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "bucketmoo_kernels.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'bucketmoo_kernels\[lightning\]'"):
        importlib.import_module("bucketmoo_kernels.integrations.lightning")


def test_old_deepspeed_is_refused():
    from bucketmoo_kernels.integrations.deepspeed import _check_version

    with pytest.raises(RuntimeError, match="deepspeed >= "):
        _check_version("0.9.5")
    _check_version("0.19.8")
