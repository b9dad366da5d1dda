"""The integrations are optional: importing the package pulls in no framework, and a missing
framework gives an ImportError that names the pip extra."""

import importlib
import sys

import pytest


def test_package_imports_no_framework():
    before = {m for m in ("transformers", "accelerate", "lightning", "deepspeed") if m in sys.modules}
    importlib.import_module("bucketmoo_kernels.integrations")
    importlib.import_module("bucketmoo_kernels.integrations._common")
    importlib.import_module("bucketmoo_kernels.data")
    after = {m for m in ("transformers", "accelerate", "lightning", "deepspeed") if m in sys.modules}
    assert after == before


@pytest.mark.parametrize("module, framework, extra", [
    ("bucketmoo_kernels.integrations.transformers", "transformers", "hf"),
    ("bucketmoo_kernels.integrations.accelerate", "accelerate", "hf"),
    ("bucketmoo_kernels.integrations.trl", "trl", "trl"),
])
def test_missing_framework_names_the_extra(monkeypatch, module, framework, extra):
    monkeypatch.setitem(sys.modules, framework, None)  # makes `import framework` fail
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'bucketmoo_kernels\[{extra}\]'"):
        importlib.import_module(module)
