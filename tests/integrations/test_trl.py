"""``BucketMOOSFTTrainer`` (TRL): the example of docs/integrations.md, run as a user runs it.

The script is extracted from the doc; its CPU launch line is run as written (2 gloo processes
through torchrun), then ``trl_checks.py`` runs the same script's ``main`` in five
configurations under one torchrun launch: MOO is applied (segments where the languages'
gradients conflict get weights away from the mean's 1/2, and the parameters differ from plain
DDP), replicas are bitwise identical, ``state.step`` counts optimizer steps with gradient
accumulation, a resume from the step-2 checkpoint is bitwise equal to the uninterrupted run,
chat (``messages``) data without packing and LoRA through PEFT train, and every language is
evaluated.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from doc_examples import launch_lines, run_launch_line, user_env, write_example

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = "sft_multilingual.py"
HERE = Path(__file__).resolve().parent


def _needs_trl():
    for module in ("trl", "datasets", "peft", "babel"):
        pytest.importorskip(module, reason=f"needs {module} (pip install 'bucketmoo_kernels[trl,peft,demo]')")


def test_doc_gives_the_cpu_launch_line():
    cpu, _ = launch_lines(SCRIPT)
    assert cpu and all(line.startswith("torchrun --nproc-per-node 2 ") for line in cpu), cpu


def test_documented_cpu_launch_runs(tmp_path):
    _needs_trl()
    write_example(SCRIPT, tmp_path)
    cpu, _ = launch_lines(SCRIPT)
    for line in cpu:
        done = run_launch_line(line, tmp_path)
        assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        for lang in ("de", "ru", "fr"):
            assert f"'eval_{lang}_loss'" in done.stdout, done.stdout[-2000:]


@pytest.fixture(scope="module")
def sft_results(tmp_path_factory):
    _needs_trl()
    folder = tmp_path_factory.mktemp("sft")
    example = write_example(SCRIPT, folder)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(HERE / "trl_checks.py"), str(example), str(folder)]
    done = subprocess.run(cmd, cwd=folder, env=user_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    return [torch.load(folder / f"results_rank{r}.pt", weights_only=True) for r in range(2)]


def _run(results, name):
    for res in results:
        assert "error" not in res[name], res[name].get("error")
    return [res[name] for res in results]


@pytest.mark.parametrize("name", ["none", "mgda", "mgda_resume", "messages", "lora"])
def test_replicas_identical(sft_results, name):
    runs = _run(sft_results, name)
    assert [r["task"] for r in runs] == ["de", "ru"]
    assert torch.equal(runs[0]["params"], runs[1]["params"]), "replicas diverged"


def test_moo_applied_where_languages_conflict(sft_results):
    mgda, none = _run(sft_results, "mgda")[0], _run(sft_results, "none")[0]
    cos = torch.cat([r["cosine"][:, 0, 1] for r in mgda["records"]])
    weights = torch.cat([r["weights"] for r in mgda["records"]])
    # one record per DDP bucket and optimizer step (accumulation 2: 8 backwards, 4 hook runs)
    assert mgda["records"] and len(mgda["records"]) % 4 == 0
    torch.testing.assert_close(weights.sum(1), torch.ones(len(weights)), atol=1e-5, rtol=0)
    conflict = cos < 0
    assert conflict.any(), "no segment where the languages conflict: the check could not fail"
    # MGDA on a conflicting pair moves away from the mean's (1/2, 1/2) unless the norms are equal
    assert (weights[conflict, 0] - 0.5).abs().mean() > 0.05
    # and the trained parameters differ from plain DDP averaging of the same data
    assert (mgda["params"] - none["params"]).abs().max() > 1e-4


def test_steps_count_optimizer_steps_with_accumulation(sft_results):
    for name, steps in (("mgda", 4), ("mgda_resume", 4), ("messages", 2), ("lora", 2)):
        for run in _run(sft_results, name):
            assert run["step"] == steps == run["global_step"], name


def test_resume_is_bitwise_equal_to_the_uninterrupted_run(sft_results):
    full = _run(sft_results, "mgda")
    resumed = _run(sft_results, "mgda_resume")
    for a, b in zip(full, resumed):
        assert torch.equal(a["params"], b["params"])


def test_lora_trains_only_the_adapters(sft_results):
    lora = _run(sft_results, "lora")[0]
    initial = sft_results[0]["initial"]["params"]
    assert 0 < lora["trainable"].numel() < lora["params"].numel()
    assert lora["frozen"].numel() == initial.numel()
    assert torch.equal(lora["frozen"], initial)       # the base model's weights are untouched


def test_every_language_is_evaluated(sft_results):
    for name in ("mgda", "messages", "lora"):
        logs = _run(sft_results, name)[0]["logs"]
        keys = set().union(*logs)
        assert {"eval_de_loss", "eval_ru_loss", "eval_fr_loss"} <= keys, (name, keys)
        train = [log for log in logs if "loss" in log]
        assert train and all("bucket_moo/step" in log for log in train)
