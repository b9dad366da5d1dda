"""Helpers shared by the tests: comparisons that say where and how much things differ,
the dtype tolerance table, and generators of awkward segment layouts."""

from __future__ import annotations

import torch

# (dtype, atol, rtol) for a combined gradient stored in ``dtype`` against the float64
# reference: one rounding of the output (half an ulp of the dtype) plus float32
# accumulation error, relative to the gradients' scale (tests use O(1) gradients).
DTYPE_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
DTYPES = list(DTYPE_TOLERANCES)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """``torch.testing.assert_close`` in float64 that reports how many elements differ and
    the first offending indices with their values."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = torch.nonzero(bad)[:5]
        rows = [f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.8g}, expected {e[tuple(i)].item():.8g}"
                for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs diff {(a - e).abs().nan_to_num(float('inf')).max().item():.3g}\n" + "\n".join(rows)
        )


def offsets(*lengths: int) -> torch.Tensor:
    """int64 offsets of consecutive segments with the given lengths."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int64)


# Segment layouts by name -> function(N) -> segments argument. N is the total length.
def _uneven(n: int) -> torch.Tensor:
    cuts = sorted({0, n, *[int(n * f) for f in (0.1, 0.13, 0.5, 0.77)]})
    return torch.tensor(cuts, dtype=torch.int64)


def _with_empty(n: int) -> torch.Tensor:
    return offsets(0, n // 3, 0, 0, n - n // 3 - 1, 1, 0)


LAYOUTS = {
    "one": lambda n: None,
    "chunk7": lambda n: 7,
    "uneven": _uneven,
    "empty+len1": _with_empty,
}


def random_grads(num_tasks: int, n: int, dtype=torch.float32, device="cpu", correlated: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``[T, N]`` gradients with a shared component so that conflicts and agreements both occur."""
    base = torch.randn(n, generator=generator, dtype=torch.float64)
    own = torch.randn(num_tasks, n, generator=generator, dtype=torch.float64)
    signs = torch.tensor([1.0 if t % 2 == 0 else -0.5 for t in range(num_tasks)], dtype=torch.float64)
    grads = own + (signs[:, None] * base if correlated else 0)
    return grads.to(device=device, dtype=dtype)


# Exact inputs: small integers (exact in fp32, bf16 and fp16) and weights that are multiples
# of 1/4 in [-1, 1]. A Gram of N such elements with |values| <= bound is a sum of integers of
# at most bound^2 each, so while N * bound^2 < 2^24 every partial sum, in any order, is an
# integer below 2^24 and exact in float32: the kernel's result must equal the float64
# reference bit for bit (atol = 0), and one dropped, doubled or misplaced element shows. The
# combine sum_t w_t g_t of T such terms, and each partial sum, is a multiple of 1/4 of
# magnitude <= T bound: at most 4 T bound quarters, exact in float32 and in the 8 significant
# bits of bfloat16 while that is <= 256 (T <= 32 at bound 2).
EXACT_BOUND = 2


def small_int_grads(num_tasks: int, n: int, dtype=torch.float32, bound: int = EXACT_BOUND,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """``[T, N]`` integers uniform in ``[-bound, bound]``, in ``dtype``."""
    if n * bound * bound >= 2 ** 24:
        raise ValueError(f"n * bound^2 = {n * bound * bound} is not below 2^24: sums would not be exact")
    return torch.randint(-bound, bound + 1, (num_tasks, n), generator=generator).to(dtype)


def quarter_weights(num_segments: int, num_tasks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[S, T]`` float32 multiples of 1/4 in ``[-1, 1]`` (exact products with small integers)."""
    return torch.randint(-4, 5, (num_segments, num_tasks), generator=generator).float() / 4
