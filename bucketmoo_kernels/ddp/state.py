"""Moved to :mod:`bucketmoo_kernels.distributed.state` (shared with the FSDP2 path); this
name stays importable."""

from ..distributed.state import *  # noqa: F401,F403
from ..distributed.state import __all__  # noqa: F401
