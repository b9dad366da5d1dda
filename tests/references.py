"""Independent float64 oracles of the weight step, written for the tests.

Nothing here imports the code under test except :func:`pcgrad_orders`, the seeded task
order that *defines* PCGrad's randomness (a permutation per task; its own tests check it).
Every method works on explicit gradient vectors, as the papers state it, not on the Gram
matrix the library solves on, so a slip in the library's Gram-space algebra (normalisation,
weight rescaling, segment bookkeeping) shows up as a mismatch:

* ``mean``:   d = (1/T) sum_t g_t
* ``mgda``:   the min-norm point of the convex hull of the g_t, by enumerating the faces of
  the simplex (every subset's equality-constrained minimiser, the feasible one of least
  norm; Sener & Koltun 2018, eq. 3), T <= 8;
* ``pcgrad``: Yu et al. 2020, Algorithm 1, on the vectors, tracking each projected gradient's
  coefficients over the g_t;
* ``cagrad``: Liu et al. 2021, the dual solved with scipy's SLSQP from several starts, as in
  the authors' code;
* ``upgrad`` / ``dualproj``: Quinton & Rey 2024 in torchjd's scale, on the vectors: each
  preference u (DualProj: the preference vector; UPGrad: pref_i e_i for every i) is moved
  to v = argmin |B v|^2 s.t. v >= u, B = [J^T / sqrt(trace); sqrt(reg_eps) I] (so that
  B^T B = J J^T / trace + reg_eps I, torchjd's regularised Gram), by scipy's NNLS
  (Lawson-Hanson) on v - u; weights v, or sum_i v_i;
* normalisations (Sener & Koltun 2018, §3.3): every g_t is divided by n_t (``l2``: |g_t|,
  ``loss``: L_t, ``loss+``: L_t |g_t|; a zero scale counts as 1) before the method runs;
  the result is the same combination of the divided vectors; ``normalize_weights`` divides
  it by the sum of the weights on the raw g_t.

The other methods of the library (Nash-MTL, GradVac, ... and any method with the
``ema`` option) have no oracle here: :func:`combined_per_segment` hands them to the library's
``fused_bucket_moo`` (their float64 torch functions, themselves checked against torchjd 0.18
and scipy in ``tests/methods``), so the distributed tests of those methods check the hook's
plumbing (buckets, shards, state per bucket), not the method's algebra.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from bucketmoo_kernels.methods.pcgrad import pcgrad_orders

__all__ = ["UNIT_ROUNDOFF", "mgda_weights", "pcgrad_weights", "cagrad_weights", "dual_cone_weights",
           "method_weights",
           "normalization_scales", "combined", "combined_per_segment"]

#: Half an ulp at 1 of each storage dtype: the relative error of one rounding.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
                 torch.float64: 2.0 ** -53}


def _as_rows(rows) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.detach().to("cpu", torch.float64)
    return torch.stack([r.detach().reshape(-1).to("cpu", torch.float64) for r in rows])


def mgda_weights(vectors: torch.Tensor) -> torch.Tensor:
    """Weights of the min-norm point of conv{g_1..g_T} ([T, n] float64 -> [T]).

    Every non-empty subset S gives the minimiser of |sum_S w_t g_t| on the affine hull
    (sum w = 1), a least-squares KKT solve; among the subsets whose minimiser has w >= 0,
    the one of least norm wins (ties: the larger support, so equal gradients share equally).
    """
    num_tasks = vectors.shape[0]
    if num_tasks > 8:
        raise ValueError("the enumeration oracle is for T <= 8")
    m = (vectors @ vectors.T).numpy()
    scale = max(float(np.abs(np.diag(m)).max()), 1e-300)
    best, best_val, best_size = None, None, -1
    for size in range(1, num_tasks + 1):
        for subset in itertools.combinations(range(num_tasks), size):
            idx = list(subset)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = m[np.ix_(idx, idx)]
            kkt[:size, size] = kkt[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if (sol < -1e-12).any() or abs(sol.sum() - 1) > 1e-9:
                continue
            w = np.zeros(num_tasks)
            w[idx] = np.clip(sol, 0, None)
            w /= w.sum()
            val = float(w @ m @ w)
            if best is None or val < best_val - 1e-12 * scale or (val <= best_val + 1e-12 * scale and size > best_size):
                best, best_val, best_size = w, val, size
    return torch.from_numpy(best)


def pcgrad_weights(vectors: torch.Tensor, seed: int) -> torch.Tensor:
    """Yu et al. 2020, Algorithm 1: each g_i is projected off every original g_j it conflicts
    with (g_i . g_j < 0), in the order ``pcgrad_orders(T, seed)[i]``; zero g_j are skipped.
    Returns the coefficients of the mean of the projected gradients (paper scale)."""
    num_tasks = vectors.shape[0]
    orders = pcgrad_orders(num_tasks, seed)
    coefs = []
    for i in range(num_tasks):
        g, coef = vectors[i].clone(), torch.zeros(num_tasks, dtype=torch.float64)
        coef[i] = 1.0
        for j in orders[i].tolist():
            dot = float(g @ vectors[j])
            sq = float(vectors[j] @ vectors[j])
            if dot < 0 and sq > 0:
                g = g - dot / sq * vectors[j]
                coef[j] -= dot / sq
        coefs.append(coef)
    return torch.stack(coefs).mean(0)


def cagrad_weights(vectors: torch.Tensor, c: float = 0.4, rescale: int = 1) -> torch.Tensor:
    """Liu et al. 2021 as in the authors' code: maximise the worst improvement in a ball of
    radius c |g_0| around the average g_0 through its dual over the simplex (SLSQP, several
    starts); d = g_0 + radius / |G^T x| G^T x, divided by 1, 1 + c^2 or 1 + c (rescale 0/1/2)."""
    from scipy.optimize import minimize

    num_tasks = vectors.shape[0]
    grads = vectors.numpy()
    gg = grads @ grads.T
    mean = np.full(num_tasks, 1.0 / num_tasks)
    radius = c * np.sqrt(max(mean @ gg @ mean, 0.0))

    def objective(x):
        return x @ gg @ mean + radius * np.sqrt(max(x @ gg @ x, 0.0))

    best = None
    for x0 in [mean] + [np.eye(num_tasks)[i] * 0.8 + 0.2 / num_tasks for i in range(num_tasks)]:
        res = minimize(objective, x0, bounds=[(0, 1)] * num_tasks, method="SLSQP",
                       constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},),
                       options={"ftol": 1e-15, "maxiter": 1000})
        if best is None or objective(res.x) < objective(best):
            best = res.x
    gw_norm = np.sqrt(max(best @ gg @ best, 0.0))
    w = mean + (radius / gw_norm * best if gw_norm > 0 else 0.0)
    return torch.from_numpy(w / {0: 1.0, 1: 1 + c * c, 2: 1 + c}[rescale])


def dual_cone_weights(vectors: torch.Tensor, method: str, pref_vector=None, norm_eps: float = 0.0,
                      reg_eps: float = 1e-4, max_iter: int = 200) -> torch.Tensor:
    """UPGrad (``method="upgrad"``) or DualProj weights of the rows ``[T, n]`` (module docstring);
    ``max_iter`` belongs to the library's solver and is ignored here."""
    from scipy.optimize import nnls

    jac = vectors.numpy()
    num_tasks = jac.shape[0]
    pref = (np.full(num_tasks, 1.0 / num_tasks) if pref_vector is None
            else np.asarray(pref_vector, dtype=np.float64).reshape(num_tasks))
    trace = float((jac * jac).sum())
    scaled = jac.T / np.sqrt(trace) if trace > norm_eps else np.zeros_like(jac.T)
    b = np.vstack([scaled, np.sqrt(reg_eps) * np.eye(num_tasks)])
    prefs = [pref] if method == "dualproj" else [pref[i] * np.eye(num_tasks)[i] for i in range(num_tasks)]
    total = np.zeros(num_tasks)
    for u in prefs:
        x, _ = nnls(b, -b @ u, maxiter=50 * num_tasks)
        total += u + x
    return torch.from_numpy(total)


def method_weights(vectors: torch.Tensor, method: str, **options) -> torch.Tensor:
    """The method's weights on explicit vectors ``[T, n]`` float64 (paper scale)."""
    if method == "mean":
        return torch.full((vectors.shape[0],), 1.0 / vectors.shape[0], dtype=torch.float64)
    if method == "mgda":
        return mgda_weights(vectors)
    if method == "pcgrad":
        return pcgrad_weights(vectors, options.get("seed", 0))
    if method == "cagrad":
        return cagrad_weights(vectors, options.get("c", 0.4), options.get("rescale", 1))
    if method in ("upgrad", "dualproj"):
        return dual_cone_weights(vectors, method, **options)
    raise ValueError(f"no oracle for method {method!r}")


def normalization_scales(vectors: torch.Tensor, normalization: str, losses=None) -> torch.Tensor:
    """n_t of every task from the vectors and the losses (a zero scale counts as 1)."""
    ones = torch.ones(vectors.shape[0], dtype=torch.float64)
    norms = vectors.norm(dim=1)
    loss = None if losses is None else torch.as_tensor(losses, dtype=torch.float64).reshape(-1)
    scales = {"none": ones, "l2": norms, "loss": loss, "loss+": None if loss is None else loss * norms}[normalization]
    return torch.where(scales > 0, scales, ones)


def combined(rows, method: str = "mgda", *, normalization: str = "none", losses=None,
             normalize_weights: bool = True, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined gradient (float64 ``[n]``) and the weights on the raw rows (``[T]``)."""
    vectors = _as_rows(rows)
    scales = normalization_scales(vectors, normalization, losses)
    weights = method_weights(vectors / scales[:, None], method, **options) / scales
    if normalize_weights and weights.sum() > 0:
        weights = weights / weights.sum()
    return weights @ vectors, weights


#: Methods with an oracle of their own in this module.
ORACLE_METHODS = ("mean", "mgda", "pcgrad", "cagrad", "upgrad", "dualproj")


def has_oracle(method: str, options: dict) -> bool:
    """Whether :func:`combined` has an independent oracle for ``method`` with ``options``."""
    return method in ORACLE_METHODS and not options.get("ema") and options.get("solver") != "iterative"


def combined_per_segment(rows, lengths: Sequence[int] | None = None, method: str = "mgda",
                         **kwargs) -> torch.Tensor:
    """:func:`combined` on every segment of ``lengths`` (None: one segment), concatenated.

    Methods without an oracle here go to the library's ``fused_bucket_moo`` (module docstring),
    on float32 rows, looked up at call time so a test may wrap it (e.g. to pass a MethodState).
    """
    vectors = _as_rows(rows)
    if lengths is None:
        lengths = [vectors.shape[1]]
    assert sum(lengths) == vectors.shape[1], (sum(lengths), vectors.shape)
    if not has_oracle(method, kwargs):
        import bucketmoo_kernels as bm

        segments = bm.Segments.from_lengths(list(lengths))
        return bm.fused_bucket_moo(list(vectors.float()), method=method, segments=segments, **kwargs).double()
    parts = []
    for block in torch.split(vectors, list(lengths), dim=1):
        if block.shape[1] == 0:
            continue
        parts.append(combined(block, method, **kwargs)[0])
    return torch.cat(parts) if parts else vectors[0, :0]
