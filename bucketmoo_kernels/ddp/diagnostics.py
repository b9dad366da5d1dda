"""Moved to :mod:`bucketmoo_kernels.distributed.diagnostics`; this name stays importable."""

from ..distributed.diagnostics import *  # noqa: F401,F403
from ..distributed.diagnostics import __all__  # noqa: F401
