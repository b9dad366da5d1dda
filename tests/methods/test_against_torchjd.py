"""The Gram methods against torchjd 0.18 (https://github.com/TorchJD/torchjd), the same
combined vector J^T w to 1e-4 relative where torchjd's solver is exact (closed forms, quadprog,
clarabel, scipy's least squares), and against a tighter scipy oracle where torchjd stops
early (Nash-MTL's 20 ECOS steps).

Each test loops over T = 2..10 and both matrix kinds inside one test item, to keep the
collection small; the failure message names the case."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bucketmoo_kernels.methods import get_method

from method_cases import KINDS, gram_of, task_matrix

aggregation = pytest.importorskip("torchjd.aggregation", reason="torchjd is not installed")

#: torchjd's optional solvers (pip install qpsolvers quadprog cvxpy ecos clarabel scipy): the tests
#: of a method whose torchjd implementation needs a missing one are skipped, saying which.
QP = pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("qpsolvers", "quadprog")),
                        reason="torchjd's UPGrad/DualProj need qpsolvers and quadprog")
CONVEX = pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("cvxpy", "ecos", "clarabel")),
                            reason="torchjd's NashMTL/CAGrad need cvxpy, ecos and clarabel")

TASKS = (2, 3, 5, 10)  # the fast lane; test_every_task_count runs 2..10
RTOL = 1e-4


#: Where our side of a comparison runs: ``torch`` (the method's float64 torch function) or
#: ``cpu`` (the native float64 solver, ``solve_dual_cone``, for the methods that have one
#: without a ``pref_vector``; skipped when the extension is not built).
BACKENDS = ("torch", "cpu")
_NATIVE_CODES = {"upgrad": 4, "dualproj": 5}


def _ours(name: str, jac: torch.Tensor, backend: str = "torch", **options) -> torch.Tensor:
    if backend == "cpu":
        native = pytest.importorskip("bucketmoo_kernels.native")
        if native._cpu is None:
            pytest.skip("the CPU extension is not built")
        opts = {"norm_eps": 0.0, "reg_eps": 1e-4, "max_iter": 200, **options}
        weights = torch.ops.bucketmoo.solve_dual_cone(gram_of(jac), _NATIVE_CODES[name], opts["norm_eps"],
                                                      opts["reg_eps"], opts["max_iter"])
        return weights[0] @ jac
    return get_method(name)(gram_of(jac), **options)[0] @ jac


def _rel(ours: torch.Tensor, theirs: torch.Tensor, jac: torch.Tensor | None = None) -> float:
    """|ours - theirs| / |theirs|; when both should be zero (opposite gradients in ConFIG),
    relative to 1e-4 of the largest gradient instead (torchjd then returns rounding noise)."""
    floor = 1e-4 * float(jac.norm(dim=1).max()) if jac is not None else 1e-300
    return float((ours - theirs).norm() / theirs.norm().clamp_min(floor))


def _check_all(name, make_aggregator, options=None, kinds=KINDS, tasks=TASKS, min_tasks=2, backend="torch"):
    bad = []
    for kind in kinds:
        for num_tasks in tasks:
            if num_tasks < min_tasks:
                continue
            jac = task_matrix(num_tasks, kind, seed=0)
            theirs = make_aggregator(num_tasks)(jac).to(torch.float64)
            ours = _ours(name, jac, backend, **(options or {}))
            rel = _rel(ours, theirs, jac)
            if not rel <= RTOL:
                bad.append(f"{kind} T={num_tasks}: rel {rel:.2e}")
    assert not bad, f"{name} ({backend}) differs from torchjd: " + "; ".join(bad)


@pytest.mark.slow
@QP
@pytest.mark.parametrize("name,make", [
    ("upgrad", lambda t: aggregation.UPGrad()), ("dualproj", lambda t: aggregation.DualProj()),
    ("imtl_g", lambda t: aggregation.IMTLG()), ("aligned_mtl", lambda t: aggregation.AlignedMTL()),
    ("config", lambda t: aggregation.ConFIG())], ids=lambda v: v if isinstance(v, str) else "")
def test_every_task_count(name, make):
    for backend in BACKENDS if name in _NATIVE_CODES else ("torch",):
        _check_all(name, make, tasks=range(2, 11), backend=backend)


@QP
@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrad(backend):
    _check_all("upgrad", lambda t: aggregation.UPGrad(), tasks=TASKS + (16,), backend=backend)


@QP
def test_upgrad_pref_vector():
    pref = [0.5, 0.2, 0.3]
    _check_all("upgrad", lambda t: aggregation.UPGrad(pref_vector=torch.tensor(pref, dtype=torch.float64)),
               {"pref_vector": pref}, tasks=[3])


@QP
@pytest.mark.parametrize("backend", BACKENDS)
def test_dualproj(backend):
    _check_all("dualproj", lambda t: aggregation.DualProj(), tasks=TASKS + (16,), backend=backend)


def test_imtl_g():
    _check_all("imtl_g", lambda t: aggregation.IMTLG())


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl(scale_mode):
    _check_all("aligned_mtl", lambda t: aggregation.AlignedMTL(scale_mode=scale_mode),
               {"scale_mode": scale_mode})


def test_config():
    _check_all("config", lambda t: aggregation.ConFIG())


def test_config_pref_vector():
    pref = [1.0, 2.0, 0.5, 1.0]
    _check_all("config", lambda t: aggregation.ConFIG(pref_vector=torch.tensor(pref, dtype=torch.float64)),
               {"pref_vector": pref}, tasks=[4])


@pytest.mark.parametrize("n_byzantine,n_selected", [(0, 1), (1, 2)])
def test_krum(n_byzantine, n_selected):
    _check_all("krum", lambda t: aggregation.Krum(n_byzantine=n_byzantine, n_selected=n_selected),
               {"n_byzantine": n_byzantine, "n_selected": n_selected}, min_tasks=n_byzantine + 3)


def test_sum_and_constant():
    _check_all("sum", lambda t: aggregation.Sum())
    weights = [0.3, -1.0, 2.0, 0.25, 4.0]
    _check_all("constant", lambda t: aggregation.Constant(torch.tensor(weights, dtype=torch.float64)),
               {"weights": weights}, tasks=[5])


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad(alpha):
    # scipy's bounded least squares is exact to its tolerances on full-rank Grams (a rank-
    # deficient Gram may have no solution: see test_method_properties' degenerate cases).
    _check_all("fairgrad", lambda t: aggregation.FairGrad(alpha=alpha), {"alpha": alpha},
               kinds=("full_rank",))


@pytest.mark.slow
@CONVEX
def test_cagrad_any_number_of_tasks():
    # torchjd does not rescale (our rescale=0); clarabel solves the convex problem exactly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_all("cagrad", lambda t: aggregation.CAGrad(c=0.4), {"c": 0.4, "rescale": 0},
                   tasks=range(2, 11))
        # T > 8: the iterative solver; T <= 8 with solver="iterative" too.
        _check_all("cagrad", lambda t: aggregation.CAGrad(c=0.4),
                   {"c": 0.4, "rescale": 0, "solver": "iterative"}, tasks=(3, 8, 12, 16))


def _nash_oracle(gram: np.ndarray) -> np.ndarray:
    """scipy root of Gn a = 1/a, Gn = G / |G|_F, solved in log coordinates to machine tolerance."""
    from scipy.optimize import least_squares

    gn = gram / np.linalg.norm(gram)
    res = least_squares(lambda z: gn @ np.exp(z) - np.exp(-z), np.zeros(len(gn)),
                        xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=10_000)
    return np.exp(res.x)


@pytest.mark.slow
@CONVEX
def test_nash_mtl_against_oracle_and_torchjd():
    bad = []
    for num_tasks in range(2, 11):
        jac = task_matrix(num_tasks, "full_rank", seed=0)
        ours = get_method("nash_mtl")(gram_of(jac), max_norm=0.0)[0]
        oracle = torch.from_numpy(_nash_oracle((jac @ jac.T).numpy()))
        rel = float((ours - oracle).norm() / oracle.norm())
        if not rel <= 1e-6:
            bad.append(f"T={num_tasks}: vs oracle rel {rel:.2e}")
        # torchjd stops once |Gn a - 1/a| < 1e-3 (or when ECOS fails): compare where it got there.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = aggregation.NashMTL(n_tasks=num_tasks, max_norm=0.0, optim_niter=200).weighting(jac)
        gn = jac @ jac.T / (jac @ jac.T).norm()
        their_res = float((gn @ theirs - 1 / theirs).norm())
        our_res = float((gn @ ours - 1 / ours).norm())
        assert our_res <= 1e-6 * float(ours.norm()), (num_tasks, our_res)
        if their_res < 1e-3 and not float((ours - theirs).norm() / ours.norm()) <= 1e-2:
            bad.append(f"T={num_tasks}: vs torchjd (residual {their_res:.1e})")
    assert not bad, "; ".join(bad)


@CONVEX
def test_nash_mtl_max_norm_matches_torchjd_clipping():
    jac = task_matrix(3, "full_rank", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = aggregation.NashMTL(n_tasks=3, max_norm=0.5, optim_niter=200)(jac)
    ours = _ours("nash_mtl", jac, max_norm=0.5)
    assert abs(float(ours.norm()) - 0.5) < 1e-9
    assert _rel(ours, theirs) <= 1e-2  # torchjd's stopping tolerance
