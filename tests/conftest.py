"""Test configuration shared by the whole suite.

Without a GPU, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be
set before Triton compiles anything, so it is set here, before the package is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests without a GPU. A module that defines ``FAST_UNDER_INTERPRETER`` (test
    names or full ids, ``name[params]``) runs Triton kernels under the interpreter when there
    is no GPU, seconds per launch: its other tests are marked ``slow`` then."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:  # not `in keywords`: a checkout dir named gpu
            item.add_marker(skip_gpu)
        fast = getattr(getattr(item, "module", None), "FAST_UNDER_INTERPRETER", None)
        if fast is not None and not HAS_CUDA and item.name not in fast and item.originalname not in fast:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
