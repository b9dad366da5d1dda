"""Backend dispatch, in one place.

Backends: ``torch`` (reference, always there), ``cpu`` (native C++/OpenMP extension),
``triton`` and ``cuda`` (native CUDA extension). ``backend="auto"`` takes the first one
that can run on the tensors' device, in this order:

* CUDA tensors: ``cuda``, ``triton``, ``torch``
* CPU tensors:  ``cpu``, ``torch``   (Triton runs on CPU tensors only under
  ``TRITON_INTERPRET=1`` and only when asked for by name: it is a test vehicle there)

The environment variable ``BUCKETMOO_BACKEND`` pins what ``auto`` means. A backend asked
for by name that cannot run raises ``RuntimeError`` saying why; ``auto`` skips it and logs
the reason once.

A backend is a :class:`~bucketmoo_kernels.backend.Backend` (its own module, re-exported here):
every member one may have is declared there, the optional
ones (``solve``, ``weights``, ``fused``) with defaults that return None ("not here, take the
next path"), so the API calls them without probing. Each gets the weight step as one
:class:`~bucketmoo_kernels.weight_step.WeightStep`.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

from .backend import Backend
from .reference import TorchBackend
from .tracing import assume_constant_result

__all__ = ["BACKEND_NAMES", "ENV_BACKEND", "Backend", "register_backend", "get_backend",
           "available_backends"]


logger = logging.getLogger("bucketmoo_kernels")

ENV_BACKEND = "BUCKETMOO_BACKEND"
BACKEND_NAMES = ("torch", "cpu", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# Where each optional backend lives; imported lazily so a missing piece never breaks import.
_MODULES = {"cpu": "bucketmoo_kernels.native", "cuda": "bucketmoo_kernels.native",
            "triton": "bucketmoo_kernels.triton"}

_backends: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_logged: set[tuple[str, str]] = set()


def register_backend(backend: Backend) -> None:
    """Make ``backend`` (a :class:`Backend`) selectable under ``backend.name``."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a bucketmoo_kernels.dispatch.Backend; got {type(backend).__name__}")
    if not isinstance(backend.name, str) or not backend.name:
        raise ValueError(f"backend.name must be a non-empty string; got {backend.name!r}")
    _backends[backend.name] = backend


def _load(name: str):
    if name in _backends:
        return _backends[name]
    if name not in _load_errors and name in _MODULES:
        try:
            importlib.import_module(_MODULES[name])
        except Exception as exc:  # noqa: BLE001  (any import failure means "not available")
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
        if name not in _backends and name not in _load_errors:
            _load_errors[name] = f"module {_MODULES[name]} did not provide it"
    return _backends.get(name)


def _reason(name: str, device: torch.device) -> str | None:
    backend = _load(name)
    if backend is None:
        return f"backend {name!r} is not available ({_load_errors.get(name, 'not installed')})"
    return backend.unavailable_reason(device)


def get_backend(name: str, device: torch.device | str) -> Backend:
    """The backend object to run on ``device``; see the module docstring for the rules.

    Under ``torch.compile`` the choice is made once, at trace time, outside the traced code
    (it may import a backend's module): the graph holds the chosen backend's ops.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string; got {type(name).__name__}")
    return _backends[_backend_name(name, str(torch.device(device)))]


@assume_constant_result
def _backend_name(name: str, device_name: str) -> str:
    """The name of the backend :func:`get_backend` returns (run eagerly, even when traced)."""
    device = torch.device(device_name)
    if name == "auto":
        pinned = os.environ.get(ENV_BACKEND, "").strip()
        if pinned and pinned != "auto":
            name = pinned
    if name != "auto":
        if name not in BACKEND_NAMES and name not in _backends:
            raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKEND_NAMES)}; got {name!r}")
        reason = _reason(name, device)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
        return name
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        reason = _reason(candidate, device)
        if reason is None:
            return candidate
        if (device.type, candidate) not in _logged:
            _logged.add((device.type, candidate))
            logger.info("bucketmoo_kernels: backend %r skipped on %s: %s", candidate, device.type, reason)
    return "torch"


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """``{name: None if it can run on device else the reason}`` for every backend."""
    device = torch.device(device)
    return {name: _reason(name, device) for name in BACKEND_NAMES}


register_backend(TorchBackend())  # the torch reference is always there
