"""Optional integrations with training engines (each imported lazily by its own module).

* :mod:`.deepspeed` -- ``apply_bucket_moo(engine, state)`` for DeepSpeed ZeRO stages 0-2.
* :mod:`.lightning` -- ``BucketMOOStrategy``, a Lightning ``DDPStrategy`` that runs the hook.

Importing this package imports no framework; each submodule raises an ImportError naming
the pip extra when its framework is missing.
"""
