"""The one record per method: what it declares agrees with the method's code, the docs table
is generated from it, and the rest of the library reads it (validation, task limits, the
Triton and native dispatch, the element-wise routing, the per-step seed rule)."""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest
import torch

import bucketmoo_kernels as bm
from bucketmoo_kernels.methods import available_methods, get_method, methods_table
from bucketmoo_kernels.methods.elementwise import is_elementwise
from bucketmoo_kernels.methods.options import AtLeast, Option
from bucketmoo_kernels.methods.registry import KINDS, register

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def test_docs_table_is_the_records():
    text = DOCS.read_text()
    table = re.search(r"<!-- methods-table:begin -->\n(.*?)\n<!-- methods-table:end -->", text, re.S)
    assert table, "docs/methods.md lost its methods-table markers"
    assert table.group(1) == methods_table(), (
        "docs/methods.md's method table is out of date: paste bucketmoo_kernels.methods.methods_table()")


@pytest.mark.parametrize("name", available_methods())
def test_record_agrees_with_the_code(name):
    method = get_method(name)
    assert method.kind in KINDS
    assert method.stateful == (method.kind == "stateful")
    assert method.defaults == {k: spec.default for k, spec in method.options.items()}
    code = method.combine if method.is_elementwise else method.fn
    assert callable(code) and method.summary
    if not method.name.startswith("test_"):  # (methods registered by other tests)
        params = inspect.signature(code).parameters
        for option, default in method.defaults.items():  # each option is a keyword of the code ...
            assert option in params, (name, option)
            if params[option].default is not inspect.Parameter.empty:  # ... with the same default
                assert params[option].default == default, (name, option)
    if method.native_code is not None:
        assert method.native_args is not None and method.native_max_tasks is not None
    assert is_elementwise(name) == method.is_elementwise


def test_a_new_method_is_one_record():
    """A method declared with its record only: options checked, task limit enforced, listed."""

    def doubled_first(gram, *, boost=2.0):
        """Weight ``boost`` on task 0, 1 elsewhere."""
        weights = torch.ones(gram.shape[:2], dtype=gram.dtype)
        weights[:, 0] = boost
        return weights

    register("test_doubled_first", doubled_first, options={"boost": Option(2.0, AtLeast(1.0))},
             min_tasks=lambda options: 2, tasks_doc="T >= 2", overwrite=True)
    with pytest.raises(ValueError, match="test_doubled_first option boost must be >= 1"):
        bm.WeightStep("test_doubled_first", {"boost": 0.5})
    with pytest.raises(ValueError, match="at least 2 tasks"):
        bm.solve(torch.eye(1), "test_doubled_first")
    weights = bm.solve(torch.eye(3), "test_doubled_first", boost=3.0, normalize_weights=False)
    torch.testing.assert_close(weights, torch.tensor([[3.0, 1.0, 1.0]]))
    assert "test_doubled_first" in methods_table(builtin_only=False)
    assert "test_doubled_first" not in methods_table()


def test_triton_dispatch_reads_the_record():
    """Which solver and T the Triton kernels take comes from ``triton_max_tasks``."""
    assert bm.WeightStep("mgda").triton_solver(2) == (True, "closed_form")
    assert bm.WeightStep("mgda").triton_solver(8) == (True, "exact")
    assert bm.WeightStep("mgda").triton_solver(64) == (True, "pgd")
    assert bm.WeightStep("mgda").triton_solver(65) == (False, "pgd")
    assert bm.WeightStep("cagrad").triton_solver(8) == (True, "exact")
    assert bm.WeightStep("cagrad").triton_solver(9) == (False, "iterative")
    # solver="iterative" runs the iterative torch solver on every backend (it ran the exact
    # kernel on Triton before)
    assert bm.WeightStep("cagrad", {"solver": "iterative"}).triton_solver(4) == (False, "iterative")
    assert bm.WeightStep("cagrad", {"solver": "iterative"}).native_codes(4) is None
    assert bm.WeightStep("pcgrad").triton_solver(40) == (True, None)
    assert bm.WeightStep("upgrad").triton_solver(3) == (False, None)
    assert bm.WeightStep("mgda", {"ema": 0.5}).triton_solver(3) == (True, "exact")  # ema smooths after


def test_the_seed_rule_is_one_method():
    step = bm.WeightStep("pcgrad", {"seed": 5})
    assert step.at_step(0) is step
    assert step.at_step(3).options["seed"] == 8
    assert bm.WeightStep("mgda").at_step(3) == bm.WeightStep("mgda")  # draws nothing
    state = bm.MethodState()
    state.calls = 4
    assert step.for_call(state).options["seed"] == 9
    assert bm.WeightStep("gradvac", {"seed": 5}).for_call(state).options["seed"] == 5  # reads its state
    from bucketmoo_kernels.distributed.settings import MOOSettings
    settings = MOOSettings.build("random", seed=2)
    assert settings.weight_step_at(7).options["seed"] == 9
    assert settings.method_call_options(7) == {"seed": 9}
