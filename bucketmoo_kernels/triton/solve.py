"""Triton ``solve``: per-segment weights (MGDA, PCGrad, CAGrad) on the device, float64, one
launch, no host sync.

Follows :mod:`bucketmoo_kernels.methods.mgda` and the numeric contract of
:mod:`bucketmoo_kernels.methods.simplex` (ridge, TIE_REL, FEASIBLE_TOL, pick rule):

* ``_mgda_closed_form_kernel`` (T = 2): a block of segments per program.
* ``_mgda_exact_kernel`` (3 <= T <= 8): one program per segment; the 2^T - 1 subsets are the
  leading axis of a ``[KP, TP, TP]`` tensor (subset k is bitmask k + 1). Each subset's system
  ``M_AA x = 1`` (rows/cols outside A replaced by identity rows with a zero right-hand side,
  as in the torch solver) is solved by Gauss-Jordan elimination without pivoting, which is
  safe because the ridged M_AA is positive definite. Then w = x / sum(x), the objective
  ``w^T M w``, and the pick rule: least objective among feasible candidates, ties (within
  TIE_REL * max diag) go to the largest support, then the lowest bitmask; clamp, renormalise.
* ``_pcgrad_kernel``: PCGrad (Yu et al. 2020) on projection coefficients, as
  :mod:`bucketmoo_kernels.methods.pcgrad`, a block of segments per program.
* ``_cagrad_kernel``: CAGrad (Liu et al. 2021) by the same face enumeration as
  :mod:`bucketmoo_kernels.methods.cagrad` (two right-hand sides per subset), T <= 8.
* ``_mgda_pgd_kernel`` (any T, ``solver="pgd"``): the accelerated projected gradient of
  ``mgda_pgd`` (FISTA with adaptive restart, step 1/L with L the largest absolute row sum),
  a fixed ``max_iter`` iterations (``tol`` is not used: checking it needs a host sync), the
  simplex projection in a sort-free closed form; then ``mgda_polish`` (torch ops on the device)
  takes the iterate to the exact optimum, as the torch and native PGD solvers do.

The float constants come in through a small float64 tensor: Triton types Python float
arguments and literals as float32, which would flush RIDGE_ABS = 1e-200 to zero.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..methods import simplex
from ..methods.mgda import mgda_polish_pgd
from ..methods.pcgrad import pcgrad_orders
from .tiles import next_pow2, on_device, to_device_table

__all__ = ["mgda_closed_form_triton", "mgda_exact_triton", "mgda_pgd_triton", "mgda_triton",
           "pcgrad_triton", "cagrad_triton"]

# Small device tensors cached per device: contract constants and CAGrad parameters per
# (c, rescale) (never freed, so reading them from any stream is safe); PCGrad orders per
# (T, seed) in the bounded cache of _orders_flat (evicted entries are freed: every use
# registers the current stream with record_stream). Each is copied once from pageable host
# memory (a one-time host sync) and refused during CUDA graph capture (warm up first).
_constants: dict[str, torch.Tensor] = {}
_cagrad_params: dict[tuple[float, int, str], torch.Tensor] = {}


def _contract_constants(device: torch.device) -> torch.Tensor:
    """float64 ``[RIDGE_REL, RIDGE_ABS, TIE_REL, FEASIBLE_TOL]`` on ``device`` (cached)."""
    key = str(device)
    cached = _constants.get(key)
    if cached is None:
        host = torch.tensor([simplex.RIDGE_REL, simplex.RIDGE_ABS, simplex.TIE_REL, simplex.FEASIBLE_TOL],
                            dtype=torch.float64)
        cached = to_device_table(host, torch.device(device), "solver constants").tensor
        _constants[key] = cached
    return cached


@triton.jit
def _mgda_closed_form_kernel(g_ptr, c_ptr, w_ptr, S, BLOCK_S: tl.constexpr):
    # int64: offs * 4 overflows int32 past 2^29 segments
    offs = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = offs < S
    ridge_rel = tl.load(c_ptr + 0)
    ridge_abs = tl.load(c_ptr + 1)
    m11 = tl.load(g_ptr + offs * 4 + 0, mask=ok, other=0.0)
    m12 = tl.load(g_ptr + offs * 4 + 1, mask=ok, other=0.0)
    m22 = tl.load(g_ptr + offs * 4 + 3, mask=ok, other=0.0)
    ridge = ridge_rel * ((m11 + m22) / 2) + ridge_abs
    m11 = m11 + ridge
    m22 = m22 + ridge
    denom = m11 + m22 - 2 * m12
    safe = tl.where(denom > 0, denom, 1.0)
    gamma = tl.where(denom > 0, (m22 - m12) / safe, 0.5)
    gamma = tl.minimum(tl.maximum(gamma, 0.0), 1.0)
    tl.store(w_ptr + offs * 2 + 0, gamma, mask=ok)
    tl.store(w_ptr + offs * 2 + 1, 1.0 - gamma, mask=ok)


@triton.jit
def _load_ridged(g_ptr, c_ptr, s, T: tl.constexpr, TP: tl.constexpr):
    """Segment s's Gram padded to [TP, TP] (zeros outside), its ridged copy, max(diag) >= 0."""
    i = tl.arange(0, TP)
    real = (i[:, None] < T) & (i[None, :] < T)
    m = tl.load(g_ptr + s * (T * T) + i[:, None] * T + i[None, :], mask=real, other=0.0)
    on_diag = (i[:, None] == i[None, :]) & real
    diag = tl.sum(tl.where(on_diag, m, 0.0), axis=1)
    ridge = tl.load(c_ptr + 0) * (tl.sum(diag) / T) + tl.load(c_ptr + 1)
    mr = tl.where(on_diag, m + ridge, m)
    scale = tl.maximum(tl.max(tl.where(i < T, diag, 0.0)), 0.0)
    return mr, scale


@triton.jit
def _subset_systems(mr, T: tl.constexpr, TP: tl.constexpr, KP: tl.constexpr):
    """For every subset A (index k = bitmask - 1), the system of the torch solvers: M_AA on the
    subset, identity rows/cols outside it. Returns the matrices [KP, TP, TP] and the masks."""
    i = tl.arange(0, TP)
    k = tl.arange(0, KP)
    inset = (((k[:, None] + 1) >> i[None, :]) & 1) != 0
    inset = inset & (i[None, :] < T)  # [KP, TP]
    pair = inset[:, :, None] & inset[:, None, :]  # [KP, TP, TP]
    eye = (i[:, None] == i[None, :])[None, :, :]
    a = tl.where(pair, mr[None, :, :], tl.where(eye, 1.0, 0.0).to(tl.float64))
    return a, inset


@triton.jit
def _gauss_jordan(a, b, c, T: tl.constexpr, TP: tl.constexpr):
    """Solve a[k] x = b[k] and a[k] y = c[k] for all k (a [KP, TP, TP], b, c [KP, TP]) by
    Gauss-Jordan elimination without pivoting (a is positive definite on the subset and the
    identity elsewhere). Returns x, y [KP, TP]."""
    i = tl.arange(0, TP)
    row_i = i[None, :, None]
    col_j = i[None, None, :]
    for p in range(T):
        row_p = tl.sum(tl.where(row_i == p, a, 0.0), axis=1)  # [KP, TP] = a[k, p, :]
        col_p = tl.sum(tl.where(col_j == p, a, 0.0), axis=2)  # [KP, TP] = a[k, :, p]
        piv = tl.sum(tl.where(i[None, :] == p, row_p, 0.0), axis=1)  # [KP]
        b_p = tl.sum(tl.where(i[None, :] == p, b, 0.0), axis=1)  # [KP]
        c_p = tl.sum(tl.where(i[None, :] == p, c, 0.0), axis=1)
        factor = tl.where(i[None, :] == p, 0.0, col_p / piv[:, None])  # [KP, TP]
        a = a - factor[:, :, None] * row_p[:, None, :]
        b = b - factor * b_p[:, None]
        c = c - factor * c_p[:, None]
    d = tl.sum(tl.where((i[:, None] == i[None, :])[None, :, :], a, 0.0), axis=2)  # [KP, TP]
    real = i[None, :] < T
    return tl.where(real, b / d, 0.0), tl.where(real, c / d, 0.0)


@triton.jit
def _pick_candidate(w, obj, usable, inset, scale, tie_rel, feas_tol, T: tl.constexpr, TP: tl.constexpr,
                    KP: tl.constexpr):
    """The pick rule of ``simplex.pick_candidate`` over candidates w [KP, TP] (``usable``
    marks candidates that exist: not padding, not NaN in torch). Returns [TP], clamped and
    renormalised."""
    i = tl.arange(0, TP)
    k = tl.arange(0, KP)
    num_k = (1 << T) - 1
    valid = k < num_k
    elem_ok = ((tl.abs(w) < float("inf")) & (w >= -feas_tol)) | (i[None, :] >= T)
    feasible = tl.min(elem_ok.to(tl.int32), axis=1) == 1
    usable = usable & feasible & (tl.abs(obj) < float("inf")) & valid
    obj = tl.where(usable, obj, float("inf"))
    best = tl.min(obj)
    ties = (obj <= best + tie_rel * scale) & valid
    size = tl.sum(inset.to(tl.int32), axis=1)
    score = tl.where(ties, size * num_k - k, -1)
    top = tl.max(score)
    chosen = tl.sum(tl.where((score == top)[:, None], w, 0.0), axis=0)  # [TP]
    chosen = tl.maximum(chosen, 0.0)
    return chosen / tl.sum(chosen)


@triton.jit
def _mgda_exact_kernel(g_ptr, c_ptr, w_ptr, T: tl.constexpr, TP: tl.constexpr, KP: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    mr, scale = _load_ridged(g_ptr, c_ptr, s, T, TP)
    a, inset = _subset_systems(mr, T, TP, KP)
    ones = tl.where(inset, 1.0, 0.0).to(tl.float64)  # [KP, TP]
    x, _ = _gauss_jordan(a, ones, ones, T, TP)
    # w = x / sum(x); a zero sum (the padding subset) is infeasible, as the NaN it gives in torch.
    total = tl.sum(x, axis=1)
    w = x / tl.where(total != 0, total, 1.0)[:, None]  # [KP, TP]
    mw = tl.sum(mr[None, :, :] * w[:, None, :], axis=2)
    obj = tl.sum(w * mw, axis=1)  # [KP]
    chosen = _pick_candidate(w, obj, total != 0, inset, scale, tl.load(c_ptr + 2), tl.load(c_ptr + 3),
                             T, TP, KP)
    i = tl.arange(0, TP)
    tl.store(w_ptr + s * T + i, chosen, mask=i < T)


@triton.jit
def _cagrad_kernel(g_ptr, c_ptr, p_ptr, w_ptr, T: tl.constexpr, TP: tl.constexpr, KP: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    mr, scale = _load_ridged(g_ptr, c_ptr, s, T, TP)
    i = tl.arange(0, TP)
    real = i < T
    m = tl.load(g_ptr + s * (T * T) + i[:, None] * T + i[None, :], mask=real[:, None] & real[None, :],
                other=0.0)
    c = tl.load(p_ptr + 0)
    divisor = tl.load(p_ptr + 1)
    tiny_rel = tl.load(p_ptr + 2)
    mean_w = tl.where(real, tl.full([TP], 1.0, tl.float64) / T, 0.0)
    av = tl.sum(mr * mean_w[None, :], axis=1)  # [TP] a = M g0 coefficients
    radius = c * tl.sqrt(tl.maximum(tl.sum(av * mean_w), 0.0))

    a, inset = _subset_systems(mr, T, TP, KP)
    ones = tl.where(inset, 1.0, 0.0).to(tl.float64)
    x, y = _gauss_jordan(a, ones, ones * av[None, :], T, TP)
    sx = tl.sum(x, axis=1)
    sy = tl.sum(y, axis=1)
    ay = tl.sum(av[None, :] * y, axis=1)
    disc = sy * sy - sx * (ay - radius * radius)
    root = tl.sqrt(tl.maximum(disc, 0.0))
    ok = (disc > 0) & (sx != 0)
    lam = (sy + root) / tl.where(ok, sx, 1.0)
    w = (lam[:, None] * x - y) / tl.where(ok, root, 1.0)[:, None]
    single = tl.sum(inset.to(tl.int32), axis=1) == 1
    w = tl.where(single[:, None], ones, tl.where(ok[:, None], w, 0.0))
    quad = tl.maximum(tl.sum(w * tl.sum(mr[None, :, :] * w[:, None, :], axis=2), axis=1), 0.0)
    obj = tl.sum(av[None, :] * w, axis=1) + radius * tl.sqrt(quad)
    chosen = _pick_candidate(w, obj, ok | single, inset, scale, tl.load(c_ptr + 2), tl.load(c_ptr + 3),
                             T, TP, KP)

    gw_norm = tl.sqrt(tl.maximum(tl.sum(chosen * tl.sum(m * chosen[None, :], axis=1)), 0.0))
    tiny = tiny_rel * tl.sqrt(scale)
    big = gw_norm > tiny
    lam_out = tl.where(big, radius / tl.where(big, gw_norm, 1.0), 0.0)
    weights = (mean_w + lam_out * chosen) / divisor
    tl.store(w_ptr + s * T + i, weights, mask=real)


@triton.jit
def _project_simplex(v, i, T: tl.constexpr):
    """Euclidean projection of v [1, TP] onto the simplex over its first T entries.

    Sort-free form of the Held-Wolfe-Crowder / Duchi et al. rule: with u the entries sorted
    in decreasing order, theta = max_j (u_1 + ... + u_j - 1) / j. The prefix that ends at
    entry j is the set of entries ranked before it (larger, or equal with a lower index).
    """
    real = i < T
    flat = tl.sum(v, axis=0)  # [TP] (v has one row)
    vj = flat[:, None]  # [TP, 1]  candidate last entry j
    vi = flat[None, :]  # [1, TP]  entry i
    before = ((vi > vj) | ((vi == vj) & (i[None, :] <= i[:, None]))) & real[None, :]
    count = tl.sum(before.to(tl.float64), axis=1)  # [TP]
    prefix = tl.sum(tl.where(before, vi, 0.0), axis=1)
    cand = tl.where(real, (prefix - 1) / tl.maximum(count, 1.0), -float("inf"))
    theta = tl.max(cand)
    return tl.where(real[None, :], tl.maximum(v - theta, 0.0), 0.0)


@triton.jit
def _mgda_pgd_kernel(g_ptr, c_ptr, w_ptr, max_iter, T: tl.constexpr, TP: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    mr, scale = _load_ridged(g_ptr, c_ptr, s, T, TP)
    i = tl.arange(0, TP)
    real = (i < T)[None, :]
    lipschitz = tl.max(tl.sum(tl.abs(mr), axis=1))
    half_step = 0.5 / tl.maximum(lipschitz, 2.2250738585072014e-308)
    w = tl.where(real, tl.full([1, TP], 1.0, tl.float64) / T, 0.0)  # [1, TP]
    y = w
    t_k = tl.full([1, 1], 1.0, tl.float64)
    for _ in range(max_iter):
        grad = 2 * tl.sum(mr[None, :, :] * y[:, None, :], axis=2)  # [1, TP]
        w_next = _project_simplex(y - half_step * grad, i, T)
        t_next = (1 + tl.sqrt(1 + 4 * t_k * t_k)) / 2
        # Adaptive restart (O'Donoghue & Candes 2015): drop momentum when it points uphill.
        uphill = tl.sum(grad * (w_next - w), axis=1)[:, None] > 0  # [1, 1]
        momentum = tl.where(uphill, 0.0, (t_k - 1) / t_next)
        t_next = tl.where(uphill, 1.0, t_next)
        y = w_next + momentum * (w_next - w)
        w = w_next
        t_k = t_next
    tl.store(w_ptr + s * T + i[None, :], w, mask=real)


@triton.jit
def _pcgrad_kernel(g_ptr, order_ptr, w_ptr, S, T: tl.constexpr, TP: tl.constexpr, BLOCK_S: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    seg_ok = offs < S
    i = tl.arange(0, TP)
    real = i < T
    mask3 = seg_ok[:, None, None] & real[None, :, None] & real[None, None, :]
    m = tl.load(g_ptr + offs[:, None, None].to(tl.int64) * (T * T) + i[None, :, None] * T + i[None, None, :],
                mask=mask3, other=0.0)  # [BS, TP, TP]
    total = tl.zeros([BLOCK_S, TP], dtype=tl.float64)
    for task in range(T):
        coef = tl.where(i[None, :] == task, 1.0, 0.0).to(tl.float64) + tl.zeros([BLOCK_S, TP], tl.float64)
        for step in range(T - 1):
            j = tl.load(order_ptr + task * (T - 1) + step)
            col = tl.sum(tl.where(i[None, None, :] == j, m, 0.0), axis=2)  # [BS, TP] = M[:, j]
            dot = tl.sum(coef * col, axis=1)  # g_task^PC . g_j
            sq = tl.sum(tl.where(i[None, :] == j, col, 0.0), axis=1)  # |g_j|^2
            conflict = (dot < 0) & (sq > 0)
            scale = tl.where(conflict, dot / tl.where(conflict, sq, 1.0), 0.0)
            coef = coef - tl.where(i[None, :] == j, scale[:, None], 0.0)
        total += coef
    out = total / T
    tl.store(w_ptr + offs[:, None].to(tl.int64) * T + i[None, :], out, mask=seg_ok[:, None] & real[None, :])


def mgda_closed_form_triton(gram: torch.Tensor) -> torch.Tensor:
    """MGDA closed form, T = 2: ``gram [S, 2, 2]`` float64 -> ``[S, 2]`` float64."""
    gram = gram.to(torch.float64).contiguous()
    num_seg = gram.shape[0]
    out = torch.empty(num_seg, 2, dtype=torch.float64, device=gram.device)
    if num_seg == 0:
        return out
    block = 256
    with on_device(gram.device):
        _mgda_closed_form_kernel[(triton.cdiv(num_seg, block),)](
            gram, _contract_constants(gram.device), out, num_seg, BLOCK_S=block)
    return out


def mgda_exact_triton(gram: torch.Tensor) -> torch.Tensor:
    """MGDA by active-set enumeration, 2 <= T <= 8: ``[S, T, T]`` float64 -> ``[S, T]`` float64."""
    gram = gram.to(torch.float64).contiguous()
    num_seg, num_tasks, _ = gram.shape
    if not 2 <= num_tasks <= simplex.MAX_EXACT_TASKS:
        raise ValueError(f"the exact Triton MGDA solver needs 2 <= T <= {simplex.MAX_EXACT_TASKS}; "
                         f"got T = {num_tasks}")
    out = torch.empty(num_seg, num_tasks, dtype=torch.float64, device=gram.device)
    if num_seg == 0:
        return out
    tp = next_pow2(num_tasks)
    kp = 1 << num_tasks
    warps = 4 if kp * tp * tp <= 4096 else 8
    with on_device(gram.device):
        _mgda_exact_kernel[(num_seg,)](gram, _contract_constants(gram.device), out,
                                       T=num_tasks, TP=tp, KP=kp, num_warps=warps)
    return out


def mgda_pgd_triton(gram: torch.Tensor, max_iter: int = 500) -> torch.Tensor:
    """MGDA by accelerated projected gradient, any T >= 2, exactly ``max_iter`` iterations,
    then the active-set polish of :func:`~bucketmoo_kernels.methods.mgda.mgda_polish` (batched
    torch ops on the same device, no host sync), as the torch and native solvers end:
    ``[S, T, T]`` float64 -> ``[S, T]`` float64."""
    gram = gram.to(torch.float64).contiguous()
    num_seg, num_tasks, _ = gram.shape
    out = torch.empty(num_seg, num_tasks, dtype=torch.float64, device=gram.device)
    if num_seg == 0:
        return out
    tp = max(2, next_pow2(num_tasks))
    with on_device(gram.device):
        _mgda_pgd_kernel[(num_seg,)](gram, _contract_constants(gram.device), out, int(max_iter),
                                     T=num_tasks, TP=tp, num_warps=1 if tp <= 8 else 4 if tp <= 32 else 8)
    return mgda_polish_pgd(gram, out)


def mgda_triton(gram: torch.Tensor, solver: str, max_iter: int = 500) -> torch.Tensor:
    """MGDA with the kernel of ``solver`` (``closed_form``, ``exact`` or ``pgd``; the
    ``max_iter`` of pgd): ``[S, T, T]`` float64 -> ``[S, T]`` float64."""
    if solver == "closed_form":
        if gram.shape[-1] != 2:
            raise ValueError(f"the closed-form MGDA solver needs T = 2; got T = {gram.shape[-1]}")
        return mgda_closed_form_triton(gram)
    if solver == "exact":
        return mgda_exact_triton(gram)
    if solver == "pgd":
        return mgda_pgd_triton(gram, max_iter=int(max_iter))
    raise ValueError(f"solver must be 'closed_form', 'exact' or 'pgd'; got {solver!r}")


@functools.lru_cache(maxsize=256)
def _orders_flat(num_tasks: int, seed: int, device: str) -> torch.Tensor:
    """The kernel's layout of PCGrad's orders: flat int32 with one pad element (never empty),
    built on the host and copied once (complete when this returns)."""
    orders = pcgrad_orders(num_tasks, seed).to(torch.int32).reshape(-1)
    host = torch.cat([orders, orders.new_zeros(1)])
    return to_device_table(host, torch.device(device), "PCGrad orders").tensor


def pcgrad_triton(gram: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """PCGrad weights (mean of the projected gradients' coefficients, the torch function's
    scale): ``[S, T, T]`` float64 -> ``[S, T]`` float64. The task orders come from
    :func:`~bucketmoo_kernels.methods.pcgrad.pcgrad_orders` (host, seeded), cached on the device."""
    gram = gram.to(torch.float64).contiguous()
    num_seg, num_tasks, _ = gram.shape
    out = torch.empty(num_seg, num_tasks, dtype=torch.float64, device=gram.device)
    if num_seg == 0:
        return out
    orders = _orders_flat(num_tasks, int(seed), str(gram.device))
    if orders.is_cuda:  # an evicted entry must outlive kernels queued on other streams
        orders.record_stream(torch.cuda.current_stream(orders.device))
    tp = max(2, next_pow2(num_tasks))
    block = max(1, 2048 // (tp * tp))
    with on_device(gram.device):
        _pcgrad_kernel[(triton.cdiv(num_seg, block),)](gram, orders, out, num_seg, T=num_tasks, TP=tp,
                                                         BLOCK_S=block, num_warps=4)
    return out


def cagrad_triton(gram: torch.Tensor, c: float = 0.4, rescale: int = 1) -> torch.Tensor:
    """CAGrad weights in the paper's scale, 2 <= T <= 8, exact face enumeration as
    :mod:`bucketmoo_kernels.methods.cagrad`: ``[S, T, T]`` float64 -> ``[S, T]`` float64."""
    gram = gram.to(torch.float64).contiguous()
    num_seg, num_tasks, _ = gram.shape
    if not 2 <= num_tasks <= simplex.MAX_EXACT_TASKS:
        raise ValueError(f"the Triton CAGrad solver needs 2 <= T <= {simplex.MAX_EXACT_TASKS}; "
                         f"got T = {num_tasks}")
    if c < 0 or rescale not in (0, 1, 2):
        raise ValueError(f"cagrad needs c >= 0 and rescale in (0, 1, 2); got c={c}, rescale={rescale}")
    out = torch.empty(num_seg, num_tasks, dtype=torch.float64, device=gram.device)
    if num_seg == 0:
        return out
    key = (float(c), int(rescale), str(gram.device))
    params = _cagrad_params.get(key)
    if params is None:
        divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
        params = to_device_table(torch.tensor([c, divisor, 1e-12], dtype=torch.float64), gram.device,
                                 "CAGrad parameters").tensor
        _cagrad_params[key] = params
    tp = next_pow2(num_tasks)
    kp = 1 << num_tasks
    warps = 4 if kp * tp * tp <= 4096 else 8
    with on_device(gram.device):
        _cagrad_kernel[(num_seg,)](gram, _contract_constants(gram.device), params, out,
                                   T=num_tasks, TP=tp, KP=kp, num_warps=warps)
    return out
