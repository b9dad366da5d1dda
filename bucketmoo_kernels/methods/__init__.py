"""Aggregation methods: each is a function of the per-segment Gram matrix.

Importing this package registers the built-in methods: ``mean``, ``mgda``, ``pcgrad`` and
``cagrad``. See :mod:`.registry` to add your own.
"""

from . import cagrad, mean, mgda, pcgrad  # noqa: F401  (registration side effects)
from .normalization import NORMALIZATIONS, normalization_scales
from .registry import Method, available_methods, get_method, register_method, resolve_options

__all__ = [
    "Method",
    "NORMALIZATIONS",
    "available_methods",
    "get_method",
    "normalization_scales",
    "register_method",
    "resolve_options",
]
