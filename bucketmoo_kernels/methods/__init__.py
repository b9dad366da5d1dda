"""Aggregation methods.

Importing this package registers the built-in methods. Functions of the per-segment Gram:
``mean``, ``sum``, ``constant``, ``random``, ``mgda``, ``pcgrad``, ``cagrad``, ``upgrad``,
``dualproj``, ``imtl_g``, ``aligned_mtl``, ``nash_mtl``, ``fairgrad``, ``config``, ``krum``;
stateful per segment (need a :class:`MethodState`): ``gradvac``, ``pcd``; element-wise
combines (not functions of the Gram): ``graddrop``, ``trimmed_mean``. Every method also takes
the ``ema`` option (weight smoothing over steps, needs a :class:`MethodState`). See
:mod:`.registry` to add your own.
"""

from . import (aligned_mtl, cagrad, config, dual_cone, elementwise, fairgrad, fixed_weights,  # noqa: F401
               gradvac, imtl_g, krum, mean, mgda, nash_mtl, pcd, pcgrad)  # (registration side effects)
from .normalization import NORMALIZATIONS, normalization_scales
from .options import Option
from .registry import Method, available_methods, get_method, methods_table, register_method, resolve_options
from .state import MethodState

__all__ = [
    "Method",
    "MethodState",
    "Option",
    "methods_table",
    "NORMALIZATIONS",
    "available_methods",
    "get_method",
    "normalization_scales",
    "register_method",
    "resolve_options",
]
