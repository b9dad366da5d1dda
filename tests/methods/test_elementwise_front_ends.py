"""The element-wise methods (graddrop, trimmed_mean) are refused, when the settings are built,
by every front end that cannot run them: the DDP hook's sharded protocol, the FSDP2
reduce-scatter and the DeepSpeed integration (both sharded only), ``granularity="global"``
and ``ema``. No process group is needed: the refusals come before anything is registered."""

from __future__ import annotations

import types

import pytest
import torch

from bucketmoo_kernels.ddp import BucketMOOState
from bucketmoo_kernels.distributed.settings import MOOSettings
from bucketmoo_kernels.methods import available_methods, get_method

ELEMENTWISE = [m for m in available_methods() if get_method(m).is_elementwise]


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_sharded_protocol_is_refused_naming_method_protocol_and_the_alternative(method):
    for build in (lambda: BucketMOOState(method=method),
                  lambda: BucketMOOState(method=method, protocol="sharded", granularity="param"),
                  lambda: MOOSettings.build(method)):
        with pytest.raises(ValueError) as info:
            build()
        text = str(info.value)
        assert f"method={method!r}" in text and "protocol='sharded'" in text
        assert "protocol='allgather'" in text and "mode='stash'" in text


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_allgather_and_stash_are_accepted(method):
    assert BucketMOOState(method=method, protocol="allgather").method == method
    assert BucketMOOState(method=method, mode="stash", num_tasks=3).method == method
    assert BucketMOOState(method=method, protocol="allgather", granularity="chunk:64").method == method


@pytest.mark.parametrize("method", ELEMENTWISE)
@pytest.mark.parametrize("kwargs, words", [
    ({"protocol": "allgather", "granularity": "global"}, "granularity='global'"),
    ({"mode": "stash", "num_tasks": 3, "granularity": "global"}, "granularity='global'"),
    ({"protocol": "allgather", "ema": 0.5}, "option ema"),
])
def test_global_granularity_and_ema_are_refused(method, kwargs, words):
    with pytest.raises(ValueError, match=words):
        BucketMOOState(method=method, **kwargs)


def test_weight_methods_keep_the_sharded_default():
    assert BucketMOOState(method="mgda").protocol == "sharded"
    assert BucketMOOState(method="mgda", granularity="global", ema=0.5).granularity == "global"


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_fsdp_refuses_element_wise_methods_before_touching_the_model(method):
    from bucketmoo_kernels.fsdp import apply_bucket_moo, fsdp_supports_custom_reduce_scatter

    if not fsdp_supports_custom_reduce_scatter():
        pytest.skip("this torch has no FSDPModule.set_custom_reduce_scatter")
    state = BucketMOOState(method=method, protocol="allgather")
    with pytest.raises(ValueError) as info:
        apply_bucket_moo(torch.nn.Linear(2, 2), state)  # no fully_shard: the check comes first
    text = str(info.value)
    assert f"method={method!r}" in text and "protocol='allgather'" in text and "mode='stash'" in text


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_deepspeed_refuses_element_wise_methods(method):
    from bucketmoo_kernels.integrations.deepspeed import _check_engine

    engine = types.SimpleNamespace(
        zero_offload_optimizer=lambda: None, zero_offload_param=lambda: None, pipeline_parallelism=False,
        has_moe_layers=False, sequence_parallel_size=1, module=torch.nn.Linear(2, 2), zenflow=False,
        is_deepcompile_active=lambda: False, gradient_average=True)
    with pytest.raises(ValueError) as info:
        _check_engine(engine, BucketMOOState(method=method, protocol="allgather"), 2)
    text = str(info.value)
    assert f"method={method!r}" in text and "protocol='allgather'" in text and "mode='stash'" in text
