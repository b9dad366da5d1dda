"""scripts/gpu_session.sh without a GPU: its plan fits the 8-minute call, and against a stub
interpreter (a fake ``PYTHON`` and fake nvidia-smi / nvcc / compute-sanitizer on the PATH) it
ends by itself, writes summary.txt and the archive, marks the GPU steps as failed, timed out or
skipped rather than hanging, prints the failing pytest ids to rerun, and moves a finished build
into the package.

The script runs in a copy of itself inside a skeleton repository (tmp_path), so nothing it
writes (the build, the package's extensions, gpu_out) touches this checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

STUB_PYTHON = r"""#!/usr/bin/env bash
# A python3 without a GPU. STUB_MODE=fail: every GPU command fails at once (pytest prints a
# failing id the way pytest -v -ra does), setup.py "builds" a fake extension. STUB_MODE=hang:
# every command hangs.
[ "${STUB_MODE:-fail}" = hang ] && exec sleep 300
if [ "$1" = setup.py ]; then
  lib=
  while [ $# -gt 0 ]; do [ "$1" = --build-lib ] && lib=$2; shift; done
  kind=cpu
  [ "${BUCKETMOO_SKIP_CPU_BUILD:-}" = 1 ] && kind=cuda
  mkdir -p "$lib/bucketmoo_kernels" && echo fake > "$lib/bucketmoo_kernels/_${kind}.stub.so"
  echo "built _${kind}"
  exit 0
fi
if [ "$1" = -m ] && [ "$2" = pytest ]; then
  echo "[gw0] [ 50%] FAILED tests/test_stub.py::test_gpu[cuda-2] "
  echo "FAILED tests/test_stub.py::test_gpu[cuda-2] - RuntimeError: no CUDA device"
  echo "ERROR tests/test_stub.py::test_setup - RuntimeError: no CUDA device"
  echo "=== 1 failed, 1 error in 0.1s ==="
  exit 1
fi
echo "stub python: no GPU here" >&2
exit 1
"""

SHIMS = {
    "nvidia-smi": '[ "${STUB_MODE:-fail}" = hang ] && exec sleep 300\necho "NVIDIA-SMI has failed" >&2; exit 9\n',
    "nvcc": 'echo "nvcc stub"; exit 0\n',
    # compute-sanitizer: drop its options, run the program
    "compute-sanitizer": 'while [ "${1#--}" != "$1" ]; do case "$1" in --tool|--error-exitcode|--target-processes) '
                         'shift;; esac; shift; done\nexec "$@"\n',
}


def _executable(path: Path, text: str) -> Path:
    path.write_text(text if text.startswith("#!") else "#!/usr/bin/env bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def skeleton(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "bucketmoo_kernels").mkdir()
    shutil.copy(SCRIPT, repo / "scripts" / "gpu_session.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in SHIMS.items():
        _executable(bin_dir / name, text)
    python = _executable(tmp_path / "python3", STUB_PYTHON)
    return repo, bin_dir, python, tmp_path / "out"


def _run(skeleton, *args, timeout, **env):
    repo, bin_dir, python, out = skeleton
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(python),
                "OUT": str(out), "TMPDIR": str(out.parent), **env}
    t0 = time.monotonic()
    result = subprocess.run(["bash", str(repo / "scripts" / "gpu_session.sh"), *args], env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - t0


def _statuses(summary: str) -> dict[str, str]:
    """step -> status, from summary.txt's step lines."""
    got = {}
    for line in summary.splitlines():
        m = re.match(r"^(\w+)\s+(ok|SKIPPED|FAILED \(exit \d+\)|TIMED OUT after \d+s)\s", line)
        if m:
            got[m.group(1)] = m.group(2)
    return got


FIRST_STEPS = ["versions", "build_cpu", "build_cuda", "triton", "import", "cuda", "graphs", "local_memory", "bench",
               "sanitizer"]


def test_plan_lists_every_step_and_totals_at_most_480_s():
    result = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    total = re.fullmatch(r"total: (\d+) s", lines[-1])
    assert total and int(total.group(1)) <= 480, lines[-1]
    planned = [line.split()[0] for line in lines if re.match(r"^\s+\w+\s+\d+s\s", line)]
    assert planned == FIRST_STEPS + ["pack"]
    # the total is the wall clock: the builds and the Triton tests run side by side
    limits = {line.split()[0]: int(line.split()[1][:-1]) for line in lines if re.match(r"^\s+\w+\s+\d+s\s", line)}
    parallel = max(limits["build_cpu"], limits["build_cuda"], limits["triton"])
    assert int(total.group(1)) == sum(v for k, v in limits.items() if k not in ("build_cpu", "build_cuda", "triton")) \
        + parallel


@pytest.mark.parametrize("stage", ["gpu-suite", "sanitize", "bench", "rerun"])
def test_opt_in_stages_fit_one_device_command(stage):
    result = subprocess.run(["bash", str(SCRIPT), "--plan", stage], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    total = int(re.fullmatch(r"total: (\d+) s", result.stdout.strip().splitlines()[-1]).group(1))
    assert total <= 560  # their deadline, inside one 10-minute command


def test_unknown_argument_is_refused():
    result = subprocess.run(["bash", str(SCRIPT), "benchh"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown argument 'benchh'" in result.stderr


def test_without_a_gpu_every_step_fails_the_summary_names_the_ids_and_the_build_is_moved_in(skeleton):
    repo, _, _, out = skeleton
    result, elapsed = _run(skeleton, timeout=120, STUB_MODE="fail")
    assert elapsed < 60 and result.returncode == 1, result.stdout[-3000:]
    summary = (out / "summary.txt").read_text()
    status = _statuses(summary)
    assert sorted(status) == sorted(FIRST_STEPS), summary
    # the stub's builds finish: moved into the package, nothing half-written left there
    assert status["build_cpu"] == "ok" and status["build_cuda"] == "ok", summary
    assert sorted(p.name for p in (repo / "bucketmoo_kernels").iterdir()) == ["_cpu.stub.so", "_cuda.stub.so"]
    # every GPU step fails; the CUDA tests are skipped when the backend does not import
    for name in ("versions", "triton", "import", "graphs", "local_memory", "bench", "sanitizer"):
        assert status[name].startswith("FAILED"), (name, summary)
    assert status["cuda"] == "SKIPPED"
    # the failing ids, as the command that reruns them
    assert "bash scripts/gpu_session.sh rerun 'tests/test_stub.py::test_gpu[cuda-2]' 'tests/test_stub.py::test_setup'" \
        in summary
    assert summary == result.stdout[-len(summary):]  # the summary is the last thing printed
    with tarfile.open(out / "gpu_session.tgz") as tar:
        names = set(tar.getnames())
    assert {"summary.txt", "logs/triton.log", "logs/build_cuda.log", "results/rerun_triton.txt"} <= names, names
    assert sorted(p.name for p in out.iterdir()) == ["gpu_session.tgz", "summary.txt"]  # 2 of the 8 files


@pytest.mark.slow
def test_hanging_commands_time_out_and_the_deadline_holds(skeleton):
    repo, _, _, out = skeleton
    budget = 30  # 20 s for the steps after the 10 s kept back for packing: each gets its 2 s cap
    result, elapsed = _run(skeleton, timeout=120, STUB_MODE="hang", GPU_SESSION_BUDGET_S=str(budget),
                           GPU_SESSION_STEP_CAP_S="2")
    assert elapsed < budget + 10, result.stdout[-3000:]
    summary = (out / "summary.txt").read_text()
    status = _statuses(summary)
    assert sorted(status) == sorted(FIRST_STEPS), summary
    for name in ("versions", "build_cpu", "build_cuda", "triton", "import", "graphs", "local_memory", "bench"):
        assert status[name].startswith("TIMED OUT after 2s"), (name, summary)
    assert status["cuda"] == "SKIPPED"  # the backend did not import
    assert status["sanitizer"] == "SKIPPED"  # less than its 25 s left
    assert not any(status[name] == "ok" for name in FIRST_STEPS)
    assert list((repo / "bucketmoo_kernels").iterdir()) == []  # a build cut off moves nothing in
    assert (out / "gpu_session.tgz").exists()


@pytest.mark.parametrize("doc", ["docs/cuda.md", "docs/triton.md"])
def test_the_docs_show_the_current_plan(doc):
    plan = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=30).stdout
    assert f"```\n{plan}```" in (ROOT / doc).read_text(), f"{doc}: paste the output of `bash scripts/gpu_session.sh --plan`"


def test_rerun_builds_then_runs_the_given_ids(skeleton):
    repo, _, _, out = skeleton
    result, _ = _run(skeleton, "rerun", "tests/test_stub.py::test_gpu[cuda-2]", timeout=120, STUB_MODE="fail")
    assert result.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert _statuses(summary) == {"versions": "FAILED (exit 1)", "build_cpu": "ok", "build_cuda": "ok",
                                  "rerun": "FAILED (exit 1)"}, summary
    with tarfile.open(out / "gpu_session.tgz") as tar:
        log = tar.extractfile("logs/rerun.log").read().decode()
    assert "FAILED tests/test_stub.py::test_gpu[cuda-2]" in log
    assert sorted(p.name for p in (repo / "bucketmoo_kernels").iterdir()) == ["_cpu.stub.so", "_cuda.stub.so"]


def test_rerun_without_ids_is_refused(skeleton):
    result, _ = _run(skeleton, "rerun", timeout=30)
    assert result.returncode == 2 and "give the pytest ids" in result.stderr
