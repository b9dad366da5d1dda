"""Stateful methods (GradVac, PCD) and the ``ema`` option against torchjd 0.18 over several
consecutive calls with one state, each segment of a batch against its own torchjd
aggregator; MethodState errors, checkpointing, and seeded draws with a state."""

from __future__ import annotations

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.methods import get_method

from method_cases import task_matrix

aggregation = pytest.importorskip("torchjd.aggregation", reason="torchjd is not installed")

STEPS = 4


def _jacs(num_seg, num_tasks, step, kind="full_rank"):
    return [task_matrix(num_tasks, kind, seed=100 * step + s) for s in range(num_seg)]


def _grams(jacs):
    return torch.stack([j @ j.T for j in jacs])


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("num_tasks", [2, 5])
def test_gradvac_matches_torchjd_over_steps(num_tasks):
    state = bm.MethodState()
    theirs = [aggregation.GradVac(beta=0.3) for _ in range(3)]
    for step in range(STEPS):
        jacs = _jacs(3, num_tasks, step)
        ours = get_method("gradvac")(_grams(jacs), state=state, beta=0.3, seed=11)
        state.calls += 1
        for s, jac in enumerate(jacs):
            torch.manual_seed(11 + step)  # torchjd draws its orders from the global generator
            expected = theirs[s](jac)
            assert _rel(ours[s] @ jac, expected) <= 1e-9, (step, s)


@pytest.mark.parametrize("kind", ["full_rank", "rank_deficient"])
def test_pcd_matches_torchjd_over_steps(kind):
    state = bm.MethodState()
    theirs = [aggregation.PCD(tau=0.1, beta=0.9) for _ in range(2)]
    for step in range(STEPS):
        jacs = _jacs(2, 6, step, kind)
        ours = bm.solve(_grams(jacs), "pcd", tau=0.1, beta=0.9, method_state=state,
                        normalize_weights=False).double()
        for s, jac in enumerate(jacs):
            # the Gram goes through float32 in bm.solve: compare to 1e-4
            assert _rel(ours[s] @ jac, theirs[s](jac)) <= 1e-4, (kind, step, s)


def test_pcd_exact_in_float64_and_per_task_tau():
    state = bm.MethodState()
    tau = [0.0, 0.3, 0.05]
    agg = aggregation.PCD(tau=torch.tensor(tau, dtype=torch.float64))
    for step in range(STEPS):
        jac = task_matrix(4, "full_rank", seed=step)
        ours = get_method("pcd")((jac @ jac.T)[None], state=state, tau=tau)[0]
        assert _rel(ours @ jac, agg(jac)) <= 1e-9, step


@pytest.mark.slow
def test_pcd_infeasible_constraints_follow_the_primary_gradient():
    jac = task_matrix(3, "full_rank", seed=0)
    jac[2] = -jac[1]  # both secondary objectives cannot progress at once
    ours = get_method("pcd")((jac @ jac.T)[None], state=bm.MethodState(), tau=0.5)[0]
    theirs = aggregation.PCD(tau=0.5)(jac)
    assert _rel(ours @ jac, theirs) <= 1e-9
    torch.testing.assert_close(ours @ jac, jac[0])


@pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("qpsolvers", "quadprog")),
                    reason="torchjd's UPGrad needs qpsolvers and quadprog")
@pytest.mark.parametrize("method,options", [("upgrad", {}), ("mgda", {}), ("mean", {})])
def test_ema_matches_torchjd_crmogm(method, options):
    weighting = {"upgrad": aggregation.UPGradWeighting(), "mgda": aggregation.MGDAWeighting(epsilon=1e-12, max_iters=100_000),
                 "mean": aggregation.MeanWeighting()}[method]
    agg = aggregation.GramianWeightedAggregator(aggregation.CRMOGMWeighting(weighting, alpha=0.8))
    state = bm.MethodState()
    for step in range(STEPS):
        jac = task_matrix(3, "full_rank", seed=step)
        ours = bm.solve((jac @ jac.T)[None], method, ema=0.8, method_state=state,
                        normalize_weights=False, **options)[0].double()
        assert _rel(ours @ jac, agg(jac)) <= 1e-4, (method, step)


def test_stateful_without_state_raises_clearly():
    gram = torch.eye(3)[None]
    for method, extra in (("gradvac", {}), ("pcd", {}), ("mgda", {"ema": 0.5})):
        with pytest.raises(ValueError, match="method_state=bm.MethodState"):
            bm.solve(gram, method, **extra)
        with pytest.raises(ValueError, match="method_state=bm.MethodState"):
            bm.fused_bucket_moo(torch.randn(3, 16), method=method, **extra)
    with pytest.raises(ValueError, match="ema"):
        bm.solve(gram, "mgda", ema=1.5, method_state=bm.MethodState())
    with pytest.raises(TypeError, match="MethodState"):
        bm.solve(gram, "gradvac", method_state={})


def test_state_shape_change_raises():
    state = bm.MethodState()
    bm.solve(torch.eye(3).expand(2, 3, 3), "gradvac", method_state=state)
    with pytest.raises(ValueError, match="number of segments or tasks changed"):
        bm.solve(torch.eye(3).expand(4, 3, 3), "gradvac", method_state=state)
    state.reset()
    bm.solve(torch.eye(3).expand(4, 3, 3), "gradvac", method_state=state)
    lenient = bm.MethodState(strict=False)  # what the DDP hook uses: a new layout starts afresh
    bm.solve(torch.eye(3).expand(2, 3, 3), "gradvac", method_state=lenient)
    bm.solve(torch.eye(3).expand(4, 3, 3), "gradvac", method_state=lenient)
    assert lenient.state_dict()["tensors"]["gradvac.phi_hat"].shape == (4, 3, 3)


def test_state_dict_round_trip_continues_identically():
    grads = [torch.randn(4, 200, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    a = bm.MethodState()
    for g in grads[:2]:
        bm.fused_bucket_moo(g, method="gradvac", segments=50, method_state=a, ema=0.5)
    b = bm.MethodState()
    b.load_state_dict(a.state_dict())
    for g in grads[2:]:
        out_a = bm.fused_bucket_moo(g, method="gradvac", segments=50, method_state=a, ema=0.5)
        out_b = bm.fused_bucket_moo(g, method="gradvac", segments=50, method_state=b, ema=0.5)
        assert torch.equal(out_a, out_b)


def test_seeded_methods_draw_afresh_with_a_state_and_agree_across_states():
    gram = torch.eye(4)[None].expand(2, 4, 4)
    a, b = bm.MethodState(), bm.MethodState()
    first = bm.solve(gram, "random", method_state=a)
    second = bm.solve(gram, "random", method_state=a)
    assert not torch.allclose(first, second)
    assert torch.equal(first, bm.solve(gram, "random", method_state=b))  # "another rank"
    assert torch.equal(first, bm.solve(gram, "random"))  # calls = 0: seed as given


def test_bucket_moo_state_keeps_one_method_state_per_bucket_in_its_state_dict():
    from bucketmoo_kernels.ddp import BucketMOOState

    state = BucketMOOState(method="gradvac", beta=0.3)
    kwargs = state.solve_kwargs(0)
    assert isinstance(kwargs["method_state"], bm.MethodState)
    assert state.solve_kwargs(0)["method_state"] is kwargs["method_state"]  # one per bucket
    assert state.solve_kwargs(-1)["method_state"] is not kwargs["method_state"]
    assert "method_state" not in BucketMOOState(method="mgda").solve_kwargs(0)
    assert "method_state" in BucketMOOState(method="mgda", ema=0.9).solve_kwargs(0)
    gram = torch.stack([torch.eye(3), torch.ones(3, 3) + torch.eye(3)])
    bm.solve(gram, weight_step=state.weight_step(), method_state=kwargs["method_state"])
    restored = BucketMOOState(method="gradvac", beta=0.3)
    restored.load_state_dict(state.state_dict())
    again = restored.solve_kwargs(0)["method_state"]
    assert again.calls == 1
    torch.testing.assert_close(again.state_dict()["tensors"]["gradvac.phi_hat"],
                               kwargs["method_state"].state_dict()["tensors"]["gradvac.phi_hat"])
