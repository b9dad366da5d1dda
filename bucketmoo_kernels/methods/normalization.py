"""Optional gradient normalisation before a method runs (Sener & Koltun 2018, §3.3).

Each task gradient g_t is divided by a scale n_t before solving, which is a congruence of
the Gram matrix, M'_ij = M_ij / (n_i n_j), and a rescaling of the weights:
d = sum_t w'_t g_t / n_t, i.e. w_t = w'_t / n_t on the raw gradients.

* ``none``  n_t = 1
* ``l2``    n_t = |g_t| (from the Gram diagonal)
* ``loss``  n_t = L_t, the task's loss (pass ``losses``)
* ``loss+`` n_t = L_t |g_t|

Zero scales (a zero gradient, a zero loss) are replaced by 1: that task's gradient is then
left as it is. A negative, NaN or infinite loss, or losses of the wrong length, raise
``ValueError`` (:func:`loss_table`) before anything is computed or written.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NORMALIZATIONS", "USES_LOSSES", "check_normalization", "loss_table",
           "normalization_scales", "scales_from_table"]

#: In the order of their codes in csrc/common/bucketmoo_solvers.h (solver::Normalization).
NORMALIZATIONS = ("none", "l2", "loss", "loss+")
#: The normalisations that need the per-task losses.
USES_LOSSES = ("loss", "loss+")


def check_normalization(normalization: str) -> int:
    """The code of ``normalization`` (its index in :data:`NORMALIZATIONS`), or ValueError."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {', '.join(NORMALIZATIONS)}; got {normalization!r}"
        )
    return NORMALIZATIONS.index(normalization)


def loss_table(losses, normalization: str, num_seg: int, num_tasks: int,
               device: torch.device) -> torch.Tensor:
    """``losses`` (``[T]`` or ``[S, T]``) as a contiguous float64 ``[S, T]`` tensor on ``device``.

    Raises:
        ValueError: ``losses`` missing, of the wrong shape, or holding a negative, NaN or
            infinite value (zero is allowed: that task is not rescaled). The values are read
            on the host: a losses tensor on a GPU costs one device-to-host copy here.
    """
    if losses is None:
        raise ValueError(f"normalization={normalization!r} needs the per-task losses: pass losses=[L_1..L_T]")
    given = losses
    try:
        losses = torch.as_tensor(losses, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"losses must be T = {num_tasks} numbers (a list or a tensor); got "
                         f"{type(losses).__name__} ({exc})") from None
    if losses.shape not in ((num_tasks,), (num_seg, num_tasks)):
        raise ValueError(f"losses must have shape [T] = [{num_tasks}] (or [S, T] = [{num_seg}, "
                         f"{num_tasks}]); got {tuple(losses.shape)}")
    bad = _first_bad_loss(given) if not isinstance(given, torch.Tensor) else _first_bad_loss_tensor(given)
    if bad is not None:
        index, value = bad
        raise ValueError(
            f"normalization={normalization!r} divides each task by its loss, so losses must be "
            f"finite and >= 0; got losses{index} = {value}"
        )
    return losses.to(device).expand(num_seg, num_tasks).contiguous()


def _first_bad_loss(values, index=()) -> tuple[list, float] | None:
    """The first negative / NaN / infinite number in a (nested) sequence, read in Python (so
    it also traces under torch.compile: the values are constants there)."""
    if isinstance(values, torch.Tensor):
        return _first_bad_loss_tensor(values, index)
    if isinstance(values, (list, tuple)):
        for i, v in enumerate(values):
            bad = _first_bad_loss(v, index + (i,))
            if bad is not None:
                return bad
        return None
    value = float(values)
    return None if math.isfinite(value) and value >= 0 else (list(index), value)


def _first_bad_loss_tensor(values: torch.Tensor, index=()) -> tuple[list, float] | None:
    """The same for a tensor: one host read (a device-to-host copy for a GPU tensor)."""
    host = values.detach().to("cpu", torch.float64)
    bad = ~torch.isfinite(host) | (host < 0)
    if not bool(bad.any()):
        return None
    first = tuple(torch.nonzero(bad)[0].tolist())
    return list(index + first), float(host[first])


def normalization_scales(gram: torch.Tensor, normalization: str,
                         losses: torch.Tensor | None) -> torch.Tensor | None:
    """``[S, T]`` float64 scales n_t for ``gram [S, T, T]``, or None for ``"none"``."""
    check_normalization(normalization)
    if normalization == "none":
        return None
    num_seg, num_tasks, _ = gram.shape
    table = (loss_table(losses, normalization, num_seg, num_tasks, gram.device)
             if normalization in USES_LOSSES else None)
    return scales_from_table(gram, normalization, table)


def scales_from_table(gram: torch.Tensor, normalization: str,
                      table: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`normalization_scales` with the losses already checked by :func:`loss_table`
    (``table``: float64 ``[S, T]`` on the Gram's device, or None when not used)."""
    if normalization == "none":
        return None
    scales = torch.ones(gram.shape[:2], dtype=torch.float64, device=gram.device)
    if normalization in ("l2", "loss+"):
        scales = scales * gram.diagonal(dim1=-2, dim2=-1).to(torch.float64).clamp_min(0).sqrt()
    if normalization in USES_LOSSES:
        scales = scales * table
    return torch.where(scales > 0, scales, torch.ones_like(scales))
