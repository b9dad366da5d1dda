"""Training loop of the demo: one language per rank, one run per compared method.

Every run starts from the same initial weights (``torch.manual_seed(seed)`` before the
model is built) and sees the same batches (rank ``r`` draws from a generator seeded with
``seed`` and ``r``), so the runs differ only in how the per-language gradients become the
update:

* ``mean``: plain DDP, no comm hook (the all-reduce averages the language gradients);
* ``static`` / ``static-t<tau>``: plain DDP with rank ``r``'s loss multiplied by
  ``w_r * world_size``, where ``w`` re-weights languages by data size with temperature
  ``tau`` (the all-reduce mean then gives ``sum_r w_r g_r``);
* ``<method>[-<granularity>]`` (``mgda``, ``mgda-global``, ``pcgrad``, ``cagrad-param``,
  ... -- every registered method): plain DDP plus ``bucket_moo_hook`` from
  :mod:`bucketmoo_kernels.ddp` in ``mode="ranks"``; the hook is the only thing that changes
  between these runs. The element-wise methods (``graddrop``, ``trimmed_mean``) run with
  ``protocol="allgather"`` unless ``--hook-option protocol=...`` says otherwise (the sharded
  protocol cannot run them); the run's ``notes`` say so (:func:`hook_settings`).

At evaluation steps every rank scores a share of the languages (seen and unseen) on fixed
held-out windows, and a probe computes the per-language gradients of a fixed batch
(without DDP), gathers them and measures conflict per bucket: the share of buckets where
some pair of languages has a negative cosine, and the spread of the run's weights.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..distributed.localhost import free_port
from .. import diagnostics
from ..api import fused_bucket_moo as fused_op
from ..api import gram as gram_op
from ..api import solve as solve_op
from ..methods import MethodState, get_method, resolve_options
from ..methods.elementwise import is_elementwise
from .data import DATA_SOURCE, heldout_windows, load_languages, sample_batch, static_weights
from .model import ByteLM, ModelConfig

__all__ = ["RunSpec", "DemoSettings", "RunContext", "parse_run", "run_ddp_demo", "bucket_lengths", "hook_settings",
           "hook_statistics", "probe_losses", "leave_group", "settings_dict"]

GRANULARITIES = ("bucket", "global", "param")
DEFAULT_RUNS = ("mean", "static", "mgda", "mgda-global", "pcgrad")
ENGINES = ("ddp", "fsdp", "hf")


@dataclass(frozen=True)
class RunSpec:
    """One compared configuration.

    Attributes:
        name: the spec as written (``"mgda-global"``).
        method: hook method name, or None for plain DDP (``mean`` and ``static``).
        granularity: hook granularity (``bucket``, ``global``, ``param``, ``chunk:<n>``).
        tau: temperature of the static weighting, or None.
    """

    name: str
    method: str | None = None
    granularity: str | None = None
    tau: float | None = None

    @property
    def uses_hook(self) -> bool:
        return self.method is not None


def parse_run(spec: str, default_tau: float = 1.0) -> RunSpec:
    """Parse ``mean``, ``static``, ``static-t<tau>`` or ``<method>[-<granularity>]``."""
    spec = spec.strip()
    if spec == "mean":
        return RunSpec("mean")
    if spec == "static":
        return RunSpec(f"static-t{default_tau:g}", tau=default_tau)
    if spec.startswith("static-t"):
        try:
            tau = float(spec[len("static-t"):])
        except ValueError:
            raise ValueError(f"run {spec!r}: expected static-t<tau> with a number, e.g. static-t5") from None
        if tau <= 0:
            raise ValueError(f"run {spec!r}: tau must be > 0")
        return RunSpec(spec, tau=tau)
    method, _, granularity = spec.partition("-")
    granularity = granularity or "bucket"
    if not method or (granularity not in GRANULARITIES and not granularity.startswith("chunk:")):
        raise ValueError(f"run {spec!r}: expected mean, static, static-t<tau> or "
                         f"<method>[-<granularity>] with granularity in {GRANULARITIES} or "
                         "chunk:<n> (e.g. mgda, mgda-global, pcgrad)")
    return RunSpec(spec, method=method, granularity=granularity)


@dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run depends on (see ``python -m bucketmoo_kernels.demo --help``)."""

    languages: tuple[str, ...] = ("de", "fr", "ru", "sw")
    unseen: tuple[str, ...] = ("es", "uk")
    runs: tuple[str, ...] = DEFAULT_RUNS
    steps: int = 120
    batch: int = 16
    model: ModelConfig = field(default_factory=ModelConfig)
    lr: float = 2e-3
    warmup: int = 20
    clip: float = 1.0
    tau: float = 1.0
    heldout_share: float = 0.1
    eval_every: int = 20
    eval_windows: int = 48
    bucket_cap_mb: float = 0.25
    seed: int = 0
    device: str = "auto"
    dist_backend: str = "auto"
    threads: int = 0
    method_options: tuple[tuple[str, str, object], ...] = ()
    hook_options: tuple[tuple[str, object], ...] = ()
    hook_module: str = "bucketmoo_kernels.ddp"
    engine: str = "ddp"
    progress: bool = True

    def __post_init__(self):
        if len(self.languages) < 2:
            raise ValueError(f"languages: need at least 2 (one per rank); got {list(self.languages)}")
        if len(set(self.languages) | set(self.unseen)) != len(self.languages) + len(self.unseen):
            raise ValueError("languages and unseen must be distinct; got "
                             f"{list(self.languages)} and {list(self.unseen)}")
        for name in ("steps", "batch", "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.clip < 0:
            raise ValueError(f"clip must be >= 0 (0: no clipping); got {self.clip}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}; got {self.engine!r}")
        if self.lr <= 0 or self.bucket_cap_mb <= 0:
            raise ValueError(f"lr and bucket_cap_mb must be > 0; got {self.lr}, {self.bucket_cap_mb}")
        for method, key, _ in self.method_options:
            get_method(method)  # ValueError listing the known methods
        for method in {m for m, _, _ in self.method_options}:
            resolve_options(get_method(method), self.options_for(method))  # errors name the option
        for run in self.runs:
            spec = parse_run(run, self.tau)
            if spec.uses_hook:
                check_hook_run(spec, self)

    @property
    def world_size(self) -> int:
        return len(self.languages)

    def specs(self) -> list[RunSpec]:
        return [parse_run(run, self.tau) for run in self.runs]

    def options_for(self, method: str) -> dict:
        return {key: value for m, key, value in self.method_options if m == method}


def hook_settings(spec: RunSpec, settings: DemoSettings) -> tuple[dict, tuple[str, ...]]:
    """The ``BucketMOOState`` keyword arguments of hook run ``spec`` (every engine builds its
    state from these) and notes on what the demo chose for it.

    An element-wise method (graddrop, trimmed_mean: not a function of the Gram) gets
    ``protocol="allgather"`` unless ``--hook-option protocol=...`` sets one.
    """
    kwargs = dict(method=spec.method, mode="ranks", granularity=spec.granularity,
                  bucket_cap_mb=settings.bucket_cap_mb)
    hook = dict(settings.hook_options)
    fixed = sorted(set(hook) & set(kwargs))
    if fixed:
        raise ValueError(f"--hook-option {fixed[0]}: set by the demo for each run (use --runs / --bucket-cap-mb)")
    notes = []
    if is_elementwise(spec.method) and "protocol" not in hook:
        hook["protocol"] = "allgather"
        notes.append(f"{spec.method} is element-wise (not a function of the Gram): it runs with "
                     "protocol='allgather'")
    kwargs.update(hook)
    options = settings.options_for(spec.method)
    clash = sorted(set(options) & set(kwargs))
    if clash:
        raise ValueError(f"--method-option {spec.method}:{clash[0]} clashes with a hook setting of the same name")
    kwargs.update(options)
    if get_method(spec.method).stateful or float(options.get("ema", 0.0) or 0.0) > 0:
        notes.append(f"{spec.method} keeps per-bucket state across steps (one MethodState per bucket in the "
                     "hook); the conflict probe's weights come from a fresh state (a first step)")
    return kwargs, tuple(notes)


def check_hook_run(spec: RunSpec, settings: DemoSettings) -> None:
    """Build hook run ``spec``'s settings and run its weight step once on a small Gram with one
    task per language, so that a bad method, option or combination fails now, naming the run
    (not in the middle of training)."""
    from ..distributed.settings import MOOSettings

    try:
        kwargs, _ = hook_settings(spec, settings)
        kwargs = dict(kwargs)
        built = MOOSettings.build(kwargs.pop("method"), kwargs.pop("mode"), kwargs.pop("granularity"),
                                  **kwargs)
        num_tasks = settings.world_size
        rows = torch.randn(num_tasks, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        if is_elementwise(spec.method):
            fused_op(rows.float(), weight_step=built.weight_step, method=spec.method)
        else:
            gram = (rows @ rows.T)[None].float()
            solve_op(gram, weight_step=built.weight_step, method=spec.method, backend="torch",
                     method_state=MethodState(), losses=torch.ones(num_tasks))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run {spec.name!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# helpers


def bucket_lengths(params, cap_bytes: int) -> list[int]:
    """DDP-like bucket layout: parameters in reverse order, a bucket closed once it holds ``cap_bytes``.

    This is DDP's packing rule (``_compute_bucket_assignment_by_size``: add a parameter,
    close the bucket when it reaches the cap). DDP rebuilds its buckets after the first step
    in the order gradients become ready, which for a sequential model is close to the
    reverse parameter order used here. The probe statistics use this layout; the hook
    itself sees DDP's real buckets.

    Returns:
        element counts of the buckets, in reverse parameter order.
    """
    lengths, current, current_bytes = [], 0, 0
    for p in reversed(list(params)):
        current += p.numel()
        current_bytes += p.numel() * p.element_size()
        if current_bytes >= cap_bytes:
            lengths.append(current)
            current, current_bytes = 0, 0
    if current:
        lengths.append(current)
    return lengths


def _load_hook(module_name: str):
    try:
        module = importlib.import_module(module_name)
        return module.BucketMOOState, module.bucket_moo_hook
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            f"the DDP comm hook is not available ({module_name}.BucketMOOState / bucket_moo_hook: "
            f"{exc}); the hook-based runs need it. Run only plain-DDP baselines with "
            "--runs mean static") from exc


class _PeakMemory:
    """Peak memory growth during training steps: CUDA allocator peak, or process RSS on Linux.

    ``start()`` / ``stop()`` bracket a stretch of training steps (evaluation and the probe
    stay outside); ``peak`` is the largest growth over all stretches, or None where it
    cannot be measured (RSS needs Linux's /proc; freed heap may be reused, so small CPU
    numbers are approximate).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = None
        self.peak = 0

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self, reset: bool = False) -> None:
        """Begin a stretch; ``reset`` also forgets the peaks of earlier stretches."""
        if reset:
            self.peak = 0
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:  # hand freed heap back to the OS, then reset the RSS high-water mark
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS")
        except (OSError, AttributeError):
            self.base = None

    def stop(self) -> None:
        if self.base is None or self.peak is None:
            self.peak = None
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            grown = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            high = self._status("VmHWM")
            grown = None if high is None else high - self.base
        self.peak = None if grown is None else max(self.peak, grown)


def lr_at(step: int, *, warmup: int, steps: int, peak: float) -> float:
    """The learning rate of ``step`` (0-based) of ``steps``: linear warm-up over ``warmup``
    steps to ``peak``, then cosine decay to 10% of ``peak`` (the demo's and the study's)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class RunContext:
    rank: int
    world: int
    device: torch.device
    settings: DemoSettings
    data: dict
    eval_sets: dict
    probe: tuple
    static_sizes: list


def evaluate(model: ByteLM, sets: dict, codes: list[str], rank: int, world: int,
             device: torch.device | None = None) -> dict[str, float]:
    """Held-out loss of every language of ``codes`` (``sets[code]`` = ``(inputs, targets)``
    windows), in batches of 16: rank r scores every world-th language from the r-th, and
    every rank gets all the losses (``all_gather_object``), in the order of ``codes``."""
    mine = {}
    with torch.no_grad():
        for code in codes[rank::world]:
            inputs, targets = sets[code]
            total = 0.0
            for start in range(0, inputs.shape[0], 16):
                x, y = inputs[start: start + 16], targets[start: start + 16]
                if device is not None:
                    x, y = x.to(device), y.to(device)
                total += float(model.loss(x, y)) * x.shape[0]
            mine[code] = total / inputs.shape[0]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    merged = {}
    for part in gathered:
        merged.update(part)
    return {code: merged[code] for code in codes}


def _evaluate(model: ByteLM, ctx: RunContext) -> dict[str, float]:
    """Held-out loss of every language of the run (seen and unseen)."""
    codes = list(ctx.settings.languages) + list(ctx.settings.unseen)
    return evaluate(model, ctx.eval_sets, codes, ctx.rank, ctx.world, ctx.device)


def probe_losses(model: ByteLM, ctx: RunContext, spec: RunSpec, static_w: torch.Tensor | None) -> dict | None:
    """Conflict statistics of the per-language gradients of a fixed batch (rank 0 gets them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model.loss(*ctx.probe), params)
    flat = torch.cat([g.reshape(-1) for g in reversed(grads)]).float()  # bucket order
    rows = [torch.empty_like(flat) for _ in range(ctx.world)]
    dist.all_gather(rows, flat)
    if ctx.rank != 0:
        return None
    stacked = torch.stack(rows).cpu()
    cap = int(ctx.settings.bucket_cap_mb * 1024 * 1024)
    offsets = torch.tensor([0] + bucket_lengths(params, cap), dtype=torch.int64).cumsum(0)
    gram = gram_op(stacked, offsets, backend="torch").double()            # [S, T, T]
    cos = diagnostics.task_cosine(gram)
    upper = torch.triu(torch.ones(ctx.world, ctx.world, dtype=torch.bool), 1)
    pair_cos = cos[:, upper]                                               # [S, pairs]
    global_gram = gram.sum(0, keepdim=True)
    global_cos = diagnostics.task_cosine(global_gram)[0][upper]
    conflict = {
        "bucket_conflict_share": float((pair_cos < 0).any(-1).double().mean()),
        "pair_conflict_share": float((pair_cos < 0).double().mean()),
        "min_bucket_cos": float(pair_cos.min()),
        "global_cos_mean": float(global_cos.mean()),
    }
    options = ctx.settings.options_for(spec.method) if spec.method is not None else {}
    if spec.method is not None and is_elementwise(spec.method):
        # no weights: the combined gradient of the element-wise method itself
        combined = fused_op(stacked, method=spec.method, segments=offsets, backend="torch", check_finite=False,
                            **options)
        nan = float("nan")
        return dict(conflict, weight_spread=nan, weight_bucket_std=nan, weights_mean=[nan] * ctx.world,
                    norm_ratio=float(combined.double().norm() / stacked.double().mean(0).norm()))
    if spec.method is None:
        weights = (static_w if static_w is not None
                   else torch.full((ctx.world,), 1.0 / ctx.world)).expand(gram.shape[0], -1)
    else:
        # a stateful weight step (gradvac, pcd, ema) gets a fresh state: its first-step weights
        if spec.granularity == "global":
            weights = solve_op(global_gram.float(), spec.method, backend="torch", method_state=MethodState(),
                               **options)
            weights = weights.expand(gram.shape[0], -1)
        else:  # the probe's layout is the bucket one, also for param / chunk runs
            weights = solve_op(gram.float(), spec.method, backend="torch", method_state=MethodState(), **options)
    weights = weights.double()
    return dict(
        conflict,
        weight_spread=float((weights.max(-1).values - weights.min(-1).values).mean()),
        weight_bucket_std=float(weights.std(0, unbiased=False).mean()),
        weights_mean=weights.mean(0).tolist(),
        norm_ratio=float(diagnostics.combined_sqnorm(gram, weights).sum().sqrt()
                         / diagnostics.mean_sqnorm(gram).sum().sqrt()),
    )


def hook_statistics(state) -> dict:
    """Conflict statistics of the buckets the hook combined in the step just taken."""
    records = list(getattr(state.diagnostics, "records", []))
    state.diagnostics.clear()
    if not records:
        return {}
    cos = torch.cat([r.cosine.double() for r in records])                 # [S, T, T]
    weights = torch.cat([r.weights.double() for r in records])            # [S, T]
    upper = torch.triu(torch.ones(cos.shape[-1], cos.shape[-1], dtype=torch.bool), 1)
    pair_cos = cos[:, upper]
    combined = torch.cat([r.combined_norm.double() for r in records])
    mean = torch.cat([r.mean_norm.double() for r in records])
    return {
        "segments": int(cos.shape[0]),
        "bucket_conflict_share": float((pair_cos < 0).any(-1).double().mean()),
        "weight_spread": float((weights.max(-1).values - weights.min(-1).values).mean()),
        "weight_bucket_std": float(weights.std(0, unbiased=False).mean()),
        "weights_mean": weights.mean(0).tolist(),
        "norm_ratio": float(combined.norm() / mean.norm()) if float(mean.norm()) > 0 else float("nan"),
    }


def _wrap(model: ByteLM, spec: RunSpec, settings: DemoSettings, hook, device: torch.device, world: int):
    """The data-parallel engine of one run: ``(net, state, eval_model)``.

    * ``ddp``: DistributedDataParallel; a hook run registers ``bucket_moo_hook``.
    * ``fsdp``: FSDP2 ``fully_shard`` per transformer block and the root (one parameter
      group = one bucket); a hook run installs the Bucket-Level MOO reduce-scatter
      (:func:`bucketmoo_kernels.fsdp.apply_bucket_moo`). Evaluation and the conflict probe
      run on an unsharded copy rebuilt from the full parameters (the same collective on
      every rank), since ranks evaluate different languages.
    """
    state = None
    if hook is not None:
        state_cls, _ = hook
        kwargs, _ = hook_settings(spec, settings)
        state = state_cls(process_group=None, task_of_rank=None, **kwargs)
    if settings.engine == "ddp":
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      bucket_cap_mb=settings.bucket_cap_mb)
        if state is not None:
            net.register_comm_hook(state, hook[1])
        return net, state, lambda: model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..fsdp import apply_bucket_moo

    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if state is not None:
        apply_bucket_moo(model, state)
    plain = ByteLM(settings.model).to(device)

    def eval_model() -> ByteLM:
        with torch.no_grad():
            for dst, src in zip(plain.parameters(), model.parameters()):
                dst.copy_(src.full_tensor())
        return plain

    return model, state, eval_model


def _train_one(spec: RunSpec, ctx: RunContext, bar) -> dict:
    settings, rank, world, device = ctx.settings, ctx.rank, ctx.world, ctx.device
    result = {"name": spec.name, "method": spec.method, "granularity": spec.granularity,
              "tau": spec.tau, "status": "ok"}
    if spec.uses_hook:
        result["notes"] = list(hook_settings(spec, settings)[1])
    hook, state, hook_stats = None, None, []
    if spec.uses_hook:
        try:
            hook = _load_hook(settings.hook_module)
        except RuntimeError as exc:
            result.update(status="skipped", error=str(exc))
            if bar is not None:
                bar.update(settings.steps)
            return result

    torch.manual_seed(settings.seed)
    model = ByteLM(settings.model).to(device)
    try:
        net, state, eval_model = _wrap(model, spec, settings, hook, device, world)
    except (ValueError, RuntimeError) as exc:  # e.g. global granularity under FSDP2
        result.update(status="skipped", error=str(exc))
        if bar is not None:
            bar.update(settings.steps)
        return result
    static_w = None
    loss_scale = 1.0
    if spec.tau is not None:
        static_w = torch.tensor(static_weights(ctx.static_sizes, spec.tau), dtype=torch.float64)
        loss_scale = float(static_w[rank]) * world
        result["static_weights"] = static_w.tolist()
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + rank)
    train = ctx.data[settings.languages[rank]].train

    memory = _PeakMemory(device)
    step_s, train_loss, evals, probes, untimed = [], [], [], [], set()
    eval_steps = sorted({0, settings.steps}
                        | set(range(settings.eval_every, settings.steps, settings.eval_every)))

    def checkpoint(step):
        plain = eval_model()
        evals.append(_evaluate(plain, ctx))
        probes.append(probe_losses(plain, ctx, spec, static_w))

    checkpoint(0)
    memory.start()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, warmup=settings.warmup, steps=settings.steps, peak=settings.lr)
        x, y = sample_batch(train, settings.batch, settings.model.context, generator)
        x, y = x.to(device), y.to(device)
        recording = state is not None and step + 1 in eval_steps and hasattr(state, "record_diagnostics")
        if recording:  # the hook's own per-bucket record of the step before each evaluation
            state.record_diagnostics = True
        start = time.perf_counter()
        logits = net(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        (loss * loss_scale).backward()
        if settings.clip > 0:  # the combined gradient is the same on every rank, so is the clip
            torch.nn.utils.clip_grad_norm_(net.parameters(), settings.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s.append(time.perf_counter() - start)
        train_loss.append(loss.detach().item())
        if recording:
            state.record_diagnostics = False
            hook_stats.append(dict(hook_statistics(state), step=step + 1))
            untimed.add(step)
        if step == 0:  # DDP builds its real buckets after the first step: measure from then on
            memory.start(reset=True)
            if hasattr(state, "reset_statistics"):
                state.reset_statistics()
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{settings.languages[0]} loss {train_loss[-1]:.3f}")
        if step + 1 in eval_steps:
            memory.stop()
            checkpoint(step + 1)
            memory.start()
    peak = memory.peak

    hook_extra = getattr(state, "peak_extra_bytes", None) if state is not None else None
    gathered = [None] * world
    dist.all_gather_object(gathered, {"step_s": step_s, "train_loss": train_loss, "peak": peak,
                                      "hook_extra": hook_extra})
    if rank != 0:
        return result
    per_step = torch.tensor([part["step_s"] for part in gathered]).max(0).values
    # the first steps include DDP's bucket rebuild; steps that recorded hook diagnostics are slower
    timed = [i for i in range(3, settings.steps) if i not in untimed] or list(range(settings.steps))
    per_step = per_step[timed]
    peaks = [part["peak"] for part in gathered]
    hook_extras = [part["hook_extra"] for part in gathered]
    result.update(
        eval_steps=eval_steps,
        heldout={code: [e[code] for e in evals] for code in evals[0]},
        train_loss={code: part["train_loss"] for code, part in zip(settings.languages, gathered)},
        step_ms_median=1e3 * float(per_step.median()),
        step_ms_p90=1e3 * float(per_step.quantile(0.9)),
        peak_mem_mib=None if None in peaks else max(peaks) / 2**20,
        hook_extra_mib=None if None in hook_extras else max(hook_extras) / 2**20,
        probe=[dict(p, step=s) for p, s in zip(probes, eval_steps)],
        hook_diagnostics=hook_stats,
    )
    return result


def _pick_device(settings: DemoSettings, rank: int) -> tuple[torch.device, str]:
    world = settings.world_size
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "cpu"
    if device == "cuda":
        if torch.cuda.device_count() < world:
            raise RuntimeError(f"--device cuda needs one GPU per language: {world} languages, "
                               f"{torch.cuda.device_count()} GPUs visible")
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be auto, cpu or cuda; got {device!r}")
    backend = settings.dist_backend
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    return dev, backend


def _worker(rank: int, settings: DemoSettings, port: int, result_path: str) -> None:
    world = settings.world_size
    threads = settings.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    device, backend = _pick_device(settings, rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        codes = list(settings.languages) + list(settings.unseen)
        data = load_languages(codes, settings.heldout_share, settings.seed,
                              min_bytes=settings.model.context + 2)
        eval_sets = {c: heldout_windows(data[c].heldout, settings.model.context, settings.eval_windows)
                     for c in codes}
        probe_gen = torch.Generator().manual_seed(settings.seed * 1000 + 999 + rank)
        probe = sample_batch(data[settings.languages[rank]].train, settings.batch,
                             settings.model.context, probe_gen)
        ctx = RunContext(rank, world, device, settings, data, eval_sets,
                       tuple(t.to(device) for t in probe),
                       [data[c].train.numel() for c in settings.languages])
        bar = None
        if rank == 0 and settings.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=settings.steps * len(settings.runs), unit="step", dynamic_ncols=True)
        runs = []
        started = time.perf_counter()
        for spec in settings.specs():
            if bar is not None:
                bar.set_description(f"{spec.name:<12}")
            runs.append(_train_one(spec, ctx, bar))
        if bar is not None:
            bar.close()
        if rank == 0:
            model = ByteLM(settings.model)
            summary = {
                "settings": settings_dict(settings),
                "environment": environment(device, backend, threads),
                "data_source": DATA_SOURCE,
                "languages": {c: {"name": data[c].name, "train_bytes": data[c].train.numel(),
                                  "heldout_bytes": data[c].heldout.numel(),
                                  "eval_windows": int(eval_sets[c][0].shape[0]),
                                  "strings": data[c].num_strings, "seen": c in settings.languages}
                              for c in codes},
                "model_parameters": model.num_parameters(),
                "probe_buckets": len(bucket_lengths(list(model.parameters()),
                                                    int(settings.bucket_cap_mb * 2**20))),
                "wall_s": time.perf_counter() - started,
                "runs": runs,
            }
            with open(result_path, "w") as f:
                json.dump(summary, f)
        dist.barrier()  # nobody tears the group down while a peer still has work in flight
    finally:
        gc.collect()  # DDP reducers (hook state, futures) go now, not at interpreter exit
        dist.destroy_process_group()
    leave_group()


def leave_group() -> None:
    """End a spawned worker whose result is on disk without interpreter finalization: there,
    C++ threads or destructors that still reach for Python can std::terminate the process
    ("terminate called without an active exception", seen rarely with gloo under load)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def settings_dict(settings: DemoSettings) -> dict:
    out = asdict(settings)
    out["method_options"] = [list(item) for item in settings.method_options]
    out["hook_options"] = [list(item) for item in settings.hook_options]
    return out


def environment(device: torch.device, backend: str, threads: int, **extra: str) -> dict:
    """What a results file says about where it was produced: versions, device, threads,
    the package's git commit (when run from a checkout), and the load average and
    date when it is called (rank 0, after the runs)."""
    from .. import __version__
    from ..provenance import git_commit, load_average
    return {"torch": torch.__version__, **extra, "python": platform.python_version(),
            "bucketmoo_kernels": __version__, "commit": git_commit(),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "dist_backend": backend, "threads_per_rank": threads, "cpu_count": os.cpu_count(),
            "load_average": load_average(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_ddp_demo(settings: DemoSettings) -> dict:
    """Train every run of ``settings`` on ``len(languages)`` processes; return the results.

    Spawns one process per language (gloo on CPU, NCCL when there is one GPU per
    language), trains the runs one after another inside the same process group and
    returns rank 0's summary (a JSON-serialisable dict; see :mod:`.report`).
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bucketmoo_demo_") as tmp:
        result_path = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(settings, free_port(), result_path), nprocs=settings.world_size,
                 join=True)
        with open(result_path) as f:
            return json.load(f)


def with_overrides(settings: DemoSettings, **changes) -> DemoSettings:
    """``dataclasses.replace`` that also accepts model fields (``d_model=...``)."""
    model_fields = {k: changes.pop(k) for k in list(changes) if k in ModelConfig.__dataclass_fields__}
    if model_fields:
        changes["model"] = replace(settings.model, **model_fields)
    return replace(settings, **changes)
