"""The conflict profiler: where do the tasks' gradients conflict in a model, and would
bucket-level multi-objective weighting change the update? See ``docs/profile.md``.

* :func:`profile_conflicts` (:mod:`.conflicts`) -- the measurement, on one process or across
  a process group;
* :class:`ConflictReport`, :class:`SegmentRecord` (:mod:`.report`) -- the result, its summary,
  Markdown, JSON and plots (:mod:`.plot`, matplotlib imported when called);
* :mod:`.layout` -- the segments of each granularity and the layer of each parameter;
* ``python -m bucketmoo_kernels.profile`` (:mod:`.__main__`) -- the command line, on the
  demo's byte model or a Transformers model built from a config.
"""

from .conflicts import profile_conflicts
from .report import ConflictReport, SegmentRecord

__all__ = ["ConflictReport", "SegmentRecord", "profile_conflicts"]
