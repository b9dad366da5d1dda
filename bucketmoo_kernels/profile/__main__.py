"""Command line of the conflict profiler: ``python -m bucketmoo_kernels.profile --help``.

Builds the demo's byte-level model (:mod:`bucketmoo_kernels.demo.model`) or a Transformers
causal LM from a config (``--hf-config``, no weights downloaded), gives every language of the
demo's text (:mod:`bucketmoo_kernels.demo.data`, Unicode CLDR strings shipped with Babel) its
own loss on fresh random windows, optionally trains the model a little with the plain average
of the language losses first (``--pretrain-steps``), and runs
:func:`~bucketmoo_kernels.profile_conflicts` for each ``--granularity``. For each granularity
it writes ``<out>/<granularity>/report.md``, ``report.json``, ``by_layer.png`` and
``by_segment.png``, and prints the per-layer table and the reading.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import torch

QUICK = dict(steps=2, batch=4)

EPILOG = """\
examples:
  python -m bucketmoo_kernels.profile                                  # demo model and languages, param + bucket
  python -m bucketmoo_kernels.profile --quick                          # a few seconds
  python -m bucketmoo_kernels.profile --pretrain-steps 60 --steps 8    # after some plain-average training
  python -m bucketmoo_kernels.profile --hf-config tiny-gpt2 --granularity bucket global
  python -m bucketmoo_kernels.profile --hf-config path/to/config.json --languages de fr ar hi
"""


def build_parser() -> argparse.ArgumentParser:
    from ..demo.model import ModelConfig
    from ..demo.train import DemoSettings

    demo, model = DemoSettings(), ModelConfig()
    p = argparse.ArgumentParser(
        prog="python -m bucketmoo_kernels.profile",
        description="Measure where the languages' gradients conflict in a model, per parameter, DDP bucket, "
                    "chunk or for the whole model, and what per-segment multi-objective weights would change. "
                    "One loss per language of the demo's text (Unicode CLDR strings shipped with Babel); "
                    "writes report.md, report.json and two heat maps per granularity to --out.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to profile")
    g.add_argument("--languages", nargs="+", default=list(demo.languages), metavar="CODE",
                   help="CLDR locale ids, one task each (default: %(default)s)")
    g.add_argument("--granularity", nargs="+", default=["param", "bucket"], metavar="G",
                   help="param, bucket, chunk:<n> or global; one report each (default: %(default)s)")
    g.add_argument("--bucket-cap-mb", type=float, default=demo.bucket_cap_mb,
                   help="DDP bucket cap of the bucket and chunk granularities (default: the demo's, %(default)s)")
    g.add_argument("--method", default="mgda", help="method whose weights are reported (default: %(default)s)")
    g.add_argument("--steps", type=int, default=4, help="profiled steps, a fresh batch each (default: %(default)s)")
    g.add_argument("--batch", type=int, default=demo.batch,
                   help="windows per language and step (default: %(default)s)")
    g.add_argument("--pretrain-steps", type=int, default=0,
                   help="AdamW steps on the plain average of the language losses before profiling, so that the "
                        "profile is of a partly trained model (default: %(default)s: the initial weights)")
    g.add_argument("--lr", type=float, default=demo.lr, help="learning rate of --pretrain-steps (default: %(default)s)")
    g.add_argument("--seed", type=int, default=demo.seed, help="seed of the weights and batches (default: %(default)s)")
    g = p.add_argument_group("model")
    g.add_argument("--hf-config", default=None, metavar="PATH|tiny-gpt2",
                   help="a Transformers causal LM built from this config (a config.json file or a folder "
                        "holding one; 'tiny-gpt2': GPT-2 with the demo model's sizes and 256 byte tokens); no "
                        "weights are downloaded. Default: the demo's byte model")
    g.add_argument("--context", type=int, default=model.context, help="bytes per window (default: %(default)s)")
    g.add_argument("--d-model", type=int, default=model.d_model, help="model width (default: %(default)s)")
    g.add_argument("--layers", type=int, default=model.n_layer, help="blocks (default: %(default)s)")
    g.add_argument("--heads", type=int, default=model.n_head, help="attention heads (default: %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (default: %(default)s)")
    g.add_argument("--backend", default="auto", help="kernel backend of the Gram and weights (default: %(default)s)")
    g.add_argument("--threads", type=int, default=0, help="torch threads; 0 = leave torch's default")
    g.add_argument("--out", default=os.path.join("out", "profile"),
                   help="output folder (default: %(default)s)")
    g.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {', '.join(f'--{k} {v}' for k, v in QUICK.items())}")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="write report.md and report.json only")
    return p


def _hf_model(spec: str, context: int, d_model: int, layers: int, heads: int):
    try:
        import transformers
    except ImportError as exc:
        raise SystemExit("--hf-config needs transformers: pip install 'bucketmoo_kernels[hf]'") from exc
    if spec == "tiny-gpt2":
        cfg = transformers.GPT2Config(vocab_size=256, n_positions=context, n_embd=d_model, n_layer=layers,
                                      n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif os.path.isfile(spec):
        with open(spec, encoding="utf-8") as fh:
            data = json.load(fh)
        if "model_type" not in data:
            raise SystemExit(f"--hf-config {spec}: the config has no 'model_type' (e.g. \"gpt2\")")
        cfg = transformers.AutoConfig.for_model(**data)
    elif os.path.isdir(spec):
        cfg = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
    else:
        raise SystemExit(f"--hf-config {spec!r}: not a config file or folder (or 'tiny-gpt2'); nothing is "
                         "downloaded")
    vocab = getattr(cfg, "vocab_size", 0) or 0
    if vocab < 256:
        raise SystemExit(f"--hf-config: tokens are bytes (ids 0..255), so vocab_size must be >= 256; got {vocab}")
    positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if positions is not None and positions < context:
        raise SystemExit(f"--hf-config: the model takes {positions} positions, fewer than --context {context}")
    model = transformers.AutoModelForCausalLM.from_config(cfg)

    def loss(inputs, targets):
        logits = model(input_ids=inputs).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    return model, loss, f"{type(model).__name__} from {spec}"


def _demo_model(context: int, d_model: int, layers: int, heads: int):
    from ..demo.model import ByteLM, ModelConfig

    model = ByteLM(ModelConfig(context=context, d_model=d_model, n_layer=layers, n_head=heads))
    return model, model.loss, f"demo ByteLM (context {context}, d_model {d_model}, {layers} layers, {heads} heads)"


def _pretrain(model, loss_fn, data, args, device, progress: bool) -> None:
    from ..demo.data import sample_batch

    gens = {c: torch.Generator().manual_seed(args.seed * 7919 + 104729 + i) for i, c in enumerate(data)}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps = range(args.pretrain_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="pretraining (plain average of the languages)", unit="step")
    for _ in steps:
        opt.zero_grad(set_to_none=True)
        losses = [loss_fn(*(t.to(device) for t in sample_batch(d, args.batch, args.context, gens[c])))
                  for c, d in data.items()]
        torch.stack(losses).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    opt.zero_grad(set_to_none=True)


def _command(argv) -> str:
    return "python -m bucketmoo_kernels.profile" + "".join(" " + shlex.quote(a) for a in argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for name in ("steps", "batch", "context", "d_model", "layers", "heads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.pretrain_steps < 0:
        raise SystemExit(f"--pretrain-steps must be >= 0; got {args.pretrain_steps}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    progress = not args.no_progress

    from .. import __version__
    from ..demo.data import DATA_SOURCE, load_languages, sample_batch
    from ..provenance import git_commit, load_average
    from . import profile_conflicts

    data = {c: lang.train for c, lang in load_languages(args.languages, seed=args.seed,
                                                        min_bytes=args.context + 1).items()}
    torch.manual_seed(args.seed)
    if args.hf_config:
        model, loss_fn, model_name = _hf_model(args.hf_config, args.context, args.d_model, args.layers, args.heads)
    else:
        model, loss_fn, model_name = _demo_model(args.context, args.d_model, args.layers, args.heads)
    model.to(device)
    if args.pretrain_steps:
        model.train()
        _pretrain(model, loss_fn, data, args, device, progress)
    model.eval()  # no dropout: the measured conflict is the data's, not dropout noise
    meta = {
        "command": _command(argv), "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
                   f"{torch.get_num_threads()} torch threads, load average {load_average()}"
                   + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "versions": f"bucketmoo_kernels {__version__}, torch {torch.__version__}, python {platform.python_version()}",
        "model": f"{model_name}, {sum(p.numel() for p in model.parameters()):,} parameters, "
                 f"{args.pretrain_steps} pretraining steps",
        "data": f"{', '.join(args.languages)}: {args.batch} random {args.context}-byte windows per language and step "
                f"from the training split; {DATA_SOURCE}",
    }
    os.makedirs(args.out, exist_ok=True)
    written = []
    for granularity in args.granularity:
        # The same batches for every granularity: generators seeded per language.
        gens = {c: torch.Generator().manual_seed(args.seed * 1000 + i) for i, c in enumerate(data)}
        task_losses = {c: (lambda c=c, d=d: loss_fn(*(t.to(device) for t in
                                                      sample_batch(d, args.batch, args.context, gens[c]))))
                       for c, d in data.items()}
        t0 = time.perf_counter()
        report = profile_conflicts(model, task_losses, steps=args.steps, granularity=granularity,
                                   bucket_cap_mb=args.bucket_cap_mb, backend=args.backend, method=args.method,
                                   progress=progress)
        report.meta = {**meta, "device": str(device), "backend": args.backend,
                       "profile seconds": f"{time.perf_counter() - t0:.1f}"}
        folder = os.path.join(args.out, granularity.replace(":", "-"))
        figures = []
        try:
            if args.no_plots:
                raise ImportError("--no-plots")
            figures = [os.path.basename(report.plot(os.path.join(folder, "by_layer.png"), by="layer")),
                       os.path.basename(report.plot(os.path.join(folder, "by_segment.png"), by="segment"))]
        except ImportError as exc:
            print(f"(no plots: {exc})")
        report.to_markdown(os.path.join(folder, "report.md"), figures=figures)
        report.to_json(os.path.join(folder, "report.json"))
        written.append(folder)
        print(f"\n== {granularity}: {len(report.segments)} segments, {report.steps} steps, "
              f"tasks {', '.join(report.tasks)} ==")
        print(report.format_summary())
    print("\nwrote " + ", ".join(os.path.join(f, "report.md") for f in written) + " (with report.json and plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
