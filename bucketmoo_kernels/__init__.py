"""bucketmoo_kernels: fused kernels for Bucket-Level multi-objective optimisation.

Per gradient bucket (segment): the Gram matrix of the task gradients, the weights of a
multi-objective method (MGDA, PCGrad, CAGrad, ...) and the combined gradient, written into
the caller's buffer. See the README for the method and the DDP hook.
"""

from . import diagnostics, methods
from ._version import __version__
from .api import MOOInfo, combine, fused_bucket_moo, gram, solve
from .dispatch import BACKEND_NAMES, Backend, available_backends, get_backend
from .inputs import Segments
from .methods import MethodState, available_methods, register_method
from .profile import ConflictReport, profile_conflicts
from .weight_step import WeightStep

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "ConflictReport",
    "MOOInfo",
    "MethodState",
    "Segments",
    "WeightStep",
    "available_backends",
    "available_methods",
    "combine",
    "diagnostics",
    "fused_bucket_moo",
    "get_backend",
    "gram",
    "methods",
    "profile_conflicts",
    "register_method",
    "solve",
    "__version__",
]
