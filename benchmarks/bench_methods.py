"""Weight-step benchmark of every Gram method: ``bm.solve`` on ``[S, T, T]`` Grams (batched over
segments, float64 inside) against torchjd 0.18's implementation of the same method applied to
each segment in a Python loop (torchjd has no batch dimension).

T in {2, 4, 8, 16}, S in {1, 1000}, ours and torchjd's timed round-robin in one run. Ours runs on each backend of ``--backends``
(default ``torch cpu``: the batched torch function and the native CPU weight step; a method
without a native solver for that T runs its torch function on ``cpu`` too, so only the
methods with ``native_code`` get a ``cpu`` row). torchjd at S = 1000 is timed on ``--jd-sample``
segments and scaled to S (its per-segment cost does not depend on the other segments); the
table says so in the ``torchjd_note`` column. Usage::

    PYTHONPATH=. python benchmarks/bench_methods.py [--tasks 2 4 8 16] [--segments 1 1000] \
        [--backends torch cpu]
"""

from __future__ import annotations

import argparse
import warnings

import torch

import bucketmoo_kernels as bm
from benchmarks.harness import append_results, environment, time_round_robin

METHODS = {  # name: (our options, torchjd factory(T) -> callable on (gram, jac))
    "upgrad": ({}, lambda t, A: _gramian(A.UPGradWeighting())),
    "dualproj": ({}, lambda t, A: _gramian(A.DualProjWeighting())),
    "imtl_g": ({}, lambda t, A: _gramian(A.IMTLGWeighting())),
    "aligned_mtl": ({}, lambda t, A: _gramian(A.AlignedMTLWeighting())),
    # one torchjd NashMTL per segment, as one per bucket would be (it warm-starts from its
    # previous call, so sharing one across unrelated segments slows it down badly)
    "nash_mtl": ({}, lambda t, A: (lambda gram, jac: A.NashMTL(n_tasks=t).weighting(jac))),
    "fairgrad": ({"alpha": 1.0}, lambda t, A: _gramian(A.FairGradWeighting(alpha=1.0))),
    "config": ({}, lambda t, A: _matrix(A.ConFIG())),
    "krum": ({"n_byzantine": 0}, lambda t, A: _gramian(A.KrumWeighting(n_byzantine=0))),
    "sum": ({}, lambda t, A: _matrix(A.SumWeighting())),
    "random": ({}, lambda t, A: _matrix(A.RandomWeighting())),
    "cagrad": ({"rescale": 0}, lambda t, A: _gramian(A.CAGradWeighting(c=0.4))),
    "mgda": ({}, lambda t, A: _gramian(A.MGDAWeighting())),
    "pcgrad": ({}, lambda t, A: _gramian(A.PCGradWeighting())),
    "gradvac": ({}, lambda t, A: _gramian(A.GradVacWeighting())),
    "pcd": ({}, lambda t, A: _gramian(A.PCDWeighting())),
}


def _gramian(weighting):
    return lambda gram, jac: weighting(gram)


def _matrix(fn):
    return lambda gram, jac: fn(jac)


def _grams(num_seg: int, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(num_tasks)
    jac = torch.randn(num_seg, num_tasks, 64, generator=gen, dtype=torch.float64)
    jac[:, 1:] -= 0.5 * jac[:, :1]
    return jac @ jac.transpose(1, 2), jac


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 1000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--backends", nargs="+", default=["torch", "cpu"])
    parser.add_argument("--jd-sample", type=int, default=5)
    parser.add_argument("--samples", type=int, default=7, help="round-robin samples per configuration")
    parser.add_argument("--name", default="methods_weight_step")
    args = parser.parse_args()
    from torchjd import aggregation as A

    rows = []
    for name in args.methods:
        options, make_jd = METHODS[name]
        for num_tasks in args.tasks:
            if name == "krum" and num_tasks < 3:
                continue
            for num_seg in args.segments:
                grams, jacs = _grams(num_seg, num_tasks)
                gram32 = grams.float()
                step = bm.WeightStep(name, options, normalize_weights=False)
                calls = {}
                for backend in args.backends:
                    if backend != "torch" and step.native_codes(num_tasks) is None:
                        continue  # no native weight step here: the same torch function runs
                    state = bm.MethodState() if name in ("gradvac", "pcd") else None
                    calls[backend] = (lambda b=backend, st=state:
                                      bm.solve(gram32, backend=b, weight_step=step, method_state=st))
                sample = min(num_seg, args.jd_sample)
                jd = make_jd(num_tasks, A)
                sub_g, sub_j = grams[:sample], jacs[:sample]

                def run_jd():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        for s in range(sample):
                            jd(sub_g[s], sub_j[s])
                note = "" if sample == num_seg else f"{sample} segments timed, x{num_seg // sample}"
                try:
                    run_jd()
                    calls["torchjd"] = run_jd
                except Exception as exc:  # noqa: BLE001  (a torchjd solver failure is reported)
                    note = f"torchjd failed: {type(exc).__name__}"
                # ours and torchjd's round-robin in the same run (one call of each per round)
                times = time_round_robin(calls, "cpu", samples=args.samples, warmup=1)
                theirs = (times["torchjd"]["median_ms"] * num_seg / sample if "torchjd" in times
                          else float("nan"))
                for backend, timing in times.items():
                    if backend == "torchjd":
                        continue
                    rows.append({"method": name, "backend": backend, "T": num_tasks, "S": num_seg,
                                 "ours_ms": timing["median_ms"], "ours_iqr_ms": timing["iqr_ms"],
                                 "torchjd_ms": theirs, "speedup": theirs / timing["median_ms"],
                                 "torchjd_note": note})
                    print(rows[-1], flush=True)
    append_results(args.name, rows, environment("cpu"), title="Weight step per method: bucketmoo vs torchjd",
                  notes=("`ours_ms`: `bm.solve(gram [S,T,T] f32, method, normalize_weights=False)` on the "
                         "row's backend: `torch` runs the method's batched float64 torch function, `cpu` the "
                         "native weight step (rows only where the method has one for this T: mgda, pcgrad, "
                         "cagrad T<=8, upgrad/dualproj T<=16); stateful methods with a MethodState. `torchjd_ms`: torchjd "
                         "0.18's weighting of the same method on each segment's float64 Gram (or its matrix "
                         "for the matrix-based ones), a Python loop over segments. Ours and torchjd's timed "
                         "round-robin in the same run (`harness.time_round_robin`, " + str(args.samples) + " samples "
                         "after 1 warm-up; median, and IQR of ours); torchjd at S = 1000 runs 5 segments per "
                         "sample, scaled to S (one torchjd NashMTL per segment). Read the load average above: "
                         "the machine is a shared 2-core one."))


if __name__ == "__main__":
    main()
