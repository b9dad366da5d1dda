"""scripts/compat.sh: its usage, and that it refuses to start without a torch version (the lane
itself downloads several GB and runs for minutes: see benchmarks/results/compat.md)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compat.sh"


def test_help_names_the_arguments():
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_VERSION [TRITON_VERSION]" in proc.stdout and "--record" in proc.stdout


def test_without_a_version_it_prints_usage_and_fails():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "TORCH_VERSION" in proc.stdout


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=30).returncode == 0
