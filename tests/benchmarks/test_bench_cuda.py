"""benchmarks/bench_cuda.py (the headline GPU benchmark) without a GPU: its --quick CPU path runs,
checks every timed output against the torch reference, flags a wrong one in the table and in its
exit status, and saves the table after every case (a run cut off keeps what it measured)."""

import json

import pytest
import torch

import bucketmoo_kernels as bm
from benchmarks import bench_cuda
from benchmarks.harness import COPY_RATIO, RunRecorder


@pytest.fixture
def native_cpu():
    if bm.available_backends("cpu")["cpu"] is not None:
        pytest.skip("the native cpu backend is not built")


def _runs(tmp_path, name="cuda_goal_cpu_quick"):
    return json.loads((tmp_path / f"{name}.json").read_text())["runs"]


def test_help_runs_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cuda.main(["--help"])
    assert exit_info.value.code == 0 and "(T+1)/(2T+1)" in capsys.readouterr().out


def test_quick_cpu_run_checks_every_output_and_saves_the_table(native_cpu, tmp_path):
    assert bench_cuda.main(["--quick", "--device", "cpu", "--no-torch", "--parts", "--results-dir", str(tmp_path)]) == 0
    runs = _runs(tmp_path)
    assert len(runs) == 1
    rows = runs[0]["rows"]
    cases = {(r["size"], r["T"], r["dtype"]) for r in rows}
    assert cases == {("shard", 2, "fp32"), ("large", 2, "fp32")}
    for case in cases:
        calls = [r["call"] for r in rows if (r["size"], r["T"], r["dtype"]) == case]
        assert calls == ["copy", "fused eager", "gram", "combine"]
    fused = [r for r in rows if r["call"] == "fused eager"]
    assert all(r["check"].startswith("ok") and r[COPY_RATIO] > 0 for r in fused)
    # the shard size: T * N * itemsize = --shard-bytes (rounded down to 4096 elements)
    assert [r["N"] for r in fused] == [bench_cuda.shard_elements(1 << 20, 2, 4), 1 << 19]
    assert (tmp_path / "cuda_goal_cpu_quick.md").read_text().count("## Run ") == 1


def test_a_wrong_output_is_flagged_and_fails_the_run(native_cpu, tmp_path, monkeypatch, capsys):
    fused = bm.fused_bucket_moo

    def one_element_off(grads, **kw):
        got = fused(grads, **kw)
        if kw.get("backend") != "torch":
            got[5] += 1.0
        return got

    monkeypatch.setattr(bm, "fused_bucket_moo", one_element_off)
    assert bench_cuda.main(["--quick", "--device", "cpu", "--no-torch", "--sizes", "shard",
                            "--results-dir", str(tmp_path)]) == 1
    row = [r for r in _runs(tmp_path)[0]["rows"] if r["call"] == "fused eager"][0]
    assert row["check"].startswith("WRONG (rel")
    assert "WRONG OR FAILED: 1 cases" in capsys.readouterr().out


def test_a_run_cut_off_keeps_the_cases_it_measured(native_cpu, tmp_path, monkeypatch):
    point = bench_cuda.run_point
    calls = []

    def second_case_is_killed(*args, **kw):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # not caught: the process ends here
        return point(*args, **kw)

    monkeypatch.setattr(bench_cuda, "run_point", second_case_is_killed)
    with pytest.raises(KeyboardInterrupt):
        bench_cuda.main(["--quick", "--device", "cpu", "--no-torch", "--results-dir", str(tmp_path)])
    rows = _runs(tmp_path)[0]["rows"]
    assert {r["size"] for r in rows} == {"shard"} and [r["call"] for r in rows] == ["copy", "fused eager"]


def test_check_and_bound():
    ref = torch.randn(1000)
    assert bench_cuda.check(ref.clone(), ref, torch.float32).startswith("ok")
    off = ref.clone()
    off[3] = float("nan")
    assert bench_cuda.check(off, ref, torch.float32) == "WRONG (1 non-finite elements)"
    off = ref * (1 + 1e-3)
    assert bench_cuda.check(off, ref, torch.float32).startswith("WRONG (rel 1.00e-03")
    assert bench_cuda.check(off.bfloat16(), ref, torch.bfloat16).startswith("ok")
    assert bench_cuda.bound(2, in_l2=False) == pytest.approx(3 / 5) and bench_cuda.bound(8, in_l2=True) == 1.0


def test_run_recorder_rewrites_its_own_run_and_keeps_earlier_ones(tmp_path):
    first = RunRecorder("t", {"date": "d1", "commit": "c1"}, title="T", results_dir=tmp_path)
    first.save([{"a": 1}])
    second = RunRecorder("t", {"date": "d2", "commit": "c2"}, title="T", results_dir=tmp_path)
    second.save([{"a": 2}])
    second.save([{"a": 2}, {"a": 3}])
    runs = json.loads((tmp_path / "t.json").read_text())["runs"]
    assert [r["env"]["date"] for r in runs] == ["d1", "d2"] and runs[1]["rows"] == [{"a": 2}, {"a": 3}]
    md = (tmp_path / "t.md").read_text()
    assert md.count("# T\n") == 1 and md.count("## Run d2") == 1 and md.index("## Run d1") < md.index("## Run d2")
    assert not list(tmp_path.glob("*.tmp"))


def test_the_documented_cpu_smoke_run_writes_nothing(native_cpu, monkeypatch, capsys):
    """``python -m benchmarks.bench_cuda --quick --device cpu --no-write`` (docs/cuda.md)."""
    def no_saving(*args, **kwargs):
        raise AssertionError("--no-write must not create a results file")

    monkeypatch.setattr(bench_cuda, "RunRecorder", no_saving)
    assert bench_cuda.main(["--quick", "--device", "cpu", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "torch reference" in out and out.rstrip().endswith("every output matches the torch reference")
