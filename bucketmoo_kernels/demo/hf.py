"""``--engine hf``: the demo's comparison run through the HF Transformers ``Trainer``.

The same languages, held-out split, evaluation windows, conflict probe and report as the DDP
engine (:mod:`.train`), but each run is a :class:`~bucketmoo_kernels.integrations.transformers.BucketMOOTrainer`
fine-tuning a small HF causal LM built from a config -- ``GPT2LMHeadModel`` with a byte-level
vocabulary of 256, so no tokenizer or weights are downloaded. ``mean`` is ``bucket_moo=None``
(plain DDP on the same per-language data), ``<method>[-<granularity>]`` a ``BucketMOOState``.

Differences from the DDP engine, all the Trainer's own behaviour: training examples are the
non-overlapping ``context``-byte windows of each language's training bytes, shuffled per
epoch by :class:`~bucketmoo_kernels.data.TaskSampler` (the DDP engine draws random offsets);
the learning rate follows the Trainer's ``cosine_with_min_lr`` schedule (warm-up, cosine decay
to 10%); the held-out loss is the Trainer's ``eval_<code>_loss`` on the same windows (a causal
LM with ``labels=input_ids`` predicts ``context - 1`` bytes per window). Static weighting runs
are not offered here.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

from ..distributed.localhost import free_port
from .data import DATA_SOURCE, heldout_windows, load_languages, sample_batch
from .train import (environment, DemoSettings, RunSpec, RunContext, hook_statistics, leave_group, probe_losses,
                    hook_settings,
                    settings_dict, bucket_lengths)

__all__ = ["run_hf_demo", "build_model", "WindowDataset"]


class WindowDataset(torch.utils.data.Dataset):
    """Fixed ``[W, context]`` byte windows as causal-LM examples (``labels = input_ids``)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def build_model(settings: DemoSettings):
    """A byte-level ``GPT2LMHeadModel`` from a config (vocabulary 256, no dropout, no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = settings.model
    cfg = GPT2Config(vocab_size=m.vocab, n_positions=m.context, n_embd=m.d_model, n_layer=m.n_layer,
                     n_head=m.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=ord("\n"), eos_token_id=ord("\n"))
    torch.manual_seed(settings.seed)
    return GPT2LMHeadModel(cfg)


class _LossView:
    """``parameters()`` and ``loss(inputs, targets)`` of an HF causal LM, as the probe expects."""

    def __init__(self, model):
        self.model = model

    def parameters(self):
        return self.model.parameters()

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=inputs).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _training_args(settings: DemoSettings, out: str, device: torch.device):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out, max_steps=settings.steps, per_device_train_batch_size=settings.batch,
        per_device_eval_batch_size=16, learning_rate=settings.lr, warmup_steps=settings.warmup,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=settings.clip,
        eval_strategy="steps", eval_steps=settings.eval_every, eval_on_start=True,
        logging_steps=settings.eval_every, save_strategy="no", report_to=[], disable_tqdm=True,
        seed=settings.seed, use_cpu=device.type == "cpu", ddp_backend="gloo" if device.type == "cpu" else "nccl",
        ddp_bucket_cap_mb=settings.bucket_cap_mb, dataloader_pin_memory=False, ddp_timeout=600)


def _train_one(spec: RunSpec, ctx: RunContext, train_sets: dict, eval_sets: dict, workdir: str, bar) -> dict:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..ddp import BucketMOOState
    from ..integrations.transformers import BucketMOOTrainer

    settings = ctx.settings
    result = {"name": spec.name, "method": spec.method, "granularity": spec.granularity, "tau": spec.tau,
              "status": "ok"}
    if spec.tau is not None:
        result.update(status="skipped", error="static loss weighting is not part of the --engine hf demo")
        if bar is not None:
            bar.update(settings.steps)
        return result
    state = None
    if spec.uses_hook:
        kwargs, notes = hook_settings(spec, settings)
        result["notes"] = list(notes)
        state = BucketMOOState(**kwargs)
    model = build_model(settings)
    eval_steps = sorted({0, settings.steps} | set(range(settings.eval_every, settings.steps, settings.eval_every)))
    step_s, probes, hook_stats = [], [], []

    class _DemoCallback(TrainerCallback):
        """Times steps, records the hook's diagnostics on the step before each evaluation and
        runs the conflict probe (a collective: every rank runs the same callbacks)."""

        started = 0.0

        def on_step_begin(self, args, trainer_state, control, **kwargs):
            if state is not None:
                state.record_diagnostics = trainer_state.global_step + 1 in eval_steps
            self.started = time.perf_counter()

        def on_step_end(self, args, trainer_state, control, **kwargs):
            step_s.append(time.perf_counter() - self.started)
            if bar is not None:
                bar.update(1)
            if state is not None and state.record_diagnostics:
                state.record_diagnostics = False
                hook_stats.append(dict(hook_statistics(state), step=trainer_state.global_step))
            if trainer_state.global_step in eval_steps:
                probes.append(_probe_now(kwargs["model"], trainer_state.global_step))

        def on_train_begin(self, args, trainer_state, control, **kwargs):
            probes.append(_probe_now(kwargs["model"], 0))

    def _probe_now(hf_model, step):
        was_training = hf_model.training
        hf_model.eval()
        try:
            return probe_losses(_LossView(hf_model), ctx, spec, None)
        finally:
            hf_model.train(was_training)

    trainer = BucketMOOTrainer(model=model, args=_training_args(settings, os.path.join(workdir, spec.name), ctx.device),
                               train_dataset={c: train_sets[c] for c in settings.languages},
                               eval_dataset=eval_sets, bucket_moo=state, callbacks=[_DemoCallback()])
    for noisy in (PrinterCallback, ProgressCallback):  # the demo prints its own table and progress bar
        trainer.remove_callback(noisy)
    trainer.train()
    if settings.steps % settings.eval_every:  # the Trainer evaluates at multiples of eval_steps only
        trainer.evaluate()
    evals = {}
    for log in trainer.state.log_history:
        for code in eval_sets:
            key = f"eval_{code}_loss"
            if key in log:
                evals.setdefault(code, {})[int(log["step"])] = log[key]
    gathered = [None] * ctx.world
    dist.all_gather_object(gathered, {"step_s": step_s})
    if ctx.rank != 0:
        return result
    per_step = torch.tensor([part["step_s"] for part in gathered]).max(0).values
    timed = per_step[3:] if per_step.numel() > 3 else per_step
    result.update(
        eval_steps=eval_steps,
        heldout={code: [evals[code][s] for s in eval_steps] for code in eval_sets},
        train_loss={},
        step_ms_median=1e3 * float(timed.median()),
        step_ms_p90=1e3 * float(timed.quantile(0.9)),
        peak_mem_mib=None,
        hook_extra_mib=None if state is None else state.peak_extra_bytes / 2**20,
        probe=[dict(p, step=s) for p, s in zip(probes, eval_steps)],
        hook_diagnostics=hook_stats,
    )
    return result


def _worker(rank: int, settings: DemoSettings, port: int, result_path: str) -> None:
    world = settings.world_size
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    threads = settings.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    use_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()
                                             and torch.cuda.device_count() >= world)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        codes = list(settings.languages) + list(settings.unseen)
        context = settings.model.context
        data = load_languages(codes, settings.heldout_share, settings.seed, min_bytes=context + 2)
        train_sets = {c: WindowDataset(heldout_windows(data[c].train, context, 10**9)[0]) for c in settings.languages}
        windows = {c: heldout_windows(data[c].heldout, context, settings.eval_windows) for c in codes}
        eval_sets = {c: WindowDataset(windows[c][0]) for c in codes}
        probe_gen = torch.Generator().manual_seed(settings.seed * 1000 + 999 + rank)
        probe = sample_batch(data[settings.languages[rank]].train, settings.batch, context, probe_gen)
        ctx = RunContext(rank, world, device, settings, data, windows, tuple(t.to(device) for t in probe), [])
        bar = None
        if rank == 0 and settings.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=settings.steps * len(settings.runs), unit="step", dynamic_ncols=True)
        runs = []
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bucketmoo_hf_demo_") as workdir:
            for spec in settings.specs():
                if bar is not None:
                    bar.set_description(f"{spec.name:<12}")
                runs.append(_train_one(spec, ctx, train_sets, eval_sets, workdir, bar))
                dist.barrier()
        if bar is not None:
            bar.close()
        if rank == 0:
            import transformers

            model = build_model(settings)
            summary = {
                "settings": settings_dict(settings),
                "environment": environment(device, backend, threads, transformers=transformers.__version__),
                "data_source": DATA_SOURCE,
                "languages": {c: {"name": data[c].name, "train_bytes": data[c].train.numel(),
                                  "heldout_bytes": data[c].heldout.numel(),
                                  "eval_windows": int(windows[c][0].shape[0]),
                                  "strings": data[c].num_strings, "seen": c in settings.languages}
                              for c in codes},
                "model_parameters": sum(p.numel() for p in model.parameters()),
                "probe_buckets": len(bucket_lengths(list(model.parameters()), int(settings.bucket_cap_mb * 2**20))),
                "wall_s": time.perf_counter() - started,
                "runs": runs,
            }
            with open(result_path, "w") as f:
                json.dump(summary, f)
        dist.barrier()
    finally:
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
    leave_group()


def run_hf_demo(settings: DemoSettings) -> dict:
    """Train every run of ``settings`` with ``BucketMOOTrainer`` on ``len(languages)`` processes;
    return rank 0's summary (the same structure as :func:`.run.run_demo`'s)."""
    import torch.multiprocessing as mp

    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError("--engine hf needs HF Transformers: pip install 'bucketmoo_kernels[hf]'") from exc
    with tempfile.TemporaryDirectory(prefix="bucketmoo_demo_") as tmp:
        result_path = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(settings, free_port(), result_path), nprocs=settings.world_size, join=True)
        with open(result_path) as f:
            return json.load(f)
