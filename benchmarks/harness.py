"""Shared benchmark harness: one timer, one copy baseline, the environment stamp, result files.

Every table of ``benchmarks/`` is produced with these, so their numbers compare:

* :func:`time_round_robin` -- **the timer**: the configurations of a table are visited
  round-robin in the same run (one sample of each per round), so load from other jobs on a
  shared machine hits them alike; median, quartiles (IQR) and min per configuration. CUDA
  samples are bracketed by CUDA events, CPU samples by ``time.perf_counter``; a sample
  repeats the call until it lasts ``min_sample_ms`` (short ops) and reports the per-call time.
  :func:`round_robin_samples` is the same timer returning the samples of every round
  (:func:`paired` compares two configurations round by round); with ``barrier`` it times
  one call between two barriers on every rank of a process group (the step benchmarks).
* :func:`copy_baseline` -- **the copy baseline**: ``dst.copy_(src)`` that moves the bytes of one
  ideal pass of the fused op, T*N elements read + N written, i.e. a copy of (T+1)*N/2
  elements (read and written); ``src`` holds random values and ``dst`` is initialised before
  timing (never a fresh ``torch.empty``, whose first touch would time page faults).
* :data:`COPY_RATIO` -- the one name of **the copy ratio**: an op's effective bandwidth
  (its ideal bytes / its time) over the copy baseline's bandwidth (bytes read + written /
  time) in the same run; 1.0 = as fast as copying the bytes it must move.
* :func:`environment` -- device, library versions, commit (and whether the tree had local
  changes), UTC date and time, the load average: stamped on every run.
* :func:`append_results` -- appends the run to ``results/<name>.md`` (a section per run,
  newest last) and ``results/<name>.json`` (``{"title", "runs": [...]}``): earlier runs are
  kept, never overwritten. :class:`RunRecorder` does the same for a run saved as it grows
  (after every case), so a benchmark cut off keeps the cases it measured. ``directory=OUT_DIR``
  (``out/benchmarks/``, ignored by git) is where a run goes that is not recorded on purpose
  (``bench_kernels`` without ``--record``).
* The end-to-end step benchmarks (``bench_ddp_step``, ``bench_fsdp_step``) share their
  options (:func:`step_bench_parser`, ``--quick``, ``--no-write``), their gloo workers
  (:func:`run_gloo_workers`), their rounds (:func:`time_step_rounds`), the isolated protocol
  parts of the overhead breakdown (:func:`protocol_parts`) and their tables
  (:func:`step_rows`, :func:`overhead_breakdown`).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from bucketmoo_kernels.provenance import git_commit, load_average  # noqa: F401  (load_average: the benches' too)
from bucketmoo_kernels.distributed.localhost import free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Where a run goes unless it is recorded on purpose (``--record``): ignored by git, so running a
#: benchmark (the main job's summary included) leaves the checkout as it was.
OUT_DIR = Path(__file__).resolve().parents[1] / "out" / "benchmarks"

#: The column name of the copy ratio in every table (see the module docstring).
COPY_RATIO = "copy_ratio"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, IQR and min of timing samples (ms)."""
    xs = sorted(samples_ms)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median_ms": statistics.median(xs), "p25_ms": q1, "p75_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": xs[0], "samples": len(xs)}


def _one_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _sample_ms(fn: Callable[[], object], device: torch.device, calls: int,
               barrier: Callable[[], object] | None = None) -> float:
    """Mean time of ``calls`` back-to-back calls (one sample); between two ``barrier()`` calls
    when one is given."""
    if barrier is not None:
        barrier()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        barrier()
        return (time.perf_counter() - t0) * 1e3 / calls
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def round_robin_samples(fns: Mapping[str, Callable[[], object]], device: torch.device | str = "cpu", *,
                        samples: int = 20, warmup: int = 2, min_sample_ms: float = 1.0,
                        barrier: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """The samples (ms per call) behind :func:`time_round_robin`, in round order.

    Sample ``i`` of every configuration comes from round ``i``, so two configurations can be
    compared round by round (:func:`paired`). With ``barrier`` (``dist.barrier`` in a process
    group) every sample is one call timed between two barriers on every rank, and ``warmup``
    may be 0: all ranks must make the same calls, so nothing is calibrated from a local clock.
    """
    device = torch.device(device)
    calls = {}
    for name, fn in fns.items():
        if barrier is not None:
            for _ in range(warmup):
                fn()
            calls[name] = 1
            continue
        for _ in range(max(1, warmup)):
            one = _one_call_ms(fn, device)
        calls[name] = max(1, math.ceil(min_sample_ms / max(one, 1e-6)))
    collected: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            collected[name].append(_sample_ms(fn, device, calls[name], barrier))
    _sync(device)
    return collected


def time_round_robin(fns: Mapping[str, Callable[[], object]], device: torch.device | str = "cpu", *,
                     samples: int = 20, warmup: int = 2, min_sample_ms: float = 1.0) -> dict[str, dict[str, float]]:
    """Time every configuration of a table in the same run, round-robin.

    Args:
        fns: name -> a call to time (it must not need a fresh input: it runs many times).
        samples: samples per configuration (rounds).
        warmup: untimed calls of each before the first round.
        min_sample_ms: a sample repeats the call ``k`` times (``k`` fixed per configuration
            after warm-up) so that it lasts at least this long, and reports the mean call.
    Returns:
        name -> :func:`summarize` of its samples (per call, in ms).
    """
    collected = round_robin_samples(fns, device, samples=samples, warmup=warmup, min_sample_ms=min_sample_ms)
    return {name: summarize(xs) for name, xs in collected.items()}


def paired(config: Sequence[float], base: Sequence[float], op: Callable[[float, float], float]) -> dict[str, float]:
    """:func:`summarize` of ``op(config_r, base_r)`` over the rounds r (samples of the same round)."""
    return summarize([op(a, b) for a, b in zip(config, base)])


def time_ms(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 2,
            repeats: int = 20, **kw) -> dict[str, float]:
    """:func:`time_round_robin` of a single configuration (for a row that has no peers)."""
    return time_round_robin({"fn": fn}, device, samples=repeats, warmup=warmup, **kw)["fn"]


def copy_baseline(num_tasks: int, n: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """The copy baseline of one ideal pass over ``[T, N]`` gradients (T*N read + N written).

    Returns ``(fn, bytes_moved)``: ``fn()`` copies ceil((T+1)*N/2) elements of ``dtype`` from
    random data into an initialised buffer; ``bytes_moved`` counts what it reads and writes.
    """
    numel = -(-(num_tasks + 1) * n // 2)
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.zeros_like(src)
    dst.copy_(src)  # touch every page of dst before any timing
    return (lambda: dst.copy_(src)), 2 * numel * src.element_size()


def copy_baseline_ms(numel: int, dtype: torch.dtype, device: torch.device | str, **kw) -> dict[str, float]:
    """Deprecated shape of :func:`copy_baseline` kept for older scripts: times ``dst.copy_(src)`` of
    ``numel`` elements (random ``src``, initialised ``dst``) with :func:`time_ms`. New tables use
    :func:`copy_baseline` inside their :func:`time_round_robin` call."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = src.clone()
    return time_ms(lambda: dst.copy_(src), device, **kw)


def gbps(bytes_moved: float, ms: float) -> float:
    return bytes_moved / (ms * 1e-3) / 1e9


def copy_ratio(op_bytes: float, op_ms: float, copy_bytes: float, copy_ms: float) -> float:
    """:data:`COPY_RATIO`: the op's effective bandwidth over the copy baseline's."""
    return gbps(op_bytes, op_ms) / gbps(copy_bytes, copy_ms)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    """Device, versions, commit, UTC date and time, load average: stamped on every run."""
    device = torch.device(device)
    if device.type == "cuda":
        dev = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        dev = f"{_cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    info = {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "commit": git_commit("bucketmoo_kernels", "csrc", "python", "benchmarks/*.py"),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load average (1, 5, 15 min) at start": load_average()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    return info


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _run_heading(env: dict[str, str]) -> str:
    return f"## Run {env.get('date', '?')}, commit {env.get('commit', '?')}"


def append_results(name: str, rows: Sequence[dict], env: dict[str, str], *, title: str,
                   notes: str = "", columns: Sequence[str] | None = None, extra_md: str = "",
                   directory: Path = RESULTS_DIR) -> Path:
    """Append this run to ``<directory>/<name>.md`` and ``.json`` (default the committed
    ``results/``); return the .md path.

    The markdown file holds the title once and one section per run (environment, notes,
    table, ``extra_md``), oldest first; the JSON file holds every run's environment, notes
    and rows. Earlier runs stay as they are.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    md_path, json_path = directory / f"{name}.md", directory / f"{name}.json"
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    section = f"{_run_heading(env)}\n\n{header}\n\n{notes.strip()}\n\n{markdown_table(rows, columns)}"
    if extra_md:
        section += "\n" + extra_md.strip() + "\n"
    if md_path.exists():
        text = md_path.read_text().rstrip("\n") + "\n\n" + section
    else:
        text = f"# {title}\n\nOne section per run, oldest first; `{json_path.name}` holds the same rows.\n\n" + section
    md_path.write_text(text)
    data = {"title": title, "runs": []}
    if json_path.exists():
        old = json.loads(json_path.read_text())
        data["runs"] = old["runs"] if "runs" in old else [{"env": old.get("env", {}), "rows": old.get("rows", [])}]
    data["runs"].append({"env": env, "notes": notes.strip(), "rows": list(rows)})
    json_path.write_text(json.dumps(data, indent=1))
    return md_path


class RunRecorder:
    """One run of a table, saved as it grows: the first :meth:`save` appends the run to
    ``<results_dir>/<name>.md`` and ``.json`` (as :func:`append_results` does), every later one
    rewrites that same run with all the rows so far. A benchmark cut off after some cases keeps
    them; earlier runs in the files stay as they are."""

    def __init__(self, name: str, env: dict[str, str], *, title: str, notes: str = "",
                 columns: Sequence[str] | None = None, results_dir: Path | str | None = None):
        self.dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
        self.md_path, self.json_path = self.dir / f"{name}.md", self.dir / f"{name}.json"
        self.env, self.title, self.notes, self.columns = env, title, notes.strip(), columns
        self._md_before = self.md_path.read_text().rstrip("\n") if self.md_path.exists() else None
        runs = []
        if self.json_path.exists():
            old = json.loads(self.json_path.read_text())
            runs = old["runs"] if "runs" in old else [{"env": old.get("env", {}), "rows": old.get("rows", [])}]
        self._runs_before = runs

    def save(self, rows: Sequence[dict], extra_md: str = "") -> Path:
        """Write this run with ``rows`` (all of them so far); return the .md path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        header = "\n".join(f"- {k}: {v}" for k, v in self.env.items())
        section = f"{_run_heading(self.env)}\n\n{header}\n\n{self.notes}\n\n{markdown_table(rows, self.columns)}"
        if extra_md:
            section += "\n" + extra_md.strip() + "\n"
        if self._md_before is not None:
            text = self._md_before + "\n\n" + section
        else:
            text = (f"# {self.title}\n\nOne section per run, oldest first; `{self.json_path.name}` holds the same "
                    "rows.\n\n" + section)
        _write_atomically(self.md_path, text)
        data = {"title": self.title,
                "runs": self._runs_before + [{"env": self.env, "notes": self.notes, "rows": list(rows)}]}
        _write_atomically(self.json_path, json.dumps(data, indent=1))
        return self.md_path


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a process killed meanwhile leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(name: str, rows: Sequence[dict], env: dict[str, str], *, title: str, notes: str = "",
                  columns: Sequence[str] | None = None) -> Path:
    """The former name of :func:`append_results` (kept for scripts written against it): it now
    appends the run instead of overwriting the file."""
    return append_results(name, rows, env, title=title, notes=notes, columns=columns)


# ---- multi-process (gloo) step benchmarks -------------------------------------------------

def step_bench_parser(doc: str, name: str, warmup: int):
    """Command-line options shared by the end-to-end step benchmarks (DDP, FSDP2); read them
    with :func:`parse_step_args`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2], help="process counts (4 optional)")
    parser.add_argument("--width", type=int, default=1152, help="MLP width")
    parser.add_argument("--layers", type=int, default=8, help="MLP depth")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples", type=int, default=20, help="round-robin rounds (timed steps per configuration)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps per configuration before the rounds")
    parser.add_argument("--name", default=name, help="results file name")
    parser.add_argument("--quick", action="store_true",
                        help=f"a check that the benchmark runs: P=2, MLP {QUICK['layers']} x {QUICK['width']}, "
                             f"{QUICK['samples']} rounds (its numbers mean nothing)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, append nothing to results/")
    return parser


#: What ``--quick`` sets (a few seconds per process group).
QUICK = {"worlds": [2], "width": 128, "layers": 2, "batch": 4, "samples": 3}


def parse_step_args(parser, argv: Sequence[str] | None = None):
    """Parse the options of :func:`step_bench_parser`, applying ``--quick``."""
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.warmup = min(args.warmup, 2)
    return args


def init_gloo_worker(rank: int, world: int, port: int) -> None:
    """One thread per process, a gloo process group on localhost."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


class HookClock:
    """Wall time spent inside calls wrapped by :meth:`wrap` (a DDP hook, an FSDP reduce-scatter),
    summed until :meth:`take_ms`."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn: Callable) -> Callable:
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed

    def take_ms(self) -> float:
        ms, self.seconds = self.seconds * 1e3, 0.0
        return ms


def protocol_parts(sizes: Sequence[int], world: int, *, plain: str, all_gather: bool) -> dict[str, Callable[[], None]]:
    """The isolated parts of the sharded tasks-on-ranks protocol on buckets of ``sizes`` elements.

    * ``kernel``: Gram + solve + combine of this rank's ``[T, n/P]`` shard of every bucket
      (``fused_bucket_moo``, mgda, T = P tasks);
    * ``plain collectives``: what the stock reduction sends per bucket, one ``all_reduce``
      (DDP) or one ``reduce_scatter`` (FSDP2) of n elements;
    * ``sharded collectives``: per bucket an all-to-all of n elements, an all-reduce of the
      ``[1, T, T]`` Gram and, when ``all_gather`` (DDP), an all-gather of the n/P shard.
    """
    import torch.distributed as dist

    import bucketmoo_kernels as bm

    if plain not in ("all_reduce", "reduce_scatter"):
        raise ValueError(f"plain must be 'all_reduce' or 'reduce_scatter'; got {plain!r}")
    shards = [-(-n // world) for n in sizes]
    rows = [torch.randn(world, m) for m in shards]  # [T, n/P]: this rank's shard of every task
    outs = [torch.zeros(m) for m in shards]
    buckets = [torch.randn(n if plain == "all_reduce" else world * m) for n, m in zip(sizes, shards)]
    padded = [torch.zeros(world * m) for m in shards]
    received = [torch.zeros(world * m) for m in shards]
    gathered = [torch.zeros(world * m) for m in shards]
    grams = [torch.zeros(1, world, world) for _ in sizes]

    def kernel():
        for r, o in zip(rows, outs):
            bm.fused_bucket_moo(r, method="mgda", out=o, check_finite=False)

    def plain_collectives():
        for b, o in zip(buckets, outs):
            if plain == "all_reduce":
                dist.all_reduce(b)
            else:
                dist.reduce_scatter_tensor(o, b)

    def sharded_collectives():
        for p, r, g, o, gm in zip(padded, received, gathered, outs, grams):
            dist.all_to_all_single(r, p)
            dist.all_reduce(gm)
            if all_gather:
                dist.all_gather_into_tensor(g, o)

    return {"kernel": kernel, "plain collectives": plain_collectives, "sharded collectives": sharded_collectives}


def time_step_rounds(steps: Mapping[str, Callable[[], None]], parts: Mapping[str, Callable[[], None]],
                     clock: HookClock, samples: int) -> dict[str, dict[str, list[float]]]:
    """Every configuration's step and every breakdown part, round-robin between barriers
    (:func:`round_robin_samples`), after one untimed call of each part.

    Returns ``{"steps": ..., "in_hook": ..., "parts": ...}``, each name -> ms per round;
    ``in_hook`` is ``clock``'s time inside the hook during that step.
    """
    import torch.distributed as dist

    in_hook: dict[str, list[float]] = {name: [] for name in steps}

    def timed(name, step):
        def call():
            clock.take_ms()
            step()
            in_hook[name].append(clock.take_ms())
        return call

    fns = {f"step {name}": timed(name, step) for name, step in steps.items()}
    fns.update({f"part {name}": fn for name, fn in parts.items()})
    for fn in parts.values():
        fn()
    got = round_robin_samples(fns, samples=samples, warmup=0, barrier=dist.barrier)
    return {"steps": {name: got[f"step {name}"] for name in steps}, "in_hook": in_hook,
            "parts": {name: got[f"part {name}"] for name in parts}}


def step_rows(world: int, res: dict, configs: Sequence[tuple], baseline: Mapping[str, str], *, vs: str,
              hook: str, per: str) -> list[dict]:
    """One row per configuration ``(name, kind, ...)`` of a step benchmark's results ``res``
    (:func:`time_step_rounds` plus ``res["extra"][name] = (peak bytes, bucket bytes)``):
    median step and IQR, the per-round ratio to ``baseline[kind]`` (column ``x <vs>``) with
    its quartiles, the median time in the hook, the extra memory and its ratio to a bucket."""
    rows = []
    for name, kind, *_ in configs:
        t = summarize(res["steps"][name])
        ratio = paired(res["steps"][name], res["steps"][baseline[kind]], lambda a, b: a / b)
        extra, bucket = res["extra"].get(name, (0, 0))
        rows.append({"P": world, "configuration": name, "step ms": t["median_ms"], "IQR ms": t["iqr_ms"],
                     f"x {vs}": ratio["median_ms"], f"x {vs} p25": ratio["p25_ms"], f"x {vs} p75": ratio["p75_ms"],
                     f"in {hook} ms": statistics.median(res["in_hook"][name]),
                     "extra MB": extra / 2**20, f"extra / {per}": extra / bucket if bucket else 0.0})
    return rows


def overhead_breakdown(world: int, res: dict, config: str, baseline: str, *, hook: str) -> dict:
    """The overhead of ``config`` over ``baseline`` (median per-round difference) split into the
    :func:`protocol_parts`: kernel, extra collectives (sharded - plain, per round) and the
    rest (overhead - kernel - extra collectives: waiting, lost overlap, Python and copies)."""
    parts = {name: summarize(xs) for name, xs in res["parts"].items()}
    overhead = paired(res["steps"][config], res["steps"][baseline], lambda a, b: a - b)
    kernel = parts["kernel"]["median_ms"]
    extra_coll = paired(res["parts"]["sharded collectives"], res["parts"]["plain collectives"], lambda a, b: a - b)
    return {
        "P": world, "buckets": len(res["sizes"]), "bucket elements": "+".join(str(n) for n in res["sizes"]),
        "overhead ms": overhead["median_ms"], "overhead IQR ms": overhead["iqr_ms"],
        "kernel ms": kernel, "kernel IQR ms": parts["kernel"]["iqr_ms"],
        "plain collectives ms": parts["plain collectives"]["median_ms"],
        "sharded collectives ms": parts["sharded collectives"]["median_ms"],
        "extra collectives ms": extra_coll["median_ms"], "extra collectives IQR ms": extra_coll["iqr_ms"],
        "waiting and the rest ms": overhead["median_ms"] - kernel - extra_coll["median_ms"],
        f"in {hook} ms": statistics.median(res["in_hook"][config]),
    }


def run_gloo_workers(worker, world: int, args) -> list[dict]:
    """Spawn ``worker(rank, world, port, outdir, args)`` on ``world`` processes; return the
    rows that rank 0 saved with :func:`finish_worker`."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(worker, args=(world, free_port(), outdir, args), nprocs=world)
        return torch.load(Path(outdir) / "rows.pt", weights_only=True)


def finish_worker(rows: list[dict], rank: int, outdir: str) -> None:
    """Rank 0 saves ``rows`` for :func:`run_gloo_workers`; every rank leaves the group and
    ends its process (``os._exit``: nothing may follow this call)."""
    import torch.distributed as dist

    if rank == 0:
        torch.save(rows, Path(outdir) / "rows.pt")
    dist.barrier()
    gc.collect()  # DDP/FSDP objects (hook state, futures) go now, not at interpreter exit
    dist.destroy_process_group()
    # The rows are on disk: leave without interpreter finalization, where C++ threads or
    # destructors that still reach for Python can std::terminate ("terminate called without
    # an active exception", seen rarely with gloo under load).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
