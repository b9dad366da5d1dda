"""Every command shown in README.md and docs/*.md is run by CI or marked in the doc as not runnable here.

A shell command in a fenced code block (``bash``/``sh``/``shell``/``console`` blocks, and
unlabelled blocks whose lines all start with a command) must be one of:

* **marked** in the doc, with a comment at the very end of its line (after any other comment):
  ``# gpu-only`` (needs a CUDA device) or ``# long`` (minutes or more, or it installs from the
  network: CI runs a smaller form of it elsewhere, or not at all);
* in :data:`RUN`: the documented command -> the command this file runs (the same one, or a small
  form of it: ``--quick``, tiny sizes, ``--help``), in ``test_documented_command_runs``;
* in :data:`COVERED`: the documented command -> ``(file, text)``, a test or CI script that runs
  it (or its small form); the file must contain the text, so a renamed test breaks the link.

``test_every_documented_command_is_run_or_marked`` fails for any other command and says what
to add. Inline code (`` `python -m benchmarks.x ...` ``) is checked more lightly: the module or
script it names must exist. ``test_command_line_modules_answer_help`` runs ``--help`` of every
``benchmarks`` module with a ``__main__`` block (and the demo and tools' scripts).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

#: The marker at the end of a command's line: it is not run by CI.
MARK = re.compile(r"#\s*(long|gpu-only)\s*$")
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
#: First words that make a line of an unlabelled block a shell command.
COMMAND_WORDS = {"python", "python3", "bash", "sh", "pip", "pip3", "torchrun", "accelerate", "deepspeed",
                 "compute-sanitizer", "nvcc", "git", "cd", "export", "pytest", "lightning"}
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")

PY = sys.executable

#: documented command -> the command CI runs for it here (from the repository root).
RUN = {
    'python -c "import bucketmoo_kernels as bm; print(bm.__version__, bm.available_backends(\'cpu\'))"':
        f'{PY} -c "import bucketmoo_kernels as bm; print(bm.__version__, bm.available_backends(\'cpu\'))"',
}

#: documented command -> (file, text): a test or CI script that runs it (or its small form).
COVERED = {
    # docs/integrations.md: every engine's example script, run by its CPU launch lines as written.
    "torchrun --nproc-per-node 2 train_trainer.py": ("tests/integrations/test_doc_examples.py",
                                                     "def test_example_runs_as_documented"),
    "torchrun --nproc-per-node 2 train_accelerate.py": ("tests/integrations/test_doc_examples.py",
                                                        "def test_example_runs_as_documented"),
    "accelerate launch --multi_gpu --num_processes 2 train_accelerate.py":
        ("tests/integrations/test_doc_examples.py", "def test_example_runs_as_documented"),
    "python train_lightning.py": ("tests/integrations/test_doc_examples.py", "def test_example_runs_as_documented"),
    "DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 train_deepspeed.py":
        ("tests/integrations/test_doc_examples.py", "def test_example_runs_as_documented"),
    "torchrun --nproc-per-node 2 sft_multilingual.py": ("tests/integrations/test_trl.py", "launch_lines(SCRIPT)"),
    "torchrun --nproc-per-node 2 sft_multilingual.py --resume sft-out/checkpoint-3":
        ("tests/integrations/test_trl.py", "launch_lines(SCRIPT)"),
    # docs/cuda.md: the GPU session's plan (its stub test also checks the docs show the current plan).
    "bash scripts/gpu_session.sh --plan": ("tests/scripts/test_gpu_session.py",
                                           "def test_plan_lists_every_step_and_totals_at_most_480_s"),
    # docs/profile.md: the profiler's CLI, small sizes.
    "python -m bucketmoo_kernels.profile --help": ("tests/test_profile.py", "def test_cli_help"),
    "python -m bucketmoo_kernels.profile --quick": ("tests/test_profile.py", "def test_cli_quick"),
    "python -m bucketmoo_kernels.profile --hf-config path/to/config.json --quick --granularity bucket":
        ("tests/test_profile.py", '"--hf-config",\n                           str(cfg), "--granularity", "bucket"'),
    "python -m bucketmoo_kernels.profile --hf-config tiny-gpt2 --quick":
        ("tests/test_profile.py", '"--hf-config", "tiny-gpt2"'),
    # README: the test command and the fast lane are what CI itself runs.
    "bash scripts/test.sh": (".ci/run", "bash scripts/test.sh"),
    'python -m pytest -m "not slow and not distributed"': ("scripts/test.sh", "python -m pytest"),
    "python -m pytest": ("scripts/test.sh", "python -m pytest"),
    # README install: scripts/setup_env.sh does these steps (every CI run starts with it).
    "pip install torch": ("scripts/setup_env.sh", 'pip_install torch "$TORCH_SPEC"'),
    "pip install triton numpy ninja pybind11": ("scripts/setup_env.sh", "ninja pybind11"),
    "pip install --no-build-isolation -e .": ("scripts/setup_env.sh", "--no-build-isolation -c \"$CONSTRAINT\" -e ."),
    # README and docs/demo.md: the demo's engines on tiny settings, and its CLI.
    "python -m bucketmoo_kernels.demo --quick --engine hf --runs mean mgda":
        ("tests/test_demo.py", "def test_hf_engine_runs_through_the_trainer"),
    "python -m bucketmoo_kernels.demo --quick --engine fsdp": ("tests/test_demo.py", "def test_fsdp_engine_runs"),
    "python -m bucketmoo_kernels.demo --quick": ("tests/test_demo.py", "def test_every_configuration_runs"),
    "python -m bucketmoo_kernels.demo --help": ("tests/test_doc_commands.py", '"bucketmoo_kernels.demo"'),
    "pip install -e '.[demo]'": ("tests/test_packaging.py", '"demo"'),
    # docs/methods.md: list-valued method options reach the runs (tiny settings).
    "python -m bucketmoo_kernels.demo --runs mean constant upgrad graddrop gradvac --method-option "
    "constant:weights=1,2,1,1 --method-option upgrad:pref_vector=[0.4,0.2,0.2,0.2]":
        ("tests/test_demo.py", "def test_list_options_reach_the_state"),
    # docs/cuda.md: the CUDA compile check runs in scripts/test.sh whenever nvcc is present.
    "bash tools/check_cuda_compile.sh": ("scripts/test.sh", "bash tools/check_cuda_compile.sh"),
}

#: Modules with a command line (``if __name__ == "__main__"``) outside benchmarks/ whose
#: ``--help`` must work; every such benchmarks/ module is found by itself.
OTHER_COMMAND_LINES = ["bucketmoo_kernels.demo", "tools/readme_results.py"]


# ------------------------------------------------------------------------------ parsing
def _strip_comment(line: str) -> tuple[str, str]:
    """Split a shell line into (command, comment) at the first ``#`` that starts a word
    outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def _logical_lines(body: str):
    """``(index of the first physical line, text)`` of a block's lines, with backslash
    continuations joined and a ``$ `` prompt removed."""
    pending, start = "", 0
    for i, raw in enumerate(body.splitlines()):
        line = raw.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not pending:
            start = i
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        yield start, (pending + line).strip()
        pending = ""
    if pending:
        yield start, pending.strip()


def _is_command(command: str) -> bool:
    words = command.split()
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    return bool(words) and words[0] in COMMAND_WORDS


def documented_commands() -> list[tuple[str, int, str, str | None]]:
    """``(doc, line number, command, marker)`` for every shell command of the fenced blocks."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for block in re.finditer(r"^```([^\n`]*)\n(.*?)^```", text, re.S | re.M):
            lang = block.group(1).strip().lower()
            if lang not in SHELL_LANGS and lang != "":
                continue
            lines = [(i, *_strip_comment(x)) for i, x in _logical_lines(block.group(2))]
            lines = [(i, c, k) for i, c, k in lines if c]
            if lang == "" and not all(_is_command(c) for _, c, _ in lines):
                continue  # an unlabelled block of something else (schemas, output)
            first_line = text[:block.start(2)].count("\n") + 1
            for i, command, comment in lines:
                marker = MARK.search(comment)
                found.append((doc, first_line + i, " ".join(command.split()), marker.group(1) if marker else None))
    return found


def _key(command: str) -> str:
    return " ".join(command.split())


# ------------------------------------------------------------------------------ tests
def test_every_documented_command_is_run_or_marked():
    commands = documented_commands()
    assert commands, "no shell commands found in README.md and docs/*.md: is the parser broken?"
    run, covered = {_key(k) for k in RUN}, {_key(k) for k in COVERED}
    unhandled = [f"  {doc}:{line}: {cmd}" for doc, line, cmd, marker in commands
                 if marker is None and cmd not in run and cmd not in covered]
    assert not unhandled, (
        "documented commands that CI neither runs nor skips on purpose:\n" + "\n".join(unhandled) +
        "\nFor each: end its line in the doc with `# gpu-only` or `# long` (after any other comment), or "
        "map it in tests/test_doc_commands.py: RUN (documented -> a small form this test runs) or "
        "COVERED (documented -> (file, text) of the test or script that runs it).")
    shown = {cmd for _, _, cmd, _ in commands}
    stale = sorted((run | covered) - shown)
    assert not stale, f"RUN/COVERED entries no longer in any doc (remove or update them): {stale}"
    both = sorted(run & covered)
    assert not both, f"in both RUN and COVERED: {both}"


@pytest.mark.parametrize("documented", sorted(COVERED))
def test_covered_commands_point_at_what_runs_them(documented):
    path, text = COVERED[documented]
    assert (ROOT / path).is_file(), f"{documented!r}: {path} does not exist"
    assert text in (ROOT / path).read_text(), f"{documented!r}: {path} no longer contains {text!r}"


@pytest.mark.slow
@pytest.mark.parametrize("documented", sorted(RUN))
def test_documented_command_runs(documented):
    proc = subprocess.run(RUN[documented], shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{RUN[documented]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def test_marker_syntax():
    """The markers as the docs use them, and what is not one."""
    assert MARK.search("# main job: demo + bench # long")
    assert MARK.search("# gpu-only") and not MARK.search("# longer") and not MARK.search("# long run, mind")
    assert _strip_comment('python -m pytest -m "not slow # x" # fast lane') == (
        'python -m pytest -m "not slow # x"', "# fast lane")
    assert list(_logical_lines("$ python a.py \\\n    --x 1 # long\nbash b.sh\n")) == [
        (0, "python a.py --x 1 # long"), (2, "bash b.sh")]
    assert _is_command("BUCKETMOO_X=1 python -m pytest") and not _is_command("gram(Tensor[] grads) -> Tensor")


def _command_line_modules() -> list[str]:
    names = [f"benchmarks.{p.stem}" for p in sorted((ROOT / "benchmarks").glob("*.py"))
             if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)]
    return names + OTHER_COMMAND_LINES


# runpy warns when the module was imported before (by another test): harmless for --help.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import of package:RuntimeWarning")
@pytest.mark.parametrize("module", _command_line_modules())
def test_command_line_modules_answer_help(module, monkeypatch):
    """``--help`` in this process (no interpreter start per module): exit status 0 and a usage line."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        if module.endswith(".py"):
            runpy.run_path(str(ROOT / module), run_name="__main__")
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None), f"{module} --help exited with {exit_.value.code}"
    assert "usage:" in out.getvalue(), f"{module} --help printed no usage:\n{out.getvalue()[:500]}"


INLINE = re.compile(r"`((?:[A-Z_][A-Z0-9_]*=\S+ )*(?:python -m [\w.]+|python [\w/.-]+\.py|bash [\w/.-]+\.sh)[^`]*)`")


def test_inline_commands_name_existing_modules():
    """Inline code that runs a module or script names one that exists."""
    missing = []
    for doc in DOCS:
        for m in INLINE.finditer((ROOT / doc).read_text()):
            words = [w for w in m.group(1).split() if not ENV_ASSIGNMENT.match(w)]
            target = words[2] if words[1] == "-m" else words[1]
            if words[1] == "-m":
                ok = importlib.util.find_spec(target) is not None
            else:
                ok = (ROOT / target).is_file()
            if not ok:
                missing.append(f"{doc}: `{m.group(1)}`")
    assert not missing, "inline commands naming a module or script that does not exist:\n" + "\n".join(missing)
