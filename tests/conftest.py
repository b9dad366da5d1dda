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
    # The heaviest files first (each file's tests stay together and in order): with
    # ``-n 2 --dist loadfile`` the last file to start bounds the run, so it must be a short one.
    rank = {path: i for i, path in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


#: The slowest test files (seconds of one worker in CI, 2 workers on 2 cores, from
#: ``--durations``), slowest first: they are collected, hence started, before the others.
HEAVY_FILES = (
    "tests/test_packaging.py",  # ~2 min of CPU: sdist -> wheel (compiles the CPU extension) -> DDP step
    "tests/integrations/test_doc_examples.py",  # ~2 min: every engine's doc example, launched as written
    "tests/integrations/test_trl.py",  # ~70 s: TRL's SFTTrainer on 2 processes, 5 configurations
    "tests/test_demo.py",  # ~90 s: the demo's process groups and its HF engine
    "tests/integrations/test_transformers.py",  # the HF scenarios (~50 s), shared with the next two
    "tests/integrations/test_accelerate.py",
    "tests/integrations/test_transformers_deepspeed.py",
    "tests/test_native_cpu.py",  # ISA-variant subprocesses
    "tests/methods/test_methods_fsdp.py",
    "tests/fsdp/test_fsdp.py",
    "tests/integrations/test_lightning.py",
    "tests/integrations/test_deepspeed.py",
    "tests/methods/test_methods_distributed.py",
    "tests/ddp/test_ddp_ranks.py",
    "tests/test_compile.py",
    "tests/ddp/test_ddp_loss_normalization.py",
    "tests/integrations/test_launch_checks.py",
    "tests/ddp/test_golden_numbers.py",
    "tests/ddp/test_clean_exit.py",
)

#: Files that share a session fixture (the HF scenarios of ``tests/integrations/conftest.py``)
#: run on one xdist worker, so that the fixture runs once, not once per worker.
SAME_WORKER = {path: "HF scenarios" for path in ("tests/integrations/test_transformers.py",
                                                  "tests/integrations/test_accelerate.py",
                                                  "tests/integrations/test_transformers_deepspeed.py")}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the files of :data:`SAME_WORKER` as one unit and the units in
    collection order (heaviest first, see :data:`HEAVY_FILES`) instead of xdist's default
    order by test count, which starts the heavy files with few tests last."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid):
            path = super()._split_scope(nodeid)
            return SAME_WORKER.get(path, path)

    config.option.loadscopereorder = False
    return Scheduling(config, log)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
