"""What a wrong launch is told, without starting processes: the Trainer's check of a launch it
does not see as distributed (CPU without ``use_cpu=True``), Accelerate's advice when
``accelerator.prepare`` returns no DDP model, and the task/rank split messages."""

from types import SimpleNamespace

import pytest
import torch

from bucketmoo_kernels.data import TaskPlan
from bucketmoo_kernels.distributed.protocol import TaskLayout


def test_world_not_a_multiple_of_the_tasks_says_what_to_launch():
    with pytest.raises(ValueError) as info:
        TaskPlan.build(["a", "b", "c"], world_size=2)
    message = str(info.value)
    assert "launch a multiple of 3 processes" in message and "torchrun --nproc-per-node 3" in message
    assert "task_of_rank" not in message                 # it cannot fix an uneven split


@pytest.mark.parametrize("num_tasks", [3, 1])
def test_num_tasks_against_the_world_without_task_of_rank(num_tasks):
    with pytest.raises(ValueError) as info:
        TaskLayout.build(None, 2, num_tasks)
    message = str(info.value)
    assert f"num_tasks={num_tasks} on a process group of 2 ranks" in message
    assert "assigns no rank" not in message and "task ids in" not in message


def _fake_group(monkeypatch, world):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)


@pytest.mark.slow  # imports transformers
def test_trainer_refuses_a_cpu_launch_without_use_cpu(monkeypatch):
    pytest.importorskip("transformers", reason="needs pip install 'bucketmoo_kernels[hf]'")
    from bucketmoo_kernels.integrations.transformers import check_distributed_launch

    _fake_group(monkeypatch, 2)
    args = SimpleNamespace(world_size=1, use_cpu=False, parallel_mode="not_parallel")
    with pytest.raises(RuntimeError, match=r"2 processes were launched, but the TrainingArguments see a world of 1"
                                           r".*set use_cpu=True in the TrainingArguments \(or SFTConfig\)"):
        check_distributed_launch(args, "BucketMOOTrainer")
    check_distributed_launch(SimpleNamespace(world_size=2, use_cpu=True, parallel_mode="distributed"), "x")


@pytest.mark.slow  # imports transformers
def test_trainer_without_a_group_names_use_cpu_when_processes_were_launched(monkeypatch):
    pytest.importorskip("transformers", reason="needs pip install 'bucketmoo_kernels[hf]'")
    from bucketmoo_kernels.integrations.transformers import check_distributed_launch

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 processes were launched .* set use_cpu=True"):
        check_distributed_launch(SimpleNamespace(world_size=1, use_cpu=False), "BucketMOOTrainer")


@pytest.mark.slow  # imports accelerate
@pytest.mark.parametrize("world, words", [
    (1, "this is a single-process run"),
    (2, "2 processes were launched but the Accelerator sees 1"),
])
def test_accelerate_not_ddp_gives_the_cpu_launch_lines(monkeypatch, world, words):
    pytest.importorskip("accelerate", reason="needs pip install 'bucketmoo_kernels[hf]'")
    from accelerate.utils import DistributedType

    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.accelerate import register_bucket_moo, task_dataloader

    if world > 1:
        _fake_group(monkeypatch, world)
    accelerator = SimpleNamespace(num_processes=1, process_index=0, distributed_type=DistributedType.NO)
    with pytest.raises(TypeError) as info:
        register_bucket_moo(accelerator, torch.nn.Linear(2, 2), BucketMOOState(method="mgda"))
    message = str(info.value)
    assert words in message
    assert "Accelerator(cpu=True)" in message and "accelerate launch --multi_gpu --num_processes P" in message
    assert "torchrun --nproc-per-node P" in message
    if world > 1:
        with pytest.raises(RuntimeError, match=words):
            task_dataloader(accelerator, {"a": [0, 1], "b": [2, 3]}, state=BucketMOOState(method="mgda"))


_NO_USE_CPU = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from bucketmoo_kernels.ddp import BucketMOOState
from bucketmoo_kernels.integrations.transformers import BucketMOOTrainer

ids = torch.zeros(4, 8, dtype=torch.long)
data = [{"input_ids": x, "labels": x} for x in ids]
model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
BucketMOOTrainer(model=model, args=TrainingArguments(output_dir="out", report_to=[]),   # no use_cpu=True
                 train_dataset={"a": data, "b": data}, bucket_moo=BucketMOOState(method="mgda"))
print("NOT REFUSED")
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_on_cpu_without_use_cpu_is_refused_on_every_rank(tmp_path):
    """The launch of issue 25: two processes, TrainingArguments without use_cpu=True."""
    pytest.importorskip("transformers", reason="needs pip install 'bucketmoo_kernels[hf]'")
    if torch.cuda.is_available():
        pytest.skip("with GPUs the Trainer enters distributed mode without use_cpu")
    from doc_examples import run_launch_line

    (tmp_path / "no_use_cpu.py").write_text(_NO_USE_CPU)
    done = run_launch_line("torchrun --nproc-per-node 2 no_use_cpu.py", tmp_path)
    assert done.returncode != 0 and "NOT REFUSED" not in done.stdout
    message = "2 processes were launched, but the TrainingArguments see a world of 1"
    assert done.stderr.count(message) >= 2, done.stderr[-4000:]      # both ranks say it
    assert "set use_cpu=True in the TrainingArguments" in done.stderr
