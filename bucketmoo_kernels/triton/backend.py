"""The ``triton`` backend object that :mod:`bucketmoo_kernels.dispatch` selects."""

from __future__ import annotations

import os

import torch

from ..dispatch import Backend
from ..inputs import Segments, TaskGrads
from ..weight_step import WeightStep
from .combine import combine_triton
from .gram import GRAM_CHUNK, REDUCE_SLOTS, gram_triton
from .ops import NAMESPACE
from .solve import cagrad_triton, mgda_triton, pcgrad_triton
from .tiles import INTERPRET

_ops = getattr(torch.ops, NAMESPACE)

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    """Gram, solve and combine as Triton kernels (one launch each).

    Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (a test vehicle:
    slow). ``solve`` runs the kernels of ``mean``, ``pcgrad``, ``cagrad`` and ``mgda`` where
    their method records say a Triton kernel takes the solver and T (``triton_max_tasks``:
    CAGrad's exact solver for T <= 8; MGDA's closed form, exact enumeration for T <= 8 and
    fixed-iteration PGD for T <= 64); other methods and sizes run their torch functions, on
    the device too.

    Eager calls run the launchers directly; while ``torch.compile`` traces, each launch goes
    through its ``bucketmoo_triton`` custom op (:mod:`bucketmoo_kernels.triton.ops`), which
    runs the same launcher.

    Args:
        gram_chunk: elements per program of the Gram kernel; combine_block: elements per
            program of the combine kernel (None: the module defaults). Small values exercise
            the multi-tile reduction and blocks that straddle segments.
    """

    name = "triton"

    def __init__(self, gram_chunk: int | None = None, combine_block: int | None = None):
        self.gram_chunk = gram_chunk
        self.combine_block = combine_block

    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type == "cuda":
            if not INTERPRET and not torch.cuda.is_available():
                return "torch reports no usable CUDA device"
            return None
        if device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET") != "1":
                return ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                        "before importing bucketmoo_kernels")
            if not INTERPRET:
                return ("TRITON_INTERPRET=1 was set after bucketmoo_kernels.triton was imported; the "
                        "kernels were compiled for the GPU. Set it before the first import")
            return None
        return f"Triton kernels run on CUDA devices (or CPU under TRITON_INTERPRET=1); got {device.type}"

    def gram(self, grads: TaskGrads, segments: Segments) -> torch.Tensor:
        if torch.compiler.is_compiling():
            chunk = GRAM_CHUNK if self.gram_chunk is None else int(self.gram_chunk)
            return _ops.gram(list(grads.rows), list(segments.bounds), chunk, None, REDUCE_SLOTS)
        return gram_triton(grads, segments, chunk=self.gram_chunk)

    def solve(self, gram: torch.Tensor, step: WeightStep) -> torch.Tensor | None:
        num_seg, num_tasks = gram.shape[0], gram.shape[-1]
        runs, solver = step.triton_solver(num_tasks)  # the method record's kernels and limits
        if not runs:
            return None
        options = step.options
        if step.name == "mean":
            return torch.full((num_seg, num_tasks), 1.0 / num_tasks, dtype=torch.float64,
                              device=gram.device)
        if num_tasks < 2 or num_seg == 0:  # the kernels take two tasks or more
            return None
        traced = torch.compiler.is_compiling()
        if step.name == "pcgrad":
            seed = int(options["seed"])
            return _ops.solve_pcgrad_seeded(gram, seed) if traced else pcgrad_triton(gram, seed=seed)
        if step.name == "cagrad":
            c, rescale = float(options["c"]), int(options["rescale"])
            return (_ops.solve_cagrad(gram, c, rescale) if traced
                    else cagrad_triton(gram, c=c, rescale=rescale))
        if step.name == "mgda":
            max_iter = int(options["max_iter"])
            return _ops.solve_mgda(gram, solver, max_iter) if traced else mgda_triton(gram, solver, max_iter)
        return None

    def combine(self, grads: TaskGrads, weights: torch.Tensor, segments: Segments,
                out: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            _ops.combine_(out, list(grads.rows), weights, list(segments.bounds), self.combine_block)
            return
        combine_triton(grads, weights, segments, out, block=self.combine_block)
