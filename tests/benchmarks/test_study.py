"""The study's analysis (benchmarks/study.py) against independent computations."""

import numpy as np
import pytest

from benchmarks.study import StudySettings, bootstrap_ci, metrics, paired, split_language


def test_bootstrap_interval_matches_numpy_percentiles():
    values = [0.03, -0.01, 0.02, 0.05, -0.02]
    lo, hi = bootstrap_ci(values, resamples=4000, seed=3)
    # An independent bootstrap with numpy's generator: the percentile interval of the mean
    # agrees to within the Monte-Carlo error of 4000 resamples.
    rng = np.random.default_rng(7)
    means = np.asarray(values)[rng.integers(0, 5, size=(200_000, 5))].mean(1)
    ref_lo, ref_hi = np.percentile(means, [2.5, 97.5])
    assert abs(lo - ref_lo) < 2e-3 and abs(hi - ref_hi) < 2e-3
    assert lo <= np.mean(values) <= hi


def test_bootstrap_of_constant_differences_is_a_point():
    assert bootstrap_ci([0.25] * 5, resamples=100) == (0.25, 0.25)


def _result(run, seed, losses, step_ms=10.0):
    return {"run": run, "seed": seed, "step_ms": step_ms, "final": {"test": losses, "valid": losses}}


def test_metrics_and_paired_differences():
    s = StudySettings(languages=("a", "b"), low_resource=(("b", 0.5),), unseen=("c",), seeds=(0, 1),
                      bootstrap=100)
    results = [_result("mean", 0, {"a": 1.0, "b": 3.0, "c": 2.0}), _result("mean", 1, {"a": 1.0, "b": 2.0, "c": 2.0}),
               _result("x", 0, {"a": 0.5, "b": 3.0, "c": 1.0}), _result("x", 1, {"a": 1.5, "b": 1.0, "c": 2.0})]
    m = metrics(results[2], s)
    assert m == {"primary": 1.75, "worst": 3.0, "low_resource": 3.0, "unseen": 1.0, "step_ms": 10.0}
    d = paired(results, s, "x", "mean", "primary")
    assert d["per_seed"] == [-0.25, -0.25] and d["mean"] == -0.25 and (d["lo"], d["hi"]) == (-0.25, -0.25)
    d = paired(results, s, "x", "mean", "worst")
    assert d["per_seed"] == [0.0, -0.5]


def test_splits_are_disjoint_and_fixed():
    pytest.importorskip("babel")
    a, b = split_language("sw"), split_language("sw")
    assert all(bool((a[k] == b[k]).all()) for k in a)
    parts = {k: set(bytes(v.tolist()).decode().split("\n")) - {""} for k, v in a.items()}
    assert not parts["train"] & parts["test"] and not parts["valid"] & parts["test"]
    low = split_language("sw", 0.15)
    assert low["train"].numel() < 0.2 * a["train"].numel() and bool((low["test"] == a["test"]).all())
