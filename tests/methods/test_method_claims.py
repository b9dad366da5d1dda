"""The properties each registered method claims, read from the table in docs/methods.md
("## Properties each method claims"), tested through the public API (``fused_bucket_moo``,
float32 gradients, default options unless the table's note names some).

A "yes" cell is tested; "no" is not claimed (seeded methods get a determinism check instead of
the permutation one); "n.a." is tested to be refused with a ValueError. The fast lane runs one
representative method per property (``FAST``), the rest are ``slow``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.methods import MethodState, get_method

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"
SECTION = "## Properties each method claims"
PROPERTIES = ("non-conflicting", "permutation", "linear", "extreme scales", "stationary", "T = 1",
              "zero row", "duplicate row")
#: One method per property in the fast lane.
FAST = {"non-conflicting": "upgrad", "permutation": "mgda", "linear": "nash_mtl",
        "extreme scales": "mgda", "stationary": "mgda", "T = 1": "pcgrad", "zero row": "mean",
        "duplicate row": "mgda"}
#: Options the tests need for a method to run at all (T-sized ones are built per T).
NEEDED = {"constant": lambda num_tasks: {"weights": [float(t + 1) for t in range(num_tasks)]}}


def read_claims() -> dict[str, dict[str, tuple[str, dict, str]]]:
    """method -> property -> ("yes" | "no" | "n.a.", options named in the cell's note, the note)."""
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["method", *PROPERTIES], header
    claims = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        entry = {}
        for prop, cell in zip(PROPERTIES, cells[1:]):
            verdict = cell.split("(", 1)[0].strip()
            assert verdict in ("yes", "no", "n.a."), (cells[0], prop, cell)
            note = re.search(r"\((.*)\)", cell)
            options = {}
            for key, value in re.findall(r"(\w+)=([-\w.]+)", note.group(1) if note else ""):
                options[key] = float(value) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", value) else value
            entry[prop] = (verdict, options, note.group(1) if note else "")
        claims[cells[0]] = entry
    return claims


CLAIMS = read_claims()


def test_every_registered_method_has_a_row():
    registered = set(bm.available_methods())
    assert registered - set(CLAIMS) == set(), f"methods missing from {SECTION}: {registered - set(CLAIMS)}"
    assert set(CLAIMS) - registered == set(), f"rows for unknown methods: {set(CLAIMS) - registered}"


def combined(name: str, jac: torch.Tensor, **options) -> torch.Tensor:
    """d of ``jac [T, n]`` (float64, rounded to float32) through the API, float64 out."""
    num_tasks = jac.shape[0]
    options = {**NEEDED.get(name, lambda t: {})(num_tasks), **options}
    state = MethodState() if get_method(name).stateful else None
    out = bm.fused_bucket_moo(jac.to(torch.float32).contiguous(), method=name, method_state=state,
                              **options)
    return out.double()


def conflicting(num_tasks: int, seed: int, dim: int = 24) -> torch.Tensor:
    """Task gradients with conflicts (the first task against the others) but, with dim > T, a
    conflict-free direction."""
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(num_tasks, dim, generator=gen, dtype=torch.float64)
    jac[1:] -= 0.5 * jac[0]
    return jac.to(torch.float32).double()  # exactly what the API sees


def stationary(seed: int) -> torch.Tensor:
    """Three tasks in a 2-D subspace with 0 strictly inside their hull: g = [[3, 0], [-1, 1],
    [-1, -1]] B (B orthonormal rows), (2 g1 + 3 g2 + 3 g3) / 8 = 0; their mean is not 0."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(24, 2, generator=gen, dtype=torch.float64)).Q.T  # orthonormal
    return torch.tensor([[3.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64) @ basis


def _cases():
    for name in sorted(CLAIMS):
        for prop in PROPERTIES:
            verdict, options, _ = CLAIMS[name][prop]
            if verdict == "no" and not (prop == "permutation"):
                continue
            marks = [] if FAST.get(prop) == name else [pytest.mark.slow]
            yield pytest.param(name, prop, verdict, options, marks=marks, id=f"{name}-{prop}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


#: Float32 gradients and weights: d is reproduced to this relative error.
F32 = 2e-5


def _regularised(name: str) -> bool:
    return name in ("upgrad", "dualproj")


def check_non_conflicting(name: str, jac: torch.Tensor, options: dict) -> None:
    d = combined(name, jac, **options)
    progress = jac @ d  # g_t . d
    # The float32 rounding of d: |g_t| |d| 1e-6; upgrad/dualproj: their documented regularisation
    # reg_eps tr(G) w_t with w_t <= 1 after the sum-1 rescale (bounded by reg_eps tr(G) * T).
    rounding = 1e-5 * jac.norm(dim=1) * d.norm()
    reg = 1e-4 * float((jac * jac).sum()) * jac.shape[0] if _regularised(name) else 0.0
    assert (progress >= -rounding - reg).all(), (name, progress)


@pytest.mark.parametrize("name,prop,verdict,options", list(_cases()))
def test_claimed_property(name, prop, verdict, options):
    if prop == "non-conflicting":
        for num_tasks, seed in ((2, 0), (3, 1), (5, 2), (9, 3)):
            check_non_conflicting(name, conflicting(num_tasks, seed), options)
    elif prop == "permutation":
        jac = conflicting(5, 4)
        perm = torch.tensor([3, 0, 4, 1, 2])
        d = combined(name, jac, **options)
        if verdict == "yes":
            assert _rel(combined(name, jac[perm], **options), d) <= F32, name
        else:  # not claimed: a seeded or position-bound method is at least reproducible
            assert torch.equal(combined(name, jac, **options), d), name
    elif prop in ("linear", "extreme scales"):
        jac = conflicting(4, 5)
        d = combined(name, jac, **options)
        for a in ((1e-3, 7.5) if prop == "linear" else (1e-18, 1e18)):
            assert _rel(combined(name, jac * a, **options), a * d) <= F32, (name, a)
    elif prop == "stationary":
        # also in the method's own scale (normalize_weights=False), unless the cell says
        # "sum-1 scale": Nash-MTL and FairGrad have no fixed point there (their weights grow
        # without bound), only the rescaled direction goes to 0
        own_scale = "sum-1 scale" not in CLAIMS[name][prop][2]
        for seed, scaled in ((0, True), (1, True)) + (((0, False),) if own_scale else ()):
            jac = stationary(seed)
            d = combined(name, jac, normalize_weights=scaled, **options)
            # to rounding; upgrad/dualproj: their reg_eps (1e-4 of the trace) moves d off 0
            tol = 1e-3 if _regularised(name) else 1e-5
            assert float(d.norm()) <= tol * float(jac.norm(dim=1).max()), (name, d.norm())
    elif prop == "T = 1":
        jac = conflicting(1, 6)
        if verdict == "n.a.":
            with pytest.raises(ValueError):
                combined(name, jac, **options)
            return
        assert _rel(combined(name, jac, **options), jac[0]) <= 1e-6, name
    elif prop == "zero row":
        jac = conflicting(4, 7)
        jac[2] = 0
        d = combined(name, jac, **options)
        assert torch.isfinite(d).all(), name
        if CLAIMS[name]["non-conflicting"][0] == "yes":
            check_non_conflicting(name, jac, options)
    elif prop == "duplicate row":
        jac = conflicting(4, 8)
        d = combined(name, jac, **options)
        doubled = combined(name, torch.cat([jac, jac[1:2]]), **options)
        assert _rel(doubled, d) <= F32, name
    else:  # pragma: no cover
        raise AssertionError(prop)


@pytest.mark.parametrize("name", [n if n == "mgda" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(CLAIMS)])
def test_duplicated_rows_give_a_finite_direction(name):
    """Every method, claimed or not: a duplicated task gives a finite d."""
    jac = conflicting(4, 9)
    assert torch.isfinite(combined(name, torch.cat([jac, jac[:2]]))).all(), name


@pytest.mark.slow
@settings(max_examples=25, deadline=None, derandomize=True)
@given(num_tasks=st.integers(2, 7), dim=st.integers(8, 40), seed=st.integers(0, 2**31 - 1),
       log_scale=st.floats(-12, 12))
def test_non_conflicting_methods_on_drawn_gradients(num_tasks, dim, seed, log_scale):
    """Every method claiming non-conflicting, on drawn sizes, seeds and scales (dim > T: a
    conflict-free direction exists)."""
    if dim <= num_tasks:
        dim = num_tasks + 1
    jac = conflicting(num_tasks, seed, dim) * 10.0 ** log_scale
    jac = jac.to(torch.float32).double()
    for name in sorted(CLAIMS):
        verdict, options, _ = CLAIMS[name]["non-conflicting"]
        if verdict == "yes":
            check_non_conflicting(name, jac, options)
