"""The end-to-end step benchmarks (benchmarks/bench_ddp_step.py, bench_fsdp_step.py) run, and
the harness pieces they share."""

import math

import pytest

from benchmarks import harness


def test_round_robin_samples_visit_configurations_in_rounds_between_barriers():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    got = harness.round_robin_samples(fns, samples=3, warmup=1, barrier=lambda: calls.append("|"))
    # one warm-up call each, then per round: barrier, call, barrier for every configuration
    assert calls == ["a", "b"] + ["|", "a", "|", "|", "b", "|"] * 3
    assert {k: len(v) for k, v in got.items()} == {"a": 3, "b": 3}
    assert all(x >= 0 for xs in got.values() for x in xs)


def test_paired_compares_samples_of_the_same_round():
    # Round-by-round ratios are all 2 although the medians of the two lists differ by less.
    got = harness.paired([2.0, 8.0, 4.0, 6.0], [1.0, 4.0, 2.0, 3.0], lambda a, b: a / b)
    assert got["median_ms"] == 2.0 and got["iqr_ms"] == 0.0 and got["samples"] == 4


def test_step_rows_and_breakdown_from_known_samples():
    res = {"steps": {"base": [10.0, 20.0, 30.0], "x": [12.0, 23.0, 33.0]},
           "in_hook": {"base": [1.0, 1.0, 1.0], "x": [2.0, 3.0, 4.0]},
           "parts": {"kernel": [1.0, 1.0, 1.0], "plain collectives": [4.0, 5.0, 6.0],
                     "sharded collectives": [5.0, 6.5, 7.0]},
           "sizes": [100, 50], "extra": {"x": (2 * 2**20, 2**20)}}
    rows = harness.step_rows(2, res, [("base", "k", None), ("x", "k", {})], {"k": "base"}, vs="stock",
                             hook="hook", per="group")
    assert rows[1]["x stock"] == pytest.approx(23 / 20)  # the ratios of the rounds: 1.2, 1.15, 1.1
    assert rows[1]["extra MB"] == 2.0 and rows[1]["extra / group"] == 2.0
    b = harness.overhead_breakdown(2, res, "x", "base", hook="hook")
    assert b["overhead ms"] == 3.0 and b["extra collectives ms"] == 1.0
    assert b["waiting and the rest ms"] == pytest.approx(3.0 - 1.0 - 1.0) and b["bucket elements"] == "100+50"


@pytest.mark.slow
@pytest.mark.distributed
# bench_ddp_step shares everything but its worker with bench_fsdp_step; its --quick run
# (python -m benchmarks.bench_ddp_step --quick --no-write) is left out of CI to save ~30 s.
@pytest.mark.parametrize("bench", ["bench_fsdp_step"])
def test_step_benchmark_quick_runs_and_writes_nothing(bench):
    import importlib

    module = importlib.import_module(f"benchmarks.{bench}")
    results = harness.RESULTS_DIR / f"{bench.removeprefix('bench_')}.md"
    before = results.stat().st_mtime_ns if results.exists() else None
    rows, breakdowns = module.main(["--quick", "--no-write"])
    assert [r["configuration"] for r in rows] == [name for name, *_ in module.CONFIGS]
    assert all(r["P"] == 2 and r["step ms"] > 0 and math.isfinite(r["IQR ms"]) for r in rows)
    base = [r for r in rows if r["configuration"] == module.BASELINE[module.CONFIGS[0][1]]][0]
    assert next(k for k in base if k.startswith("x ")) and base[next(k for k in base if k.startswith("x "))] == 1.0
    # Bucket-Level MOO's extra memory per bucket in flight, P = 2: FSDP2 the task rows [2, n/2]
    # (1 bucket); DDP 1 + 1/P buckets (as in results/ddp_step.md: 1.5 at P = 2, 1.25 at P = 4).
    moo = [r for r in rows if r["configuration"] == module.BREAKDOWN_OF][0]
    assert moo[next(k for k in moo if k.startswith("extra / "))] == pytest.approx(
        1.0 if bench == "bench_fsdp_step" else 1.5)
    (b,) = breakdowns
    assert b["kernel ms"] > 0 and b["sharded collectives ms"] > 0 and b["buckets"] >= 1
    assert b["waiting and the rest ms"] == pytest.approx(b["overhead ms"] - b["kernel ms"] - b["extra collectives ms"])
    after = results.stat().st_mtime_ns if results.exists() else None
    assert after == before
