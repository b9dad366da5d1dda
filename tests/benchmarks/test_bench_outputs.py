"""Where the benchmarks and the main job write: never into tracked files unless asked.

``bash scripts/main.sh`` runs the demo (default ``--out demo_out``) and
``python -m benchmarks.bench_kernels --quick``; both must leave ``git status`` as it was.
Committed results change only with ``--record``. The scale model's documented commands run
(``--quick``) and ``--render`` rebuilds the committed tables from their stored measurements.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import bench_kernels, harness, scale_model

ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def checkout():
    try:
        inside = _git("rev-parse", "--is-inside-work-tree").stdout.strip() == "true"
    except OSError:
        inside = False
    if not inside:
        pytest.skip("needs a git checkout (the check is against git's view of tracked files)")


def _ignored(path: Path) -> bool:
    return _git("check-ignore", "-q", str(path)).returncode == 0


def test_main_job_outputs_are_ignored_and_it_never_records(checkout):
    from bucketmoo_kernels.demo.__main__ import build_parser

    demo_out = ROOT / build_parser().get_default("out")
    assert _ignored(demo_out / "report.md"), f"the demo's default output folder {demo_out} is not ignored by git"
    assert _ignored(harness.OUT_DIR / "kernels_cpu_quick.md"), f"{harness.OUT_DIR} is not ignored by git"
    main_sh = (ROOT / "scripts" / "main.sh").read_text()
    assert "python -m benchmarks.bench_kernels --quick\n" in main_sh and "--record" not in main_sh.split("set -euo")[1]


@pytest.mark.slow
def test_quick_bench_touches_no_tracked_file_and_record_appends(checkout, tmp_path, monkeypatch, capsys):
    before = _git("status", "--porcelain", "--untracked-files=all", "--", "benchmarks/results").stdout
    out_md = harness.OUT_DIR / "kernels_cpu_quick.md"
    runs_before = out_md.read_text().count("## Run ") if out_md.exists() else 0
    assert bench_kernels.main(["--quick", "--sizes", "4096", "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| fused | cpu | 4 | 4096 |" in printed and "appended to out/benchmarks/kernels_cpu_quick.md" in printed
    assert out_md.read_text().count("## Run ") == runs_before + 1
    after = _git("status", "--porcelain", "--untracked-files=all", "--", "benchmarks/results").stdout
    assert after == before, f"bench_kernels --quick changed benchmarks/results:\n{after}"

    # --record: the committed folder (here a stand-in), appended, earlier runs kept.
    monkeypatch.setattr(bench_kernels, "RESULTS_DIR", tmp_path)
    (tmp_path / "kernels_cpu_quick.md").write_text("# old\n\n## Run earlier\n")
    (tmp_path / "kernels_cpu_quick.json").write_text('{"title": "old", "runs": [{"env": {}, "rows": []}]}')
    assert bench_kernels.main(["--quick", "--sizes", "4096", "--samples", "2", "--record"]) == 0
    text = (tmp_path / "kernels_cpu_quick.md").read_text()
    assert text.startswith("# old\n\n## Run earlier\n") and text.count("## Run ") == 2
    assert _git("status", "--porcelain", "--untracked-files=all", "--", "benchmarks/results").stdout == before


@pytest.mark.slow
def test_scale_model_runs_and_renders_the_committed_tables(tmp_path, capsys):
    assert scale_model.main(["--quick"]) == 0
    assert "| 8B | 64 | 8 | 25 |" in capsys.readouterr().out
    assert scale_model.main(["--render", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"scale_model.md", "scale_model.json", "scale_model.png"}

    def tables(text: str) -> list[str]:  # everything but the line that stamps the rendering commit
        return [line for line in text.splitlines() if not line.startswith("- rendered:")]

    committed = (harness.RESULTS_DIR / "scale_model.md").read_text()
    assert tables((tmp_path / "scale_model.md").read_text()) == tables(committed), (
        "--render no longer reproduces benchmarks/results/scale_model.md from its stored measurements")
