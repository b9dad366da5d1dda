"""Per-segment state of the stateful methods (GradVac, PCD) and of the ``ema`` weight smoothing.

A :class:`MethodState` is what the functional API keeps between steps for one call site (one
bucket): pass the same object every step, ``fused_bucket_moo(..., method_state=state)`` or
``solve(..., method_state=state)``. Inside it, each method keeps named float64 tensors with a
leading segment dimension, so a bucket of S segments carries S independent states. The DDP
hook and the FSDP path keep one per bucket in ``BucketMOOState`` and save them in its
``state_dict()``; since every rank computes them from the same all-reduced Gram, they stay
identical on all ranks.

``calls`` counts the weight steps taken with this state; ``random`` and ``gradvac`` add it to
their ``seed`` so that each step draws afresh while every rank draws the same.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["MethodState", "require_state"]


class MethodState:
    """Named per-segment tensors plus a call counter; checkpointable with ``state_dict()``.

    Args:
        strict: when a call needs a tensor of another shape than the one held (the number of
            segments or tasks changed), raise ``ValueError`` (True, the default) or start that
            state afresh (False: what the DDP hook uses, since DDP rebuilds its buckets once
            after the first iteration).
    """

    def __init__(self, strict: bool = True) -> None:
        self.strict = bool(strict)
        self.calls = 0
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor,
            init: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor ``name`` (created by ``init()`` on first use). ``ValueError`` if it exists
        with another shape (the number of segments or tasks changed: call :meth:`reset`)."""
        tensor = self._tensors.get(name)
        if tensor is not None and tuple(tensor.shape) != tuple(shape) and not self.strict:
            self._tensors.clear()  # a new layout: every per-segment tensor starts afresh
            tensor = None
        if tensor is None:
            tensor = init().to(device=like.device, dtype=torch.float64)
            self._tensors[name] = tensor
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"method_state holds {name!r} of shape {tuple(tensor.shape)} but this call needs "
                f"{tuple(shape)} (the number of segments or tasks changed); use one MethodState "
                "per bucket, or call method_state.reset()"
            )
        if tensor.device != like.device:
            tensor = tensor.to(like.device)
            self._tensors[name] = tensor
        return tensor

    def set(self, name: str, value: torch.Tensor) -> None:
        self._tensors[name] = value

    def has(self, name: str) -> bool:
        return name in self._tensors

    def reset(self) -> None:
        """Forget everything (the next step starts as the first)."""
        self.calls = 0
        self._tensors.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "tensors": {k: v.detach().cpu().clone() for k, v in self._tensors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "calls" not in state or "tensors" not in state:
            raise ValueError("MethodState.load_state_dict expects the dict of MethodState.state_dict()")
        self.calls = int(state["calls"])
        self._tensors = {k: torch.as_tensor(v, dtype=torch.float64).clone() for k, v in state["tensors"].items()}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._tensors.items())
        return f"MethodState(calls={self.calls}, strict={self.strict}, {{{shapes}}})"


def require_state(method_state, method: str) -> MethodState:
    """``method_state`` if it is a :class:`MethodState`, else a ``ValueError`` saying what to pass."""
    if method_state is None:
        raise ValueError(
            f"method {method!r} keeps state across steps: pass method_state=bm.MethodState() (the "
            "same object every step, one per bucket) to fused_bucket_moo/solve; the DDP hook and "
            "the FSDP path keep it in BucketMOOState"
        )
    if not isinstance(method_state, MethodState):
        raise TypeError(f"method_state must be a bucketmoo_kernels.MethodState; got {type(method_state).__name__}")
    return method_state
