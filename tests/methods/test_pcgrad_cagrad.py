"""PCGrad and CAGrad against straightforward vector-space implementations of the papers."""

import numpy as np
import pytest
import torch

from bucketmoo_kernels.methods import get_method
from bucketmoo_kernels.methods.cagrad import cagrad_weights
from bucketmoo_kernels.methods.pcgrad import pcgrad_orders, pcgrad_weights
from tests import references


def pcgrad_vectors(grads: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Yu et al. 2020, Algorithm 1, on explicit vectors; returns the mean of projected gradients."""
    projected = []
    for i in range(grads.shape[0]):
        g = grads[i].clone()
        for j in orders[i].tolist():
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        projected.append(g)
    return torch.stack(projected).mean(0)


@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(3))
def test_pcgrad_matches_vector_definition(num_tasks, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(num_tasks, 40, generator=gen, dtype=torch.float64)
    grads[1:] -= 0.8 * grads[0]  # make conflicts likely
    gram = (grads @ grads.T)[None]
    w = pcgrad_weights(gram, seed=seed)[0]
    expected = pcgrad_vectors(grads, pcgrad_orders(num_tasks, seed))
    torch.testing.assert_close(w @ grads, expected, atol=1e-10, rtol=1e-10)


def test_pcgrad_without_conflict_is_mean():
    grads = torch.rand(4, 10, dtype=torch.float64)  # all positive: no conflicts
    w = pcgrad_weights((grads @ grads.T)[None], seed=3)[0]
    torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))


def test_pcgrad_orders_are_seeded():
    assert torch.equal(pcgrad_orders(6, 11), pcgrad_orders(6, 11))
    assert any(not torch.equal(pcgrad_orders(6, 11), pcgrad_orders(6, s)) for s in range(12, 20))
    for row, i in zip(pcgrad_orders(5, 1), range(5)):
        assert sorted(row.tolist()) == [j for j in range(5) if j != i]


@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_zero_gradient_is_skipped(seed):
    """g_1 = 0 conflicts with nothing and nothing is projected onto it (no 0/0), whatever the
    order. g_0 = (1, 0) and g_2 = (-1, 0.5) conflict (g_0 . g_2 = -1):
    g_0' = g_0 + (1 / 1.25) g_2 = g_0 + 0.8 g_2,  g_1' = g_1,  g_2' = g_2 + (1 / 1) g_0,
    so the mean of the projected gradients has the coefficients ((1 + 0 + 1) / 3, 1 / 3,
    (0.8 + 0 + 1) / 3) = (2/3, 1/3, 3/5) and equals (1/15, 3/10)."""
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    w = pcgrad_weights((grads @ grads.T)[None], seed=seed)[0]
    expected = torch.tensor([2 / 3, 1 / 3, 3 / 5], dtype=torch.float64)
    torch.testing.assert_close(w, expected, atol=1e-15, rtol=0)
    torch.testing.assert_close(w @ grads, torch.tensor([1 / 15, 3 / 10], dtype=torch.float64), atol=1e-15, rtol=0)


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 6])
@pytest.mark.parametrize("c", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(2))
def test_cagrad_matches_official_algorithm(num_tasks, c, seed):
    gen = torch.Generator().manual_seed(100 * seed + num_tasks)
    grads = torch.randn(num_tasks, 30, generator=gen, dtype=torch.float64)
    grads[1:] -= 0.5 * grads[0]
    w = cagrad_weights((grads @ grads.T)[None], c=c)[0]
    # Liu et al. 2021 as in their official code (SLSQP on the dual): the update d = w_ref G
    expected = (references.cagrad_weights(grads, c) @ grads).numpy()
    np.testing.assert_allclose((w @ grads).numpy(), expected, atol=2e-5 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_cagrad_rescale_options(rescale):
    grads = torch.randn(3, 20, dtype=torch.float64)
    base = cagrad_weights((grads @ grads.T)[None], c=0.5, rescale=0)
    w = cagrad_weights((grads @ grads.T)[None], c=0.5, rescale=rescale)
    torch.testing.assert_close(w * {0: 1.0, 1: 1.25, 2: 1.5}[rescale], base)


def test_cagrad_c_zero_is_mean():
    grads = torch.randn(4, 20, dtype=torch.float64)
    w = cagrad_weights((grads @ grads.T)[None], c=0.0)
    torch.testing.assert_close(w, torch.full((1, 4), 0.25, dtype=torch.float64))


def test_cagrad_degenerate_inputs_are_finite():
    for gram in (torch.zeros(1, 3, 3), torch.ones(1, 3, 3)):
        w = cagrad_weights(gram.double(), c=0.5)
        assert torch.isfinite(w).all()


def test_cagrad_rejects_bad_options():
    """The record's option specs (the one place CAGrad's ranges are written) refuse them."""
    cagrad = get_method("cagrad")
    gram = torch.eye(3, dtype=torch.float64)[None]
    with pytest.raises(ValueError, match="c must be"):
        cagrad(gram, c=-1.0)
    with pytest.raises(ValueError, match="rescale"):
        cagrad(gram, rescale=5)
    with pytest.raises(ValueError, match="at most 8"):
        cagrad_weights(torch.eye(9, dtype=torch.float64)[None], solver="exact")
    with pytest.raises(ValueError, match="solver"):
        cagrad(gram, solver="fista")


def test_pcgrad_device_orders_are_cached_and_bounded():
    from bucketmoo_kernels.methods.pcgrad import pcgrad_orders_on

    assert torch.equal(pcgrad_orders_on(5, 7, "cpu"), pcgrad_orders(5, 7))
    assert pcgrad_orders_on(5, 7, "cpu") is pcgrad_orders_on(5, 7, "cpu")
    assert pcgrad_orders_on(1, 0, "cpu").shape == (1, 0)
    for seed in range(400):  # the DDP hook uses seed + step: one new seed per step
        pcgrad_orders_on(3, seed, "cpu")
    assert pcgrad_orders_on.cache_info().currsize <= 256
