"""``MOOSettings``: what the distributed front ends (DDP hook, FSDP2 reduce-scatter) compute.

A frozen, validated value: every option is checked for its type and range when it is built
(``overlap="false"`` is refused, not read as True; ``task_of_rank=[0, 1, 0.7]`` is refused,
not truncated), with a message that names the option. The settings that every rank must
share are listed in :data:`AGREED` and hashed by :meth:`MOOSettings.digest`;
:mod:`.agreement` compares them across ranks on the first reduction.
"""

from __future__ import annotations

import hashlib
import math
import operator
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..dispatch import BACKEND_NAMES
from ..methods import NORMALIZATIONS, get_method
from ..methods.elementwise import is_elementwise
from ..weight_step import WeightStep

def _is_numpy_bool(value) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


__all__ = ["MOOSettings", "MODES", "PROTOCOLS", "COMPRESSIONS", "STASH_REDUCTIONS", "AGREED",
           "parse_granularity", "check_bool", "check_int", "check_elementwise_support", "settings_dict",
           "settings_from_dict", "settings_differences"]

MODES = ("ranks", "stash")
PROTOCOLS = ("sharded", "allgather")
COMPRESSIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
STASH_REDUCTIONS = ("tasks", "combined")



def parse_granularity(granularity: str) -> tuple[str, int | None]:
    """``"bucket" | "param" | "global" | "chunk:<n>"`` -> (kind, chunk length or None)."""
    if granularity in ("bucket", "param", "global"):
        return granularity, None
    if isinstance(granularity, str) and granularity.startswith("chunk:"):
        try:
            n = int(granularity.split(":", 1)[1])
        except ValueError:
            n = 0
        if n > 0:
            return "chunk", n
    raise ValueError(
        "granularity must be 'bucket', 'param', 'global' or 'chunk:<n>' with a positive element count n; "
        f"got {granularity!r}"
    )


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a real bool (``True``/``False``, numpy bools), else ``TypeError`` naming ``name``."""
    if isinstance(value, bool) or _is_numpy_bool(value):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False); got {value!r} of type {type(value).__name__}")


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool, not a float), else ``TypeError``;
    ``ValueError`` below ``minimum``. Messages name ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got the bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {value!r} of type {type(value).__name__}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {number}")
    return number


def _check_bucket_cap(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"bucket_cap_mb must be None (DDP's default, 25) or a positive number of MiB, the "
                         f"same as DistributedDataParallel(bucket_cap_mb=...); got {value!r}")
    return float(value)


def check_elementwise_support(method: str, mode: str, protocol: str, granularity: str,
                              method_options: dict[str, Any]) -> None:
    """``ValueError`` when element-wise ``method`` (graddrop, trimmed_mean) cannot run with
    these settings; nothing for the other methods.

    An element-wise method is not a function of the Gram: it needs every task's whole value of
    each element on the rank that combines it, and it has no per-segment weights. So it runs
    with ``protocol="allgather"`` (tasks on ranks) or ``mode="stash"``, not with the sharded
    protocol (whose ranks hold only the all-reduced Gram and their own shards), not with
    ``granularity="global"`` (one weight vector for the model) and not with ``ema`` (weight
    smoothing).
    """
    if not is_elementwise(method):
        return
    if mode == "ranks" and protocol == "sharded":
        raise ValueError(
            f"method={method!r} is element-wise (not a function of the Gram matrix) and cannot run with "
            f"protocol={protocol!r}, whose ranks solve weights from the all-reduced Gram and combine only "
            "their own shard; use protocol='allgather' (every rank gathers the whole bucket of every task) "
            "or mode='stash'")
    if granularity == "global":
        raise ValueError(
            f"method={method!r} is element-wise: it has no weight vector to share over the model, so "
            "granularity='global' does not apply; use granularity='bucket' (the granularity does not change "
            "an element-wise combine)")
    ema = method_options.get("ema", 0.0)
    if isinstance(ema, (int, float)) and not isinstance(ema, bool) and ema > 0:
        raise ValueError(f"option ema smooths per-segment weights; element-wise method={method!r} has none "
                         f"(got ema={ema!r})")


@dataclass(frozen=True)
class MOOSettings:
    """The validated settings of :class:`~bucketmoo_kernels.distributed.BucketMOOState`.

    See the ``BucketMOOState`` docstring for what each setting means. Built once; equal
    settings compare and hash equal.
    """

    # ``metadata["agreed"]``: the family of settings the ranks compare it in (see :data:`AGREED`);
    # None: not compared (it changes no number and no collective).
    method: str = field(default="mgda", metadata={"agreed": "method"})
    method_options: tuple[tuple[str, Any], ...] = field(default=(), metadata={"agreed": "method"})
    granularity: str = field(default="bucket", metadata={"agreed": "granularity"})
    normalization: str = field(default="none", metadata={"agreed": "normalization"})
    normalize_weights: bool = field(default=True, metadata={"agreed": "normalize_weights"})
    mode: str = field(default="ranks", metadata={"agreed": "mode"})
    task_of_rank: tuple[int, ...] | None = field(default=None, metadata={"agreed": "task_of_rank"})
    num_tasks: int | None = field(default=None, metadata={"agreed": "mode"})
    protocol: str = field(default="sharded", metadata={"agreed": "protocol"})
    compress: str | None = field(default=None, metadata={"agreed": "compress"})
    stash_reduce: str = field(default="tasks", metadata={"agreed": "mode"})
    overlap: bool = field(default=True, metadata={"agreed": "overlap"})
    backend: str = field(default="auto", metadata={"agreed": "backend"})
    # changes the collectives of method='mean' (plain_average)
    record_diagnostics: bool = field(default=False, metadata={"agreed": "record_diagnostics"})
    max_diagnostic_steps: int = field(default=1000, metadata={"agreed": None})
    bucket_cap_mb: float | None = field(default=None, metadata={"agreed": "bucket_cap_mb"})
    _weight_step: WeightStep = field(default=None, compare=False, repr=False, hash=False)  # type: ignore[assignment]

    @classmethod
    def build(cls, method: str = "mgda", mode: str = "ranks", granularity: str = "bucket",
              task_of_rank: Sequence[int] | None = None, *, num_tasks: int | None = None,
              protocol: str = "sharded", compress: str | None = None, stash_reduce: str = "tasks",
              normalization: str = "none", normalize_weights: bool = True, overlap: bool = True,
              backend: str = "auto", record_diagnostics: bool = False, max_diagnostic_steps: int = 1000,
              bucket_cap_mb: float | None = None, **method_options: Any) -> "MOOSettings":
        """Validate every argument (errors name it) and return the frozen settings."""
        get_method(method)  # ValueError listing the known methods
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        parse_granularity(granularity)
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}; got {protocol!r}")
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress must be None, 'bf16' or 'fp16'; got {compress!r}")
        if compress is not None and mode != "ranks":
            raise ValueError(f"compress={compress!r} applies to mode='ranks' (the exchanged shards); "
                             f"got mode={mode!r}")
        if stash_reduce not in STASH_REDUCTIONS:
            raise ValueError(f"stash_reduce must be one of {STASH_REDUCTIONS}; got {stash_reduce!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}; got {backend!r}")
        if num_tasks is not None:
            try:
                num_tasks = check_int("num_tasks", num_tasks, minimum=1)
            except (TypeError, ValueError):
                raise ValueError(f"num_tasks must be a positive int or None; got {num_tasks!r}") from None
        normalize_weights = check_bool("normalize_weights", normalize_weights)
        overlap = check_bool("overlap", overlap)
        record_diagnostics = check_bool("record_diagnostics", record_diagnostics)
        try:
            max_diagnostic_steps = check_int("max_diagnostic_steps", max_diagnostic_steps, minimum=1)
        except (TypeError, ValueError):
            raise ValueError(f"max_diagnostic_steps must be a positive int; got {max_diagnostic_steps!r}") from None
        bucket_cap_mb = _check_bucket_cap(bucket_cap_mb)
        # The weight step, built once: the method's options resolved and their values checked
        # (TypeError / ValueError naming the option).
        weight_step = WeightStep(method, method_options, normalization=normalization,
                                 normalize_weights=normalize_weights)
        check_elementwise_support(method, mode, protocol, granularity, method_options)
        if mode == "stash":
            if num_tasks is None:
                raise ValueError("mode='stash' needs num_tasks (how many backward passes, one per task, "
                                 "make one optimizer step)")
            if task_of_rank is not None:
                raise ValueError("task_of_rank applies to mode='ranks'; in mode='stash' every rank "
                                 "back-propagates every task")
        if task_of_rank is not None:
            if isinstance(task_of_rank, (str, bytes)) or not hasattr(task_of_rank, "__iter__"):
                raise TypeError(f"task_of_rank must be a sequence of ints (one task id per rank); "
                                f"got {task_of_rank!r}")
            ids = []
            for rank, task in enumerate(task_of_rank):
                try:
                    ids.append(check_int(f"task_of_rank[{rank}]", task))
                except TypeError as exc:
                    raise TypeError(f"task_of_rank must hold int task ids; {exc}") from None
            bad = [(r, t) for r, t in enumerate(ids) if t < 0 or (num_tasks is not None and t >= num_tasks)]
            if bad:
                limit = f"[0, {num_tasks})" if num_tasks is not None else ">= 0"
                raise ValueError(f"task_of_rank entries must be task ids {limit}; rank {bad[0][0]} has "
                                 f"task id {bad[0][1]}")
            task_of_rank = tuple(ids)
        # the method's task limits (krum, trimmed_mean, per-task option lengths) where T is known
        # now; else (one task per rank) at the first reduction
        known_tasks = num_tasks if num_tasks is not None else (
            max(task_of_rank) + 1 if task_of_rank else None)
        if known_tasks is not None:
            weight_step.check_tasks(known_tasks)
        checked = {**locals(), "method_options": tuple(sorted(method_options.items()))}
        settings = cls(**{f.name: checked[f.name] for f in SETTING_FIELDS})
        object.__setattr__(settings, "_weight_step", weight_step)
        return settings

    # ------------------------------------------------------------------ derived values
    @property
    def options(self) -> dict[str, Any]:
        """The method options as given (not the defaults)."""
        return dict(self.method_options)

    @property
    def weight_step(self) -> WeightStep:
        """The :class:`~bucketmoo_kernels.weight_step.WeightStep` (method, resolved options,
        normalisation, ``normalize_weights``), built once; see :meth:`weight_step_at`."""
        return self._weight_step

    def weight_step_at(self, step: int) -> WeightStep:
        """The weight step of optimizer step ``step``: :attr:`weight_step`, or for a method with a
        ``seed`` option a copy whose seed is ``seed + step`` (same on every rank, new every step)."""
        return self._weight_step.at_step(step)

    @property
    def granularity_kind(self) -> tuple[str, int | None]:
        return parse_granularity(self.granularity)

    @property
    def wire_dtype(self) -> torch.dtype | None:
        return COMPRESSIONS[self.compress]

    @property
    def plain_average(self) -> bool:
        """``mean`` with nothing that needs the MOO protocol (no normalisation, compression or
        diagnostics): the engine's own average (DDP's all-reduce, FSDP's reduce-scatter) runs
        instead, bit-identical to training without bucketmoo."""
        return (self.method == "mean" and self.normalization == "none" and self.compress is None
                and not self.record_diagnostics)

    def method_call_options(self, step: int) -> dict[str, Any]:
        """The method options for optimizer step ``step`` (a ``seed`` option becomes ``seed + step``,
        the same on every rank and different every step)."""
        options = self.options
        step_of = self.weight_step_at(step)
        if step_of.draws:
            options["seed"] = step_of.options["seed"]
        return options

    # ------------------------------------------------------------------ agreement across ranks
    def setting_value(self, name: str) -> Any:
        """Field ``name`` as plain Python data; ``method_options``: the resolved options (the
        method's defaults overlaid with the given ones), so that an option given at its default
        equals one left out."""
        if name == "method_options":
            return tuple(sorted(self._weight_step.options.items()))
        return getattr(self, name)

    def agreed_values(self) -> dict[str, Any]:
        """The value of every :data:`AGREED` family, as plain Python data (printable per rank)."""
        values: dict[str, list] = {}
        for f in SETTING_FIELDS:
            family = f.metadata["agreed"]
            if family is not None:
                values.setdefault(family, []).append(self.setting_value(f.name))
        return {family: v[0] if len(v) == 1 else tuple(v) for family, v in values.items()}

    def digest(self) -> list[int]:
        """One signed 63-bit hash per :data:`AGREED` family (stable across processes)."""
        values = self.agreed_values()
        return [int.from_bytes(hashlib.sha256(repr(values[name]).encode()).digest()[:8], "little") >> 1
                for name in AGREED]


#: The settings' fields (not the private weight step): what state_dict, the digest and the
#: comparison of a checkpoint with a built state go over.
SETTING_FIELDS = tuple(f for f in dataclasses.fields(MOOSettings) if not f.name.startswith("_"))

#: The setting families every rank must agree on (checked on the first reduction), from the
#: fields' ``agreed`` metadata: a difference in any of them gives wrong gradients or mismatched
#: collectives.
AGREED = tuple(dict.fromkeys(f.metadata["agreed"] for f in SETTING_FIELDS if f.metadata["agreed"] is not None))


def settings_dict(settings: MOOSettings) -> dict[str, Any]:
    """The settings as the plain data of ``BucketMOOState.state_dict()`` (one key per field;
    ``method_options`` as the dict of the options given)."""
    out = {f.name: getattr(settings, f.name) for f in SETTING_FIELDS}
    out["method_options"] = settings.options
    return out


def settings_from_dict(saved: dict[str, Any]) -> MOOSettings:
    """:func:`settings_dict` output (or a version-1 checkpoint, without the newer fields) back to
    validated settings; ``ValueError`` naming an unknown key."""
    names = {f.name for f in SETTING_FIELDS}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ValueError(f"state_dict has unknown settings {unknown}; expected some of {sorted(names)}")
    kwargs = {k: v for k, v in saved.items() if k != "method_options"}
    return MOOSettings.build(**kwargs, **dict(saved.get("method_options") or {}))


def settings_differences(a: MOOSettings, b: MOOSettings, ignore: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(name, value in a, value in b)`` for every field where ``a`` and ``b`` differ (method
    options compared resolved, shown as given)."""
    out = []
    for f in SETTING_FIELDS:
        if f.name in ignore or a.setting_value(f.name) == b.setting_value(f.name):
            continue
        if f.name == "method_options":
            out.append((f.name, a.options, b.options))
        else:
            out.append((f.name, getattr(a, f.name), getattr(b, f.name)))
    return out
