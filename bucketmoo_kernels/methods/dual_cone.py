"""UPGrad and DualProj (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective
Optimization"): projections onto the dual cone of the task gradients, in Gram terms.

The projection of J^T u onto the dual cone {d : J d >= 0} of the rows of J is J^T v, where v
solves (Proposition 1 of the paper)

    min_v  v^T G v   subject to  v >= u.

With v = u + x this is a non-negative QP in x (A = G, b = G u), solved by
:func:`.batched_solvers.nonneg_qp`.

* ``dualproj``: u = the preference vector (default 1/T each); weights v.
* ``upgrad``: one projection per task, u = pref_i e_i; weights sum_i v_i.

As in torchjd's default projector, G is first divided by its trace (skipped when the trace is
at most ``norm_eps``) and ``reg_eps`` I is added, which makes the QP strictly convex. torchjd
uses an absolute ``norm_eps = 1e-4``; ours defaults to 0 so that the result does not depend on
the gradients' scale (bucket Grams are often far below 1e-4). Pass ``norm_eps=1e-4`` to get
torchjd's behaviour for tiny Grams as well.

The ``cpu`` and ``cuda`` backends run both natively (``solver::upgrad_solve`` /
``dualproj_solve`` in ``csrc/common/bucketmoo_solvers.h``) for T <= 16 with the default
preference and ``reg_eps > 0``; a ``pref_vector``, ``reg_eps = 0`` or more tasks run the
functions below on every backend.
"""

from __future__ import annotations

import torch

from .batched_solvers import nonneg_qp
from .task_vectors import task_vector
from .options import AtLeast, Option
from .registry import register

__all__ = ["dual_cone_weights", "upgrad_weights", "dualproj_weights", "regularised_gram"]


def regularised_gram(gram: torch.Tensor, norm_eps: float, reg_eps: float) -> torch.Tensor:
    """G / trace(G) + reg_eps I (zero G when trace(G) <= norm_eps), as torchjd's projector."""
    if norm_eps < 0 or reg_eps < 0:
        raise ValueError(f"norm_eps and reg_eps must be >= 0; got {norm_eps}, {reg_eps}")
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    keep = trace > norm_eps
    normed = torch.where(keep[:, None, None], gram / torch.where(keep, trace, 1.0)[:, None, None],
                         torch.zeros_like(gram))
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return normed + reg_eps * eye


def dual_cone_weights(gram: torch.Tensor, u: torch.Tensor, *, norm_eps: float, reg_eps: float,
                      max_iter: int) -> torch.Tensor:
    """v = argmin v^T G v s.t. v >= u, for ``gram [S, T, T]`` and ``u [S, K, T]`` -> ``[S, K, T]``."""
    num_seg, num_k, num_tasks = u.shape
    a = regularised_gram(gram, norm_eps, reg_eps)
    a_k = a[:, None].expand(num_seg, num_k, num_tasks, num_tasks).reshape(-1, num_tasks, num_tasks)
    u_flat = u.reshape(-1, num_tasks)
    b = torch.einsum("btu,bu->bt", a_k, u_flat)
    x = nonneg_qp(a_k, b, max_iter=max_iter)
    return (u_flat + x).reshape(num_seg, num_k, num_tasks)


def upgrad_weights(gram: torch.Tensor, *, pref_vector=None, norm_eps: float = 0.0,
                   reg_eps: float = 1e-4, max_iter: int = 200) -> torch.Tensor:
    """UPGrad weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (torchjd's scale: sum of projections)."""
    pref = task_vector(pref_vector, "pref_vector", "upgrad", gram, 1.0 / gram.shape[-1])
    u = torch.diag_embed(pref)  # [S, T (projection i), T]: row i is pref_i e_i
    return dual_cone_weights(gram, u, norm_eps=norm_eps, reg_eps=reg_eps, max_iter=max_iter).sum(1)


def dualproj_weights(gram: torch.Tensor, *, pref_vector=None, norm_eps: float = 0.0,
                     reg_eps: float = 1e-4, max_iter: int = 200) -> torch.Tensor:
    """DualProj weights: ``[S, T, T]`` f64 -> ``[S, T]`` f64 (projection of the preferred direction)."""
    pref = task_vector(pref_vector, "pref_vector", "dualproj", gram, 1.0 / gram.shape[-1])
    return dual_cone_weights(gram, pref[:, None, :], norm_eps=norm_eps, reg_eps=reg_eps,
                             max_iter=max_iter)[:, 0]


#: The most tasks of the native solver (``solver::kMaxDualConeTasks``: its packed Cholesky
#: factor and T-vectors are fixed-size arrays in one thread).
MAX_NATIVE_DUAL_CONE_TASKS = 16


def _dual_cone_native_args(num_tasks: int, options) -> dict | None:
    """The native codes (``solver::upgrad_solve`` / ``dualproj_solve``): the default preference
    only, ``reg_eps > 0`` (a strictly convex QP) and ``max_iter >= 0``; else None and the torch
    function runs (and raises its own errors). The schema's float slots carry the options:
    ``tol`` is ``norm_eps``, ``c`` is ``reg_eps``. ``max_iter`` bounds the projected Gauss-Seidel
    sweeps there (here: FISTA iterations); both then polish to the same exact minimiser."""
    if options["pref_vector"] is not None:
        return None
    norm_eps, reg_eps, max_iter = float(options["norm_eps"]), float(options["reg_eps"]), int(options["max_iter"])
    if not reg_eps > 0:  # (the ranges are checked when the options are resolved)
        return None
    return {"max_iter": max_iter, "tol": norm_eps, "c": reg_eps}


_OPTIONS = {"pref_vector": Option(None, per_task=True), "norm_eps": Option(0.0, AtLeast(0.0)),
            "reg_eps": Option(1e-4, AtLeast(0.0)), "max_iter": Option(200, AtLeast(0))}
register("upgrad", upgrad_weights, options=_OPTIONS, native_code=4, native_max_tasks=MAX_NATIVE_DUAL_CONE_TASKS,
         native_args=_dual_cone_native_args)
register("dualproj", dualproj_weights, options=_OPTIONS, native_code=5,
         native_max_tasks=MAX_NATIVE_DUAL_CONE_TASKS, native_args=_dual_cone_native_args)
