"""Triton kernels of bucketmoo_kernels: ``gram``, ``solve`` (MGDA, PCGrad, CAGrad) and ``combine``.

Importing this package registers the ``triton`` backend with the dispatcher. It raises
``ImportError`` when Triton is not installed (the dispatcher reports the backend as not
available). On CPU tensors the kernels run only under ``TRITON_INTERPRET=1``, which must be
set before this package is imported. Design notes: ``docs/triton.md``.
"""

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the 'triton' backend of bucketmoo_kernels needs the 'triton' package "
        "(pip install triton; it ships with CUDA builds of torch on Linux): " + str(exc)
    ) from exc

from ..dispatch import register_backend
from .backend import TritonBackend
from .combine import combine_triton
from .gram import gram_triton
from .solve import mgda_closed_form_triton, mgda_exact_triton, mgda_pgd_triton, pcgrad_triton
from .solve import cagrad_triton

__all__ = ["TritonBackend", "gram_triton", "combine_triton", "mgda_closed_form_triton",
           "mgda_exact_triton", "mgda_pgd_triton", "pcgrad_triton", "cagrad_triton"]

register_backend(TritonBackend())
