"""Collective shims: one name per collective whatever the torch version.

torch 2.13 renamed the flat-tensor collectives: ``all_gather_single`` and
``reduce_scatter_single`` are the preferred names there and ``all_gather_into_tensor`` /
``reduce_scatter_tensor`` emit a deprecation warning; torch 2.11 only has the old names.
``all_to_all_single`` exists under that name in both. The helpers below pick whatever the
running torch provides, so the protocol code never sees the difference.

:func:`check_backend` says up front whether a process group's backend can run a protocol
on a device (e.g. NCCL needs CUDA tensors, gloo has no CUDA all-to-all), so a bad setup
fails with a message instead of a hang or an obscure C++ error inside backward.
"""

from __future__ import annotations

import atexit
import time

import torch
import torch.distributed as dist

__all__ = ["note_async_collective", "all_to_all_flat", "all_gather_flat", "reduce_scatter_flat", "all_reduce_sum",
           "group_size", "group_rank", "backend_name", "check_backend"]

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Which devices each backend's all-to-all / all-gather run on (the sharded protocol needs
# both; the all-gather protocol and the stash mode only all-gather / all-reduce).
_ALL_TO_ALL_DEVICES = {"gloo": {"cpu"}, "nccl": {"cuda"}, "mpi": {"cpu", "cuda"}, "ucc": {"cpu", "cuda"},
                       "xccl": {"xpu"}, "fake": {"cpu", "cuda"}}
_ALL_GATHER_DEVICES = {"gloo": {"cpu", "cuda"}, "nccl": {"cuda"}, "mpi": {"cpu", "cuda"},
                       "ucc": {"cpu", "cuda"}, "xccl": {"xpu"}, "fake": {"cpu", "cuda"}}


#: Seconds the interpreter's exit waits, GIL released, for the process groups' worker threads to
#: free the last asynchronous collectives (see :func:`_let_workers_finish_at_exit`).
EXIT_GRACE_S = 0.05
_exit_grace_registered = False


def _let_workers_finish_at_exit() -> None:
    """Give the backend's worker threads the GIL for a moment before the interpreter finalises.

    A backend worker thread (gloo's ``ProcessGroupGloo::runLoop``) destroys a finished work after
    its future has fired; the work holds the last references to tensors that Python dropped (the
    sharded protocol's combined shard, the gathered bucket), and freeing them takes the GIL. A
    script that ends right after its last step can reach ``Py_FinalizeEx`` before that thread got
    the GIL; a thread that takes the GIL once finalisation has begun is ended by
    ``pthread_exit``, whose forced unwind through the C++ destructor calls ``std::terminate``:
    SIGABRT, "terminate called without an active exception" (issue 23, seen in about 1 pair of
    processes in 20; plain DDP never hits it, its bucket tensors have no Python object). atexit
    runs before finalisation begins, so sleeping here (the GIL released) lets the thread finish.
    """
    time.sleep(EXIT_GRACE_S)  # sleep releases the GIL


def note_async_collective() -> None:
    """Call before issuing an asynchronous collective: registers, once per process, the exit
    grace of :func:`_let_workers_finish_at_exit`."""
    global _exit_grace_registered
    if not _exit_grace_registered:
        _exit_grace_registered = True
        atexit.register(_let_workers_finish_at_exit)


def all_to_all_flat(output: torch.Tensor, input: torch.Tensor, group=None, *,
                    output_split_sizes=None, input_split_sizes=None, async_op: bool = False):
    """Rank q's ``output`` chunk p receives rank p's ``input`` chunk q; chunks are equal or
    given by the split sizes. Returns the work handle when ``async_op``."""
    if async_op:
        note_async_collective()
    return dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group,
                                  async_op=async_op)


def all_gather_flat(output: torch.Tensor, input: torch.Tensor, group=None, *, async_op: bool = False):
    """``output`` (``P * m``) receives every rank's ``input`` (``m``), in rank order. Returns the
    work handle when ``async_op``."""
    if async_op:
        note_async_collective()
    return _ALL_GATHER(output, input, group=group, async_op=async_op)


def reduce_scatter_flat(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """``output`` (``m``) receives the sum over ranks of ``input[rank*m:(rank+1)*m]`` (blocking)."""
    _REDUCE_SCATTER(output, input, group=group)


def all_reduce_sum(tensor: torch.Tensor, group=None) -> None:
    """In-place sum over ranks (blocking)."""
    dist.all_reduce(tensor, group=group)


def group_size(group=None) -> int:
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    return dist.get_rank(group)


def backend_name(group=None) -> str:
    return str(dist.get_backend(group)).lower()


def check_backend(backend: str, device: torch.device | str, protocol: str) -> None:
    """Raise ``RuntimeError`` when ``backend`` cannot run ``protocol`` on ``device``.

    Args:
        backend: process-group backend name (``gloo``, ``nccl``, ...). Unknown backends
            (custom plugins) are let through: their own error will surface.
        device: device of the gradient buckets.
        protocol: ``sharded`` (all-to-all + all-gather), ``allgather`` or ``allreduce``.
    """
    backend = str(backend).lower()
    dev = torch.device(device).type
    table = _ALL_TO_ALL_DEVICES if protocol == "sharded" else _ALL_GATHER_DEVICES
    if backend not in table:
        return
    if protocol == "allreduce":
        if backend == "nccl" and dev != "cuda":
            raise RuntimeError(f"process group backend 'nccl' needs CUDA gradients; got {dev} buckets")
        return
    if dev not in table[backend]:
        hint = ("; use protocol='allgather' (gloo can all-gather CUDA tensors) or a NCCL process group"
                if protocol == "sharded" and backend == "gloo" else "")
        raise RuntimeError(
            f"protocol={protocol!r} needs {'all_to_all' if protocol == 'sharded' else 'all_gather'} on "
            f"{dev} tensors, which the process group backend {backend!r} cannot do "
            f"(it supports {', '.join(sorted(table[backend]))}){hint}"
        )
