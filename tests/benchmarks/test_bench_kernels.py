"""benchmarks/bench_kernels.py saves its table after every case, before plotting: a run cut
off, or a plot that fails, keeps every case it measured."""

import json

import pytest

from benchmarks import bench_kernels, harness


@pytest.fixture(autouse=True)
def _no_torchjd(monkeypatch):
    """torchjd's rows are left out: importing it takes seconds, and they are saved like any other."""
    monkeypatch.setattr(bench_kernels, "torchjd_ops", lambda *args: {})


def test_the_table_is_saved_before_the_plot(tmp_path, monkeypatch):
    # Without --record the run goes to the ignored out/benchmarks/ (OUT_DIR): redirect it here.
    monkeypatch.setattr(harness, "OUT_DIR", tmp_path)
    monkeypatch.setattr(bench_kernels, "OUT_DIR", tmp_path)

    def broken_plot(*args, **kwargs):
        raise RuntimeError("no plotting here")

    monkeypatch.setattr(bench_kernels, "plot_results", broken_plot)
    with pytest.raises(RuntimeError, match="no plotting here"):
        bench_kernels.main(["--device", "cpu", "--tasks", "2", "--sizes", "4096", "8192", "--dtypes", "fp32",
                            "--layouts", "one", "--samples", "2", "--name", "k"])
    runs = json.loads((tmp_path / "k.json").read_text())["runs"]
    assert len(runs) == 1
    rows = runs[0]["rows"]
    assert {r["N"] for r in rows} == {4096, 8192}
    assert {"copy", "gram", "solve", "combine", "fused"} == {r["op"] for r in rows}
    assert (tmp_path / "k.md").read_text().count("## Run ") == 1


def test_every_case_is_handed_over_as_it_ends():
    seen = []
    rows = bench_kernels.run(bench_kernels.torch.device("cpu"), [2], [4096, 8192], ["fp32"], ["one"], 2,
                             on_case=lambda rows: seen.append(len(rows)))
    assert len(seen) == 2 and seen[-1] == len(rows) and 0 < seen[0] < seen[1]
