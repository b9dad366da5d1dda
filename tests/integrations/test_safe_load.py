"""Nothing the library loads may unpickle arbitrary objects.

A crafted ``bucket_moo_state.pt`` (a pickle whose ``__reduce__`` would create a file) must fail
to load on resume without running; the saved state must still load; and no module of the
package or the benchmarks calls ``torch.load`` without ``weights_only=True`` or uses
``pickle`` / ``dill`` / ``numpy.load(allow_pickle=True)`` (checked on the source's syntax tree).
"""

import ast
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


class _RunsCode:
    """Unpickling this calls ``open(path, "w")``: a file appears if the loader ran it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted_checkpoint(folder: Path, marker: Path) -> Path:
    from bucketmoo_kernels.ddp import BucketMOOState

    payload = BucketMOOState(method="mgda").state_dict()
    payload["step"] = _RunsCode(marker)
    torch.save(payload, folder / "bucket_moo_state.pt")
    # the file really is hostile: a plain unpickler runs it
    probe = folder / "probe"
    with open(folder / "probe.pkl", "wb") as f:
        pickle.dump(_RunsCode(probe), f)
    with open(folder / "probe.pkl", "rb") as f:
        pickle.load(f).close()
    assert probe.exists()
    return folder


@pytest.mark.slow  # imports transformers
def test_crafted_trainer_checkpoint_raises_and_does_not_run(tmp_path):
    pytest.importorskip("transformers", reason="needs pip install 'bucketmoo_kernels[hf]'")
    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.transformers import BucketMOOTrainerMixin

    marker = tmp_path / "ran"
    _crafted_checkpoint(tmp_path, marker)
    trainer = SimpleNamespace(bucket_moo=BucketMOOState(method="mgda"))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        BucketMOOTrainerMixin._load_bucket_moo(trainer, str(tmp_path))
    assert not marker.exists(), "the crafted checkpoint ran code on load"
    assert trainer.bucket_moo.step == 0


@pytest.mark.slow  # imports transformers
def test_saved_state_still_loads(tmp_path):
    pytest.importorskip("transformers", reason="needs pip install 'bucketmoo_kernels[hf]'")
    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.transformers import STATE_FILE, BucketMOOTrainerMixin

    saved = BucketMOOState(method="upgrad", granularity="param", task_of_rank=[0, 1])
    saved.load_state_dict({**saved.state_dict(), "step": 7})
    torch.save(saved.state_dict(), tmp_path / STATE_FILE)
    trainer = SimpleNamespace(bucket_moo=BucketMOOState(method="upgrad", granularity="param", task_of_rank=[0, 1]))
    BucketMOOTrainerMixin._load_bucket_moo(trainer, str(tmp_path))
    assert trainer.bucket_moo.step == 7


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_unsafe_load_in_the_package_or_benchmarks():
    bad = []
    files = sorted((ROOT / "bucketmoo_kernels").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        where = lambda node: f"{path.relative_to(ROOT)}:{node.lineno}"  # noqa: E731
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib")
                       for n in names):
                    bad.append(f"{where(node)} imports a pickle module")
        for call in _calls(tree):
            name = _name(call.func)
            kw = {k.arg: k.value for k in call.keywords}
            if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
                if not _is_true(kw.get("weights_only")):
                    bad.append(f"{where(call)} {name}(...) without weights_only=True")
            if name.endswith(("np.load", "numpy.load")) and _is_true(kw.get("allow_pickle")):
                bad.append(f"{where(call)} {name}(allow_pickle=True)")
    assert not bad, "\n".join(bad)
