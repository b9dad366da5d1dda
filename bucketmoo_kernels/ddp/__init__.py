"""Bucket-Level MOO inside DDP: a communication hook and its state.

    from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook
    state = BucketMOOState(method="mgda", mode="ranks", granularity="bucket")
    ddp_model.register_comm_hook(state, bucket_moo_hook)

See ``docs/ddp.md`` for the modes, protocols, costs and DDP pitfalls. :mod:`.protocol`
holds the tasks-on-ranks protocol on flat tensors (reused by the FSDP2 path).
"""

from . import collectives, protocol
from .diagnostics import BucketRecord, DiagnosticsLog
from .hook import bucket_moo_hook
from .protocol import TaskLayout
from .state import BucketMOOState

__all__ = ["BucketMOOState", "BucketRecord", "DiagnosticsLog", "TaskLayout", "bucket_moo_hook",
           "collectives", "protocol"]
