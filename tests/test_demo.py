"""Tests of the multilingual demo: data, model, run parsing, a tiny end-to-end run, the report."""

import json
import math

import pytest
import torch

pytest.importorskip("babel")

from bucketmoo_kernels.demo import report  # noqa: E402
from bucketmoo_kernels.demo.__main__ import build_parser, main, settings_from_args  # noqa: E402
from bucketmoo_kernels.demo.data import (heldout_windows, load_cldr_strings, load_languages,  # noqa: E402
                                         sample_batch, static_weights)
from bucketmoo_kernels.demo.model import ByteLM, ModelConfig  # noqa: E402
from bucketmoo_kernels.demo.run import run_demo  # noqa: E402
from bucketmoo_kernels.demo.train import (DemoSettings, _load_hook, bucket_lengths, hook_settings,  # noqa: E402
                                          lr_at, parse_run)
from bucketmoo_kernels.methods import available_methods  # noqa: E402

# ----------------------------------------------------------------------------------- data


def test_cldr_strings_are_localized_text():
    de, sw = load_cldr_strings("de"), load_cldr_strings("sw")
    assert len(de) > 1000 and len(sw) > 1000
    assert len(set(de)) == len(de)
    assert all(any(c.isalpha() for c in s) for s in de)
    assert "Deutsch" in de  # the language's own name
    with pytest.raises(ValueError, match="unknown CLDR locale"):
        load_cldr_strings("xx_not_a_locale")


def test_split_is_by_string_and_reproducible():
    langs = load_languages(["ru"], heldout_share=0.2, seed=3)
    again = load_languages(["ru"], heldout_share=0.2, seed=3)
    ru = langs["ru"]
    assert torch.equal(ru.train, again["ru"].train) and torch.equal(ru.heldout, again["ru"].heldout)
    train_lines = set(bytes(ru.train.tolist()).decode("utf-8").split("\n"))
    held_lines = [s for s in bytes(ru.heldout.tolist()).decode("utf-8").split("\n") if s]
    assert held_lines and not train_lines.intersection(held_lines)
    assert len(held_lines) + len(train_lines - {""}) == ru.num_strings
    assert abs(len(held_lines) / ru.num_strings - 0.2) < 0.01
    other = load_languages(["ru"], heldout_share=0.2, seed=4)["ru"]
    assert not torch.equal(other.heldout, ru.heldout)
    with pytest.raises(ValueError, match="heldout_share"):
        load_languages(["ru"], heldout_share=1.0)


def test_sample_batch_targets_are_shifted_inputs():
    data = torch.arange(200, dtype=torch.uint8)
    x, y = sample_batch(data, 5, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    x2, _ = sample_batch(data, 5, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    hx, hy = heldout_windows(data, 16, max_windows=100)
    assert hx.shape == (199 // 16, 16) and torch.equal(hx.flatten()[1:], hy.flatten()[:-1])
    with pytest.raises(ValueError, match="context"):
        sample_batch(data[:10], 1, 16, torch.Generator())


@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0])
def test_static_weights_follow_temperature_formula(tau):
    sizes = [100, 400, 900]
    w = static_weights(sizes, tau)
    expected = [s ** (1 / tau) for s in sizes]
    expected = [e / sum(expected) for e in expected]
    assert w == pytest.approx(expected) and sum(w) == pytest.approx(1.0)
    assert static_weights(sizes, 1e9) == pytest.approx([1 / 3] * 3, abs=1e-6)
    with pytest.raises(ValueError, match="tau"):
        static_weights(sizes, 0)


def test_lr_schedule_warms_up_linearly_then_decays_to_a_tenth():
    lrs = [lr_at(s, warmup=4, steps=20, peak=2.0) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # cosine from the peak (step = warmup) towards 10% of it (reached at step = steps)
    expected = [2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - 4) / 16))) for s in range(4, 20)]
    assert lrs[4:] == pytest.approx(expected) and lrs[4] == pytest.approx(2.0)
    assert lr_at(20, warmup=4, steps=20, peak=2.0) == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


# ---------------------------------------------------------------------------------- model


def test_model_forward_is_causal_and_starts_near_uniform():
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(context=12, d_model=32, n_layer=2, n_head=4))
    x = torch.randint(0, 256, (3, 12))
    logits = model(x)
    assert logits.shape == (3, 12, 256) and logits.dtype == torch.float32
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 256
    assert torch.allclose(model(x2)[:, :7], logits[:, :7], atol=1e-6)
    assert not torch.allclose(model(x2)[:, 7:], logits[:, 7:])
    y = torch.randint(0, 256, (3, 12))
    assert abs(model.loss(x, y).item() - math.log(256)) < 0.1
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=30, n_head=4)


def test_bucket_lengths_cover_parameters_in_reverse_order():
    model = ByteLM(ModelConfig(context=8, d_model=32, n_layer=2, n_head=2))
    params = list(model.parameters())
    cap = 16 * 1024
    lengths = bucket_lengths(params, cap)
    assert sum(lengths) == sum(p.numel() for p in params)
    # every bucket is a run of whole parameters (reverse order) within the cap, or one big parameter
    sizes = [p.numel() for p in reversed(params)]
    i = 0
    for n in lengths:
        j, total = i, 0
        while total < n:
            total += sizes[j]
            j += 1
        # DDP's rule: a bucket closes as soon as it reaches the cap (the last one may be short)
        assert total == n and (4 * (n - sizes[j - 1]) < cap) and (4 * n >= cap or j == len(sizes))
        i = j
    assert len(bucket_lengths(params, 1 << 40)) == 1


# ------------------------------------------------------------------------------- settings


def test_parse_run():
    assert parse_run("mean").method is None and parse_run("mean").tau is None
    assert parse_run("static", 2.0).tau == 2.0 and parse_run("static", 2.0).name == "static-t2"
    assert parse_run("static-t5").tau == 5.0
    spec = parse_run("mgda")
    assert (spec.method, spec.granularity) == ("mgda", "bucket")
    assert parse_run("mgda-global").granularity == "global"
    assert parse_run("cagrad-chunk:4096").granularity == "chunk:4096"
    for bad in ("mgda-everything", "static-tx", "static-t0", "-global"):
        with pytest.raises(ValueError, match="run"):
            parse_run(bad)


def test_cli_settings_and_errors():
    args = build_parser().parse_args(["--quick", "--languages", "de", "sw", "--unseen",
                                      "--method-option", "cagrad:c=0.4",
                                      "--hook-option", "protocol=allgather"])
    s = settings_from_args(args)
    assert s.steps == 30 and s.languages == ("de", "sw") and s.unseen == ()
    assert s.options_for("cagrad") == {"c": 0.4} and dict(s.hook_options) == {"protocol": "allgather"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--method-option", "c=0.4"])
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert main(["--languages", "de"]) == 2  # one language: a clear error, not a crash
    with pytest.raises(ValueError, match="distinct"):
        DemoSettings(languages=("de", "fr"), unseen=("de",))
    with pytest.raises(ValueError, match="clip"):
        DemoSettings(clip=-1.0)


@pytest.mark.parametrize("method", available_methods())
def test_every_registered_method_is_a_run(method):
    """Every method is accepted by --runs, its settings build (no process group) and its weight
    step runs once at construction; element-wise methods get the all-gather protocol, noted."""
    from bucketmoo_kernels.ddp import BucketMOOState

    extra = ["--method-option", "constant:weights=1,2,1,1"] if method == "constant" else []  # no default
    s = settings_from_args(build_parser().parse_args(["--runs", method, f"{method}-param"] + extra))
    for spec in s.specs():
        if spec.name == "mean":  # plain DDP (the hook's 'mean' would run the same all-reduce)
            assert not spec.uses_hook
            continue
        kwargs, notes = hook_settings(spec, s)
        state = BucketMOOState(**kwargs)
        assert (state.method, state.granularity) == (method, spec.granularity)
        if method in ("graddrop", "trimmed_mean"):
            assert state.protocol == "allgather" and "protocol='allgather'" in notes[0]
        else:
            assert state.protocol == "sharded" and not any("protocol" in n for n in notes)
        assert any("MethodState" in n for n in notes) == (method in ("gradvac", "pcd"))
    if method in ("graddrop", "trimmed_mean"):
        with pytest.raises(ValueError, match=f"run '{method}-global'.*granularity='global'"):
            settings_from_args(build_parser().parse_args(["--runs", f"{method}-global"]))
        with pytest.raises(ValueError, match="protocol='sharded'"):
            settings_from_args(build_parser().parse_args(["--runs", method, "--hook-option", "protocol=sharded"]))


@pytest.mark.parametrize("value, expected", [
    ("[1,2,1,1]", [1, 2, 1, 1]), ("1,2,1,1", [1, 2, 1, 1]), ("(0.5, 1.5, 1, 1)", [0.5, 1.5, 1, 1]),
    ("[0.1, 0.2, 0.3, 0.4]", [0.1, 0.2, 0.3, 0.4]), ("0.4", 0.4), ("3", 3), ("None", None), ("true", True),
    ("pgd", "pgd"), ("'pgd'", "pgd"),
])
def test_method_option_values(value, expected):
    args = build_parser().parse_args(["--method-option", f"constant:weights={value}"])
    assert args.method_option == [("constant", "weights", expected)]


def test_list_options_reach_the_state_and_are_checked_at_construction():
    from bucketmoo_kernels.ddp import BucketMOOState

    s = settings_from_args(build_parser().parse_args([
        "--runs", "constant", "upgrad", "--method-option", "constant:weights=[1,2,1,1]",
        "--method-option", "upgrad:pref_vector=0.4,0.2,0.2,0.2", "--method-option", "mgda:solver=pgd"]))
    kwargs = {spec.method: hook_settings(spec, s)[0] for spec in s.specs()}
    assert kwargs["constant"]["weights"] == [1, 2, 1, 1]
    assert BucketMOOState(**kwargs["upgrad"]).method_options == {"pref_vector": [0.4, 0.2, 0.2, 0.2]}
    assert s.options_for("mgda") == {"solver": "pgd"}
    with pytest.raises(SystemExit):  # bad syntax: argparse names the option
        build_parser().parse_args(["--method-option", "constant:weights=[1,2"])
    with pytest.raises(ValueError, match="run 'constant'.*weights must have 4 values"):  # 4 languages
        settings_from_args(build_parser().parse_args(["--runs", "constant",
                                                      "--method-option", "constant:weights=1,2"]))
    with pytest.raises(ValueError, match="unknown method 'cagard'"):
        settings_from_args(build_parser().parse_args(["--method-option", "cagard:c=0.4"]))
    with pytest.raises(TypeError, match="unknown option"):
        settings_from_args(build_parser().parse_args(["--method-option", "cagrad:cc=0.4"]))


def test_bad_option_syntax_names_the_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--method-option", "upgrad:pref_vector=[0.4,,0.6]"])
    assert "--method-option upgrad:pref_vector: cannot read the value" in capsys.readouterr().err


def test_missing_hook_is_a_clear_error():
    with pytest.raises(RuntimeError, match="--runs mean static"):
        _load_hook("bucketmoo_kernels_no_such_module")


# ------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_results():
    """One spawn of 2 gloo ranks running every compared configuration for 3 steps."""
    settings = DemoSettings(
        languages=("de", "sw"), unseen=("es",),
        runs=("mean", "static", "mgda", "mgda-global", "pcgrad", "cagrad"),
        steps=3, batch=2, model=ModelConfig(context=16, d_model=32, n_layer=1, n_head=2),
        warmup=1, eval_every=2, eval_windows=2, bucket_cap_mb=0.01, threads=1, progress=False)
    return run_demo(settings)


@pytest.mark.distributed
def test_every_configuration_runs_from_the_same_start(tiny_results):
    runs = {r["name"]: r for r in tiny_results["runs"]}
    assert list(runs) == ["mean", "static-t1", "mgda", "mgda-global", "pcgrad", "cagrad"]
    assert all(r["status"] == "ok" for r in runs.values()), [r.get("error") for r in runs.values()]
    for run in runs.values():
        assert run["eval_steps"] == [0, 2, 3]
        assert set(run["heldout"]) == {"de", "sw", "es"}
        assert all(math.isfinite(v) for vs in run["heldout"].values() for v in vs)
        assert len(run["train_loss"]["de"]) == 3 and run["step_ms_median"] > 0
        # same initial weights: the step-0 evaluation is identical in every run
        start = {c: v[0] for c, v in run["heldout"].items()}
        assert start == {c: v[0] for c, v in runs["mean"]["heldout"].items()}
        # same data order: the first training loss too
        assert run["train_loss"]["sw"][0] == runs["mean"]["train_loss"]["sw"][0]
        probe = run["probe"][-1]
        assert 0 <= probe["pair_conflict_share"] <= probe["bucket_conflict_share"] <= 1
        assert sum(probe["weights_mean"]) == pytest.approx(1.0, abs=1e-5)
    sizes = [tiny_results["languages"][c]["train_bytes"] for c in ("de", "sw")]
    assert runs["static-t1"]["static_weights"] == pytest.approx([s / sum(sizes) for s in sizes])
    assert runs["mean"]["probe"][-1]["weight_spread"] == 0
    assert runs["mgda-global"]["probe"][-1]["weight_bucket_std"] == pytest.approx(0, abs=1e-7)
    assert runs["mean"]["heldout"]["de"][-1] != runs["static-t1"]["heldout"]["de"][-1]


@pytest.mark.distributed
def test_report_files_and_table(tiny_results, tmp_path, capsys):
    paths = report.write_report(tiny_results, str(tmp_path))
    names = {p.rsplit("/", 1)[-1] for p in paths}
    assert {"results.json", "report.md", "heldout_loss.png", "loss_vs_mean.png", "conflict.png"} <= names
    for p in paths:
        assert (tmp_path / p.rsplit("/", 1)[-1]).stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    for name in ("mean", "static-t1", "mgda-global", "cagrad", "CLDR", "Unicode License", "2209.11379"):
        assert name in md
    table = report.format_table(tiny_results)
    assert len(table.splitlines()) == 2 + len(tiny_results["runs"])
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["name"] == "mean"
    assert main(["--report-only", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "best average held-out loss" in out and "pcgrad" in out


@pytest.mark.distributed
def test_report_marks_skipped_runs(tiny_results):
    results = dict(tiny_results, runs=tiny_results["runs"][:2] + [
        {"name": "mgda", "status": "skipped", "error": "the DDP comm hook is not available"}])
    table = report.format_table(results)
    assert "skipped: the DDP comm hook is not available" in table


@pytest.mark.distributed
def test_fsdp_engine_runs_and_refuses_global():
    """--engine fsdp: stock FSDP2 for 'mean', the MOO reduce-scatter for hook runs, 'global'
    skipped with the FSDP path's explanation; same start as the DDP engine's runs."""
    settings = DemoSettings(
        languages=("de", "sw"), unseen=(), runs=("mean", "mgda", "mgda-global"), engine="fsdp",
        steps=2, batch=2, model=ModelConfig(context=16, d_model=32, n_layer=1, n_head=2),
        warmup=1, eval_every=2, eval_windows=2, threads=1, progress=False)
    results = run_demo(settings)
    runs = {r["name"]: r for r in results["runs"]}
    assert runs["mean"]["status"] == "ok" and runs["mgda"]["status"] == "ok"
    assert runs["mgda-global"]["status"] == "skipped" and "FSDP2" in runs["mgda-global"]["error"]
    assert runs["mgda"]["hook_extra_mib"] is not None and runs["mgda"]["hook_extra_mib"] > 0
    assert {c: v[0] for c, v in runs["mgda"]["heldout"].items()} == \
        {c: v[0] for c, v in runs["mean"]["heldout"].items()}
    assert runs["mgda"]["heldout"]["de"][-1] != runs["mean"]["heldout"]["de"][-1]
    assert "stock FSDP2" in "\n".join(report.summary_lines(results))
    with pytest.raises(ValueError, match="engine"):
        DemoSettings(engine="zero3")


@pytest.mark.distributed
@pytest.mark.slow
def test_hf_engine_runs_through_the_trainer(tmp_path):
    """--engine hf: BucketMOOTrainer on a byte-level GPT-2 from a config; 'mean' is the plain
    Trainer on the same per-language data, the hook run starts from the same weights and
    differs after training; the report names the engine."""
    pytest.importorskip("transformers")
    settings = DemoSettings(
        languages=("de", "sw"), unseen=("es",), runs=("mean", "mgda", "static"), engine="hf",
        steps=2, batch=2, model=ModelConfig(context=16, d_model=16, n_layer=1, n_head=2),
        warmup=1, eval_every=1, eval_windows=2, threads=1, progress=False)
    results = run_demo(settings)
    runs = {r["name"]: r for r in results["runs"]}
    assert runs["mean"]["status"] == "ok" and runs["mgda"]["status"] == "ok"
    assert runs["static-t1"]["status"] == "skipped"
    for name in ("mean", "mgda"):
        assert runs[name]["eval_steps"] == [0, 1, 2]
        assert set(runs[name]["heldout"]) == {"de", "sw", "es"}
        assert all(math.isfinite(v) for vals in runs[name]["heldout"].values() for v in vals)
        assert len(runs[name]["probe"]) == 3
    assert {c: v[0] for c, v in runs["mgda"]["heldout"].items()} == \
        {c: v[0] for c, v in runs["mean"]["heldout"].items()}
    assert runs["mgda"]["heldout"]["de"][-1] != runs["mean"]["heldout"]["de"][-1]
    stats = runs["mgda"]["hook_diagnostics"]
    assert [s["step"] for s in stats] == [1, 2]
    assert all(sum(s["weights_mean"]) == pytest.approx(1.0, abs=1e-5) for s in stats)
    paths = report.write_report(results, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "HF Transformers Trainer" in md and "plain HF Trainer" in md and len(paths) >= 3
