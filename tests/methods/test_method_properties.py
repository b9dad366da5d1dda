"""Properties the new Gram methods claim, on random and degenerate Grams, at gradient scales
from 1e-12 to 1e8: batched == per segment, scale invariance of the normalised weights,
non-conflicting directions, permutation equivariance, finite documented output on zero,
identical, colinear and opposite gradients; plus the public API and option errors."""

from __future__ import annotations

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.methods import counter_rng, get_method

from method_cases import degenerate_matrices, gram_of, task_matrix

#: Every new stateless Gram method with the options the tests use.
METHODS = {
    "upgrad": {}, "dualproj": {}, "imtl_g": {}, "aligned_mtl": {}, "config": {},
    "nash_mtl": {"max_norm": 0.0}, "fairgrad": {"alpha": 2.0}, "krum": {"n_byzantine": 1},
    "sum": {}, "constant": {"weights": [1.0, 2.0, 3.0, 4.0]}, "random": {"seed": 3},
    "cagrad": {"solver": "iterative"},
}
#: Methods whose weights follow a permutation of the tasks.
EQUIVARIANT = ("upgrad", "dualproj", "imtl_g", "aligned_mtl", "config", "nash_mtl", "fairgrad",
               "krum", "sum", "cagrad")
SCALES = (1e-12, 1.0, 1e8)


def _weights(name, gram, **extra):
    return get_method(name)(gram, **{**METHODS[name], **extra})


def _normalised(w):
    return w / w.sum(-1, keepdim=True)


#: Their fixed point may not exist on a rank-deficient Gram (then the ridge defines it, and it
#: is ill-conditioned): scale tests use full-rank Grams only.
FULL_RANK_ONLY = ("nash_mtl", "fairgrad")


def _stack(num_tasks=4, count=3, kinds=("full_rank", "rank_deficient")):
    jacs = [task_matrix(num_tasks, kind, seed) for seed in range(count) for kind in kinds]
    return jacs, torch.cat([gram_of(j) for j in jacs])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batched_equals_per_segment(name):
    _, grams = _stack()
    together = _weights(name, grams)
    if name == "random":  # each segment draws its own weights, by design
        assert not torch.allclose(together[0], together[1])
        return
    alone = torch.cat([_weights(name, g[None]) for g in grams])
    torch.testing.assert_close(together, alone, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_scale_invariance_of_normalised_weights(name):
    _, grams = _stack(count=2, kinds=("full_rank",) if name in FULL_RANK_ONLY else ("full_rank", "rank_deficient"))
    ref = _normalised(_weights(name, grams))
    for scale in SCALES:
        got = _normalised(_weights(name, grams * scale * scale))
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8, msg=f"{name} at scale {scale}")


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "config"])
def test_non_conflicting(name):
    for num_tasks in (2, 3, 6, 10):
        for scale in SCALES:
            jac = task_matrix(num_tasks, "full_rank", seed=num_tasks) * scale
            gram = gram_of(jac)
            w = _weights(name, gram)
            progress = torch.einsum("stu,su->st", gram, w)  # g_t . d
            d_norm = torch.einsum("st,stu,su->s", w, gram, w).sqrt()
            rounding = 1e-9 * gram.diagonal(dim1=-2, dim2=-1).sqrt() * d_norm[:, None]
            if name == "config":
                bound = -rounding
            else:
                # KKT of min v^T (G / tr G + reg_eps I) v s.t. v >= u: (G / tr G) v >= -reg_eps v,
                # so g_t . d >= -reg_eps tr(G) w_t: the projector's regularisation, exactly.
                trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
                bound = -1e-4 * trace * w.abs() * (1 + 1e-9) - rounding
            assert (progress >= bound).all(), (name, num_tasks, scale, progress)


@pytest.mark.parametrize("name", EQUIVARIANT)
def test_permutation_equivariance(name):
    jac = task_matrix(5, "full_rank", seed=4)
    perm = torch.tensor([3, 0, 4, 1, 2])
    w = _weights(name, gram_of(jac))
    w_perm = _weights(name, gram_of(jac[perm]))
    torch.testing.assert_close(w_perm, w[:, perm], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_degenerate_grams_give_finite_weights(name):
    for case, jac in degenerate_matrices().items():
        for scale in SCALES:
            w = _weights(name, gram_of(jac * scale))
            assert torch.isfinite(w).all(), (name, case, scale, w)


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "imtl_g", "nash_mtl", "fairgrad", "cagrad", "config"])
def test_identical_gradients_get_equal_weights(name):
    jac = degenerate_matrices()["identical"]
    w = _normalised(_weights(name, gram_of(jac)))
    torch.testing.assert_close(w, torch.full_like(w, 0.25), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad"])
def test_zero_gradient_task_gets_zero_weight(name):
    jac = degenerate_matrices()["zero_row"]
    w = _weights(name, gram_of(jac))
    assert w[0, 1] == 0 and (w[0, [0, 2, 3]] > 0).all()


def test_all_zero_gram_gives_zero_combined_gradient():
    for name in METHODS:
        grads = torch.zeros(4, 64)
        out = bm.fused_bucket_moo(grads, method=name, **METHODS[name])
        assert torch.equal(out, torch.zeros(64)), name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_public_api_segments_and_scale(name):
    gen = torch.Generator().manual_seed(11)
    grads = torch.randn(4, 300, generator=gen)
    grads[1:] -= 0.5 * grads[0]
    offsets = torch.tensor([0, 100, 101, 300])
    out, info = bm.fused_bucket_moo(grads, method=name, segments=offsets, return_info=True,
                                    **METHODS[name])
    assert info.weights.shape == (3, 4)
    raw_total = bm.solve(info.gram, name, normalize_weights=False, **METHODS[name]).sum(-1)
    total = info.weights.double().sum(-1)
    # the contract: weights sum to one where the method's own weights have a positive sum
    torch.testing.assert_close(total[raw_total > 0], torch.ones_like(total[raw_total > 0]),
                               rtol=1e-6, atol=1e-6)
    expected = torch.cat([info.weights[s].double() @ grads[:, a:b].double()
                          for s, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    raw = bm.solve(info.gram, name, normalize_weights=False, **METHODS[name])
    torch.testing.assert_close(raw.double(), _weights(name, info.gram.double()).to(torch.float32).double(),
                               rtol=1e-5, atol=1e-7)


def test_random_weights_are_seeded_and_vary_with_the_seed():
    gram = torch.eye(5, dtype=torch.float64).expand(3, 5, 5)
    a = get_method("random")(gram, seed=1)
    torch.testing.assert_close(a, get_method("random")(gram, seed=1), rtol=0, atol=0)
    assert not torch.allclose(a, get_method("random")(gram, seed=2))
    assert (a > 0).all() and torch.allclose(a.sum(-1), torch.ones(3, dtype=torch.float64))


def test_counter_rng_moments():
    index = torch.arange(200_000)
    u = counter_rng.uniform(5, 0, index)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    z = counter_rng.normal(5, 0, index)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    # neighbouring indices and seeds are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u, counter_rng.uniform(6, 0, index)]))[0, 1])) < 0.01


def test_option_errors_name_the_option():
    gram = gram_of(task_matrix(3, "full_rank", 0))
    with pytest.raises(ValueError, match="weights"):
        get_method("constant")(gram)
    with pytest.raises(ValueError, match="pref_vector"):
        get_method("upgrad")(gram, pref_vector=[1.0, 2.0])
    with pytest.raises(ValueError, match="scale_mode"):
        get_method("aligned_mtl")(gram, scale_mode="max")
    with pytest.raises(ValueError, match="at least 4 tasks"):
        get_method("krum")(gram, n_byzantine=1)
    with pytest.raises(ValueError, match="alpha"):
        get_method("fairgrad")(gram, alpha=-1.0)
    with pytest.raises(ValueError, match="exact cagrad solver"):
        get_method("cagrad")(gram_of(task_matrix(9, "full_rank", 0)), solver="exact")
