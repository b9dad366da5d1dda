"""The engine examples of docs/integrations.md, run as a user runs them.

Each script is read from the doc (``<!-- example: NAME -->``), written to a fresh folder and
launched with every CPU launch line the doc gives for it, as written (2 gloo processes). A run
passes when every process exits 0 and the script's own last line reports the optimizer steps
(or the per-language evaluation) it is expected to reach; the correctness of each engine's
MOO is checked by the engine's own tests. The TRL example is ``test_trl.py``.
"""

import importlib.util
import re

import pytest

from doc_examples import example_script, launch_lines, run_launch_line, write_example

# script -> (modules it needs, what its output must contain)
# DeepSpeed prints "... built successfully" once it has built or loaded its shm op: the
# example must skip that JIT build
MUST_NOT_PRINT = {"train_deepspeed.py": "built successfully"}
EXAMPLES = {
    "train_trainer.py": (("transformers", "accelerate", "babel"), [r"'eval_de_loss': [\d.]+, 'eval_sw_loss'"]),
    "train_accelerate.py": (("transformers", "accelerate", "babel"), [r"optimizer steps: 8,"]),
    "train_lightning.py": (("lightning", "babel"), [r"optimizer steps: 16\b"]),
    "train_deepspeed.py": (("deepspeed", "babel"), [r"optimizer steps: 16,"]),
}


def test_every_example_has_a_cpu_launch_line():
    for name in EXAMPLES:
        assert example_script(name).strip()
        cpu, _ = launch_lines(name)
        assert cpu, f"docs/integrations.md gives no CPU launch line for {name}"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_as_documented(tmp_path, name):
    modules, expected = EXAMPLES[name]
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{name} needs {module}")
    write_example(name, tmp_path)
    for line in launch_lines(name)[0]:
        done = run_launch_line(line, tmp_path)
        assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        for pattern in expected:
            assert re.search(pattern, done.stdout), f"{line}: no {pattern!r} in\n{done.stdout[-3000:]}"
        if name in MUST_NOT_PRINT:
            assert MUST_NOT_PRINT[name] not in done.stdout + done.stderr, line
