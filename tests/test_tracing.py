"""``bucketmoo_kernels.tracing``: the constant-result mark without importing Dynamo."""

import subprocess
import sys

import torch

from bucketmoo_kernels import tracing


def test_the_mark_is_what_torch_sets():
    def ours():
        return 1

    def theirs():
        return 1

    sys_modules = dict(sys.modules)
    try:
        sys.modules.pop("torch._dynamo", None)  # take the path that sets the mark itself
        tracing.assume_constant_result(ours)
    finally:
        sys.modules.clear()
        sys.modules.update(sys_modules)
    torch.compiler.assume_constant_result(theirs)
    marks = {k: v for k, v in vars(theirs).items()}
    assert marks and vars(ours) == marks


def test_importing_the_package_does_not_import_dynamo():
    code = "import sys, bucketmoo_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
