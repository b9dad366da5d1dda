"""The weight step as one frozen object: Gram matrices in, per-segment weights out.

A :class:`WeightStep` holds everything that decides the weights except the data: the
method (from the registry), its resolved options, the gradient normalisation and whether
the weights are rescaled to sum to one. It is validated once when built and then handed,
unchanged, to every backend, the DDP hook and the FSDP path::

    step = WeightStep("mgda", {"solver": "pgd"}, normalization="l2")
    out = fused_bucket_moo(grads, weight_step=step)          # same as method="mgda", solver="pgd", ...
    weights = solve(gram, weight_step=step)

The per-call data stays outside it: the losses of the loss normalisations (checked once per
call by :func:`loss_table` into a float64 ``[S, T]`` table) and, for the methods that draw
(PCGrad's orders, RLW's weights), the step of each call or optimizer step:
:meth:`WeightStep.at_step` holds the one "new seed every step" rule.

Which solver runs for T tasks and each method's task limits are read from the method
registry (:class:`~bucketmoo_kernels.methods.registry.Method`); :meth:`WeightStep.native_codes`
turns them into the integer codes of the native weight step (``csrc/common/bucketmoo_solvers.h``,
``solver::WeightStep``), so no backend repeats those rules.

:func:`compute_weights` is the step itself, in one place for every backend: the backend's
native weight step when it has one for this configuration, else normalise in float64, the
backend's solver (or the method's torch function), undo the scales, rescale to sum 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import torch

from .methods.normalization import (NORMALIZATIONS, USES_LOSSES, check_normalization, loss_table,
                                    scales_from_table)
from .methods.registry import Method, get_method, resolve_options, split_common_options

if TYPE_CHECKING:  # pragma: no cover
    from .backend import Backend

__all__ = ["WeightStep", "NativeCodes", "compute_weights", "as_weight_step"]


class NativeCodes(NamedTuple):
    """The ``<method>`` arguments of the native ``weights`` / ``fused_`` ops, in schema order
    (``python/bucketmoo_ops.h``): ``solver::WeightStep`` of ``csrc/common/bucketmoo_solvers.h``.

    ``method``: solver::Method code (registry ``native_code``); ``solver``: the MGDA solver
    that runs for this T, already resolved (never 0 = auto); ``normalization``: its index in
    :data:`~bucketmoo_kernels.methods.normalization.NORMALIZATIONS`. ``max_iter``, ``tol``,
    ``c`` and ``rescale`` are the method's option slots: MGDA's ``max_iter``/``tol``, CAGrad's
    ``c``/``rescale``; UPGrad and DualProj pass ``max_iter``, ``norm_eps`` as ``tol`` and
    ``reg_eps`` as ``c``.
    """

    method: int
    solver: int = 0
    max_iter: int = 0
    tol: float = 0.0
    c: float = 0.0
    rescale: int = 0
    normalization: int = 0
    normalize_weights: bool = True


@dataclass(frozen=True, eq=False)
class WeightStep:
    """Method, resolved options, normalisation and ``normalize_weights``, validated once.

    Args:
        method: a registered method name (or its :class:`Method`).
        options: the method's options; missing ones take the method's defaults, unknown
            ones raise ``TypeError``.
        normalization: ``none``, ``l2``, ``loss`` or ``loss+`` (``ValueError`` otherwise).
        normalize_weights: rescale the weights to sum to 1 (where the sum is > 0).

    Attributes:
        method: the registry's :class:`Method`; ``options``: read-only resolved options.
    """

    method: Method
    options: Mapping[str, Any] = field(default_factory=dict)
    normalization: str = "none"
    normalize_weights: bool = True

    def __post_init__(self) -> None:
        method = self.method if isinstance(self.method, Method) else get_method(self.method)
        options = self.options
        if not isinstance(options, Mapping):
            raise TypeError(f"options must be a mapping of the method's options; got {type(options).__name__}")
        check_normalization(self.normalization)
        if not isinstance(self.normalize_weights, bool):
            raise TypeError(f"normalize_weights must be a bool; got {type(self.normalize_weights).__name__}")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "options", MappingProxyType(resolve_options(method, dict(options))))

    # ------------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        """The method's name."""
        return self.method.name

    @property
    def needs_state(self) -> bool:
        """Whether the step keeps state across calls (a stateful method, or ``ema`` > 0): it
        then needs a ``method_state`` and runs the method's torch function."""
        return self.method.stateful or float(self.options.get("ema", 0.0)) > 0

    @property
    def uses_losses(self) -> bool:
        """Whether the normalisation needs the per-task losses (``loss``, ``loss+``)."""
        return self.normalization in USES_LOSSES

    def with_options(self, **options: Any) -> "WeightStep":
        """A copy with some options replaced, validated."""
        return replace(self, options={**self.options, **options})

    @property
    def draws(self) -> bool:
        """Whether the method draws random numbers from a ``seed`` option (``random``,
        ``pcgrad``, ``gradvac``, ``graddrop``)."""
        return "seed" in self.method.options

    def at_step(self, step: int) -> "WeightStep":
        """The rule "a new draw every step, the same on every rank", in one place: for a
        method that draws (:attr:`draws`), a copy whose seed is ``seed + step``; else this
        step. The distributed front ends pass the optimizer step; :func:`compute_weights` and
        the element-wise combine pass ``method_state.calls`` (except for a stateful method,
        which reads the counter of its state itself: GradVac)."""
        if not self.draws or int(step) == 0:
            return self
        return self.with_options(seed=int(self.options["seed"]) + int(step))

    def for_call(self, method_state) -> "WeightStep":
        """:meth:`at_step` of ``method_state``'s call counter (a fresh draw per call of the
        functional API) for a method that draws and keeps no state; else this step."""
        if method_state is None or not self.draws or self.method.stateful:
            return self
        from .methods.state import require_state
        return self.at_step(require_state(method_state, self.name).calls)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (f"WeightStep({self.name!r}, {{{opts}}}, normalization={self.normalization!r}, "
                f"normalize_weights={self.normalize_weights})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightStep):
            return NotImplemented
        return (self.method is other.method and dict(self.options) == dict(other.options)
                and self.normalization == other.normalization
                and self.normalize_weights == other.normalize_weights)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.options.items())), self.normalization,
                     self.normalize_weights))

    # ------------------------------------------------------------------ per T
    def check_tasks(self, num_tasks: int) -> None:
        """``ValueError`` when the method does not take ``num_tasks`` tasks with these options
        (the record's task limits and per-task option lengths: :meth:`Method.check_tasks`)."""
        self.method.check_tasks(num_tasks, self.options)

    def triton_solver(self, num_tasks: int) -> tuple[bool, str | None]:
        """``(runs, solver)``: whether a Triton kernel solves this method for T tasks (the
        record's ``triton_max_tasks`` for the solver that runs), and which solver."""
        limits = self.method.triton_max_tasks
        if limits is None or self.method.stateful:
            return False, None
        solver = self.solver(num_tasks)
        if solver not in limits:
            return False, solver
        most = limits[solver]
        return most is None or num_tasks <= most, solver

    def solver(self, num_tasks: int) -> str | None:
        """The solver that runs for T tasks (MGDA: ``closed_form``/``exact``/``pgd``), or
        None for a method with one solver."""
        if self.method.solver_for is None:
            return None
        return self.method.solver_for(num_tasks, self.options)

    def native_codes(self, num_tasks: int) -> NativeCodes | None:
        """The native weight step's codes for T tasks, or None where it does not run this
        configuration (no native solver, T above its limit, options it rejects): the
        method's torch function then runs."""
        method = self.method
        if method.native_code is None or method.native_args is None or self.needs_state:
            return None
        if method.native_max_tasks is not None and num_tasks > method.native_max_tasks:
            return None
        fields = method.native_args(num_tasks, self.options)
        if fields is None:
            return None
        return NativeCodes(method=method.native_code, **fields,
                           normalization=NORMALIZATIONS.index(self.normalization),
                           normalize_weights=self.normalize_weights)

    def loss_table(self, losses, num_segments: int, num_tasks: int,
                   device: torch.device) -> torch.Tensor | None:
        """The checked losses as float64 ``[S, T]`` on ``device`` when the normalisation uses
        them, else None (``losses`` is then ignored). ``ValueError`` naming ``losses`` for a
        missing, wrong-length, negative, NaN or infinite loss."""
        if not self.uses_losses:
            return None
        return loss_table(losses, self.normalization, num_segments, num_tasks, device)


def as_weight_step(weight_step: WeightStep | None, method, normalization: str,
                   normalize_weights: bool, options: dict[str, Any]) -> WeightStep:
    """The API's keyword arguments as one :class:`WeightStep`; a prebuilt ``weight_step``
    is used as it is (then the loose arguments must be left at their defaults)."""
    if weight_step is None:
        return WeightStep(method, options, normalization=normalization,
                          normalize_weights=normalize_weights)
    if not isinstance(weight_step, WeightStep):
        raise TypeError(f"weight_step must be a WeightStep or None; got {type(weight_step).__name__}")
    if options or normalization != "none" or normalize_weights is not True or method not in (
            "mgda", weight_step.name):
        raise TypeError("pass either weight_step=WeightStep(...) or method/normalization/"
                        "normalize_weights/options, not both")
    return weight_step


def compute_weights(gram: torch.Tensor, step: WeightStep, losses: torch.Tensor | None,
                    backend: "Backend", method_state=None) -> torch.Tensor:
    """The weight step: ``gram [S, T, T]`` float32 -> ``[S, T]`` float32.

    ``losses`` is the table from :meth:`WeightStep.loss_table` (None unless the normalisation
    uses it). Runs the backend's native weight step where it has one for this configuration;
    otherwise normalises in float64, runs the backend's solver (or the method's torch
    function), divides by the scales and rescales to sum 1 if asked. A step that keeps state
    (:attr:`WeightStep.needs_state`) runs the torch function with ``method_state`` (a
    :class:`~bucketmoo_kernels.methods.state.MethodState`, required) and applies ``ema``.
    """
    step = step.for_call(method_state)  # a fresh draw (RLW weights, PCGrad orders) every call
    state = None
    finish = step.method.finish
    if step.needs_state:
        from .methods.state import require_state
        state = require_state(method_state, step.name)
    else:
        weights = backend.weights(gram, step, losses)
        if weights is not None:
            if finish is not None:
                weights = finish(gram, weights, step.options)
            if method_state is not None:
                method_state.calls += 1
            return nan_where_not_finite(gram, weights)
    gram64 = gram.to(torch.float64)
    scales = scales_from_table(gram64, step.normalization, losses)
    if scales is not None:
        gram64 = gram64 / (scales[:, :, None] * scales[:, None, :])
    own, common = split_common_options(step.options)
    if step.method.stateful:
        weights = step.method.fn(gram64, state=state, **own)
    else:
        weights = backend.solve(gram64, step)
        if weights is None:
            weights = step.method.fn(gram64, **own)
        elif finish is not None:
            weights = finish(gram64, weights, step.options)
    weights = weights.to(torch.float64)
    if common["ema"] > 0:
        # a segment whose Gram is not finite is not remembered, whatever the method returned
        weights = nan_where_not_finite(gram, weights)
        from .methods.ema import smooth_weights
        weights = smooth_weights(weights, float(common["ema"]), state)
    if method_state is not None:
        method_state.calls += 1
    if scales is not None:
        weights = weights / scales
    if step.normalize_weights:
        total = weights.sum(-1, keepdim=True)
        weights = torch.where(total > 0, weights / torch.where(total > 0, total, 1.0), weights)
    return nan_where_not_finite(gram, weights.to(torch.float32))


def nan_where_not_finite(gram: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The one non-finite policy of every backend (the native weight step applies the same,
    ``solver::nan_weights_if_not_finite``): a segment whose Gram is not finite (a NaN/Inf
    gradient, or squares that overflow float32) gets NaN weights, so its combined gradient is
    NaN and a GradScaler-style check sees it. No host sync."""
    finite = torch.isfinite(gram).flatten(1).all(-1)
    return torch.where(finite[:, None], weights, torch.full_like(weights, float("nan")))

