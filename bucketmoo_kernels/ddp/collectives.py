"""Moved to :mod:`bucketmoo_kernels.distributed.collectives` (shared with the FSDP2 path); this
name stays importable."""

from ..distributed.collectives import *  # noqa: F401,F403
from ..distributed.collectives import __all__  # noqa: F401
