"""Where a results file was produced: the checkout's commit and the machine's load average.

Used by the demo's ``results.json`` and by the benchmarks' results files, so that every
published figure says which code and how busy a machine produced it.
"""

from __future__ import annotations

import os
import subprocess

__all__ = ["git_commit", "load_average"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(*paths: str) -> str:
    """The checkout's short commit, with " (with local changes)" when tracked files under
    ``paths`` (relative to the repository root; default the package) differ from it, or
    "unknown" outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.check_output(["git", "-C", _ROOT, *args], stderr=subprocess.DEVNULL,
                                       text=True, timeout=10).strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *(paths or ("bucketmoo_kernels",)))
        return commit + (" (with local changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or "n/a" where the OS has none."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
