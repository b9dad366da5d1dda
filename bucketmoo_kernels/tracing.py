"""What the library needs from ``torch.compile`` at import time, without importing Dynamo.

``torch.compiler.assume_constant_result`` imports ``torch._dynamo`` (about 3 s of CPU), so
decorating a function with it at import time made ``import bucketmoo_kernels`` cost that in
every process, including every DDP worker that never compiles. Dynamo's decorator only marks
the function (``torch._dynamo.decorators.assume_constant_result`` sets
``_dynamo_marked_constant``, torch 2.11 to 2.13), so the same mark is set here; when Dynamo is
already imported, its own decorator runs. ``tests/test_tracing.py`` checks that the mark is
what the installed torch sets, and the compile tests that traced calls still fold it.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

__all__ = ["assume_constant_result"]

_MARK = "_dynamo_marked_constant"


def assume_constant_result(fn: F) -> F:
    """``torch.compiler.assume_constant_result(fn)`` without importing Dynamo."""
    if "torch._dynamo" in sys.modules:
        import torch
        return torch.compiler.assume_constant_result(fn)
    setattr(fn, _MARK, True)
    return fn
