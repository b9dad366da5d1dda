"""Eigen-decomposition helpers for the methods that invert the Gram (IMTL-G, Aligned-MTL,
ConFIG), batched over segments, float64.

Rank cut-off: an eigenvalue counts as zero when it is at most ``rcond`` times the segment's
largest. The default :data:`RCOND` = 1e-5 sits above the spurious eigenvalues that float32
rounding of the public API's Gram leaves in a rank-deficient Gram (about T * 6e-8 of the
largest) and far below the spread of the eigenvalues of any Gram whose gradients are not
nearly colinear (a condition number of 1e5 means cosines of about 1 - 5e-6).

On the CPU the decomposition is ``torch.linalg.eigh``; elsewhere (and inside
:func:`.batched_solvers.fixed_iterations`) it is :func:`.batched_solvers.jacobi_eigh`, a fixed
number of Jacobi sweeps with no host read, so that the weight step can be captured in a CUDA
graph. Every use here is a function of the spectral decomposition (not of the basis chosen
inside a repeated eigenvalue), so both give the same weights to rounding.
"""

from __future__ import annotations

import torch

from .batched_solvers import host_reads_free, jacobi_eigh

__all__ = ["RCOND", "eigh_with_rank", "finite_segments", "pinv_psd"]

RCOND = 1e-5


def finite_segments(gram: torch.Tensor) -> torch.Tensor:
    """``[S]`` bool: the segments whose Gram is finite."""
    return torch.isfinite(gram).flatten(1).all(-1)


def eigh_with_rank(gram: torch.Tensor, rcond: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(evals [S, T], evecs [S, T, T], keep [S, T] bool)``, eigenvalues ascending.

    A segment whose Gram is not finite (NaN/Inf gradients, squares that overflow) is not
    decomposed (``torch.linalg.eigh`` would fail to converge on it): its eigenvalues and
    vectors are NaN and nothing is kept; the other segments are unchanged."""
    if not rcond >= 0:
        raise ValueError(f"rcond must be >= 0; got {rcond}")
    sym = 0.5 * (gram + gram.transpose(-1, -2))
    finite = finite_segments(sym)
    sym = torch.where(finite[:, None, None], sym, torch.zeros_like(sym))
    if host_reads_free(sym.device):
        evals, evecs = torch.linalg.eigh(sym)
    else:  # torch.linalg.eigh reads its error info on the host on CUDA: a sync, no CUDA graph
        evals, evecs = jacobi_eigh(sym)
    evals = torch.where(finite[:, None], evals, torch.full_like(evals, float("nan")))
    evecs = torch.where(finite[:, None, None], evecs, torch.full_like(evecs, float("nan")))
    top = evals.amax(-1, keepdim=True)
    keep = (evals > rcond * top) & (evals > 0)
    return evals, evecs, keep


def pinv_psd(gram: torch.Tensor, rcond: float) -> torch.Tensor:
    """Pseudo-inverse ``[S, T, T]`` of positive semi-definite ``gram`` with the rank cut-off
    (NaN for a segment whose Gram is not finite)."""
    evals, evecs, keep = eigh_with_rank(gram, rcond)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), torch.zeros_like(evals))
    return torch.einsum("sik,sk,sjk->sij", evecs, inv, evecs)
