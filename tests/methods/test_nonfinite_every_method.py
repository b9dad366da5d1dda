"""The non-finite policy for every registered method, through the API (issue 23).

One NaN element in one segment of one task (``check_finite=False``, as the DDP hook calls it):
that segment's combined gradient is all NaN, every other segment is bit-identical to the same
call without the NaN, and a method state (stateful methods, and the ``ema`` option) keeps that
segment's entries as they were before the step while the other segments advance exactly as in
the clean call. The DDP hook's side is ``tests/ddp/test_nonfinite_every_method_ddp.py``.
"""

from __future__ import annotations

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.methods import MethodState, get_method
from bucketmoo_kernels.methods.elementwise import is_elementwise

NUM_TASKS, SEG, NUM_SEG = 4, 32, 3
BAD = slice(SEG, 2 * SEG)  # segment 1
NAN_AT = (2, SEG + 5)  # task 2, element 5 of segment 1

#: Options a method needs to run at T = 4.
NEEDED = {"constant": {"weights": [1.0, 2.0, 3.0, 4.0]}}
#: The fast lane: Gram methods, a stateful one, an ema; the rest slow.
FAST = {("mgda", False), ("pcd", False), ("mean", False), ("mgda", True)}


def _cases():
    for name in bm.available_methods():
        for ema in (False, True):
            if ema and (is_elementwise(name)):
                continue  # element-wise methods refuse ema (documented)
            marks = [] if (name, ema) in FAST else [pytest.mark.slow]
            yield pytest.param(name, ema, marks=marks, id=f"{name}{'-ema' if ema else ''}")


def _grads(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(17 + step)
    grads = torch.randn(NUM_TASKS, NUM_SEG * SEG, generator=gen)
    grads[1:] -= 0.5 * grads[0]
    return grads


def _state_rows(state: MethodState | None) -> dict[str, torch.Tensor]:
    return {} if state is None else {k: v.clone() for k, v in state.state_dict()["tensors"].items()}


@pytest.mark.parametrize("name,ema", list(_cases()))
def test_one_nan_element_poisons_its_segment_only(name, ema):
    options = dict(NEEDED.get(name, {}))
    if ema:
        options["ema"] = 0.5
    keeps_state = get_method(name).stateful or ema

    def run(grads, state):
        return bm.fused_bucket_moo(grads, method=name, segments=SEG, check_finite=False,
                                   method_state=state, backend="torch", **options)

    clean_state = MethodState() if keeps_state else None
    dirty_state = MethodState() if keeps_state else None
    run(_grads(0), clean_state)  # a first clean step, so the state holds something
    run(_grads(0), dirty_state)
    before = _state_rows(dirty_state)

    grads = _grads(1)
    clean = run(grads, clean_state)
    poisoned = grads.clone()
    poisoned[NAN_AT] = float("nan")
    dirty = run(poisoned, dirty_state)

    assert torch.isnan(dirty[BAD]).all(), f"{name}: the NaN segment is not all NaN: {dirty[BAD]}"
    for seg in (slice(0, SEG), slice(2 * SEG, 3 * SEG)):
        assert torch.equal(dirty[seg], clean[seg]), f"{name}: a finite segment changed"
    if keeps_state:
        after, advanced = _state_rows(dirty_state), _state_rows(clean_state)
        assert after.keys() == advanced.keys() == before.keys(), name
        for key in after:
            assert after[key].shape[0] == NUM_SEG, (name, key, after[key].shape)
            assert torch.equal(after[key][1], before[key][1]), f"{name}: state {key!r} of the NaN segment moved"
            assert torch.equal(after[key][[0, 2]], advanced[key][[0, 2]]), f"{name}: state {key!r} differs"


@pytest.mark.parametrize("name", [n if n == "mgda" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in bm.available_methods() if not is_elementwise(n)])
def test_solve_gives_nan_weights_for_a_nan_gram_segment(name):
    """``bm.solve`` with a NaN entry in one segment's Gram: NaN weights there, the rest as
    without it, bit for bit."""
    options = dict(NEEDED.get(name, {}))
    gen = torch.Generator().manual_seed(5)
    jac = torch.randn(3, NUM_TASKS, 20, generator=gen, dtype=torch.float64)
    grams = (jac @ jac.transpose(1, 2)).float()
    state = MethodState() if get_method(name).stateful else None
    clean = bm.solve(grams, name, method_state=state, backend="torch", **options)
    bad = grams.clone()
    bad[1, 0, 2] = bad[1, 2, 0] = float("nan")
    state = MethodState() if get_method(name).stateful else None
    got = bm.solve(bad, name, method_state=state, backend="torch", **options)
    assert torch.isnan(got[1]).all(), (name, got)
    assert torch.equal(got[[0, 2]], clean[[0, 2]]), name
