"""scripts/sanitizer_cases.py (the compute-sanitizer step of scripts/gpu_session.sh) on the CPU
backend: every case runs and is checked against the float64 reference, and a wrong combine fails."""

import importlib.util
from pathlib import Path

import pytest

import bucketmoo_kernels as bm

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sanitizer_cases.py"


def _module():
    spec = importlib.util.spec_from_file_location("sanitizer_cases", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cases():
    if bm.available_backends("cpu")["cpu"] is not None:
        pytest.skip("the native cpu backend is not built")
    return _module()


def test_every_case_runs_and_matches_the_reference(cases, capsys):
    assert cases.main(["--device", "cpu", "--backends", "cpu", "--n", "5003"]) == 0
    out = capsys.readouterr().out
    assert "cpu: 40 cases checked" in out and out.rstrip().endswith("sanitizer cases done")


def test_a_wrong_combine_is_caught(cases, monkeypatch):
    combine = bm.combine

    def off_by_one_element(grads, weights, segments=None, *, out=None, backend="auto", **kw):
        got = combine(grads, weights, segments, out=out, backend=backend, **kw)
        if backend != "torch":
            got[7] += 10.0
        return got

    monkeypatch.setattr(bm, "combine", off_by_one_element)
    with pytest.raises(AssertionError, match="combine cpu T=2 torch.float32 one: relative error"):
        cases.main(["--device", "cpu", "--backends", "cpu", "--n", "5003"])
