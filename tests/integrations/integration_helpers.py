"""Shared pieces of the integration tests: 2 spawned gloo processes (``ddp_helpers``), the tiny
model and per-task data every engine trains on, and the independent float64 reference
(per-parameter MGDA with two tasks, closed form, plain SGD)."""

from __future__ import annotations

import torch

from tests.ddp.ddp_helpers import run_distributed

IN_DIM, HIDDEN, OUT_DIM, BATCH = 6, 8, 3, 4
LR = 0.1


def run_two_ranks(fn, world: int = 2) -> list:
    """Run ``fn(rank, world)`` (a module-level function) on ``world`` spawned gloo processes
    and return every rank's return value; a worker's exception is re-raised here
    (``ddp_helpers.run_distributed``, with the engines' longer collective timeout)."""
    return run_distributed(fn, world, timeout_s=300)


# --------------------------------------------------------------------------- model and data
def make_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN_DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT_DIM))
    return model.to(dtype)


def task_batch(task: int, step: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Task t's batch of step k: regression onto a task-specific linear map (the two maps
    conflict, so MGDA's weights are not the mean's)."""
    g = torch.Generator().manual_seed(1000 * task + step)
    x = torch.randn(BATCH, IN_DIM, generator=g, dtype=torch.float64)
    w = torch.randn(IN_DIM, OUT_DIM, generator=torch.Generator().manual_seed(77 + task), dtype=torch.float64)
    y = x @ w * (1.0 if task == 0 else -1.0)
    return x.to(dtype), y.to(dtype)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


# --------------------------------------------------------------------------- float64 reference
def _mgda_two(g0: torch.Tensor, g1: torch.Tensor) -> tuple[float, float]:
    """Min-norm point of the segment [g0, g1] (float64), with the library's documented ridge
    (1e-9 x the mean diagonal) so that a singular Gram gives equal weights."""
    m00, m01, m11 = g0 @ g0, g0 @ g1, g1 @ g1
    r = 1e-9 * (m00 + m11) / 2 + 1e-200
    m00, m11 = m00 + r, m11 + r
    den = m00 + m11 - 2 * m01
    gamma = float(((m11 - m01) / den).clamp(0.0, 1.0)) if den > 0 else 0.5
    return gamma, 1.0 - gamma


def _combine(task_grads: list, granularity: str, method: str) -> list:
    if method == "mean":
        return [(a + b) / 2 for a, b in zip(*task_grads)]
    if granularity == "param":
        out = []
        for a, b in zip(*task_grads):
            w0, w1 = _mgda_two(a, b)
            out.append(w0 * a + w1 * b)
        return out
    if granularity == "global":
        w0, w1 = _mgda_two(torch.cat(task_grads[0]), torch.cat(task_grads[1]))
        return [w0 * a + w1 * b for a, b in zip(*task_grads)]
    raise ValueError(granularity)


def reference_run(steps: int, granularity: str, method: str = "mgda", lr: float = LR, accumulate: int = 1,
                  combine_each_micro_batch: bool = False) -> torch.Tensor:
    """Train the float64 model: every step, each task's full gradient, combined per
    parameter (``param``) or with one weight pair for the whole model (``global``) or
    averaged (``mean``), then ``p -= lr * d``. Returns the final flat parameters.

    With ``accumulate`` = A, step j averages the gradients of micro-batches ``A j .. A j + A-1``
    (each micro-batch loss scaled by 1/A, as the engines do) and combines the accumulated
    task gradients once; with ``combine_each_micro_batch`` it combines every micro-batch's
    scaled task gradients and sums the combinations (ZeRO-2 reduces every micro-batch)."""
    model = make_model(torch.float64)
    params = list(model.parameters())
    for j in range(steps):
        micro = []
        for k in range(accumulate * j, accumulate * (j + 1)):
            task_grads = []
            for t in range(2):
                x, y = task_batch(t, k, torch.float64)
                grads = torch.autograd.grad(loss_fn(model(x), y) / accumulate, params)
                task_grads.append([g.reshape(-1) for g in grads])
            micro.append(task_grads)
        with torch.no_grad():
            if combine_each_micro_batch:
                parts = [_combine(tg, granularity, method) for tg in micro]
                combined = [sum(ds) for ds in zip(*parts)]
            else:
                summed = [[sum(gs) for gs in zip(*(tg[t] for tg in micro))] for t in range(2)]
                combined = _combine(summed, granularity, method)
            for p, d in zip(params, combined):
                p.sub_(lr * d.view_as(p))
    return flat_params(model)
