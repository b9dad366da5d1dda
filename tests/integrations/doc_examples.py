"""The runnable examples of docs/integrations.md, read from the doc itself.

A script is the fenced code block that follows a ``<!-- example: NAME -->`` line; its launch
commands are the lines of the doc's fenced ``bash`` blocks that name the script. Lines whose
comment starts with ``gpu-only`` need GPUs; every other launch line runs on CPU, and the tests
run it as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integrations.md"
GPU_ONLY = "gpu-only"


def _blocks(text: str):
    """``(info, body, preceding text)`` of every fenced block."""
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        yield m.group(1), m.group(2), text[:m.start()]


def example_script(name: str, doc: Path = DOC) -> str:
    """The code block that follows ``<!-- example: name -->`` (the line right before it)."""
    for info, body, before in _blocks(doc.read_text()):
        if before.rstrip().endswith(f"<!-- example: {name} -->"):
            return body
    raise LookupError(f"{doc} has no block marked <!-- example: {name} -->")


def launch_lines(name: str, doc: Path = DOC) -> tuple[list[str], list[str]]:
    """``(cpu, gpu)``: the commands of the doc's bash blocks that run script ``name``."""
    cpu, gpu = [], []
    for info, body, _ in _blocks(doc.read_text()):
        if info != "bash":
            continue
        for line in body.splitlines():
            if re.search(rf"(^|\s){re.escape(name)}(\s|$)", line.split("#")[0]):
                command = line.partition("#")[0]
                # The marker the doc-commands test knows: `# gpu-only` at the very end of the line.
                (gpu if re.search(rf"#\s*{GPU_ONLY}\s*$", line) else cpu).append(command.strip())
    return cpu, gpu


def write_example(name: str, folder: Path) -> Path:
    path = Path(folder) / name
    path.write_text(example_script(name))
    return path


def user_env() -> dict:
    """A user's environment: the package importable, one thread, no hub access."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    return env


def run_launch_line(line: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a documented launch line in ``cwd`` (``torchrun`` / ``accelerate`` from this
    interpreter's environment)."""
    bindir = os.path.dirname(sys.executable)
    env = user_env()
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
