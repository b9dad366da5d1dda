"""FairGrad (Ban & Ji 2024, "Fair Resource Allocation in Multi-Task Learning", Eq. 4).

The weights are the x > 0 with G x = x^(-1/alpha) (element-wise), G the raw Gram; ``alpha``
sets the kind of fairness (alpha = 1 is proportional fairness, i.e. Nash-MTL's condition;
alpha = 0 gives uniform weights 1/T, as torchjd). With c = |G|_F the solution is
c^(-alpha/(1+alpha)) y for the y solving the same equation with G / c, which is the
minimiser of the strictly convex 1/2 y^T (G/c) y - sum_t h(y_t), h' = y^(-1/alpha); damped
Newton finds it (:func:`.nash_mtl.positive_fixed_point`, same degenerate-input rules: ridge,
zero-gradient tasks get 0). torchjd and the official code use scipy's bounded least squares
on G x - x^(-1/alpha), which stops at scipy's tolerances.
"""

from __future__ import annotations

import torch

from .nash_mtl import positive_fixed_point
from .options import AtLeast, Option
from .registry import register

__all__ = ["fairgrad_weights"]


def fairgrad_weights(gram: torch.Tensor, *, alpha: float = 1.0, max_iter: int = 100,
                     tol: float = 1e-20) -> torch.Tensor:
    """FairGrad weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (the paper's scale)."""
    if not alpha >= 0:
        raise ValueError(f"fairgrad alpha must be >= 0; got {alpha}")
    num_seg, num_tasks, _ = gram.shape
    if alpha == 0:
        return torch.full((num_seg, num_tasks), 1.0 / num_tasks, dtype=gram.dtype, device=gram.device)
    y, fro = positive_fixed_point(gram, 1.0 / alpha, max_iter=max_iter, tol=tol)
    scale = torch.where(fro > 0, fro, 1.0).pow(-alpha / (1.0 + alpha))
    return y * scale[:, None]


register("fairgrad", fairgrad_weights, options={"alpha": Option(1.0, AtLeast(0.0)),
                                                 "max_iter": Option(100, AtLeast(1)),
                                                 "tol": Option(1e-20, AtLeast(0.0))})
