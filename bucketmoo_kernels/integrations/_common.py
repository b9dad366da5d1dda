"""What every integration does the same way: import the framework or name the extra, match
the state's ``task_of_rank`` to the data's task plan, register the hook once on a DDP model,
and turn the hook's diagnostics into flat scalars for an engine's logger. No framework
import here."""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Sequence

import torch

from ..data import TaskPlan

__all__ = ["require", "plan_for_state", "register_ddp_hook", "diagnostics_scalars"]

_HOOKED_ATTR = "_bucketmoo_hook_state"


def require(module: str, extra: str, what: str):
    """Import ``module`` or raise ``ImportError`` naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs the '{module}' package: pip install 'bucketmoo_kernels[{extra}]' "
                          f"(or pip install {module}); import failed with: {exc}") from exc


def plan_for_state(tasks: Sequence[str] | Mapping[str, Any], state, world_size: int,
                   task_of_rank: Sequence[int | str] | None = None) -> TaskPlan:
    """The :class:`TaskPlan` of ``tasks`` on ``world_size`` ranks, consistent with ``state``.

    ``task_of_rank`` (names or ids) wins; else the state's own ``task_of_rank``; else the plan's
    default (contiguous blocks of ranks). A state without ``task_of_rank`` gets the plan's, so
    the hook and the data agree on which rank trains which task; a state whose
    ``task_of_rank`` differs from the plan is refused. ``state`` may be None (plain DDP).
    """
    if state is not None and getattr(state, "mode", "ranks") != "ranks":
        raise ValueError(f"the integrations feed one task per rank: the BucketMOOState needs mode='ranks'; "
                         f"got mode={state.mode!r}")
    own = None if state is None else state.task_of_rank
    plan = TaskPlan.build(tasks, world_size, task_of_rank if task_of_rank is not None else own)
    if state is not None:
        if own is None:
            if plan.task_ids != tuple(range(world_size)):
                settings = state.state_dict()
                settings["task_of_rank"] = plan.task_ids
                state.load_state_dict(settings, replace_settings=True)  # the state's one change: the plan's tasks
        elif tuple(own) != plan.task_ids:
            raise ValueError(f"task_of_rank {list(plan.task_ids)} of the data differs from the "
                             f"BucketMOOState's task_of_rank {list(own)}: give it in one place only")
        if state.num_tasks is not None and state.num_tasks != plan.num_tasks:
            raise ValueError(f"BucketMOOState(num_tasks={state.num_tasks}) but the data has "
                             f"{plan.num_tasks} tasks {list(plan.tasks)}")
    return plan


def register_ddp_hook(model: torch.nn.Module, state, engine: str) -> bool:
    """Register ``bucket_moo_hook`` with ``state`` on the DDP ``model``, once.

    Returns True when it registered now, False when this model already carries the same
    state. Raises ``TypeError`` when ``model`` is not a ``DistributedDataParallel`` and
    ``RuntimeError`` when it carries a different state (DDP accepts one hook per model).
    """
    from torch.nn.parallel import DistributedDataParallel

    from ..ddp import bucket_moo_hook

    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"{engine} did not wrap the model in torch DistributedDataParallel (got "
                        f"{type(model).__name__}); Bucket-Level MOO's comm hook needs a multi-process DDP "
                        "launch (torchrun --nproc-per-node P, or accelerate launch) with one task per rank")
    current = getattr(model, _HOOKED_ATTR, None)
    if current is state:
        return False
    if current is not None:
        raise RuntimeError("this DDP model already has a bucket_moo_hook with another BucketMOOState; "
                           "DDP allows one comm hook per model")
    model.register_comm_hook(state, bucket_moo_hook)
    setattr(model, _HOOKED_ATTR, state)
    return True


def diagnostics_scalars(state, tasks: Sequence[str] | None = None, prefix: str = "bucket_moo") -> dict[str, float]:
    """Flat scalars from the hook's diagnostics recorded since the last call, which clears them.

    Keys: ``{prefix}/step`` (the state's optimizer steps), and when records exist
    ``{prefix}/conflict_share`` (share of segments where some pair of tasks has a negative
    cosine), ``{prefix}/min_cosine``, ``{prefix}/norm_ratio`` (norm of the combined over the
    averaged gradient), ``{prefix}/residual`` (mean min-norm residual), and per bucket b
    ``{prefix}/bucket{b}/min_cosine`` and ``{prefix}/bucket{b}/weight_<task>`` (mean over the
    bucket's segments and the recorded steps; b = -1 is the global granularity).
    """
    out = {f"{prefix}/step": float(state.step)}
    log = getattr(state, "diagnostics", None)
    records = list(getattr(log, "records", []))
    if not records:
        return out
    log.clear()
    cos = torch.cat([r.cosine.double() for r in records])                     # [S, T, T]
    num = cos.shape[-1]
    upper = torch.triu(torch.ones(num, num, dtype=torch.bool), 1)
    pair = cos[:, upper]
    if pair.numel():
        out[f"{prefix}/conflict_share"] = float((pair < 0).any(-1).double().mean())
        out[f"{prefix}/min_cosine"] = float(pair.min())
    combined = torch.cat([r.combined_norm.double() for r in records])
    mean = torch.cat([r.mean_norm.double() for r in records])
    if float(mean.norm()) > 0:
        out[f"{prefix}/norm_ratio"] = float(combined.norm() / mean.norm())
    out[f"{prefix}/residual"] = float(torch.cat([r.residual.double() for r in records]).mean())
    names = list(tasks) if tasks is not None and len(tasks) == num else [str(t) for t in range(num)]
    for bucket in sorted({r.bucket for r in records}):
        mine = [r for r in records if r.bucket == bucket]
        bcos = torch.cat([r.cosine.double() for r in mine])[:, upper]
        if bcos.numel():
            out[f"{prefix}/bucket{bucket}/min_cosine"] = float(bcos.min())
        weights = torch.cat([r.weights.double() for r in mine]).mean(0)
        for name, w in zip(names, weights.tolist()):
            out[f"{prefix}/bucket{bucket}/weight_{name}"] = w
    return out
