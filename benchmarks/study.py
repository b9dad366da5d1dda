"""The pre-registered fine-tuning study of docs/study.md: does Bucket-Level MOO help?

``python -m benchmarks.study`` runs everything the protocol lists and writes
``benchmarks/results/study.md`` (tables, paired differences with bootstrap intervals),
``study.json`` (every number) and two plots:

1. the splits (80% train / 10% validation / 10% test of each language's CLDR strings);
2. the base model: the demo's byte-level transformer pre-trained once in this process on the
   train splits of 15 languages (cached on disk under ``--cache``, keyed by its settings);
3. phase 1: every seed x run on 4 gloo ranks (one fine-tuning language per rank), all runs of
   a seed starting from the base weights and drawing the same batches;
4. the two choices the protocol makes on the validation split (the static temperature and the
   best bucket-level method), then phase 2: that method at ``granularity="param"``;
5. the analysis: paired differences to ``mean`` (and to ``static``) per seed, their mean and a
   95% percentile-bootstrap interval over seeds.

``--quick`` shrinks everything (2 seeds, a few steps) to check the pipeline end to end; its
output is not a result.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bucketmoo_kernels.demo.data import (DATA_SOURCE, heldout_windows, load_cldr_strings, sample_batch, static_weights,
                                         to_bytes)
from bucketmoo_kernels.demo.model import ByteLM, ModelConfig
from bucketmoo_kernels.demo.train import evaluate, lr_at
from bucketmoo_kernels.distributed.localhost import free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"

PRETRAIN_LANGUAGES = ("de", "es", "pt", "sw", "ru", "uk", "bg", "ar", "fa", "ur", "hi", "mr", "ne", "ja", "zh")
# Bucket-level gradient methods of phase 1, as (run name, method, normalisation); upgrad and
# gradvac run only where the library registers them (docs/study.md, "Runs").
BUCKET_RUNS = (("mgda", "mgda", "none"), ("mgda-l2", "mgda", "l2"), ("mgda-loss", "mgda", "loss"),
               ("pcgrad", "pcgrad", "none"), ("cagrad", "cagrad", "none"),
               ("upgrad", "upgrad", "none"), ("gradvac", "gradvac", "none"))


@dataclass(frozen=True)
class StudySettings:
    """Everything the study depends on; the values are the ones fixed by the timing pilot."""

    languages: tuple[str, ...] = ("de", "ru", "ar", "hi")
    low_resource: tuple[tuple[str, float], ...] = (("hi", 0.15),)
    unseen: tuple[str, ...] = ("es", "uk", "fa", "mr")
    pretrain_languages: tuple[str, ...] = PRETRAIN_LANGUAGES
    model: ModelConfig = field(default_factory=lambda: ModelConfig(context=64, d_model=64, n_layer=3, n_head=4))
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    steps: int = 100
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 10
    clip: float = 1.0
    eval_every: int = 25
    eval_windows: int = 32
    bucket_cap_mb: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    taus: tuple[float, ...] = (1.0, 2.0, 5.0)
    bootstrap: int = 10_000

    @property
    def world_size(self) -> int:
        return len(self.languages)

    def key(self) -> str:
        base = {k: v for k, v in dataclasses.asdict(self).items()
                if k in ("pretrain_languages", "model", "pretrain_steps", "pretrain_batch", "pretrain_lr")}
        return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:12]


QUICK = dict(pretrain_steps=20, pretrain_batch=8, steps=6, batch=4, eval_every=3, eval_windows=4,
             seeds=(0, 1), taus=(1.0, 5.0), bootstrap=200,
             model=ModelConfig(context=32, d_model=32, n_layer=2, n_head=2))


# ---------------------------------------------------------------------------------------------
# data


def split_language(code: str, fraction_of_train: float = 1.0) -> dict[str, torch.Tensor]:
    """80/10/10 split of ``code``'s distinct strings (fixed, seed-independent), as bytes.

    ``fraction_of_train`` < 1 keeps only that share of the train strings (the low-resource
    language); validation and test are never cut.
    """
    strings = load_cldr_strings(code)
    random.Random(f"study-split-{code}").shuffle(strings)
    n_valid = n_test = max(1, round(0.1 * len(strings)))
    train = strings[: len(strings) - n_valid - n_test]
    train = train[: max(1, round(fraction_of_train * len(train)))]
    return {"train": to_bytes(train),
            "valid": to_bytes(strings[len(strings) - n_valid - n_test: len(strings) - n_test]),
            "test": to_bytes(strings[len(strings) - n_test:])}


def load_data(settings: StudySettings) -> dict[str, dict[str, torch.Tensor]]:
    codes = dict.fromkeys(settings.pretrain_languages + settings.languages + settings.unseen)
    return {code: split_language(code) for code in codes}


# ---------------------------------------------------------------------------------------------
# training pieces


def pretrain(settings: StudySettings, data, cache: Path) -> tuple[dict, dict]:
    """The base model's state dict (from the cache when present) and its pre-training record."""
    path = cache / f"study_base_{settings.key()}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return saved["state"], saved["record"]
    torch.set_num_threads(1)  # more threads only spin against each other on a small model
    torch.manual_seed(12345)
    model = ByteLM(settings.model)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(12345)
    langs = settings.pretrain_languages
    per_lang = max(1, settings.pretrain_batch // len(langs))
    started = time.perf_counter()
    losses = []
    for step in range(settings.pretrain_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, warmup=settings.warmup, steps=settings.pretrain_steps, peak=settings.pretrain_lr)
        # uniform by language: each step draws the same number of windows from a random subset
        chosen = torch.randperm(len(langs), generator=gen)[: max(1, settings.pretrain_batch // per_lang)]
        xs, ys = zip(*(sample_batch(data[langs[i]]["train"], per_lang, settings.model.context, gen)
                       for i in chosen.tolist()))
        loss = model.loss(torch.cat(xs), torch.cat(ys))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    record = {"steps": settings.pretrain_steps, "wall_s": time.perf_counter() - started,
              "final_train_loss": sum(losses[-20:]) / len(losses[-20:]), "parameters": model.num_parameters()}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "record": record}, path)
    return model.state_dict(), record


@dataclass(frozen=True)
class Run:
    """One compared configuration: plain DDP (``method=None``, optionally static) or a hook run."""

    name: str
    method: str | None = None
    normalization: str = "none"
    granularity: str = "bucket"
    tau: float | None = None


def phase1_runs(settings: StudySettings, methods: set[str]) -> list[Run]:
    runs = [Run("mean")] + [Run(f"static-t{tau:g}", tau=tau) for tau in settings.taus]
    runs += [Run(name, method, norm) for name, method, norm in BUCKET_RUNS[:3]]
    runs += [Run("mgda-global", "mgda", granularity="global")]
    runs += [Run(name, method, norm) for name, method, norm in BUCKET_RUNS[3:] if method in methods]
    return runs


def _train(run: Run, seed: int, settings: StudySettings, base: dict, data, sets, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook

    model = ByteLM(settings.model)
    model.load_state_dict(base)
    net = DistributedDataParallel(model, bucket_cap_mb=settings.bucket_cap_mb)
    state = None
    if run.method is not None:
        state = BucketMOOState(method=run.method, mode="ranks", granularity=run.granularity,
                               normalization=run.normalization, bucket_cap_mb=settings.bucket_cap_mb)
        net.register_comm_hook(state, bucket_moo_hook)
    train = data[settings.languages[rank]]["train_ft"]
    scale = 1.0
    if run.tau is not None:
        sizes = [data[c]["train_ft"].numel() for c in settings.languages]
        scale = static_weights(sizes, run.tau)[rank] * world
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    seen = list(settings.languages)
    every = list(settings.languages) + list(settings.unseen)
    curve_steps, curve, step_s = [], [], []
    for step in range(settings.steps + 1):
        if step % settings.eval_every == 0 or step == settings.steps:
            curve_steps.append(step)
            curve.append(evaluate(model, sets["valid"], seen, rank, world))
        if step == settings.steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, warmup=settings.warmup, steps=settings.steps, peak=settings.lr)
        x, y = sample_batch(train, settings.batch, settings.model.context, gen)
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(x).reshape(-1, settings.model.vocab), y.reshape(-1))
        if state is not None and run.normalization in ("loss", "loss+"):
            state.gather_losses(loss.detach())
        (loss * scale).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), settings.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
    final = {"valid": evaluate(model, sets["valid"], every, rank, world),
             "test": evaluate(model, sets["test"], every, rank, world)}
    times = [None] * world
    dist.all_gather_object(times, step_s)
    per_step = torch.tensor(times).max(0).values[2:]
    del net, state
    gc.collect()
    return {"run": run.name, "seed": seed, "method": run.method, "normalization": run.normalization,
            "granularity": run.granularity, "tau": run.tau, "curve_steps": curve_steps,
            "valid_curve": curve, "final": final, "step_ms": 1e3 * float(per_step.median())}


def _worker(rank: int, settings: StudySettings, jobs, base_path: str, port: int, out_path: str) -> None:
    world = settings.world_size
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = load_data(settings)
        fractions = dict(settings.low_resource)
        for code in settings.languages:
            train = split_language(code, fractions.get(code, 1.0))["train"] if code in fractions \
                else data[code]["train"]
            data[code]["train_ft"] = train
        every = list(settings.languages) + list(settings.unseen)
        sets = {part: {c: heldout_windows(data[c][part], settings.model.context, settings.eval_windows)
                       for c in every} for part in ("valid", "test")}
        base = torch.load(base_path, weights_only=True)["state"]
        results = []
        for seed, run in jobs:
            started = time.perf_counter()
            result = _train(run, seed, settings, base, data, sets, rank, world)
            result["wall_s"] = time.perf_counter() - started
            results.append(result)
            if rank == 0:
                print(f"[study] seed {seed} {run.name:<14} test seen avg "
                      f"{sum(result['final']['test'][c] for c in settings.languages) / world:.4f} "
                      f"({result['wall_s']:.0f} s)", flush=True)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_jobs(settings: StudySettings, jobs: list[tuple[int, Run]], base_path: Path) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bucketmoo_study_") as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(settings, jobs, str(base_path), free_port(), out),
                 nprocs=settings.world_size, join=True)
        with open(out) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------------
# analysis


def bootstrap_ci(values, resamples: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampling with replacement)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (resamples, v.numel()), generator=gen)
    means = v[idx].mean(1).sort().values
    lo = means[int(math.floor((1 - level) / 2 * resamples))]
    hi = means[min(resamples - 1, int(math.ceil((1 + level) / 2 * resamples)) - 1)]
    return float(lo), float(hi)


def metrics(result: dict, settings: StudySettings, part: str = "test") -> dict[str, float]:
    """The protocol's metrics of one run and seed from its final losses."""
    final = result["final"][part]
    seen = [final[c] for c in settings.languages]
    low = [final[c] for c, _ in settings.low_resource]
    return {"primary": sum(seen) / len(seen), "worst": max(seen), "low_resource": sum(low) / len(low),
            "unseen": sum(final[c] for c in settings.unseen) / len(settings.unseen),
            "step_ms": result["step_ms"]}


def paired(results: list[dict], settings: StudySettings, run: str, baseline: str, metric: str) -> dict:
    by = {(r["run"], r["seed"]): r for r in results}
    diffs = [metrics(by[(run, s)], settings)[metric] - metrics(by[(baseline, s)], settings)[metric]
             for s in settings.seeds]
    lo, hi = bootstrap_ci(diffs, settings.bootstrap)
    return {"mean": sum(diffs) / len(diffs), "lo": lo, "hi": hi, "per_seed": diffs}


def choose(results: list[dict], settings: StudySettings, names: list[str]) -> str:
    """The name among ``names`` with the lowest validation primary metric averaged over seeds."""
    def score(name):
        rows = [r for r in results if r["run"] == name]
        return sum(metrics(r, settings, "valid")["primary"] for r in rows) / len(rows)
    return min(names, key=score)


def _environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _fmt(d: dict) -> str:
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def report(summary: dict, settings: StudySettings, out_dir: Path, stem: str) -> str:
    results = summary["results"]
    static, best = summary["static"], summary["best_bucket"]
    names = [n for n in dict.fromkeys(r["run"] for r in results)]
    lines = [f"# Fine-tuning study: results ({'QUICK PIPELINE CHECK, not a result' if summary['quick'] else 'full run'})",
             "", f"Protocol: [docs/study.md](../../docs/study.md). Produced by `python -m benchmarks.study"
             f"{' --quick' if summary['quick'] else ''}` on {summary['environment']['date']} "
             f"(commit {summary['environment']['commit']}, torch {summary['environment']['torch']}, "
             f"{summary['environment']['cpu_count']} CPU cores); total runtime "
             f"{summary['wall_s'] / 60:.1f} min.", "",
             "## Settings", "",
             f"- fine-tuning languages (one per gloo rank): {', '.join(settings.languages)}; low-resource: "
             + ", ".join(f"{c} ({f:.0%} of its train split)" for c, f in settings.low_resource)
             + f"; unseen: {', '.join(settings.unseen)}",
             f"- base model: {summary['pretrain']['parameters']:,} parameters ({settings.model.as_dict()}), "
             f"pre-trained {settings.pretrain_steps} steps x {settings.pretrain_batch} windows on "
             f"{len(settings.pretrain_languages)} languages (final train loss "
             f"{summary['pretrain']['final_train_loss']:.3f})",
             f"- fine-tuning: {settings.steps} steps, batch {settings.batch} per rank, AdamW lr {settings.lr:g} "
             f"(warm-up {settings.warmup}, cosine), clip {settings.clip:g}, DDP bucket cap "
             f"{settings.bucket_cap_mb:g} MB; seeds {list(settings.seeds)}; bootstrap {settings.bootstrap} resamples",
             f"- data: {DATA_SOURCE}",
             f"- validation choices: static temperature -> `{static}`; best bucket-level method -> `{best}` "
             f"(its param-granularity run: `{best}-param`)", "",
             "## Test losses (nats/byte), mean over seeds", ""]
    codes = list(settings.languages) + list(settings.unseen)
    lines.append("| run | " + " | ".join(codes) + " | seen avg | worst | unseen avg | step ms |")
    lines.append("|---" * (len(codes) + 5) + "|")
    for name in names:
        rows = [r for r in results if r["run"] == name]
        per = [sum(r["final"]["test"][c] for r in rows) / len(rows) for c in codes]
        m = [metrics(r, settings) for r in rows]
        avg = {k: sum(x[k] for x in m) / len(m) for k in m[0]}
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in per)
                     + f" | {avg['primary']:.4f} | {avg['worst']:.3f} | {avg['unseen']:.3f} | {avg['step_ms']:.0f} |")
    lines += ["", "## Paired differences to plain DDP (`mean`), test split", "",
              "Mean over seeds of (run - mean) and 95% bootstrap interval; negative is better.", "",
              "| run | primary (seen avg) | worst seen | low-resource | unseen avg | vs static (primary) |",
              "|---|---|---|---|---|---|"]
    for name in names:
        if name == "mean":
            continue
        cells = [_fmt(paired(results, settings, name, "mean", k))
                 for k in ("primary", "worst", "low_resource", "unseen")]
        vs_static = _fmt(paired(results, settings, name, static, "primary")) if name != static else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {vs_static} |")
    h1 = paired(results, settings, "mgda", "mean", "primary")
    h2 = paired(results, settings, "mgda", "mgda-global", "primary")
    grad_runs = [n for n in names if n not in ("mean",) and not n.startswith("static")]
    best_test = min(grad_runs, key=lambda n: paired(results, settings, n, "mean", "primary")["mean"])
    h3 = paired(results, settings, best, static, "primary")
    lines += ["", "## Hypotheses", "",
              f"- **H1** (`mgda` vs `mean`, primary): {_fmt(h1)} -> "
              + ("supported" if h1["hi"] < 0 and h1["mean"] <= -0.01 else "not supported"),
              f"- **H2** (`mgda` vs `mgda-global`, primary, supported if the interval is below +0.01): {_fmt(h2)} -> "
              + ("supported" if h2["hi"] < 0.01 else "not supported"),
              f"- **H3** (best method by validation, `{best}`, vs tuned `{static}`): {_fmt(h3)} -> "
              + ("supported" if h3["hi"] < 0 else "not supported"),
              f"- (exploratory) lowest mean test primary difference among gradient methods: `{best_test}`", "",
              "## Per-seed primary metric (test, seen average)", "",
              "| run | " + " | ".join(f"seed {s}" for s in settings.seeds) + " |",
              "|---" * (len(settings.seeds) + 1) + "|"]
    by = {(r["run"], r["seed"]): r for r in results}
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{metrics(by[(name, s)], settings)['primary']:.4f}"
                                               for s in settings.seeds) + " |")
    lines += ["", f"![validation curves]({stem}_curves.png)", "", f"![paired differences]({stem}_diffs.png)", ""]
    if summary.get("conclusion"):
        lines += ["## Conclusion", "", summary["conclusion"], ""]
    if summary.get("deviations"):
        lines += ["## Deviations from the protocol", "", summary["deviations"], ""]
    return "\n".join(lines)


def plots(summary: dict, settings: StudySettings, out_dir: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    names = list(dict.fromkeys(r["run"] for r in results))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        rows = [r for r in results if r["run"] == name]
        steps = rows[0]["curve_steps"]
        avg = [sum(sum(r["valid_curve"][i][c] for c in settings.languages) / len(settings.languages)
                   for r in rows) / len(rows) for i in range(len(steps))]
        ax.plot(steps, avg, label=name, lw=1.2)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation loss, seen avg (nats/byte)")
    ax.set_title("Validation curves (mean over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_curves.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    others = [n for n in names if n != "mean"]
    for i, name in enumerate(others):
        d = paired(results, settings, name, "mean", "primary")
        ax.errorbar(d["mean"], i, xerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], fmt="o", capsize=3)
        ax.scatter(d["per_seed"], [i] * len(d["per_seed"]), s=8, color="grey", alpha=0.6)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(others)), others)
    ax.set_xlabel("test primary metric minus plain DDP (nats/byte; negative is better)")
    ax.set_title("Paired differences, mean and 95% bootstrap interval over seeds")
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_diffs.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny pipeline check (2 seeds, a few steps); not a result")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder (default: benchmarks/results)")
    p.add_argument("--cache", type=Path, default=Path(".study_cache"), help="where the base model is cached")
    p.add_argument("--seeds", type=int, nargs="+", help="override the protocol's seeds")
    p.add_argument("--pilot", action="store_true", help="time one seed of `mean` and `mgda` and exit")
    args = p.parse_args(argv)
    settings = StudySettings(**QUICK) if args.quick else StudySettings()
    if args.seeds:
        settings = dataclasses.replace(settings, seeds=tuple(args.seeds))
    stem = "study_quick" if args.quick else "study"
    started = time.perf_counter()
    data = load_data(settings)
    base, record = pretrain(settings, data, args.cache)
    base_path = args.cache / f"study_base_{settings.key()}.pt"
    print(f"[study] base model: {record}", flush=True)
    from bucketmoo_kernels import available_methods

    methods = set(available_methods())
    if args.pilot:
        t0 = time.perf_counter()
        run_jobs(settings, [(settings.seeds[0], Run("mean")), (settings.seeds[0], Run("mgda", "mgda"))], base_path)
        print(f"[study] pilot: 2 runs in {time.perf_counter() - t0:.0f} s")
        return 0
    runs = phase1_runs(settings, methods)
    results = run_jobs(settings, [(s, r) for s in settings.seeds for r in runs], base_path)
    static = choose(results, settings, [r.name for r in runs if r.tau is not None])
    bucket_names = [r.name for r in runs if r.method is not None and r.granularity == "bucket"]
    best = choose(results, settings, bucket_names)
    best_run = next(r for r in runs if r.name == best)
    param = dataclasses.replace(best_run, name=f"{best}-param", granularity="param")
    results += run_jobs(settings, [(s, param) for s in settings.seeds], base_path)
    summary = {"quick": args.quick, "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
               "environment": _environment(), "pretrain": record, "static": static, "best_bucket": best,
               "not_run": [n for n, m, _ in BUCKET_RUNS if m not in methods],
               "results": results, "wall_s": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{stem}.json", "w") as f:
        json.dump(summary, f, indent=1)
    plots(summary, settings, args.out, stem)
    text = report(summary, settings, args.out, stem)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
