"""The public API: ``gram``, ``solve``, ``combine`` and ``fused_bucket_moo``.

Shapes (T tasks, N elements, S segments):

* ``grads``    ``[T, N]`` tensor or T 1-D tensors of length N; fp32, bf16 or fp16
* ``segments`` None (one segment), an int chunk length, or ``S + 1`` int64 offsets
* ``gram``     ``[S, T, T]`` float32
* ``weights``  ``[S, T]`` float32
* ``out``      ``[N]`` in the grads' dtype; may be the storage of one of the gradients

Results are never attached to the inputs' autograd graph, on every backend and for every
method (the functions run under ``torch.no_grad()``): they are gradient updates, not part of
a model to differentiate through.

The weight step (method, options, normalisation, ``normalize_weights``) becomes one
:class:`~bucketmoo_kernels.weight_step.WeightStep`, built here from the keyword arguments or
passed prebuilt as ``weight_step=`` (the DDP hook and the FSDP path build theirs once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import diagnostics
from .dispatch import get_backend
from .methods.elementwise import combine_elementwise
from .methods.registry import split_common_options
from .inputs import (Segments, as_segments, as_task_grads, check_gram, check_out,
                     check_weights)
from .weight_step import WeightStep, as_weight_step, compute_weights

__all__ = ["MOOInfo", "WeightStep", "gram", "solve", "combine", "fused_bucket_moo"]


@dataclass(frozen=True)
class MOOInfo:
    """What ``fused_bucket_moo(..., return_info=True)`` computed besides the gradient.

    Attributes:
        gram: ``[S, T, T]`` float32 per-segment Gram matrices.
        weights: ``[S, T]`` float32 per-segment weights (sum to 1 unless
            ``normalize_weights=False``).
        segments: the segment layout used.
        method: method name.
        backend: name of the backend that ran.
    """

    gram: torch.Tensor
    weights: torch.Tensor
    segments: Segments
    method: str
    backend: str

    def cosine(self) -> torch.Tensor:
        """``[S, T, T]`` task cosine similarities."""
        return diagnostics.task_cosine(self.gram)

    def combined_norm(self) -> torch.Tensor:
        """``[S]`` norm of the combined gradient."""
        return diagnostics.combined_sqnorm(self.gram, self.weights).clamp_min(0).sqrt()

    def mean_norm(self) -> torch.Tensor:
        """``[S]`` norm of the plain average gradient."""
        return diagnostics.mean_sqnorm(self.gram).clamp_min(0).sqrt()


@torch.no_grad()
def gram(grads, segments=None, *, backend: str = "auto") -> torch.Tensor:
    """Per-segment Gram matrices of the task gradients.

    Args:
        grads: ``[T, N]`` tensor or T 1-D tensors (fp32 / bf16 / fp16).
        segments: None, chunk length, or ``S + 1`` int64 offsets.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
    Returns:
        ``[S, T, T]`` float32, accumulated in at least float32.
    """
    task_grads = as_task_grads(grads)
    segs = as_segments(segments, task_grads.numel)
    return get_backend(backend, task_grads.device).gram(task_grads, segs)


@torch.no_grad()
def solve(gram, method: str = "mgda", *, backend: str = "auto", normalization: str = "none",
          losses=None, normalize_weights: bool = True, weight_step: WeightStep | None = None,
          method_state=None, **options) -> torch.Tensor:
    """Per-segment weights of ``method`` from Gram matrices.

    Args:
        gram: ``[S, T, T]`` (or ``[T, T]``) floating point.
        method: a registered method (``mean``, ``mgda``, ``pcgrad``, ``cagrad``, ...).
        normalization: ``none``, ``l2``, ``loss`` or ``loss+`` (the loss modes need ``losses``).
        losses: per-task losses ``[T]`` for the loss-based normalisations.
        normalize_weights: rescale the weights to sum to 1 (default); False keeps the
            method's paper scale (PCGrad: mean of projected gradients; CAGrad: its rescale).
        weight_step: a prebuilt :class:`WeightStep` instead of ``method``, ``normalization``,
            ``normalize_weights`` and the options (which must then be left out).
        method_state: a :class:`MethodState` kept by the caller across steps (one per
            bucket): required by the stateful methods (``gradvac``, ``pcd``) and by the
            ``ema`` option; with a ``seed`` option (``random``, ``pcgrad``) its call counter
            is added to the seed, so each step draws afresh.
        **options: the method's options (``mgda``: solver, max_iter, tol; ``pcgrad``: seed;
            ``cagrad``: c, rescale).
    Returns:
        ``[S, T]`` float32 (computed in float64).
    """
    gram_t = check_gram(gram)
    step = as_weight_step(weight_step, method, normalization, normalize_weights, options)
    num_seg, num_tasks = gram_t.shape[0], gram_t.shape[-1]
    step.check_tasks(num_tasks)
    table = step.loss_table(losses, num_seg, num_tasks, gram_t.device)
    backend_obj = get_backend(backend, gram_t.device)
    return compute_weights(gram_t.to(torch.float32), step, table, backend_obj, method_state)


@torch.no_grad()
def combine(grads, weights, segments=None, *, out=None, backend: str = "auto") -> torch.Tensor:
    """Combined gradient ``d[n] = sum_t weights[s(n), t] * grads[t][n]``.

    Args:
        grads: ``[T, N]`` tensor or T 1-D tensors (fp32 / bf16 / fp16).
        weights: ``[S, T]`` (or ``[T]``) weights; cast to float32.
        segments: the layout the weights refer to.
        out: optional ``[N]`` tensor in the grads' dtype; may alias one of the gradients.
    Returns:
        ``[N]`` in the grads' dtype (``out`` when given). Accumulates in float32 or wider.
    """
    task_grads = as_task_grads(grads)
    segs = as_segments(segments, task_grads.numel)
    check_out(out, task_grads)
    w = check_weights(weights, segs.num_segments, task_grads.num_tasks, task_grads.device)
    backend_obj = get_backend(backend, task_grads.device)
    if out is None:
        out = torch.empty(task_grads.numel, dtype=task_grads.dtype, device=task_grads.device)
    backend_obj.combine(task_grads, w, segs, out)
    return out


@torch.no_grad()
def fused_bucket_moo(grads, *, method: str = "mgda", segments=None, out=None, backend: str = "auto",
                     return_info: bool = False, normalization: str = "none", losses=None,
                     normalize_weights: bool = True, check_finite: bool = True,
                     weight_step: WeightStep | None = None, method_state=None, **method_options):
    """Bucket-level MOO of T task gradients: Gram -> weights -> combined gradient.

    Args:
        grads: ``[T, N]`` tensor or T 1-D tensors of length N (fp32 / bf16 / fp16, one device).
        method: registered method name; ``mean`` is plain averaging.
        segments: None (one segment), int chunk length, or ``S + 1`` int64 offsets
            (empty segments allowed); each segment gets its own weights.
        out: optional ``[N]`` output in the grads' dtype; may be the storage of one of the
            gradients (a DDP bucket buffer).
        backend: ``auto`` / ``torch`` / ``cpu`` / ``triton`` / ``cuda``.
        return_info: also return a :class:`MOOInfo` with ``gram`` and ``weights``.
        normalization, losses, normalize_weights: see :func:`solve`.
        check_finite: raise ``ValueError`` (``out`` untouched) if the Gram is not finite,
            i.e. a gradient holds NaN/Inf or its squared norm overflows float32. This costs
            one device-to-host sync of S*T*T floats. With False, non-finite input propagates
            NaN/Inf into the output without a sync (what a GradScaler-style step skip wants).
            The ``cpu`` backend's fused sweep (each segment that fits in a core's cache is
            combined right after its Gram, so it is read from memory once) runs when
            ``check_finite=False`` or ``out`` is None; with a caller's ``out`` and
            ``check_finite=True`` it makes two full passes so that nothing is written before
            the whole Gram is checked. Both give the same bits.
        weight_step: a prebuilt :class:`WeightStep` instead of ``method``, ``normalization``,
            ``normalize_weights`` and the method options (which must then be left out).
        method_state: see :func:`solve`.
        **method_options: the method's options.
    Returns:
        ``[N]`` combined gradient in the grads' dtype, or ``(combined, MOOInfo)``.
    """
    task_grads = as_task_grads(grads)
    segs = as_segments(segments, task_grads.numel)
    check_out(out, task_grads)
    step = as_weight_step(weight_step, method, normalization, normalize_weights, method_options)
    step.check_tasks(task_grads.num_tasks)
    table = step.loss_table(losses, segs.num_segments, task_grads.num_tasks, task_grads.device)
    backend_obj = get_backend(backend, task_grads.device)
    if step.method.is_elementwise:
        return _fused_elementwise(task_grads, segs, out, step, backend_obj, return_info,
                                  check_finite, method_state)
    result = None
    # One sweep writes `out` before all of the Gram is known, so it runs only where a
    # non-finite Gram cannot leave a caller's buffer half-written.
    # (The sweep computes the weights natively: not with a method state to update, nor for a
    # method whose record corrects the native weights before they are used, ``finish``.)
    sweep = method_state is None and not step.needs_state and step.method.finish is None
    if out is None:
        out = torch.empty(task_grads.numel, dtype=task_grads.dtype, device=task_grads.device)
        if sweep:
            result = backend_obj.fused(task_grads, segs, out, step, table)
    elif not check_finite and sweep:
        result = backend_obj.fused(task_grads, segs, out, step, table)
    if result is not None:
        gram_t, weights = result
        if check_finite:
            _check_finite(gram_t)
    else:
        gram_t = backend_obj.gram(task_grads, segs)
        if check_finite:
            _check_finite(gram_t)
        weights = compute_weights(gram_t, step, table, backend_obj, method_state)
        backend_obj.combine(task_grads, weights, segs, out)
    if return_info:
        return out, MOOInfo(gram_t, weights, segs, step.name, backend_obj.name)
    return out


def _fused_elementwise(task_grads, segs, out, step, backend_obj, return_info, check_finite,
                       method_state):
    """An element-wise method (graddrop, trimmed_mean) in place of gram -> weights -> combine."""
    gram_t = None
    if check_finite or return_info:
        gram_t = backend_obj.gram(task_grads, segs)
        if check_finite:
            _check_finite(gram_t)
    options, common = split_common_options(step.for_call(method_state).options)
    if common["ema"] > 0:
        raise ValueError(f"option ema smooths per-segment weights; element-wise method {step.name!r} has none")
    if out is None:
        out = torch.empty(task_grads.numel, dtype=task_grads.dtype, device=task_grads.device)
    combine_elementwise(task_grads.rows, step.name, options, out, segs)
    if method_state is not None:
        method_state.calls += 1
    if return_info:
        # no per-segment weights exist: NaN marks them as undefined
        weights = torch.full((segs.num_segments, task_grads.num_tasks), float("nan"),
                             device=task_grads.device)
        return out, MOOInfo(gram_t, weights, segs, step.name, backend_obj.name)
    return out


def _check_finite(gram_t: torch.Tensor) -> None:
    if gram_t.device.type == "meta":
        raise ValueError("check_finite=True reads the Gram's values, and meta tensors have none: pass "
                         "check_finite=False with meta grads (e.g. to trace shapes)")
    if not bool(torch.isfinite(gram_t).all()):
        bad = torch.nonzero(~torch.isfinite(gram_t).flatten(1).all(-1)).flatten()[:5].tolist()
        raise ValueError(
            "grads contain NaN/Inf (or values whose squares overflow float32): the Gram matrix of "
            f"segment(s) {bad} is not finite; nothing was written. Pass check_finite=False to let "
            "non-finite values propagate instead."
        )
