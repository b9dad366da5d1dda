"""The ``ema`` option of every method: per-segment exponential moving average of the weights
over steps (the weight smoothing of CR-MOGM, Zhou et al. 2022, "On the Convergence of
Stochastic Multi-Objective Gradient Manipulation and Beyond"; torchjd's ``CRMOGMWeighting``).

lambda_k = ema * lambda_{k-1} + (1 - ema) * lambda_hat_k, with lambda_0 = lambda_hat_1, applied
to the method's own weights (before the rescale to sum one). ``ema = 0`` (the default) turns it
off; it needs a :class:`~.state.MethodState`, like the stateful methods.
"""

from __future__ import annotations

import torch

from .state import MethodState

__all__ = ["check_ema", "smooth_weights"]


def check_ema(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"option ema must be a number in [0, 1] (0 turns the smoothing off); got {value!r}")
    return float(value)


def smooth_weights(weights: torch.Tensor, alpha: float, state: MethodState) -> torch.Tensor:
    """``[S, T]`` weights smoothed with the previous ones kept in ``state`` (updated).

    The caller passes NaN weights for a segment whose Gram is not finite (the weight step
    does, whatever the method returned there): they are returned and not remembered."""
    if state.has("ema.weights"):
        prev = state.get("ema.weights", tuple(weights.shape), weights, lambda: weights)
        # a segment with no finite step yet (its rows are NaN) starts from this one
        known = torch.isfinite(prev).all(-1, keepdim=True)
        smoothed = torch.where(known, alpha * prev + (1.0 - alpha) * weights, weights)
        # a non-finite step (NaN/Inf gradients) is returned as it is and not remembered
        finite = torch.isfinite(weights).all(-1, keepdim=True)
        state.set("ema.weights", torch.where(finite, smoothed, prev))
        return torch.where(finite, smoothed, weights)
    state.set("ema.weights", weights.to(torch.float64).clone())
    return weights
