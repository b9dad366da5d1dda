"""``bucketmoo_kernels.provenance``: the commit and load average results files record."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bucketmoo_kernels import provenance

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_git_commit_is_the_checkout_head_from_any_working_directory(monkeypatch, tmp_path):
    head = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True).strip()
    monkeypatch.chdir(tmp_path)  # path arguments are relative to the repository root, not the cwd
    assert provenance.git_commit("tests/test_provenance.py").split()[0] == head
    assert provenance.git_commit("no/such/path") == head  # nothing tracked there: no local changes


def test_load_average_is_three_numbers_or_na():
    value = provenance.load_average()
    assert value == "n/a" or re.fullmatch(r"\d+\.\d\d \d+\.\d\d \d+\.\d\d", value)
