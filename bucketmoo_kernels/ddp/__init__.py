"""Bucket-Level MOO inside DDP: a communication hook and its state.

    from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook
    state = BucketMOOState(method="mgda", mode="ranks", granularity="bucket")
    ddp_model.register_comm_hook(state, bucket_moo_hook)

See ``docs/ddp.md`` for the modes, protocols, costs and DDP pitfalls. The state, the
protocol and the collectives live in :mod:`bucketmoo_kernels.distributed`, shared with the
FSDP2 path; the names below are importable from here too (the modules ``state``, ``protocol``,
``collectives`` and ``diagnostics`` live only in ``bucketmoo_kernels.distributed``).
"""

from ..distributed import collectives, protocol
from ..distributed.diagnostics import BucketRecord, DiagnosticsLog
from ..distributed.protocol import TaskLayout
from ..distributed.state import BucketMOOState
from .hook import bucket_moo_hook

__all__ = ["BucketMOOState", "BucketRecord", "DiagnosticsLog", "TaskLayout", "bucket_moo_hook",
           "collectives", "protocol"]
