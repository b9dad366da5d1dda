"""The conflict profiler (``bucketmoo_kernels.profile``) against answers known by construction
and a float64 reference computed here from ``torch.autograd.grad``; the model left untouched;
errors that name the argument; two gloo processes; the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.profile.layout import build_layout, layer_of
from tests import references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- known answers
class Known(torch.nn.Module):
    """``opposite``: task b's gradient is exactly minus task a's; ``aligned``: b's is twice a's;
    ``other``: a's and b's are orthogonal (a touches the first half, b the second)."""

    def __init__(self):
        super().__init__()
        self.opposite = torch.nn.Parameter(torch.zeros(5))
        self.aligned = torch.nn.Parameter(torch.zeros(3))
        self.other = torch.nn.Parameter(torch.zeros(4))


def _fixed_known_losses(model):
    """Every call draws new vectors, but the two tasks of one step use the same ones."""
    gen = torch.Generator().manual_seed(0)
    current = {}

    def loss_a():
        current["u"], current["v"], current["z"] = (torch.randn(5, generator=gen), torch.randn(3, generator=gen),
                                                    torch.randn(4, generator=gen))
        return (model.opposite * current["u"]).sum() + (model.aligned * current["v"]).sum() \
            + (model.other[:2] * current["z"][:2]).sum()

    def loss_b():
        return -(model.opposite * current["u"]).sum() + 2 * (model.aligned * current["v"]).sum() \
            + (model.other[2:] * current["z"][2:]).sum()

    return {"a": loss_a, "b": loss_b}


def test_known_opposite_aligned_orthogonal():
    model = Known()
    report = bm.profile_conflicts(model, _fixed_known_losses(model), steps=3, granularity="param")
    by_name = {r.name: r for r in report.segments}
    assert [r.name for r in report.segments] == ["opposite", "aligned", "other"]
    opp, ali, oth = by_name["opposite"], by_name["aligned"], by_name["other"]
    assert opp.cosine[0][1] == pytest.approx(-1.0, abs=1e-6) and opp.conflict_share == 1.0
    assert opp.pair_conflict_share == 1.0 and ali.pair_conflict_share == 0.0
    assert ali.cosine[0][1] == pytest.approx(1.0, abs=1e-6) and ali.conflict_share == 0.0
    assert oth.cosine[0][1] == pytest.approx(0.0, abs=1e-6) and oth.conflict_share == 0.0
    assert opp.cosine[0][0] == pytest.approx(1.0) and opp.cosine[1][1] == pytest.approx(1.0)
    # MGDA: equal-norm opposite gradients -> (1/2, 1/2); v and 2v -> all weight on the smaller, v
    assert opp.weights == pytest.approx([0.5, 0.5], abs=1e-6)
    assert ali.weights == pytest.approx([1.0, 0.0], abs=1e-6)
    # norms: b's aligned gradient is twice a's, opposite ones are equal
    assert ali.norms[1] == pytest.approx(2 * ali.norms[0], rel=1e-6)
    assert opp.norms[0] == pytest.approx(opp.norms[1], rel=1e-6)
    s = report.summary()
    assert s["overall"]["elements_in_conflict"] == pytest.approx(5 / 12)
    assert s["overall"]["segments_in_conflict"] == pytest.approx(1 / 3)
    assert 0 < s["overall"]["mass_in_conflict"] < 1
    assert s["overall"]["min_segment_cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert len(s["reading"]) >= 3 and all(isinstance(x, str) for x in s["reading"])


# --------------------------------------------------------------------------- float64 reference
class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 12)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(12, 12) for _ in range(2)])
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = torch.tanh(b(h))
        return self.head(h)


TASKS = ("a", "b", "c")


def _batch(task: int, step: int):
    gen = torch.Generator().manual_seed(1000 * task + step)
    x = torch.randn(16, 6, generator=gen) + task  # the tasks see shifted inputs
    y = torch.randint(0, 3, (16,), generator=gen)
    return x, y


def _task_losses(model, tasks=TASKS, index=None):
    """Callables drawing the deterministic batch (task, call count)."""
    counts = {t: 0 for t in tasks}
    index = index or {t: i for i, t in enumerate(TASKS)}

    def make(t):
        def loss():
            x, y = _batch(index[t], counts[t])
            counts[t] += 1
            return torch.nn.functional.cross_entropy(model(x), y)
        return loss

    return {t: make(t) for t in tasks}


def _ddp_buckets(params, cap_bytes):
    """DDP's rule for one dtype: reverse parameter order, close a bucket once it holds cap bytes."""
    buckets, current, size = [], [], 0
    for i in reversed(range(len(params))):
        current.append(i)
        size += params[i].numel() * params[i].element_size()
        if size >= cap_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def _reference(model, steps, granularity, cap_mb):
    """Per-segment mean cosine, conflict share, norms, mass and MGDA weights, in float64."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    if granularity == "param":
        groups = [[i] for i in range(len(params))]
    elif granularity == "global":
        groups = [list(range(len(params)))]
    else:
        groups = _ddp_buckets(params, cap_mb * 1024 * 1024)
    chunk = int(granularity.split(":")[1]) if granularity.startswith("chunk:") else None
    stats = None
    for step in range(steps):
        rows = []
        for t in range(len(TASKS)):
            x, y = _batch(t, step)
            grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), params)
            rows.append([g.detach().double().reshape(-1) for g in grads])
        segs = []
        for group in groups:
            flat = torch.stack([torch.cat([rows[t][i] for i in group]) for t in range(len(TASKS))])
            if chunk:
                segs += [flat[:, a:a + chunk] for a in range(0, flat.shape[1], chunk)]
            else:
                segs.append(flat)
        total = sum(float((g * g).sum()) for g in segs)
        global_weights = references.mgda_weights(torch.cat(segs, dim=1))
        out = []
        for g in segs:
            m = g @ g.T
            norm = m.diagonal().sqrt()
            cos = m / (norm[:, None] * norm[None, :])
            negative = (cos[torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)] < 0).double()
            conflict = float(negative.max())
            mass = float(m.trace()) / total
            out.append(dict(cos=cos, conflict=conflict, pairs=float(negative.mean()), norms=norm, mass=mass,
                            cmass=mass * conflict,
                            dist=0.5 * float((references.mgda_weights(g) - global_weights).abs().sum()),
                            weights=references.mgda_weights(g), numel=g.shape[1]))
        if stats is None:
            stats = out
        else:
            for acc, new in zip(stats, out):
                for key in ("cos", "conflict", "pairs", "norms", "mass", "cmass", "weights", "dist"):
                    acc[key] = acc[key] + new[key]
    for acc in stats:
        for key in ("cos", "conflict", "pairs", "norms", "mass", "cmass", "weights", "dist"):
            acc[key] = acc[key] / steps
    return stats, names


@pytest.mark.parametrize("granularity", ["param", "bucket", "chunk:50", "global"])
def test_against_float64_reference(granularity):
    torch.manual_seed(0)
    model = MLP()
    cap_mb = 400 / (1024 * 1024)  # 400 bytes: three buckets of this 435-parameter model
    steps = 3
    report = bm.profile_conflicts(model, _task_losses(model), steps=steps, granularity=granularity,
                                  bucket_cap_mb=cap_mb, backend="torch")
    ref, _ = _reference(model, steps, granularity, cap_mb)
    assert len(report.segments) == len(ref), [r.name for r in report.segments]
    for rec, exp in zip(report.segments, ref):
        assert rec.numel == exp["numel"]
        torch.testing.assert_close(torch.tensor(rec.cosine, dtype=torch.float64), exp["cos"], atol=2e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(rec.norms, dtype=torch.float64), exp["norms"], atol=0, rtol=2e-6)
        assert rec.mass_share == pytest.approx(exp["mass"], rel=1e-5, abs=1e-9)
        torch.testing.assert_close(torch.tensor(rec.weights, dtype=torch.float64), exp["weights"], atol=1e-4, rtol=0)
        assert rec.weight_distance == pytest.approx(exp["dist"], abs=2e-4)
        # conflict flags: exact where no cosine sits at the fp32 rounding level of zero
        if bool((exp["cos"].abs() > 1e-4).all()):
            assert rec.conflict_share == pytest.approx(exp["conflict"])
            assert rec.pair_conflict_share == pytest.approx(exp["pairs"])
            assert rec.conflict_mass_share == pytest.approx(exp["cmass"], rel=1e-5, abs=1e-9)
    glob, _ = _reference(model, steps, "global", cap_mb)
    torch.testing.assert_close(torch.tensor(report.global_segment.cosine, dtype=torch.float64), glob[0]["cos"],
                               atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(report.global_segment.weights, dtype=torch.float64),
                               glob[0]["weights"], atol=1e-4, rtol=0)
    with torch.no_grad():
        losses = [sum(float(torch.nn.functional.cross_entropy(model(_batch(t, s)[0]), _batch(t, s)[1]))
                      for s in range(steps)) / steps for t in range(3)]
    assert report.losses == pytest.approx(losses, rel=1e-6)


def test_granularities_agree_on_the_whole_model():
    """The sum of the segment Grams is the global Gram whatever the granularity: the global
    record is the same for param, bucket and chunk."""
    torch.manual_seed(0)
    model = MLP()
    reports = {g: bm.profile_conflicts(model, _task_losses(model), steps=2, granularity=g,
                                       bucket_cap_mb=700 / 2**20) for g in ("param", "bucket", "chunk:64", "global")}
    base = reports["global"].global_segment
    for g, rep in reports.items():
        torch.testing.assert_close(torch.tensor(rep.global_segment.cosine), torch.tensor(base.cosine), atol=1e-6,
                                   rtol=0, msg=g)
        assert rep.numel == sum(p.numel() for p in model.parameters())
        assert sum(r.mass_share for r in rep.segments) == pytest.approx(1.0, rel=1e-6)


# --------------------------------------------------------------------------- layouts
def test_layout_bucket_chunk_and_layers():
    torch.manual_seed(0)
    model = MLP()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    cap = 700 / 2**20
    buckets = _ddp_buckets(params, 700)
    lay = build_layout(names, params, "bucket", cap)
    assert len(buckets) == 2 and len(build_layout(names, params, "bucket", 400 / 2**20).params) == 3
    assert [list(p) for p in lay.params] == [[names[i] for i in b] for b in buckets]
    assert lay.segments.length_list == [sum(params[i].numel() for i in b) for b in buckets]
    chunks = build_layout(names, params, "chunk:50", cap)
    expected = []
    for length in lay.segments.length_list:  # chunks never cross a bucket boundary
        expected += [min(50, length - a) for a in range(0, length, 50)]
    assert chunks.segments.length_list == expected
    for seg_layers, length in zip(chunks.layer_numel, expected):
        assert sum(seg_layers.values()) == length
    assert layer_of("blocks.0.qkv.weight") == "blocks.0"
    assert layer_of("transformer.h.11.mlp.c_fc.bias") == "transformer.h.11"
    assert layer_of("tok.weight") == "tok" and layer_of("pos") == "pos"


# --------------------------------------------------------------------------- model untouched
class WithNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.out = torch.nn.Linear(6, 2)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.out(self.bn(self.lin(x))))


def test_model_parameters_grads_and_buffers_untouched():
    torch.manual_seed(0)
    model = WithNorm().train()
    model.lin.weight.grad = torch.randn_like(model.lin.weight)
    model.out.bias.grad = torch.randn_like(model.out.bias)  # lin.bias, bn.*, out.weight keep grad None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    gen = torch.Generator().manual_seed(0)
    losses = {t: (lambda t=t: model(torch.randn(8, 4, generator=gen) + t).pow(2).mean()) for t in range(2)}
    losses = {str(k): v for k, v in losses.items()}
    report = bm.profile_conflicts(model, losses, steps=2, granularity="bucket")
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        if grads[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert all("frozen" not in p for r in report.segments for p in r.params)


# --------------------------------------------------------------------------- bad input
def _two(model):
    return {"a": lambda: model(torch.ones(2, 6)).sum(), "b": lambda: model(torch.ones(2, 6)).mean()}


@pytest.mark.parametrize("case, error, match", [
    ("no tasks", ValueError, "task_losses is empty"),
    ("one task", ValueError, "at least 2 tasks"),
    ("not a mapping", TypeError, "task_losses must be a mapping"),
    ("not callable", TypeError, r"task_losses\['b'\] must be a zero-argument callable"),
    ("not a tensor", TypeError, r"task_losses\['b'\]\(\) must return a scalar torch.Tensor"),
    ("not a scalar", ValueError, r"task_losses\['b'\]\(\) must return a scalar loss.*shape \(2, 3\)"),
    ("no graph", ValueError, "does not require grad"),
    ("not finite", ValueError, "non-finite loss"),
    ("no gradient", ValueError, r"parameter 'head.bias' gets no gradient from task_losses\['b'\]"),
    ("bad granularity", ValueError, "granularity must be"),
    ("bad chunk", ValueError, "granularity must be"),
    ("bad steps", ValueError, "steps must be a positive int"),
    ("bad cap", ValueError, "bucket_cap_mb must be a positive number"),
    ("element-wise method", ValueError, "element-wise"),
    ("unknown method", ValueError, "unknown method"),
    ("not a module", TypeError, "model must be a torch.nn.Module"),
    ("no distributed", ValueError, "distributed=True needs"),
])
def test_bad_input(case, error, match):
    torch.manual_seed(0)
    model = MLP()
    losses, kw = _two(model), {}
    if case == "no tasks":
        losses = {}
    elif case == "one task":
        losses = {"a": losses["a"]}
    elif case == "not a mapping":
        losses = [losses["a"], losses["b"]]
    elif case == "not callable":
        losses["b"] = 3.0
    elif case == "not a tensor":
        losses["b"] = lambda: 1.0
    elif case == "not a scalar":
        losses["b"] = lambda: model(torch.ones(2, 6))
    elif case == "no graph":
        losses["b"] = lambda: model(torch.ones(2, 6)).sum().detach()
    elif case == "not finite":
        losses["b"] = lambda: model(torch.ones(2, 6)).sum() * float("nan")
    elif case == "no gradient":
        losses["b"] = lambda: (model.head.weight.sum() + sum(p.sum() for n, p in model.named_parameters()
                                                             if not n.startswith("head")))
    elif case == "bad granularity":
        kw["granularity"] = "layer"
    elif case == "bad chunk":
        kw["granularity"] = "chunk:0"
    elif case == "bad steps":
        kw["steps"] = 0
    elif case == "bad cap":
        kw = dict(granularity="bucket", bucket_cap_mb=-1.0)
    elif case == "element-wise method":
        kw["method"] = "graddrop"
    elif case == "unknown method":
        kw["method"] = "nope"
    elif case == "no distributed":
        kw["distributed"] = True
    target = 3 if case == "not a module" else model
    with pytest.raises(error, match=match):
        bm.profile_conflicts(target, losses, **kw)


def test_methods_and_report_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    for method, options in (("pcgrad", {"seed": 1}), ("mean", None), ("gradvac", None)):
        rep = bm.profile_conflicts(model, _task_losses(model), steps=2, method=method, method_options=options)
        assert rep.method == method
        for r in rep.segments:
            assert sum(r.weights) == pytest.approx(1.0, abs=1e-5)
        if method == "mean":
            assert all(r.weights == pytest.approx([1 / 3] * 3) for r in rep.segments)
            assert rep.summary()["weights"]["distance_mean"] == pytest.approx(0.0, abs=1e-7)
    data = json.loads(json.dumps(rep.to_dict()))
    again = bm.ConflictReport.from_dict(data)
    assert again.to_dict() == data
    text = rep.to_markdown(str(tmp_path / "r.md"), figures=["by_layer.png"])
    assert (tmp_path / "r.md").read_text() == text
    for layer in ("inp", "blocks.0", "blocks.1", "head"):
        assert f"| {layer} |" in text
    assert "![by_layer.png](by_layer.png)" in text


@pytest.mark.slow  # matplotlib: seconds to import and draw
def test_plot_writes_png_and_needs_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = MLP()
    rep = bm.profile_conflicts(model, _task_losses(model), steps=1)
    for by in ("layer", "segment"):
        path = rep.plot(str(tmp_path / f"{by}.png"), by=by)
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="by must be"):
        rep.plot(str(tmp_path / "x.png"), by="bucket")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="needs matplotlib: pip install matplotlib"):
        rep.plot(str(tmp_path / "y.png"))


# --------------------------------------------------------------------------- process group
def _dist_worker(rank, world):
    torch.manual_seed(0)
    model = MLP()
    out = {}
    # one task per rank (the sharded protocol itself), and two tasks per rank
    mine = {0: ("a",), 1: ("b",)}[rank]
    out["one"] = bm.profile_conflicts(model, _task_losses(model, mine), steps=2, granularity="bucket",
                                      bucket_cap_mb=700 / 2**20).to_dict()
    four = {t: i for i, t in enumerate(("a", "b", "c", "d"))}
    mine = {0: ("a", "b"), 1: ("c", "d")}[rank]
    out["two"] = bm.profile_conflicts(model, _task_losses(model, mine, four), steps=2, granularity="chunk:40",
                                      bucket_cap_mb=700 / 2**20).to_dict()
    try:
        bm.profile_conflicts(model, _task_losses(model, ("a",) if rank == 0 else ("b",)), steps=1 + rank)
    except ValueError as exc:
        out["mismatch"] = str(exc)
    return out


@pytest.mark.distributed
def test_process_group_matches_single_process():
    from tests.ddp.ddp_helpers import run_distributed

    results = run_distributed(_dist_worker, 2)
    assert results[0] == results[1]  # every rank returns the same report
    torch.manual_seed(0)
    model = MLP()
    four = {t: i for i, t in enumerate(("a", "b", "c", "d"))}
    cases = {"one": (("a", "b"), None, "bucket"), "two": (("a", "b", "c", "d"), four, "chunk:40")}
    for case, (tasks, index, granularity) in cases.items():
        local = bm.profile_conflicts(model, _task_losses(model, tasks, index), steps=2, granularity=granularity,
                                     bucket_cap_mb=700 / 2**20).to_dict()
        got = results[0][case]
        assert got["tasks"] == list(tasks) and got["world_size"] == 2
        assert len(got["segments"]) == len(local["segments"])
        for a, b in zip(got["segments"], local["segments"]):
            assert a["name"] == b["name"] and a["numel"] == b["numel"]
            torch.testing.assert_close(torch.tensor(a["cosine"]), torch.tensor(b["cosine"]), atol=1e-6, rtol=0)
            torch.testing.assert_close(torch.tensor(a["weights"]), torch.tensor(b["weights"]), atol=1e-5, rtol=0)
            assert a["conflict_share"] == b["conflict_share"]
        assert got["losses"] == pytest.approx(local["losses"], rel=1e-6)
    assert "different settings" in results[0]["mismatch"] and "different settings" in results[1]["mismatch"]


# --------------------------------------------------------------------------- command line
SMALL = ["--context", "16", "--d-model", "16", "--layers", "1", "--heads", "2", "--batch", "2",
         "--languages", "de", "fr", "--no-progress"]


def test_cli_quick(tmp_path, capsys):
    pytest.importorskip("babel")
    from bucketmoo_kernels.profile.__main__ import main

    out = tmp_path / "prof"
    assert main(["--quick", *SMALL, "--granularity", "param", "chunk:256", "--no-plots", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== param:" in printed and "== chunk:256:" in printed
    for folder in ("param", "chunk-256"):
        data = json.loads((out / folder / "report.json").read_text())
        rep = bm.ConflictReport.from_dict(data)
        assert rep.tasks == ["de", "fr"] and rep.steps == 2
        assert rep.meta["command"].startswith("python -m bucketmoo_kernels.profile --quick")
        md = (out / folder / "report.md").read_text()
        assert "| blocks.0 |" in md and "## Reading" in md
        assert not (out / folder / "by_layer.png").exists()  # --no-plots


def test_cli_help(capsys):
    from bucketmoo_kernels.profile.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "--granularity" in printed and "--hf-config" in printed and "--quick" in printed


@pytest.mark.slow
def test_cli_hf_config_quick(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("babel")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 256, "n_positions": 16, "n_embd": 16,
                               "n_layer": 2, "n_head": 2}))
    out = tmp_path / "hf"  # a subprocess, as a user runs it; with the plots
    proc = subprocess.run([sys.executable, "-m", "bucketmoo_kernels.profile", "--quick", *SMALL, "--hf-config",
                           str(cfg), "--granularity", "bucket", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = bm.ConflictReport.from_dict(json.loads((out / "bucket" / "report.json").read_text()))
    assert "transformer.h.1" in rep.layers and "GPT2LMHeadModel" in rep.meta["model"]
    assert (out / "bucket" / "by_layer.png").exists() and (out / "bucket" / "by_segment.png").exists()
    from bucketmoo_kernels.profile.__main__ import main  # the built-in tiny GPT-2, in this process

    assert main(["--quick", *SMALL, "--hf-config", "tiny-gpt2", "--granularity", "global", "--no-plots",
                 "--out", str(tmp_path / "tiny")]) == 0
    rep = bm.ConflictReport.from_dict(json.loads((tmp_path / "tiny" / "global" / "report.json").read_text()))
    assert len(rep.segments) == 1 and "transformer.h.0" in rep.layers
