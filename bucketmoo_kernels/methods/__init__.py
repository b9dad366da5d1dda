"""Aggregation methods: each is a function of the per-segment Gram matrix.

Importing this package registers the built-in methods: ``mean``, ``mgda``, ``pcgrad`` and
``cagrad``. See :mod:`.registry` to add your own.
"""

from . import (aligned_mtl, cagrad, config, dual_cone, fairgrad, fixed_weights, imtl_g,  # noqa: F401
               krum, mean, mgda, nash_mtl, pcgrad)  # (registration side effects)
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
