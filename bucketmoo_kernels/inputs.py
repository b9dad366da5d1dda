"""Validation and normalisation of the public API's inputs.

Every public function funnels its arguments through here, so a bad input gets the same
clear message whichever backend would have run, and nothing is written before all checks
pass.

Two small value types come out of it:

* :class:`TaskGrads` -- the T task gradients, either as one stacked ``[T, N]`` view or as
  T separate 1-D tensors, without copying.
* :class:`Segments` -- the segment layout as ``S + 1`` int64 offsets from 0 to N.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "TaskGrads",
    "Segments",
    "as_task_grads",
    "as_segments",
    "check_out",
    "check_gram",
    "check_weights",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

GradsLike = Union[torch.Tensor, Sequence[torch.Tensor]]
SegmentsLike = Union[None, int, torch.Tensor, Sequence[int], "Segments"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class TaskGrads:
    """T task gradients of length N, all of one dtype and device.

    ``rows`` always holds the T 1-D tensors. ``stacked`` is a ``[T, N]`` view with unit
    inner stride when the rows can be seen as one strided tensor without a copy (a
    stacked input, or rows of one buffer at a constant distance), else ``None``.
    """

    rows: tuple[torch.Tensor, ...]
    stacked: torch.Tensor | None

    @property
    def num_tasks(self) -> int:
        return len(self.rows)

    @property
    def numel(self) -> int:
        return self.rows[0].numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.rows[0].dtype

    @property
    def device(self) -> torch.device:
        return self.rows[0].device

    def as_stacked(self) -> torch.Tensor:
        """``[T, N]`` tensor of the gradients (a copy only when they are not one strided view)."""
        if self.stacked is not None:
            return self.stacked
        return torch.stack(self.rows)


def _rows_as_one_view(rows: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """A ``[T, N]`` view over the rows when they sit at a constant stride in one storage."""
    first = rows[0]
    n = first.numel()
    if any(r.stride() != (1,) and r.numel() > 1 for r in rows):
        return None
    if len(rows) == 1:
        return first.unsqueeze(0)
    if any(r.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for r in rows):
        return None
    offsets = [r.storage_offset() for r in rows]
    step = offsets[1] - offsets[0]
    if step < n or any(b - a != step for a, b in zip(offsets, offsets[1:])):
        return None
    return first.as_strided((len(rows), n), (step, 1), offsets[0])


def as_task_grads(grads: GradsLike, name: str = "grads") -> TaskGrads:
    """Check ``grads`` ([T, N] tensor or T 1-D tensors) and wrap it without copying.

    Raises:
        TypeError: wrong container or dtype.
        ValueError: wrong rank, zero tasks, mismatched lengths or devices.
    """
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(
                f"{name} must be a [T, N] tensor or a sequence of T 1-D tensors; "
                f"got a tensor of shape {tuple(grads.shape)}"
            )
        rows = tuple(grads.unbind(0))
        if grads.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one task; got shape {tuple(grads.shape)}")
        stacked = grads if grads.stride(-1) == 1 or grads.shape[1] <= 1 else None
    elif isinstance(grads, (list, tuple)):
        if len(grads) == 0:
            raise ValueError(f"{name} must hold at least one task; got an empty sequence")
        for t, g in enumerate(grads):
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"{name}[{t}] must be a torch.Tensor; got {type(g).__name__}")
            if g.dim() != 1:
                raise ValueError(
                    f"{name}[{t}] must be 1-D (a flat gradient); got shape {tuple(g.shape)}"
                )
        rows = tuple(grads)
        stacked = None
    else:
        raise TypeError(
            f"{name} must be a [T, N] torch.Tensor or a list/tuple of 1-D tensors; "
            f"got {type(grads).__name__}"
        )
    first = rows[0]
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16; got {_dtype_name(first.dtype)}"
        )
    for t, g in enumerate(rows[1:], start=1):
        if g.dtype != first.dtype:
            raise TypeError(
                f"{name}[{t}] has dtype {_dtype_name(g.dtype)} but {name}[0] has "
                f"{_dtype_name(first.dtype)}; all task gradients must share one dtype"
            )
        if g.device != first.device:
            raise ValueError(
                f"{name}[{t}] is on {g.device} but {name}[0] is on {first.device}; "
                "all task gradients must be on one device"
            )
        if g.numel() != first.numel():
            raise ValueError(
                f"{name}[{t}] has {g.numel()} elements but {name}[0] has {first.numel()}; "
                "all task gradients must have the same length N"
            )
    if stacked is None and isinstance(grads, (list, tuple)):
        stacked = _rows_as_one_view(rows)
    return TaskGrads(rows=rows, stacked=stacked)


@dataclass(frozen=True, eq=False)
class Segments:
    """A segment layout: ``offsets`` is an int64 CPU tensor of S+1 non-decreasing values
    from 0 to N; segment s covers elements ``offsets[s]:offsets[s+1]`` (possibly empty).

    Build it once and reuse it (the DDP hook does): its device copy is cached. The offsets
    are also kept as Python ints (``bounds``), so that sizes are known without reading a
    tensor (under ``torch.compile`` they are constants of the trace).
    """

    offsets: torch.Tensor
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if "_bounds" not in self.__dict__:
            object.__setattr__(self, "_bounds", tuple(int(v) for v in self.offsets.tolist()))

    @classmethod
    def _from_bounds(cls, bounds: tuple[int, ...]) -> "Segments":
        result = cls.__new__(cls)
        object.__setattr__(result, "_bounds", bounds)
        object.__setattr__(result, "offsets", torch.tensor(bounds, dtype=torch.int64))
        object.__setattr__(result, "_device_cache", {})
        return result

    @property
    def bounds(self) -> tuple[int, ...]:
        """The S+1 offsets as Python ints."""
        return self._bounds

    @property
    def num_segments(self) -> int:
        return len(self._bounds) - 1

    @property
    def numel(self) -> int:
        return self._bounds[-1]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def length_list(self) -> list[int]:
        """The S segment lengths as Python ints."""
        b = self._bounds
        return [b[s + 1] - b[s] for s in range(len(b) - 1)]

    @property
    def max_length(self) -> int:
        return max(self.length_list) if self.num_segments else 0

    def on(self, device: torch.device | str) -> torch.Tensor:
        """The offsets as an int64 tensor on ``device`` (cached).

        The first call per device copies from pageable host memory, which waits for the copy
        (a one-time host sync; refused during CUDA graph capture: warm up first). Every call
        registers the current CUDA stream with ``record_stream`` (a no-op on the allocating
        stream), so the cached copy is never reused by the allocator while a kernel queued on
        another stream may still read it."""
        device = torch.device(device)
        key = str(device)
        cached = self._device_cache.get(key)
        if cached is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("Segments.on: the offsets are not on the device yet and cannot be copied "
                                   "there during CUDA graph capture; run the call once before capturing")
            cached = self.offsets.to(device)
            self._device_cache[key] = cached
        if cached.is_cuda:
            cached.record_stream(torch.cuda.current_stream(cached.device))
        return cached

    def segment_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[N]`` int64: the segment index of every element."""
        ids = torch.repeat_interleave(torch.arange(self.num_segments), self.lengths)
        return ids.to(device)

    @classmethod
    def single(cls, n: int) -> "Segments":
        return cls._from_bounds((0, int(n)))

    @classmethod
    def chunks(cls, n: int, chunk: int) -> "Segments":
        """Fixed-length chunks of ``chunk`` elements; the last one is shorter."""
        if chunk <= 0:
            raise ValueError(f"segments as a chunk length must be positive; got {chunk}")
        return cls._from_bounds(tuple(range(0, int(n), int(chunk))) + (int(n),))

    @classmethod
    def from_lengths(cls, lengths: Sequence[int]) -> "Segments":
        """Consecutive segments of the given lengths (e.g. the parameters of a bucket)."""
        lens = torch.as_tensor(list(lengths), dtype=torch.int64)
        if (lens < 0).any():
            raise ValueError("segment lengths must be non-negative")
        return cls(torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]))


def as_segments(segments: SegmentsLike, n: int, name: str = "segments") -> Segments:
    """Turn None / an int chunk length / S+1 offsets into a validated :class:`Segments`."""
    if segments is None:
        return Segments.single(n)
    if isinstance(segments, Segments):
        bounds, result = segments.bounds, segments
    elif isinstance(segments, bool):
        raise TypeError(f"{name} must be None, an int, or a 1-D int64 tensor of offsets; got bool")
    elif isinstance(segments, int):
        if segments <= 0:
            raise ValueError(f"{name} as a chunk length must be a positive int; got {segments}")
        return Segments.chunks(n, segments)
    elif isinstance(segments, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in segments):
        bounds, result = tuple(segments), None  # Python ints: no tensor is read
    elif isinstance(segments, (torch.Tensor, list, tuple)):
        offsets = torch.as_tensor(segments)
        if offsets.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"{name} offsets must be an integer tensor (int64); got {_dtype_name(offsets.dtype)}"
            )
        if offsets.dim() != 1 or offsets.numel() < 2:
            raise ValueError(
                f"{name} offsets must be a 1-D tensor of S+1 >= 2 values; got shape {tuple(offsets.shape)}"
            )
        # One host read of the offsets (under torch.compile: pass a list, an int or a Segments).
        bounds, result = tuple(int(v) for v in offsets.detach().cpu().tolist()), None
    else:
        raise TypeError(
            f"{name} must be None, an int chunk length, or a 1-D tensor of S+1 offsets; "
            f"got {type(segments).__name__}"
        )
    if len(bounds) < 2:
        raise ValueError(
            f"{name} offsets must be a 1-D tensor of S+1 >= 2 values; got shape ({len(bounds)},)"
        )
    if bounds[0] != 0 or bounds[-1] != n:
        raise ValueError(
            f"{name} offsets must start at 0 and end at N={n}; "
            f"got first={bounds[0]}, last={bounds[-1]}"
        )
    for s in range(len(bounds) - 1):
        if bounds[s] > bounds[s + 1]:
            raise ValueError(
                f"{name} offsets must be non-decreasing; offsets[{s}]={bounds[s]} > "
                f"offsets[{s + 1}]={bounds[s + 1]}"
            )
    return result if result is not None else Segments._from_bounds(bounds)


def check_out(out: torch.Tensor | None, grads: TaskGrads, name: str = "out") -> None:
    """``out`` must be a 1-D tensor of N elements in the grads' dtype and device, and either
    be exactly one gradient row (same storage, start and stride: the in-place DDP case) or
    share no memory with any row. A partial overlap is refused on every backend: the kernels
    read an element's inputs and write it from the same thread, which is safe only for the
    same element. The check compares addresses on the host (no device sync); under
    ``torch.compile`` tensors have no addresses while tracing and it is skipped."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None; got {type(out).__name__}")
    if out.dim() != 1 or out.numel() != grads.numel:
        raise ValueError(
            f"{name} must be a 1-D tensor of N={grads.numel} elements; got shape {tuple(out.shape)}"
        )
    if out.dtype != grads.dtype:
        raise TypeError(
            f"{name} must have the gradients' dtype {_dtype_name(grads.dtype)}; "
            f"got {_dtype_name(out.dtype)}"
        )
    if out.device != grads.device:
        raise ValueError(f"{name} is on {out.device} but the gradients are on {grads.device}")
    if not torch.compiler.is_compiling():
        _check_no_partial_overlap(out, grads, name)


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last)`` byte addresses a 1-D tensor's elements lie in."""
    if t.numel() == 0:
        return 0, 0
    begin = t.data_ptr()
    return begin, begin + ((t.numel() - 1) * abs(t.stride(0)) + 1) * t.element_size()


def _check_no_partial_overlap(out: torch.Tensor, grads: TaskGrads, name: str) -> None:
    out_begin, out_end = _byte_span(out)
    if out_begin == out_end:
        return
    for t, row in enumerate(grads.rows):
        begin, end = _byte_span(row)
        if begin < out_end and out_begin < end:  # the address ranges intersect
            same = begin == out_begin and row.stride() == out.stride()
            if not same:
                raise ValueError(
                    f"{name} partially overlaps grads[{t}] (it shares memory with that row but is "
                    f"not the same tensor: start {out_begin - begin:+d} bytes, stride "
                    f"{out.stride()} vs {row.stride()}); pass exactly that row (in place) or a "
                    "buffer that overlaps no gradient"
                )


def check_gram(gram: torch.Tensor, name: str = "gram") -> torch.Tensor:
    """Accept ``[T, T]`` or ``[S, T, T]`` floating Gram matrices; return ``[S, T, T]``."""
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(gram).__name__}")
    if not gram.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {_dtype_name(gram.dtype)}")
    if gram.dim() == 2:
        gram = gram.unsqueeze(0)
    if gram.dim() != 3 or gram.shape[-1] != gram.shape[-2] or gram.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [S, T, T] or [T, T] with T >= 1; got {tuple(gram.shape)}")
    return gram


def check_weights(weights: torch.Tensor, num_segments: int, num_tasks: int, device: torch.device,
                  name: str = "weights") -> torch.Tensor:
    """Accept ``[T]`` (same weights everywhere) or ``[S, T]``; return fp32 ``[S, T]`` on device."""
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(weights, dtype=torch.float32)
    if not weights.is_floating_point():
        raise TypeError(f"{name} must be floating point; got {_dtype_name(weights.dtype)}")
    if weights.dim() == 1:
        weights = weights.unsqueeze(0).expand(num_segments, -1)
    if weights.shape != (num_segments, num_tasks):
        raise ValueError(
            f"{name} must have shape [S, T] = [{num_segments}, {num_tasks}] (or [T]); "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != device:
        raise ValueError(f"{name} is on {weights.device} but the gradients are on {device}")
    return weights.to(torch.float32).contiguous()
