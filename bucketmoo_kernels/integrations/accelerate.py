"""Bucket-Level MOO with HF Accelerate (extra ``[hf]``).

Accelerate has no place for a custom comm hook: ``DistributedDataParallelKwargs(comm_hook=...)``
takes only its own ``DDPCommunicationHookType`` enum (no hook, fp16, bf16, PowerSGD and their
batched variants). The recipe is therefore the plain PyTorch one on the model Accelerate
returns, which is a ``DistributedDataParallel`` on a multi-process launch::

    accelerator = Accelerator()
    model, optimizer = accelerator.prepare(model, optimizer)
    state = BucketMOOState(method="mgda")
    register_bucket_moo(accelerator, model, state)       # model.register_comm_hook(state, bucket_moo_hook)
    loader = task_dataloader(accelerator, {"de": ds_de, "fr": ds_fr}, batch_size=8, state=state)
    accelerator.register_for_checkpointing(state)        # saved by save_state, restored by load_state
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                optimizer.zero_grad()

Do not pass the task loader to ``accelerator.prepare``: Accelerate would shard it across all
ranks again, and rank r must read only its own task. :func:`register_bucket_moo` does the
checks: a DDP model (else a clear error), DeepSpeed engines go to
:mod:`bucketmoo_kernels.integrations.deepspeed`, FSDP is refused.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..data import task_dataloader as _task_dataloader
from ._common import plan_for_state, register_ddp_hook, require

_accelerate = require("accelerate", "hf", "bucketmoo_kernels.integrations.accelerate")

__all__ = ["register_bucket_moo", "task_dataloader"]


def register_bucket_moo(accelerator, model: torch.nn.Module, state) -> torch.nn.Module:
    """Register ``bucket_moo_hook`` with ``state`` on the model ``accelerator.prepare`` returned.

    Call it before the first backward. Returns ``model``.

    Raises:
        TypeError: the model is not a ``DistributedDataParallel`` (a single-process launch, or
            ``accelerator.prepare`` was not called on it).
        NotImplementedError: Accelerate runs FSDP.
        RuntimeError: DeepSpeed without :mod:`bucketmoo_kernels.integrations.deepspeed`.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        raise NotImplementedError("register_bucket_moo does not handle Accelerate's FSDP; use plain DDP, "
                                  "DeepSpeed ZeRO-1/2, or bucketmoo_kernels.fsdp.apply_bucket_moo on an FSDP2 "
                                  "model in your own loop")
    if kind == DistributedType.DEEPSPEED:
        try:
            from .deepspeed import apply_bucket_moo
        except ImportError as exc:
            raise RuntimeError("Accelerate runs DeepSpeed: Bucket-Level MOO needs "
                               f"bucketmoo_kernels.integrations.deepspeed ({exc})") from exc
        apply_bucket_moo(model, state)
        return model
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"accelerator.prepare returned a {type(model).__name__}, not a DistributedDataParallel: "
                        f"{_launch_advice(accelerator)}")
    register_ddp_hook(model, state, "accelerator.prepare")
    return model


def _launch_advice(accelerator) -> str:
    """What the launch lacks for one process per rank, and the launch lines that give it."""
    launched = _launched_world()
    cpu_launch = ("on a machine without GPUs create Accelerator(cpu=True) and launch with torchrun "
                  "--nproc-per-node P script.py or accelerate launch --multi_gpu --num_processes P script.py "
                  "(plain accelerate launch --num_processes P starts one process there)")
    if launched > 1:
        return (f"{launched} processes were launched but the Accelerator sees {accelerator.num_processes} "
                f"(distributed_type={accelerator.distributed_type}); {cpu_launch}")
    return ("this is a single-process run, and Bucket-Level MOO needs one process per rank with one task per "
            f"rank. On GPUs: accelerate launch --num_processes P script.py; {cpu_launch}")


def _launched_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def task_dataloader(accelerator, datasets: Mapping[str, Any], batch_size: int = 1, *, state=None,
                    task_of_rank: Sequence[int | str] | None = None, seed: int = 0,
                    epoch_length: str | int = "max", **loader_kwargs: Any):
    """This process's loader over its own task (:func:`bucketmoo_kernels.data.task_dataloader`).

    The task plan comes from ``task_of_rank``, else ``state.task_of_rank``, else contiguous
    blocks of ranks; a ``state`` without ``task_of_rank`` is given the plan's. The loader
    yields CPU batches and must not go through ``accelerator.prepare``. ``loader.plan`` is
    the :class:`~bucketmoo_kernels.data.TaskPlan`.
    """
    if _launched_world() != accelerator.num_processes:
        raise RuntimeError(f"task_dataloader: {_launch_advice(accelerator)}")
    plan = plan_for_state(datasets, state, accelerator.num_processes, task_of_rank)
    loader = _task_dataloader(datasets, accelerator.process_index, plan, batch_size, seed=seed,
                              epoch_length=epoch_length, **loader_kwargs)
    loader.plan = plan
    return loader
