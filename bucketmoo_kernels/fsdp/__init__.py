"""Bucket-Level MOO under FSDP2 sharding: a custom reduce-scatter per parameter group.

    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.fsdp import apply_bucket_moo
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    apply_bucket_moo(model, BucketMOOState(method="mgda", mode="ranks", granularity="bucket"))

See docs/fsdp.md.
"""

from .apply import apply_bucket_moo, fsdp_supports_custom_reduce_scatter
from .reduce_scatter import BucketMOOReduceScatter, reduce_output_scale

__all__ = ["BucketMOOReduceScatter", "apply_bucket_moo", "fsdp_supports_custom_reduce_scatter",
           "reduce_output_scale"]
