"""Cross-checks against another library: torchjd's MGDA aggregator (Frank-Wolfe, Sener &
Koltun style; https://github.com/TorchJD/torchjd). It is iterative with a stopping
tolerance, so our exact solver must reach an objective at least as low, and the two
combined gradients must agree to torchjd's own accuracy."""

import pytest
import torch

import bucketmoo_kernels as bm

aggregation = pytest.importorskip("torchjd.aggregation", reason="torchjd is not installed")


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(3))
def test_mgda_agrees_with_torchjd(num_tasks, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(num_tasks, 500, generator=gen, dtype=torch.float64)
    grads[1:] -= 0.7 * grads[0]  # conflicting tasks
    ours = bm.fused_bucket_moo(grads.float(), method="mgda").double()
    theirs = aggregation.MGDA(epsilon=1e-6, max_iters=10_000)(grads.float()).double()
    assert ours.norm() <= theirs.norm() * (1 + 1e-5), "the exact min-norm point must be no longer than torchjd's"
    torch.testing.assert_close(ours, theirs, atol=2e-3 * grads.abs().max().item(), rtol=0)
