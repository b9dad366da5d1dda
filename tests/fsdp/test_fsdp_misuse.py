"""FSDP2 misuse: parameters outside every FSDP group, and ranks with different settings.

Before the fix ``apply_bucket_moo`` accepted a model whose root was not wrapped by
``fully_shard``: the root's own parameters were never reduced and the replicas diverged.
Now it refuses, naming the parameters. Ranks with different settings get the same
``ValueError`` on the first reduce-scatter.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bucketmoo_kernels.distributed import BucketMOOState
from bucketmoo_kernels.fsdp import apply_bucket_moo, fsdp_supports_custom_reduce_scatter
from tests.ddp.ddp_helpers import run_distributed
from tests.fsdp.test_fsdp import loss_fn, make_model, task_batch

pytestmark = [pytest.mark.distributed, pytest.mark.slow,
              pytest.mark.skipif(not fsdp_supports_custom_reduce_scatter(),
                                 reason="this torch has no FSDPModule.set_custom_reduce_scatter")]


def _worker(rank: int, world: int, _) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for block in list(model)[:2]:  # the blocks only: the head (model[2]) stays outside
        fully_shard(block, mesh=mesh)
    try:
        apply_bucket_moo(model, BucketMOOState(method="mgda"))
        out["no_root"] = None
    except RuntimeError as exc:
        out["no_root"] = str(exc)
    dist.barrier()

    model = make_model()
    for block in list(model)[:2]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    apply_bucket_moo(model, BucketMOOState(method="mgda" if rank == 0 else "pcgrad"))
    try:
        loss_fn(model, task_batch(0, rank)).backward()
        out["mismatch"] = None
    except ValueError as exc:
        out["mismatch"] = str(exc)
    return out


def test_parameters_outside_fsdp_groups_are_refused_and_mismatched_settings_raise():
    results = run_distributed(_worker, 2, None)
    for rank, res in enumerate(results):
        msg = res["no_root"]
        assert msg is not None, f"rank {rank}: a model without fully_shard(root) was accepted"
        assert "outside every FSDP parameter group" in msg and "2.weight" in msg and "2.bias" in msg
        assert "0.0.weight" not in msg  # the wrapped blocks' parameters are not named
        assert res["mismatch"] is not None and "  method: rank 0: " in res["mismatch"], res["mismatch"]
    assert results[0]["mismatch"] == results[1]["mismatch"]
