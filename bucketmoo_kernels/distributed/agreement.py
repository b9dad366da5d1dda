"""Check that every rank runs the same settings, with one tiny collective.

Ranks that disagree on the method, granularity, task mapping, protocol, ... either issue
different collectives (gloo then aborts the process with "collective mismatch", NCCL hangs)
or, worse, issue the same ones and train on wrong gradients. :func:`agree_settings` runs on
the first reduction: it all-gathers one 63-bit hash per setting family
(:data:`~.settings.AGREED`, ``len(AGREED)`` int64 per rank). When the hashes differ, every
rank sees it in the same gathered tensor, all of them then gather the readable values
(``all_gather_object``, only on this error path) and raise the same ``ValueError`` naming
each differing setting and its value on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import collectives
from .settings import AGREED, MOOSettings

__all__ = ["agree_settings", "SettingsMismatch"]


class SettingsMismatch(ValueError):
    """Ranks were given different settings (a ``ValueError``)."""


def agree_settings(settings: MOOSettings, group=None, device: torch.device | str = "cpu") -> None:
    """Raise :class:`SettingsMismatch` on every rank when the ranks' settings differ.

    A collective: every rank of ``group`` must call it at the same point. ``device`` is where
    the hashes travel (the gradients' device: NCCL needs CUDA tensors). Costs one all-gather
    of ``len(AGREED)`` int64 per rank.
    """
    if not dist.is_available() or not dist.is_initialized():
        return  # no process group: nothing to agree with
    world = collectives.group_size(group)
    if world == 1:
        return
    mine = torch.tensor(settings.digest(), dtype=torch.int64, device=device)
    gathered = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
    collectives.all_gather_flat(gathered, mine, group)
    table = gathered.view(world, -1).cpu()
    differ = [name for j, name in enumerate(AGREED) if not bool((table[:, j] == table[0, j]).all())]
    if not differ:
        return
    values: list = [None] * world
    dist.all_gather_object(values, settings.agreed_values(), group=group)
    lines = []
    for name in differ:
        per_rank = ", ".join(f"rank {r}: {v[name]!r}" for r, v in enumerate(values))
        lines.append(f"  {name}: {per_rank}")
    raise SettingsMismatch(
        "BucketMOOState settings differ between the ranks of the process group; every rank must use the "
        "same settings (otherwise the ranks train on wrong gradients or issue mismatched collectives):\n"
        + "\n".join(lines)
    )
