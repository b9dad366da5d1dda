"""GradVac (Wang et al. 2021, "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models"), stateful per segment.

For each task i, the other tasks j in a random order: with phi the cosine between the
(already corrected) g_i^PC and g_j, and phi_hat the EMA target of the pair, if phi < phi_hat
then g_i^PC += w g_j with

    w = |g_i^PC| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2) + eps)

and phi_hat <- (1 - beta) phi_hat + beta phi. The update is the sum of the corrected
gradients. As in torchjd, g_i^PC is tracked as coefficients over the g_t, so every quantity
comes from the Gram; phi_hat is a ``[S, T, T]`` tensor in the :class:`~.state.MethodState`
(zero at the start), so each segment (bucket) has its own targets. The task orders come from
``seed + method_state.calls`` (the PCGrad order generator: the same on every rank; with one
order shared by all segments of the call). ``eps`` is absolute, as in torchjd.
"""

from __future__ import annotations

import torch

from .pcgrad import pcgrad_orders
from .options import AtLeast, Between, Option, seed_option
from .registry import register
from .state import MethodState

__all__ = ["gradvac_weights"]


def gradvac_weights(gram: torch.Tensor, *, state: MethodState, beta: float = 0.5, eps: float = 1e-8,
                    seed: int = 0) -> torch.Tensor:
    """GradVac weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (sum of corrected gradients)."""
    if not 0 <= beta <= 1 or eps < 0:
        raise ValueError(f"gradvac needs 0 <= beta <= 1 and eps >= 0; got beta={beta}, eps={eps}")
    num_seg, num_tasks, _ = gram.shape
    phi_hat = state.get("gradvac.phi_hat", (num_seg, num_tasks, num_tasks), gram,
                        lambda: torch.zeros(num_seg, num_tasks, num_tasks)).clone()
    orders = pcgrad_orders(num_tasks, int(seed) + state.calls).tolist()
    eye = torch.eye(num_tasks, dtype=gram.dtype, device=gram.device)
    norm_sq = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0)
    total = torch.zeros(num_seg, num_tasks, dtype=gram.dtype, device=gram.device)
    for i in range(num_tasks):
        coef = eye[i].expand(num_seg, -1).clone()
        dots = gram[:, i, :].clone()  # g_i^PC . g_t
        for j in orders[i]:
            norm_i = (dots * coef).sum(-1).clamp_min(0).sqrt()
            norm_j = norm_sq[:, j].sqrt()
            phi = dots[:, j] / (norm_i * norm_j + eps)
            hat = phi_hat[:, i, j]
            below = phi < hat
            root_phi = (1 - phi * phi).clamp_min(0).sqrt()
            root_hat = (1 - hat * hat).clamp_min(0).sqrt()
            w = norm_i * (hat * root_phi - phi * root_hat) / (norm_j * root_hat + eps)
            w = torch.where(below, w, torch.zeros_like(w))
            coef[:, j] += w
            dots = dots + w[:, None] * gram[:, j, :]
            phi_hat[:, i, j] = (1 - beta) * hat + beta * phi
        total += coef
    finite = torch.isfinite(gram).flatten(1).all(-1)  # a non-finite segment keeps its targets
    state.set("gradvac.phi_hat", torch.where(finite[:, None, None], phi_hat,
                                             state.get("gradvac.phi_hat", tuple(phi_hat.shape), gram, None)))
    return total


register("gradvac", gradvac_weights, kind="stateful",
         options={"beta": Option(0.5, Between(0.0, 1.0)), "eps": Option(1e-8, AtLeast(0.0)), "seed": seed_option()})
