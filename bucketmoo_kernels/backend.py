"""What a kernel backend is: the :class:`Backend` base class.

Every backend (``torch`` in :mod:`.reference`, ``cpu``/``cuda`` in :mod:`.native`, ``triton``)
subclasses it; :mod:`.dispatch` registers them and picks one. Kept apart from the dispatch so
that the reference backend, which the dispatch always registers, does not import it back.
``step`` is a :class:`bucketmoo_kernels.weight_step.WeightStep` (named, not imported: the
weight step calls the backend, not the other way round).
"""

from __future__ import annotations

import torch

from .inputs import Segments, TaskGrads

__all__ = ["Backend"]


class Backend:
    """What a backend is: subclass it and override the required members.

    Required: ``name``, :meth:`unavailable_reason`, :meth:`gram`, :meth:`combine`.
    Optional (the defaults return None, which means "this backend has no faster path for
    this call"; the API then takes the next one):

    * :meth:`solve`   the method's solver on the normalised float64 Gram;
    * :meth:`weights` the whole weight step natively (normalisation, method, rescale);
    * :meth:`fused`   Gram, weights and combine in one sweep over the gradients.

    Shapes: ``grads`` T rows of N (:class:`~bucketmoo_kernels.inputs.TaskGrads`),
    ``segments`` S segments, ``gram`` ``[S, T, T]``, ``weights`` ``[S, T]``, ``out`` ``[N]``
    in the grads' dtype, checked by the API (it may be the storage of one gradient row, never
    a partial overlap). ``losses`` is the checked float64 ``[S, T]`` table of
    :meth:`WeightStep.loss_table`, or None when the normalisation does not use losses.
    """

    #: the name ``backend=`` selects it by
    name: str = ""

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``, else why not (shown to the user)."""
        raise NotImplementedError

    def gram(self, grads: TaskGrads, segments: Segments) -> torch.Tensor:
        """``[S, T, T]`` float32 per-segment Gram matrices, accumulated in >= float32."""
        raise NotImplementedError

    def combine(self, grads: TaskGrads, weights: torch.Tensor, segments: Segments,
                out: torch.Tensor) -> None:
        """Write ``out[n] = sum_t weights[s(n), t] * grads[t][n]`` (weights float32 ``[S, T]``)."""
        raise NotImplementedError

    def solve(self, gram: torch.Tensor, step) -> torch.Tensor | None:
        """``[S, T]`` float64 weights of ``step``'s method in its paper scale from the
        normalised float64 ``gram``, or None: the method's torch function runs."""
        return None

    def weights(self, gram: torch.Tensor, step,
                losses: torch.Tensor | None) -> torch.Tensor | None:
        """The whole weight step, ``[S, T, T]`` float32 -> ``[S, T]`` float32, or None: the
        API runs it around :meth:`solve` (see ``weight_step.compute_weights``)."""
        return None

    def fused(self, grads: TaskGrads, segments: Segments, out: torch.Tensor, step,
              losses: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Gram, weights and combine in one sweep, writing ``out``; ``(gram, weights)``, or
        None with nothing written: the API runs gram, the weight step and combine. Called
        only where writing ``out`` before the whole Gram is known is allowed."""
        return None
