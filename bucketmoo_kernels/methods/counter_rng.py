"""Counter-based random numbers: the same values on every device, rank and run.

A draw is a pure function of (seed, stream, index): an integer hash evaluated with int64
torch ops, so it needs no generator state, no host round trip, and gives bit-identical
integers on CPU and GPU. Every rank of a data-parallel job that passes the same seed (the
DDP hook uses ``seed + step``) draws the same numbers; RLW's weights and GradDrop's masks
are built on it. The hash is the integer mixer of the "lowbias32" family restricted to 31
bits so that no product leaves int64; it is meant for sampling weights and masks, not for
cryptography.
"""

from __future__ import annotations

import math

import torch

__all__ = ["uniform", "normal"]

_MASK = 0x7FFFFFFF
_MUL = 0x045D9F3B  # < 2**27, so (x < 2**31) * _MUL < 2**58


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK
    x = x ^ (x >> 16)
    x = (x * _MUL) & _MASK
    return x ^ (x >> 16)


def _key(seed: int, stream: int) -> int:
    key = torch.tensor([(int(seed) ^ (int(seed) >> 31)) & _MASK], dtype=torch.int64)
    key = _mix(_mix(key) ^ (int(stream) & _MASK))
    return int(key.item())


def uniform(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """Float64 uniforms in (0, 1), one per entry of ``index`` (int64, any device)."""
    index = index.to(torch.int64)
    low, high = index & _MASK, (index >> 31) & _MASK
    h = _mix(_mix(high ^ _key(seed, stream)) ^ low)
    h = _mix(h ^ _key(seed, stream + 0x2545F491))
    return (h.to(torch.float64) + 0.5) / float(2**31)


def normal(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normal float64 draws (Box-Muller on two uniform streams)."""
    u1 = uniform(seed, 2 * stream, index)
    u2 = uniform(seed, 2 * stream + 1, index)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
