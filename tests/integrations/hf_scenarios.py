"""Scenarios of the HF Transformers and Accelerate integration tests, run in ONE spawn of two
gloo processes (importing transformers dominates the cost), plus the independent float64
reference they are checked against.

The model is a tiny ``LlamaForCausalLM`` built from a config (no download); two tasks, "a"
and "b", of random token sequences with different sizes (6 and 5 sequences, batch 2, so one
epoch is 3 optimizer steps and 4 steps cross an epoch boundary with a wrap-around of the
smaller task). Optimizer: plain SGD at a constant learning rate, no clipping, so the
reference update is ``p -= lr * d``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
import traceback
import torch

from tests.ddp.ddp_helpers import run_distributed

TASKS = ("a", "b")
SIZES = (6, 5)
SEQ = 8
VOCAB = 32
STEPS = 4
BATCH = 2
LR = 0.5


# ----------------------------------------------------------------------------- data and model
class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_datasets():
    return {t: TokenDataset(n, 100 + i) for i, (t, n) in enumerate(zip(TASKS, SIZES))}


def make_model(lora: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(cfg)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        # init_lora_weights=False: B is random too, so the LoRA gradients are not zero at step 0
        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    return model


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


# ----------------------------------------------------------------------------- the reference
def mgda_two_tasks_float64(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Min-norm point of the segment [g1, g2] (float64, closed form)."""
    m11, m22, m12 = g1 @ g1, g2 @ g2, g1 @ g2
    denom = m11 + m22 - 2 * m12
    gamma = torch.tensor(0.5, dtype=torch.float64) if denom <= 0 else ((m22 - m12) / denom).clamp(0, 1)
    return gamma * g1 + (1 - gamma) * g2


def reference_params(lora: bool, steps: int = STEPS, seed: int = 0, batch: int = BATCH, lr: float = LR,
                     method: str = "mgda") -> torch.Tensor:
    """Train a float64 copy: per step, each task's gradient on its batch (the batches come from
    the same TaskSampler order as the ranks'), per-parameter MGDA (or the mean), ``p -= lr d``."""
    from bucketmoo_kernels.data import TaskPlan, TaskSampler

    data = make_datasets()
    plan = TaskPlan.build(data, world_size=len(TASKS))
    model = make_model(lora).double()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    streams = []
    for rank, task in enumerate(TASKS):
        sampler = TaskSampler(data, plan, rank, seed=seed)
        order = []
        epoch = 0
        while len(order) < steps * batch:
            sampler.set_epoch(epoch)
            idx = list(sampler)
            order += [idx[i:i + batch] for i in range(0, len(idx), batch)]
            epoch += 1
        streams.append(order)
    for step in range(steps):
        grads = []
        for rank, task in enumerate(TASKS):
            items = [data[task][i] for i in streams[rank][step]]
            batch_in = {k: torch.stack([it[k] for it in items]) for k in items[0]}
            loss = model(**batch_in).loss
            grads.append(torch.autograd.grad(loss, params))
        with torch.no_grad():
            for p, g1, g2 in zip(params, *grads):
                a, b = g1.reshape(-1), g2.reshape(-1)
                d = mgda_two_tasks_float64(a, b) if method == "mgda" else (a + b) / 2
                p -= lr * d.view_as(p)
    return flat_params(model)


# ----------------------------------------------------------------------------- HF Trainer runs
def training_args(out: str, **changes):
    from transformers import TrainingArguments

    values = dict(output_dir=out, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
                  optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0,
                  report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, ddp_backend="gloo",
                  disable_tqdm=True, seed=0, dataloader_pin_memory=False, ddp_timeout=180)
    values.update(changes)
    return TrainingArguments(**values)


def plain_trainer_run(out: str):
    """The baseline: a plain ``transformers.Trainer`` that only feeds each rank its task's data
    (what a user would write by hand), no integration."""
    from transformers import Trainer, default_data_collator

    from bucketmoo_kernels.data import TaskPlan, task_dataloader

    class EpochLoader(torch.utils.data.DataLoader):
        def set_epoch(self, epoch):
            self.sampler.set_epoch(epoch)

    class PlainTaskTrainer(Trainer):
        def get_train_dataloader(self):
            plan = TaskPlan.build(self.train_dataset, self.args.world_size)
            loader = task_dataloader(self.train_dataset, self.args.process_index, plan, BATCH, seed=self.args.seed)
            return EpochLoader(loader.dataset, batch_size=BATCH, sampler=loader.sampler,
                               collate_fn=default_data_collator)

    model = make_model()
    trainer = PlainTaskTrainer(model=model, args=training_args(out), train_dataset=make_datasets())
    trainer.train()
    return {"params": flat_params(trainer.model)}


def bucket_trainer_run(out: str, state, lora: bool = False, resume: str | None = None, eval_data: bool = False,
                       **arg_changes):
    from bucketmoo_kernels.integrations.transformers import BucketMOOTrainer

    model = make_model(lora)
    kwargs = {}
    if eval_data:
        kwargs["eval_dataset"] = {"a": TokenDataset(4, 7), "b": TokenDataset(4, 8), "unseen": TokenDataset(4, 9)}
    trainer = BucketMOOTrainer(model=model, args=training_args(out, **arg_changes), train_dataset=make_datasets(),
                               bucket_moo=state, **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    res = {"params": flat_params(trainer.model), "step": None if state is None else state.step,
           "logs": list(trainer.state.log_history), "global_step": trainer.state.global_step}
    if eval_data:
        res["eval"] = trainer.evaluate()
    return res


# ----------------------------------------------------------------------------- Accelerate runs
def accelerate_run(state, steps: int = STEPS, accumulate: int = 1, checkpoint_dir: str | None = None):
    """The documented recipe: prepare, register, a task loader that is not prepared, and
    ``accelerator.accumulate``; ``checkpoint_dir``: save_state at the end and load it into a
    fresh state registered for checkpointing."""
    from accelerate import Accelerator

    from bucketmoo_kernels.integrations.accelerate import register_bucket_moo, task_dataloader

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    if state is not None:
        register_bucket_moo(accelerator, model, state)
        accelerator.register_for_checkpointing(state)
    loader = task_dataloader(accelerator, make_datasets(), BATCH // accumulate, state=state, seed=0)
    done, epoch = 0, 0
    while done < steps * accumulate:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                optimizer.zero_grad()
            done += 1
            if done == steps * accumulate:
                break
        epoch += 1
    res = {"params": flat_params(accelerator.unwrap_model(model)), "step": None if state is None else state.step}
    if checkpoint_dir is not None:
        accelerator.save_state(checkpoint_dir)
        accelerator.wait_for_everyone()
        state.load_state_dict({**state.state_dict(), "step": 0})  # forget, as a restarted script would
        accelerator.load_state(checkpoint_dir)
        res["restored_step"] = state.step
    return res


# ----------------------------------------------------------------------------- DeepSpeed (ZeRO) runs
def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _patch_deepspeed_cpu():
    """DS_ACCELERATOR=cpu JIT-compiles a shared-memory all-reduce op on first use (minutes);
    these runs use gloo collectives only, so its build is skipped."""
    import importlib

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def ds_config(stage: int = 2) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 200, "allgather_bucket_size": 200},
            "zero_allow_untested_optimizer": True, "gradient_clipping": "auto", "steps_per_print": 10 ** 9}


# ----------------------------------------------------------------------------- the scenarios
def _expect_error(fn, exc_type):
    try:
        fn()
    except exc_type as exc:
        return str(exc)
    return "no error raised"


def scenarios(rank: int, workdir: str) -> dict:
    import torch.distributed as dist

    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.transformers import BucketMOOTrainer

    out = {}

    def run(name, fn):
        start = time.perf_counter()
        try:
            out[name] = fn()
        except BaseException:  # noqa: BLE001
            out[name] = {"error": traceback.format_exc()}
        out.setdefault("_seconds", {})[name] = time.perf_counter() - start
        dist.barrier()

    d = lambda name: os.path.join(workdir, name)  # noqa: E731
    run("plain", lambda: plain_trainer_run(d("plain")))
    run("none", lambda: bucket_trainer_run(d("none"), None))
    run("mean", lambda: bucket_trainer_run(d("mean"), BucketMOOState(method="mean")))
    run("mean_record", lambda: bucket_trainer_run(d("mean_record"), BucketMOOState(method="mean",
                                                                                    record_diagnostics=True)))
    run("mgda_param", lambda: bucket_trainer_run(d("mgda_param"), BucketMOOState(method="mgda", granularity="param"),
                                                 save_strategy="steps", save_steps=2))
    run("mgda_resume", lambda: bucket_trainer_run(
        d("mgda_param"), BucketMOOState(method="mgda", granularity="param"),
        resume=os.path.join(d("mgda_param"), "checkpoint-2"), save_strategy="steps", save_steps=2))
    run("mgda_accum", lambda: bucket_trainer_run(
        d("mgda_accum"), BucketMOOState(method="mgda", granularity="param", record_diagnostics=True),
        eval_data=True, per_device_train_batch_size=1, gradient_accumulation_steps=2))
    has_peft = importlib.util.find_spec("peft") is not None
    if has_peft:
        run("lora_mgda_param", lambda: bucket_trainer_run(d("lora"), BucketMOOState(method="mgda",
                                                                                    granularity="param"), lora=True))
    run("misuse_three_tasks", lambda: _expect_error(lambda: BucketMOOTrainer(
        model=make_model(), args=training_args(d("m1")),
        train_dataset={"a": TokenDataset(2, 0), "b": TokenDataset(2, 1), "c": TokenDataset(2, 2)},
        bucket_moo=BucketMOOState(method="mgda")), ValueError))
    run("misuse_not_mapping", lambda: _expect_error(lambda: BucketMOOTrainer(
        model=make_model(), args=training_args(d("m2")), train_dataset=TokenDataset(2, 0)), ValueError))
    run("misuse_task_of_rank", lambda: _expect_error(lambda: BucketMOOTrainer(
        model=make_model(), args=training_args(d("m3")), train_dataset=make_datasets(), task_of_rank=["b", "a"],
        bucket_moo=BucketMOOState(method="mgda", task_of_rank=[0, 1])), ValueError))
    run("acc_plain", lambda: accelerate_run(None))
    run("acc_mean", lambda: accelerate_run(BucketMOOState(method="mean")))
    run("acc_mgda_param", lambda: accelerate_run(BucketMOOState(method="mgda", granularity="param"),
                                                 checkpoint_dir=d("acc_ckpt")))
    run("acc_mgda_accum", lambda: accelerate_run(BucketMOOState(method="mgda", granularity="param"), accumulate=2))
    if deepspeed_available():  # the Trainer's DeepSpeed path: integrations.deepspeed on a ZeRO-2 engine
        _patch_deepspeed_cpu()
        run("ds_none", lambda: bucket_trainer_run(d("ds_none"), None, deepspeed=ds_config()))
        run("ds_mgda_param", lambda: bucket_trainer_run(d("ds_mgda"), BucketMOOState(method="mgda", granularity="param"),
                                                        deepspeed=ds_config(), save_strategy="steps", save_steps=2))
        run("ds_mgda_resume", lambda: bucket_trainer_run(
            d("ds_mgda"), BucketMOOState(method="mgda", granularity="param"), deepspeed=ds_config(),
            resume=os.path.join(d("ds_mgda"), "checkpoint-2"), save_strategy="steps", save_steps=2))
        run("ds_misuse_zero3", lambda: _expect_error(lambda: bucket_trainer_run(
            d("ds_zero3"), BucketMOOState(method="mgda"), deepspeed=ds_config(3)), NotImplementedError))
    if rank == 0:  # the independent float64 references (no process group involved)
        run_local = lambda name, fn: out.__setitem__(name, fn())  # noqa: E731
        run_local("ref_mgda", lambda: reference_params(lora=False))
        run_local("ref_mean", lambda: reference_params(lora=False, method="mean"))
        if has_peft:
            run_local("ref_lora_mgda", lambda: reference_params(lora=True))
    return out


def _worker(rank: int, world: int, workdir: str) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return scenarios(rank, workdir)


def run_all(world: int = 2) -> list[dict]:
    """Every scenario on ``world`` spawned processes (the Trainer sets up the process group
    from torchrun's variables); per rank ``{name: result}``."""
    with tempfile.TemporaryDirectory() as workdir:
        return run_distributed(_worker, world, workdir, init_group=False)
