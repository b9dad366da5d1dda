"""Terminal table, markdown report and PNG plots of a demo result (see :func:`.run.run_demo`).

All functions take the JSON-serialisable dict that ``run_demo`` returns; ``results.json`` in
the output folder holds it, so a report can be rebuilt without training
(``python -m bucketmoo_kernels.demo --report-only --out DIR``).
"""

from __future__ import annotations

import json
import math
import os

__all__ = ["table_rows", "format_table", "summary_lines", "write_report", "load_results"]


def _ok_runs(results: dict) -> list[dict]:
    return [run for run in results["runs"] if run.get("status") == "ok"]


def _seen_unseen(results: dict) -> tuple[list[str], list[str]]:
    langs = results["languages"]
    return ([c for c, info in langs.items() if info["seen"]],
            [c for c, info in langs.items() if not info["seen"]])


def _final(run: dict, code: str) -> float:
    return run["heldout"][code][-1]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def baseline_name(results: dict) -> str:
    """What the ``mean`` run is: plain DDP, or stock FSDP2 under ``--engine fsdp``."""
    engine = results.get("settings", {}).get("engine")
    return {"fsdp": "stock FSDP2", "hf": "the plain HF Trainer"}.get(engine, "plain DDP")


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table (one row per run, skipped runs included)."""
    seen, unseen = _seen_unseen(results)
    runs = _ok_runs(results)
    base = next((r for r in runs if r["name"] == "mean"), None)
    base_seen = _mean(_final(base, c) for c in seen) if base else None
    base_mem = base.get("peak_mem_mib") if base else None
    header = (["run"] + seen + ["seen avg", "vs mean"] + (["unseen avg"] if unseen else [])
              + ["step ms", "mem MiB", "hook MiB", "conf bkt %", "conf pair %", "w spread",
                 "w bkt std"])
    rows = []
    for run in results["runs"]:
        if run.get("status") != "ok":
            rows.append([run["name"], f"skipped: {run.get('error', '')[:70]}"])
            continue
        seen_avg = _mean(_final(run, c) for c in seen)
        probe = run["probe"][-1] or {}
        mem = run.get("peak_mem_mib")
        row = [run["name"]] + [_fmt(_final(run, c)) for c in seen]
        row += [_fmt(seen_avg), _fmt(None if base_seen is None else seen_avg - base_seen, "+.3f")]
        if unseen:
            row.append(_fmt(_mean(_final(run, c) for c in unseen)))
        row += [_fmt(run["step_ms_median"], ".0f"),
                _fmt(None if mem is None or base_mem is None else mem - base_mem, "+.1f"),
                _fmt(run.get("hook_extra_mib"), ".2f"),
                _fmt(100 * probe.get("bucket_conflict_share", float("nan")), ".0f"),
                _fmt(100 * probe.get("pair_conflict_share", float("nan")), ".0f"),
                _fmt(probe.get("weight_spread"), ".2f"), _fmt(probe.get("weight_bucket_std"), ".2f")]
        rows.append(row)
    return header, rows


def run_line(steps: int, runs, languages, unseen) -> str:
    """The line the demo prints before training (and the README's copy of its output)."""
    return (f"training {steps} steps x {len(runs)} runs ({', '.join(runs)}) on {len(languages)} ranks: "
            f"{', '.join(languages)}" + (f"; unseen: {', '.join(unseen)}" if unseen else ""))


def format_table(results: dict) -> str:
    """Fixed-width text table for the terminal."""
    header, rows = table_rows(results)
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(str(r[i])) for r in [header] + full) for i in range(len(header))]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        if len(row) != len(header):
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
            continue
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    rule = "|".join("---" if i == 0 else "---:" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", "|" + rule + "|"]
    for row in rows:
        row = row + [""] * (len(header) - len(row))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary_lines(results: dict) -> list[str]:
    """A few plain sentences: best run on seen and unseen languages, static vs gradient methods."""
    seen, unseen = _seen_unseen(results)
    runs = _ok_runs(results)
    if not runs:
        return ["no run finished; see the errors above"]
    by_seen = sorted(runs, key=lambda r: _mean(_final(r, c) for c in seen))
    lines = [f"best average held-out loss on trained languages: {by_seen[0]['name']} "
             f"({_mean(_final(by_seen[0], c) for c in seen):.3f} nats/byte)"]
    if unseen:
        by_unseen = min(runs, key=lambda r: _mean(_final(r, c) for c in unseen))
        lines.append(f"best on unseen languages ({', '.join(unseen)}): {by_unseen['name']} "
                     f"({_mean(_final(by_unseen, c) for c in unseen):.3f})")
    base = next((r for r in runs if r["name"] == "mean"), None)
    if base is not None:
        base_seen = _mean(_final(base, c) for c in seen)
        parts = [f"{r['name']} {_mean(_final(r, c) for c in seen) - base_seen:+.3f}"
                 for r in runs if r is not base]
        if parts:
            lines.append(f"seen-average loss vs {baseline_name(results)} (negative = better): " + ", ".join(parts))
    static = [r for r in runs if r.get("tau") is not None]
    grad = [r for r in runs if r.get("method")]
    if static and grad:
        best_static = min(static, key=lambda r: _mean(_final(r, c) for c in seen))
        best_grad = min(grad, key=lambda r: _mean(_final(r, c) for c in seen))
        gap = (_mean(_final(best_grad, c) for c in seen) - _mean(_final(best_static, c) for c in seen))
        verdict = "beats" if gap < 0 else "does not beat"
        lines.append(f"best gradient method ({best_grad['name']}) {verdict} the static weighting "
                     f"({best_static['name']}) on seen languages by {abs(gap):.3f} nats/byte "
                     "(one seed: differences of a few hundredths are within noise)")
    return lines


def _plots(results: dict, out_dir: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    runs = _ok_runs(results)
    if not runs:
        return []
    codes = list(results["languages"])
    paths = []

    cols = min(3, len(codes))
    rows = math.ceil(len(codes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, code in zip(axes.flat, codes):
        for run in runs:
            ax.plot(run["eval_steps"], run["heldout"][code], marker=".", label=run["name"])
        seen = "trained" if results["languages"][code]["seen"] else "unseen"
        ax.set_title(f"{results['languages'][code]['name']} ({code}, {seen})")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(codes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "heldout_loss.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    base = next((r for r in runs if r["name"] == "mean"), None)
    if base is not None:
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(codes) * len(runs) / 3), 3.6))
        width = 0.8 / max(1, len(runs) - 1)
        others = [r for r in runs if r is not base]
        for i, run in enumerate(others):
            delta = [_final(run, c) - _final(base, c) for c in codes]
            ax.bar([k + i * width for k in range(len(codes))], delta, width, label=run["name"])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks([k + width * (len(others) - 1) / 2 for k in range(len(codes))])
        ax.set_xticklabels([c if results["languages"][c]["seen"] else f"{c} (unseen)" for c in codes])
        ax.set_ylabel(f"final held-out loss - {baseline_name(results)}")
        ax.set_title(f"Per-language change vs {baseline_name(results)} (below 0 = better)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "loss_vs_mean.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    panels = [("bucket_conflict_share", 100, "buckets with a conflicting language pair (%)"),
              ("pair_conflict_share", 100, "(bucket, language pair) with negative cosine (%)"),
              ("weight_spread", 1, "weight spread: max - min weight, mean over buckets"),
              ("weight_bucket_std", 1, "weight std over buckets, mean over languages")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    for ax, (key, scale, title) in zip(axes.flat, panels):
        for run in runs:
            ax.plot([p["step"] for p in run["probe"]], [scale * p[key] for p in run["probe"]],
                    marker=".", label=run["name"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[1].legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "conflict.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _hook_table(results: dict) -> str:
    rows = []
    for run in _ok_runs(results):
        stats = [s for s in run.get("hook_diagnostics") or [] if s.get("segments")]
        if not stats:
            continue
        rows.append([run["name"], str(stats[-1]["segments"]),
                     _fmt(100 * _mean(s["bucket_conflict_share"] for s in stats), ".0f"),
                     _fmt(_mean(s["weight_spread"] for s in stats), ".2f"),
                     _fmt(_mean(s.get("weight_bucket_std", float("nan")) for s in stats), ".2f"),
                     _fmt(_mean(s["norm_ratio"] for s in stats), ".2f"),
                     " / ".join(f"{w:.2f}" for w in stats[-1]["weights_mean"])])
    if not rows:
        return ""
    header = ["run", "segments", "conflict %", "w spread", "w bkt std", "norm ratio",
              "last weights (per language)"]
    return _markdown_table(header, rows)


def write_report(results: dict, out_dir: str) -> list[str]:
    """Write ``results.json``, ``report.md`` and the PNG plots into ``out_dir``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1)
    plots = _plots(results, out_dir)
    s, env = results["settings"], results["environment"]
    seen, unseen = _seen_unseen(results)
    header, rows = table_rows(results)
    static_runs = [r for r in _ok_runs(results) if r.get("static_weights")]
    lang_rows = [[c, info["name"], "yes" if info["seen"] else "no (unseen)", str(info["train_bytes"]),
                  str(info["heldout_bytes"]), str(info["eval_windows"])]
                 for c, info in results["languages"].items()]
    md = [
        "# Bucket-level MOO demo: multilingual byte-level LM",
        "",
        f"{len(seen)} languages trained, one per rank ({', '.join(seen)})"
        + (f"; {', '.join(unseen)} evaluated but never trained on" if unseen else "") + ". "
        f"Model: byte-level decoder, {results['model_parameters'] / 1e6:.2f}M parameters "
        f"({s['model']['n_layer']} layers, width {s['model']['d_model']}, context {s['model']['context']}). "
        f"{s['steps']} steps of AdamW (lr {s['lr']:g}, warm-up {s['warmup']}, cosine decay, "
        f"gradient clipped to norm {s.get('clip', 0):g}), "
        f"batch {s['batch']} x {s['model']['context']} bytes per language, seed {s['seed']}. "
        + (f"DDP buckets of {s['bucket_cap_mb']:g} MiB. " if s.get("engine", "ddp") == "ddp" else
           f"Engine: HF Transformers Trainer (BucketMOOTrainer; model: GPT2LMHeadModel from a config with a "
           f"byte vocabulary; DDP buckets of {s['bucket_cap_mb']:g} MiB; 'mean' is bucket_moo=None, plain DDP "
           "on the same per-language data; examples are shuffled non-overlapping windows; held-out loss is "
           "the Trainer's eval_<code>_loss over context - 1 predicted bytes per window). "
           if s.get("engine") == "hf" else
           "Engine: FSDP2 (fully_shard per block and the root; one parameter group is one bucket; the "
           "'mean' run is stock FSDP2 and hook runs use the Bucket-Level MOO reduce-scatter). ")
        + "Every run starts from the same weights and sees the same batches.",
        "",
        f"Environment: {env['device']}, {env['dist_backend']}, {env['threads_per_rank']} thread(s) per rank, "
        f"{env['cpu_count']} CPU(s), torch {env['torch']}, Python {env['python']}, {env['date']}"
        + (f", commit {env['commit']}, load average {env['load_average']} when the runs ended" if "commit" in env else "")
        + f"; all runs took {results['wall_s']:.0f} s.",
        "",
        "## Results",
        "",
        _markdown_table(header, rows),
        "",
        "- Losses: mean next-byte cross-entropy (nats/byte) on held-out strings, after the last step.",
        "- step ms: median over steps of the slowest rank (forward, backward with communication, optimizer).",
        "- mem MiB: extra peak memory vs plain DDP: the largest growth of the process memory during "
        "training steps (from step 2 on, after DDP has built its buckets; CUDA allocator peak on GPU, RSS "
        "high-water mark on CPU, approximate within a few MiB), minus plain DDP's. hook MiB: the hook's "
        "own account of its largest extra buffers (BucketMOOState.peak_extra_bytes, from step 2 on).",
        "- conf bkt %, conf pair %, w spread and w bkt std come from a probe at the last evaluation: "
        "each language's gradient of a fixed batch, split into DDP-like buckets "
        f"({results['probe_buckets']} buckets; the same probe for every "
        "run): conf bkt %: share of buckets where some pair of languages has a negative cosine; conf "
        "pair %: share of (bucket, language pair) with a negative cosine; w spread: how uneven the "
        "languages' weights are, the mean over buckets of the largest minus the smallest weight (0 for "
        "plain DDP); w bkt std: how much the buckets' weights differ, the standard deviation over buckets "
        "of a language's weight, averaged over languages (0 for plain DDP, static and global runs).",
        "",
    ]
    for line in summary_lines(results):
        md.append(f"- {line}")
    md.append("")
    notes = [f"{run['name']}: {note}" for run in results["runs"] for note in run.get("notes") or []]
    if notes:
        md += ["Run notes:", ""] + [f"- {note}" for note in notes] + [""]
    if static_runs:
        md.append("Static weights (temperature re-weighting by training bytes, w_l ~ n_l^(1/tau)): "
                  + "; ".join(f"{r['name']}: "
                              + ", ".join(f"{c} {w:.2f}" for c, w in zip(seen, r["static_weights"]))
                              for r in static_runs) + ".")
        md.append("")
    hook_md = _hook_table(results)
    if hook_md:
        md += ["### What the hook saw (its own diagnostics, steps before each evaluation, mean)", "",
               hook_md, "",
               "norm ratio: norm of the combined gradient over the norm of the plain average (MGDA's "
               "min-norm point is shorter than the average when languages conflict); last weights: the "
               "run's weights averaged over segments at the last recorded step.", ""]
    if plots:
        md += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    md += ["## Data", "", f"Source: {results['data_source']}.", "",
           _markdown_table(["code", "language", "trained", "train bytes", "held-out bytes", "eval windows"],
                           lang_rows),
           "", "## Caveats", "",
           "- One seed and a few hundred steps of a tiny model: differences of a few hundredths of a nat are "
           "within run-to-run noise. Re-run with other `--seed` values before drawing conclusions.",
           "- Published comparisons (Xin et al. 2022, arXiv 2209.11379; Kurin et al. 2022, arXiv 2201.04122) "
           "find that well-tuned static weights often match gradient-conflict methods; this demo reports "
           "whatever it measures, it does not tune any method.",
           "- CPU step times on a shared machine are noisy; memory on CPU is an RSS estimate.", ""]
    paths.append(os.path.join(out_dir, "report.md"))
    with open(paths[-1], "w") as f:
        f.write("\n".join(md))
    return paths + plots


def load_results(out_dir: str) -> dict:
    """Read ``results.json`` written by :func:`write_report`."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run the demo with --out {out_dir} first")
    with open(path) as f:
        return json.load(f)
