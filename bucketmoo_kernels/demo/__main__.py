"""Command line of the demo: ``python -m bucketmoo_kernels.demo --help``."""

from __future__ import annotations

import argparse
import ast
import sys
import time

from .model import ModelConfig
from .run import run_demo
from .train import DEFAULT_RUNS, DemoSettings

QUICK = dict(steps=30, eval_every=15, eval_windows=16, batch=8)

EPILOG = """\
runs (--runs):
  mean               plain DDP, no comm hook (the all-reduce averages the language gradients)
  static             plain DDP, each language's loss weighted by its data size^(1/tau) (--tau)
  static-t<tau>      the same with an explicit temperature, e.g. static-t5
  <method>           bucket_moo_hook with one weight vector per DDP bucket: any registered method
                     (mgda, pcgrad, cagrad, upgrad, nash_mtl, gradvac, ...; see
                     bucketmoo_kernels.available_methods()); the element-wise graddrop and
                     trimmed_mean run with protocol=allgather
  <method>-global    one weight vector for the whole model (classic MGDA baseline)
  <method>-param     one weight vector per parameter

examples:
  python -m bucketmoo_kernels.demo                      # default comparison, a few minutes on 2 cores
  python -m bucketmoo_kernels.demo --quick              # about a minute
  python -m bucketmoo_kernels.demo --runs mean mgda cagrad --method-option cagrad:c=0.4
  python -m bucketmoo_kernels.demo --runs mean constant upgrad --method-option constant:weights=1,2,1,1 \
      --method-option upgrad:pref_vector=[0.4,0.2,0.2,0.2]
  python -m bucketmoo_kernels.demo --languages de ru ar hi --unseen uk --steps 300
  python -m bucketmoo_kernels.demo --report-only --out demo_out   # rebuild report.md and plots
  python -m bucketmoo_kernels.demo --engine hf --runs mean mgda   # through the HF Trainer
"""


def _value(text: str, what: str):
    """An option value from the command line.

    ``none`` / ``true`` / ``false`` (any case), an int, a float, a Python literal (a list
    ``[1, 2, 1, 1]``, a tuple, a quoted string), a comma-separated list of literals
    (``1,2,1,1`` -> ``[1, 2, 1, 1]``), or else the text itself as a string (``solver=pgd``).
    A value that starts with a bracket or holds a comma must be a valid literal; otherwise
    ``argparse.ArgumentTypeError`` naming ``what`` (the option).
    """
    stripped = text.strip()
    if stripped.lower() == "none":
        return None
    if stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    for cast in (int, float):
        try:
            return cast(stripped)
        except ValueError:
            pass
    if stripped and (stripped[0] in "[({'\"" or "," in stripped):
        try:
            value = ast.literal_eval(stripped)
        except (ValueError, SyntaxError) as exc:
            raise argparse.ArgumentTypeError(
                f"{what}: cannot read the value {text!r} ({type(exc).__name__}: {exc}); expected a number, "
                "true/false/none, a list such as [1, 2, 1, 1] or 1,2,1,1, or a plain word") from None
        return list(value) if isinstance(value, tuple) else value
    return stripped


def _method_option(text: str) -> tuple[str, str, object]:
    method, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not method or not key:
        raise argparse.ArgumentTypeError(f"expected METHOD:KEY=VALUE (e.g. cagrad:c=0.4 or "
                                         f"constant:weights=[1,2,1,1]); got {text!r}")
    return method, key, _value(value, f"--method-option {method}:{key}")


def _hook_option(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. protocol=allgather); got {text!r}")
    return key, _value(value, f"--hook-option {key}")


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoSettings()
    model = ModelConfig()
    p = argparse.ArgumentParser(
        prog="python -m bucketmoo_kernels.demo",
        description="Fine-tune a small byte-level language model on several languages of real text "
                    "(Unicode CLDR strings shipped with Babel), one language per DDP rank, and compare "
                    "plain DDP, static loss weighting and bucket-level / global multi-objective "
                    "gradient combination from the same initial weights and data order. Writes a "
                    "terminal table, report.md, results.json and PNG plots to --out.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to compare")
    g.add_argument("--languages", nargs="+", default=list(defaults.languages), metavar="CODE",
                   help="CLDR locale ids to train on, one process (rank) each (default: %(default)s)")
    g.add_argument("--unseen", nargs="*", default=list(defaults.unseen), metavar="CODE",
                   help="languages evaluated but never trained on (default: %(default)s; none: empty)")
    g.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), metavar="RUN",
                   help="configurations to compare, in order (default: %(default)s); see below")
    g.add_argument("--tau", type=float, default=defaults.tau,
                   help="temperature of the 'static' run: weights ~ bytes^(1/tau); 1 = proportional to "
                        "data size, large = uniform (default: %(default)s)")
    g.add_argument("--method-option", action="append", type=_method_option, default=[], metavar="M:K=V",
                   help="option of a hook method, e.g. cagrad:c=0.4, pcgrad:seed=1, constant:weights=[1,2,1,1] "
                        "or constant:weights=1,2,1,1 (a list: a Python literal or comma-separated values; "
                        "repeatable)")
    g.add_argument("--hook-option", action="append", type=_hook_option, default=[], metavar="K=V",
                   help="extra BucketMOOState setting for every hook run, e.g. protocol=allgather, "
                        "compress=bf16, backend=torch (repeatable)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=defaults.steps,
                   help="optimizer steps per run (default: %(default)s)")
    g.add_argument("--batch", type=int, default=defaults.batch,
                   help="sequences per rank and step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=defaults.lr,
                   help="peak AdamW learning rate (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up steps (default: %(default)s)")
    g.add_argument("--clip", type=float, default=defaults.clip,
                   help="clip the combined gradient to this global norm; 0 = off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=defaults.seed,
                   help="weights, data split and batch order (default: %(default)s)")
    g.add_argument("--context", type=int, default=model.context,
                   help="bytes per sequence (default: %(default)s)")
    g.add_argument("--d-model", type=int, default=model.d_model, help="model width (default: %(default)s)")
    g.add_argument("--layers", type=int, default=model.n_layer,
                   help="transformer blocks (default: %(default)s)")
    g.add_argument("--heads", type=int, default=model.n_head, help="attention heads (default: %(default)s)")
    g.add_argument("--bucket-cap-mb", type=float, default=defaults.bucket_cap_mb,
                   help="DDP bucket size in MiB; small buckets give the hook more, finer weight vectors "
                        "(default: %(default)s)")
    g.add_argument("--engine", choices=("ddp", "fsdp", "hf"), default=defaults.engine,
                   help="data-parallel engine: ddp (DistributedDataParallel + bucket_moo_hook), fsdp "
                        "(FSDP2 fully_shard per block + the Bucket-Level MOO reduce-scatter; one FSDP "
                        "group is one bucket, 'global' runs are skipped) or hf (a byte-level GPT-2 built "
                        "from a config, fine-tuned with the HF Transformers BucketMOOTrainer; needs "
                        "pip install 'bucketmoo_kernels[hf]'; static runs are skipped) (default: %(default)s)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--heldout-share", type=float, default=defaults.heldout_share,
                   help="share of each language's strings held out (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="steps between held-out evaluations and conflict probes (default: %(default)s)")
    g.add_argument("--eval-windows", type=int, default=defaults.eval_windows,
                   help="held-out windows per language (default: %(default)s)")
    g = p.add_argument_group("execution and output")
    g.add_argument("--quick", action="store_true",
                   help="a short run (about a minute on 2 cores): "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=defaults.device,
                   help="auto: one GPU per language with NCCL if there are enough, else CPU with gloo")
    g.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default=defaults.dist_backend,
                   help="torch.distributed backend (default: %(default)s)")
    g.add_argument("--threads", type=int, default=defaults.threads,
                   help="torch threads per rank; 0 = CPU count / ranks (default: %(default)s)")
    g.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--report-only", action="store_true",
                   help="do not train: rebuild the table, report.md and plots from OUT/results.json")
    return p


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The :class:`DemoSettings` an argparse namespace describes (``--quick`` applied)."""
    model = ModelConfig(context=args.context, d_model=args.d_model, n_layer=args.layers, n_head=args.heads)
    values = dict(languages=tuple(args.languages), unseen=tuple(args.unseen), runs=tuple(args.runs),
                  steps=args.steps, batch=args.batch, model=model, lr=args.lr, warmup=args.warmup,
                  clip=args.clip,
                  tau=args.tau, heldout_share=args.heldout_share, eval_every=args.eval_every,
                  eval_windows=args.eval_windows, bucket_cap_mb=args.bucket_cap_mb, seed=args.seed, engine=args.engine,
                  device=args.device, dist_backend=args.dist_backend, threads=args.threads,
                  method_options=tuple(args.method_option), hook_options=tuple(args.hook_option),
                  progress=not args.no_progress)
    if args.quick:
        values.update(QUICK)
        values["warmup"] = min(args.warmup, QUICK["steps"] // 4)
    return DemoSettings(**values)


def main(argv=None) -> int:
    from . import report

    args = build_parser().parse_args(argv)
    if args.report_only:
        results = report.load_results(args.out)
    else:
        try:
            settings = settings_from_args(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(report.run_line(settings.steps, settings.runs, settings.languages, settings.unseen), flush=True)
        started = time.perf_counter()
        results = run_demo(settings)
        results["total_s"] = time.perf_counter() - started
    paths = report.write_report(results, args.out)
    print()
    print(report.format_table(results))
    print()
    for line in report.summary_lines(results):
        print(f"* {line}")
    for run in results["runs"]:
        for note in run.get("notes") or []:
            print(f"~ {run['name']}: {note}")
    skipped = [r for r in results["runs"] if r.get("status") != "ok"]
    for run in skipped:
        print(f"! {run['name']} skipped: {run.get('error')}", file=sys.stderr)
    took = f" in {results['total_s']:.0f} s" if "total_s" in results else ""
    report_md = paths[1] if len(paths) > 1 else paths[0]
    print(f"\nreport{took}: {report_md} (+ {max(0, len(paths) - 2)} plots, results.json)")
    return 1 if skipped and len(skipped) == len(results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
