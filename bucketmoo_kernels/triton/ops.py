"""The Triton backend's launch points as ``torch.library`` custom operators, so that
``torch.compile`` can trace a call to the backend.

Dynamo cannot trace the launchers themselves: they build and cache host tables per
:class:`~bucketmoo_kernels.inputs.Segments` object, read data pointers, and (under
``TRITON_INTERPRET=1``) run the kernels in Python. Behind a custom op they are opaque: the
graph holds one op call, and the fake implementations below give its outputs' shapes, dtypes
and devices while tracing.

The operators (namespace ``bucketmoo_triton``, named as the native ``bucketmoo`` ops where the
signature is the same; ``solve_pcgrad_seeded`` draws the task orders from its seed, where the
native ``bucketmoo::solve_pcgrad`` takes them as a tensor):

* ``gram(Tensor[] grads, int[] bounds, int chunk, int? block, int reduce_slots) -> Tensor``:
  ``[S, T, T]`` float32 (:func:`~bucketmoo_kernels.triton.gram.gram_triton`)
* ``solve_mgda(Tensor gram, str solver, int max_iter) -> Tensor``: ``[S, T]`` float64;
  solver ``closed_form`` (T = 2), ``exact`` (T <= 8) or ``pgd``
* ``solve_pcgrad_seeded(Tensor gram, int seed) -> Tensor``: ``[S, T]`` float64
* ``solve_cagrad(Tensor gram, float c, int rescale) -> Tensor``: ``[S, T]`` float64 (T <= 8)
* ``combine_(Tensor(a!) out, Tensor[] grads, Tensor weights, int[] bounds, int? block) -> ()``:
  writes ``out`` (:func:`~bucketmoo_kernels.triton.combine.combine_triton`)

The segment layout crosses the op boundary as its S + 1 offsets as Python ints (``bounds``),
constants of the trace as everywhere under ``torch.compile``. The implementations keep one
``Segments`` object per distinct layout (an LRU cache keyed by the bounds), so the host tables
cached on it are built once per layout, as in eager calls.

The backend (:mod:`bucketmoo_kernels.triton.backend`) calls these ops only while
``torch.compile`` traces; eager calls go to the launchers directly, without the custom op's
dispatch overhead. The ops have no autograd formula (gradients are inputs, not leaves).
"""

from __future__ import annotations

import functools

import torch

from ..inputs import Segments, as_segments, as_task_grads, check_out, check_weights
from .combine import combine_triton
from .gram import gram_triton
from .solve import cagrad_triton, mgda_triton, pcgrad_triton

__all__ = ["NAMESPACE", "SCHEMAS"]

NAMESPACE = "bucketmoo_triton"
SCHEMAS = {
    "gram": "(Tensor[] grads, int[] bounds, int chunk, int? block, int reduce_slots) -> Tensor",
    "solve_mgda": "(Tensor gram, str solver, int max_iter) -> Tensor",
    "solve_pcgrad_seeded": "(Tensor gram, int seed) -> Tensor",
    "solve_cagrad": "(Tensor gram, float c, int rescale) -> Tensor",
    "combine_": "(Tensor(a!) out, Tensor[] grads, Tensor weights, int[] bounds, int? block) -> ()",
}


@functools.lru_cache(maxsize=1024)
def _segments(bounds: tuple[int, ...], numel: int) -> Segments:
    """One checked Segments object per layout; its host tables are cached on it. An evicted
    layout's tables are rebuilt on its next call (a one-time host sync on CUDA, as for a new
    layout). Bad bounds raise (and are not cached)."""
    return as_segments(list(bounds), numel, name="bounds")


def _check_gram(gram: torch.Tensor) -> None:
    if gram.dim() != 3 or gram.shape[1] != gram.shape[2] or not gram.is_floating_point():
        raise ValueError(f"gram must be a floating-point [S, T, T] tensor; got {gram.dtype} "
                         f"of shape {tuple(gram.shape)}")


def _op(name: str, mutates_args: tuple[str, ...] = ()):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args,
                                   schema=SCHEMAS[name])


def _solve_fake_output(gram: torch.Tensor) -> torch.Tensor:
    """Output of a solve op: ``[S, T]`` float64 on the Gram's device."""
    return gram.new_empty(gram.shape[:2], dtype=torch.float64)


@_op("gram")
def _gram(grads, bounds, chunk, block, reduce_slots):
    task_grads = as_task_grads(list(grads))
    return gram_triton(task_grads, _segments(tuple(bounds), task_grads.numel), chunk=chunk,
                       block=block, reduce_slots=reduce_slots)


@_gram.register_fake
def _gram_fake(grads, bounds, chunk, block, reduce_slots):
    num_tasks = len(grads)
    return grads[0].new_empty((len(bounds) - 1, num_tasks, num_tasks), dtype=torch.float32)


@_op("solve_mgda")
def _solve_mgda(gram, solver, max_iter):
    _check_gram(gram)
    return mgda_triton(gram, solver, max_iter)


@_solve_mgda.register_fake
def _solve_mgda_fake(gram, solver, max_iter):
    return _solve_fake_output(gram)


@_op("solve_pcgrad_seeded")
def _solve_pcgrad_seeded(gram, seed):
    _check_gram(gram)
    return pcgrad_triton(gram, seed=seed)


@_solve_pcgrad_seeded.register_fake
def _solve_pcgrad_seeded_fake(gram, seed):
    return _solve_fake_output(gram)


@_op("solve_cagrad")
def _solve_cagrad(gram, c, rescale):
    _check_gram(gram)
    return cagrad_triton(gram, c=c, rescale=rescale)


@_solve_cagrad.register_fake
def _solve_cagrad_fake(gram, c, rescale):
    return _solve_fake_output(gram)


@_op("combine_", mutates_args=("out",))
def _combine(out, grads, weights, bounds, block):
    task_grads = as_task_grads(list(grads))
    segments = _segments(tuple(bounds), task_grads.numel)
    check_out(out, task_grads)
    weights = check_weights(weights, segments.num_segments, task_grads.num_tasks, task_grads.device)
    combine_triton(task_grads, weights, segments, out, block=block)


@_combine.register_fake
def _combine_fake(out, grads, weights, bounds, block):
    return None
