"""Install the Bucket-Level MOO reduce-scatter on every FSDP2 module of a model."""

from __future__ import annotations

import torch

from ..distributed.protocol import TaskLayout
from ..distributed.state import BucketMOOState
from ..methods.elementwise import is_elementwise

from ..distributed.engine import BucketEngine
from .reduce_scatter import BucketMOOReduceScatter

__all__ = ["apply_bucket_moo", "fsdp_supports_custom_reduce_scatter"]


def fsdp_supports_custom_reduce_scatter() -> bool:
    """True when this torch's FSDP2 has ``FSDPModule.set_custom_reduce_scatter``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return hasattr(FSDPModule, "set_custom_reduce_scatter")


def _param_groups(module) -> list:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # older torch: a single optional group
        single = getattr(state, "_fsdp_param_group", None)
        groups = [] if single is None else [single]
    return list(groups)


def apply_bucket_moo(model: torch.nn.Module, state) -> list[str]:
    """Make every FSDP2 parameter group of ``model`` reduce its gradients with Bucket-Level MOO.

    Call it after ``fully_shard`` has been applied (to the blocks and the root) and before
    the first backward. One FSDP parameter group is one bucket.

    Args:
        model: a module tree on which ``fully_shard`` was called.
        state: a :class:`~bucketmoo_kernels.distributed.BucketMOOState` (also importable from
            :mod:`bucketmoo_kernels.ddp`) with ``mode="ranks"``;
            granularity ``bucket``, ``param`` or ``chunk:<n>``.
    Returns:
        The names of the modules that got the custom reduce-scatter.
    Raises:
        RuntimeError: torch without ``set_custom_reduce_scatter``, HSDP / replicate meshes,
            several parameter groups per module, no FSDP module found, or parameters outside
            every FSDP group (typically: ``fully_shard`` was not applied to the root module);
            FSDP2 never reduces those, so the replicas would diverge. The error names them.
        ValueError: an unsupported mode or granularity, an element-wise method (graddrop,
            trimmed_mean: they need the DDP hook's all-gather protocol or stash mode), or a
            world size that does not divide into the state's tasks.

    Example::

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        apply_bucket_moo(model, BucketMOOState(method="mgda", mode="ranks"))
    """
    if not fsdp_supports_custom_reduce_scatter():
        raise RuntimeError(
            f"torch {torch.__version__} has no FSDPModule.set_custom_reduce_scatter; the FSDP2 path of "
            "bucketmoo_kernels needs a torch that has it (2.13 does)"
        )
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(state, BucketMOOState):
        raise TypeError(f"state must be a BucketMOOState; got {type(state).__name__}")
    if state.mode != "ranks":
        raise ValueError(f"state.mode must be 'ranks' for FSDP2 (tasks on ranks); got {state.mode!r}")
    if is_elementwise(state.method):
        raise ValueError(
            f"method={state.method!r} is element-wise (not a function of the Gram matrix) and cannot run "
            f"under FSDP2, whose reduce-scatter runs the sharded protocol (protocol={state.protocol!r} of the "
            "state is not used by FSDP2): each rank solves weights from the all-reduced Gram and combines "
            "only its own shard. Use the DDP hook with protocol='allgather' or mode='stash' for this method")
    if state.granularity == "global":
        raise ValueError(
            "granularity='global' is not supported with FSDP2: each group's gradient shard must be written "
            "when its reduce-scatter runs, before the later groups' Gram matrices exist. Global MOO would "
            "need every group's full task gradients held until the end of backward (the cost that "
            "Bucket-Level MOO avoids); use granularity='bucket' or 'param'"
        )
    if state.granularity not in ("bucket", "param") and not state.granularity.startswith("chunk:"):
        raise ValueError(f"state.granularity must be 'bucket', 'param' or 'chunk:<n>'; got {state.granularity!r}")
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        groups = _param_groups(module)
        if not groups:
            continue
        if len(groups) > 1:
            raise RuntimeError(
                f"FSDP module {name or '<root>'!r} has {len(groups)} parameter groups (per-parameter meshes); "
                "bucketmoo_kernels supports one group per module"
            )
        group = groups[0]
        mesh = group.mesh_info.mesh
        if mesh.ndim != 1:
            raise RuntimeError(
                f"FSDP module {name or '<root>'!r} uses a {mesh.ndim}-D mesh (HSDP/replication); only 1-D "
                "FSDP meshes are supported: the replicate all-reduce would average the combined shards"
            )
        TaskLayout.build(state.task_of_rank, mesh.size(), state.num_tasks)  # validate the task mapping
        found.append((name or "<root>", module, group))
    if not found:
        raise RuntimeError("apply_bucket_moo found no FSDP2 module in the model: call fully_shard first")
    managed = {id(fp.sharded_param) for _, _, group in found for fp in group.fsdp_params}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in managed]
    if outside:
        shown = ", ".join(outside[:10]) + (f", ... ({len(outside)} in all)" if len(outside) > 10 else "")
        raise RuntimeError(
            f"parameters outside every FSDP parameter group: {shown}. FSDP2 never reduces their gradients "
            "(each rank would keep its own task's gradient and the replicas would diverge). Call "
            "fully_shard on the root module too (fully_shard(model) after the blocks), or on the modules "
            "holding these parameters, before apply_bucket_moo."
        )
    # FSDP hands its reduce-scatter group with every call (the reduce-scatter sets it on the engine).
    engine = BucketEngine(state, holds_buffers=False, reductions_per_step=len(found))
    for index, (name, module, group) in enumerate(found):
        param_sizes = [int(torch.Size(p.padded_sharded_param_size).numel()) for p in group.fsdp_params]
        comm = BucketMOOReduceScatter(state, param_sizes, lambda g=group: g.gradient_divide_factor,
                                      index, name, engine)
        module.set_custom_reduce_scatter(comm)
    return [name for name, _, _ in found]
