"""Weightings that ignore the gradients: ``sum`` (all ones), ``constant`` (given weights) and
``random`` (RLW, Lin et al. 2022, "Reasonable Effectiveness of Random Weighting: A Litmus Test
for Multi-Task Learning": softmax of standard normal draws, new ones every call).

``random`` draws from :mod:`.counter_rng`, a function of (``seed``, segment, task): every rank
that passes the same seed gets the same weights, on any device. Each segment gets its own
draw. The DDP hook passes ``seed + step``; in the functional API pass a ``method_state``
(its call counter is added to the seed) or vary ``seed`` yourself.
"""

from __future__ import annotations

import torch

from .counter_rng import normal
from .task_vectors import task_vector
from .options import Option, seed_option
from .registry import register

__all__ = ["sum_weights", "constant_weights", "random_weights"]


def sum_weights(gram: torch.Tensor) -> torch.Tensor:
    """All-one weights: ``[S, T, T]`` -> ``[S, T]`` (the sum of the gradients)."""
    return torch.ones(gram.shape[:2], dtype=gram.dtype, device=gram.device)


def constant_weights(gram: torch.Tensor, *, weights=None) -> torch.Tensor:
    """The given ``weights`` (T values, or ``[S, T]``): ``[S, T, T]`` -> ``[S, T]``."""
    return task_vector(weights, "weights", "constant", gram, None).clone()


def random_weights(gram: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Softmax of normal draws per segment: ``[S, T, T]`` -> ``[S, T]`` (sum to 1)."""
    num_seg, num_tasks = gram.shape[:2]
    index = torch.arange(num_seg * num_tasks, dtype=torch.int64, device=gram.device)
    draws = normal(int(seed), 0, index).reshape(num_seg, num_tasks)
    return torch.softmax(draws, dim=-1)


def _needs_weights(options) -> None:
    if options["weights"] is None:
        raise ValueError("method 'constant' needs the option weights=[w_1..w_T] (one value per task, "
                         "or [S, T])")


register("sum", sum_weights)
register("constant", constant_weights, options={"weights": Option(None, per_task=True)}, check=_needs_weights)
register("random", random_weights, options={"seed": seed_option()})
