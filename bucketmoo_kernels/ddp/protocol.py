"""Moved to :mod:`bucketmoo_kernels.distributed.protocol` (shared with the FSDP2 path); this
name stays importable."""

from ..distributed.protocol import *  # noqa: F401,F403
from ..distributed.protocol import __all__  # noqa: F401
