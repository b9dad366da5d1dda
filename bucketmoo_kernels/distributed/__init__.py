"""The distributed layer shared by the DDP hook (:mod:`bucketmoo_kernels.ddp`) and the FSDP2
reduce-scatter (:mod:`bucketmoo_kernels.fsdp`).

* :mod:`.collectives` -- one name per collective whatever the torch version; backend checks.
* :mod:`.protocol` -- the tasks-on-ranks protocols on flat tensors (DESIGN.md §4A).
* :mod:`.settings` -- :class:`MOOSettings`, what is computed (frozen, validated).
* :mod:`.runtime` -- :class:`MOORuntime`, caches, method states, the stash step machine, counters.
* :mod:`.state` -- :class:`BucketMOOState` = settings + runtime (+ the process group).
* :mod:`.engine` -- :class:`BucketEngine`, the per-bucket work every front end shares.
* :mod:`.localhost` -- a free port for process groups on one machine.
* :mod:`.agreement` -- every rank runs the same settings (one tiny all-gather).
* :mod:`.bucket_layout` -- DDP's rebuilt bucket layout, for its first iteration.
* :mod:`.diagnostics` -- per-step, per-bucket records.
"""

from . import collectives, protocol
from .agreement import SettingsMismatch, agree_settings
from .diagnostics import BucketRecord, DiagnosticsLog
from .engine import BucketEngine, PendingBucket
from .protocol import TaskLayout
from .runtime import MOORuntime
from .settings import MOOSettings
from .state import BucketMOOState

__all__ = ["BucketEngine", "BucketMOOState", "BucketRecord", "PendingBucket", "DiagnosticsLog", "MOORuntime", "MOOSettings", "SettingsMismatch",
           "TaskLayout", "agree_settings", "collectives", "protocol"]
