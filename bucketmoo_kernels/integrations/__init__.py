"""Optional integrations with training engines; each module imports its framework lazily.

* :mod:`.transformers` -- ``BucketMOOTrainer``, an HF ``transformers.Trainer``, and
  ``BucketMOOTrainerMixin``, the same behaviour for any Trainer subclass (extra ``[hf]``).
* :mod:`.trl` -- ``BucketMOOSFTTrainer``, TRL's ``SFTTrainer`` with the mixin (extra ``[trl]``).
* :mod:`.accelerate` -- register the hook on a model prepared by HF Accelerate (extra ``[hf]``).
* :mod:`.lightning` -- ``BucketMOOStrategy``, a Lightning ``DDPStrategy`` (extra ``[lightning]``).
* :mod:`.deepspeed` -- ``apply_bucket_moo`` on a DeepSpeed ZeRO-1/2 engine (extra ``[deepspeed]``).

Importing this package imports none of the frameworks: ``import
bucketmoo_kernels.integrations.transformers`` does, and raises an ``ImportError`` naming the
pip extra when the framework is missing. See ``docs/integrations.md``.
"""

__all__ = ["accelerate", "deepspeed", "lightning", "transformers", "trl"]
