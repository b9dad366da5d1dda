"""``BucketMOOTrainer``: Bucket-Level MOO in the HF Transformers ``Trainer`` (extra ``[hf]``).

::

    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.transformers import BucketMOOTrainer

    trainer = BucketMOOTrainer(model=model, args=training_args,
                               train_dataset={"de": ds_de, "fr": ds_fr},    # one task per rank
                               eval_dataset={"de": ev_de, "fr": ev_fr},     # optional, per task
                               bucket_moo=BucketMOOState(method="mgda"))    # None: plain DDP
    trainer.train()

launched with one process per rank (``torchrun --nproc-per-node 2 train.py``; on a machine
without GPUs with ``TrainingArguments(use_cpu=True)``). The behaviour lives in
:class:`BucketMOOTrainerMixin`, which works on any ``Trainer`` subclass
(``BucketMOOTrainer`` is the mixin on ``Trainer``, ``integrations.trl.BucketMOOSFTTrainer``
the mixin on TRL's ``SFTTrainer``). What it changes, and where (``transformers`` 5.x):

* data -- ``get_train_dataloader``: rank r reads only ``train_dataset[task of r]`` through a
  :class:`bucketmoo_kernels.data.TaskSampler` (shuffled per epoch from ``args.data_seed`` or
  ``args.seed``, sharded among the ranks of the task, the same number of batches on every
  rank). The loader is not passed through ``accelerator.prepare``, whose sharding would split
  the task's data across all ranks again; the Trainer moves batches to the device itself.
* the hook -- ``_prepare_for_training``: after the Trainer (Accelerate) wrapped the model in
  ``DistributedDataParallel`` and before the first backward, ``bucket_moo_hook`` is registered
  with ``bucket_moo``; on a resume the state is first restored from the checkpoint. Under a
  DeepSpeed config the DeepSpeed integration (:mod:`bucketmoo_kernels.integrations.deepspeed`)
  is applied to the engine instead; FSDP configs are refused.
* evaluation -- the Trainer's own dict ``eval_dataset`` support: every task is evaluated by
  all ranks and logged as ``eval_<task>_loss``.
* logging -- ``log``: the hook's per-bucket diagnostics (``BucketMOOState(record_diagnostics=
  True)``) recorded since the last log are summarised into ``bucket_moo/...`` scalars
  (:func:`~bucketmoo_kernels.integrations._common.diagnostics_scalars`), so every reporter the
  Trainer has (TensorBoard, W&B, ...) gets them.
* checkpoints -- ``_save_checkpoint`` writes ``bucket_moo_state.pt`` (``state.state_dict()``)
  into each checkpoint folder.

Gradient accumulation works unchanged: the Trainer's ``no_sync`` micro-batches skip the hook,
which runs once per optimizer step on the accumulated task gradients. PEFT/LoRA models work
as they are (DDP buckets hold only the trainable parameters).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader

from ..data import TaskPlan, TaskSampler
from ._common import diagnostics_scalars, plan_for_state, register_ddp_hook, require

_transformers = require("transformers", "hf", "bucketmoo_kernels.integrations.transformers")
Trainer = _transformers.Trainer
if not hasattr(Trainer, "_prepare_for_training"):  # the extension point below (transformers 5)
    raise ImportError(f"bucketmoo_kernels.integrations.transformers needs transformers >= 5 (its Trainer's "
                      f"_prepare_for_training); found {_transformers.__version__}: pip install -U "
                      "'bucketmoo_kernels[hf]'")

__all__ = ["BucketMOOTrainer", "BucketMOOTrainerMixin", "check_distributed_launch", "STATE_FILE"]

STATE_FILE = "bucket_moo_state.pt"


class _EpochBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose ``set_epoch`` reaches the :class:`TaskSampler` (the Trainer
    calls it on the batch sampler of a loader that resumes mid-epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class _TaskDataLoader(DataLoader):
    """A ``DataLoader`` with ``set_epoch`` (the Trainer calls it at every epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def check_distributed_launch(args, engine: str) -> None:
    """Refuse a launch the Trainer does not see as distributed, saying what to set.

    Raises ``RuntimeError`` when no ``torch.distributed`` process group exists, and when one
    exists with P > 1 processes but ``args.world_size`` is 1: on a machine without GPUs,
    Transformers (through Accelerate) initialises the group from torchrun's variables but
    enters distributed mode only with ``use_cpu=True``, so every rank would train alone.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not getattr(args, "use_cpu", False) \
                and not torch.cuda.is_available():
            raise RuntimeError(
                f"{engine}: WORLD_SIZE={os.environ['WORLD_SIZE']} processes were launched but there is no "
                "torch.distributed process group; on a machine without GPUs set use_cpu=True in the "
                "TrainingArguments (or SFTConfig)")
        raise RuntimeError(
            f"{engine} trains one task per rank and needs a torch.distributed process group; none is "
            "initialized. Launch one process per rank: torchrun --nproc-per-node P script.py (or accelerate "
            "launch), with P a multiple of the number of tasks; on a machine without GPUs also set use_cpu=True "
            "in the TrainingArguments")
    launched = dist.get_world_size()
    if launched > 1 and args.world_size != launched:
        hint = ("on a machine without GPUs, Transformers enters distributed mode only with use_cpu=True: set "
                "use_cpu=True in the TrainingArguments (or SFTConfig)" if not getattr(args, "use_cpu", False)
                else "check the launch (one process per rank)")
        raise RuntimeError(
            f"{engine}: {launched} processes were launched, but the TrainingArguments see a world of "
            f"{args.world_size} (parallel_mode={getattr(args.parallel_mode, 'value', args.parallel_mode)}), so every "
            f"rank would train alone; {hint}")


class BucketMOOTrainerMixin:
    """Bucket-Level MOO for a ``transformers.Trainer`` class: one task per rank.

    Put it first among the bases of any ``Trainer`` subclass (``class MyTrainer(
    BucketMOOTrainerMixin, SomeTrainer)``); :class:`BucketMOOTrainer` is the mixin on
    ``transformers.Trainer`` and :class:`bucketmoo_kernels.integrations.trl.BucketMOOSFTTrainer`
    the mixin on ``trl.SFTTrainer``. The mixin adds the keyword arguments below and passes
    every other one to the Trainer class. A base whose ``__init__`` accepts only one dataset
    (TRL's trainers) sets ``_bucket_moo_one_train_dataset = True`` and prepares every task's
    dataset in :meth:`_bucket_moo_prepare_task_dataset`.

    Args:
        *args, **kwargs: those of the Trainer class.
        train_dataset: ``{task name: dataset}``; rank r trains ``task_of_rank[r]``.
        eval_dataset: a dataset or ``{name: dataset}`` (names need not be training tasks, e.g.
            unseen languages); each is evaluated on all ranks as ``eval_<name>_loss``.
        bucket_moo: a ``BucketMOOState`` (``mode="ranks"``), or None for plain DDP averaging
            of the same per-task data -- the baseline.
        task_of_rank: the task of every rank, as names or ids (default: the state's
            ``task_of_rank``, else contiguous blocks of P / T ranks per task). A state without
            ``task_of_rank`` is given this one.
        epoch_length: :class:`~bucketmoo_kernels.data.TaskSampler`'s ``epoch_length``
            (``"max"``: smaller tasks wrap around; ``"min"``: larger ones are cut).

    Raises:
        RuntimeError: no ``torch.distributed`` process group (launch with torchrun or
            ``accelerate launch``), or a multi-process launch the TrainingArguments do not see
            (on CPU: ``use_cpu=True`` is missing).
        ValueError: ``train_dataset`` is not a mapping of tasks, or the world cannot be split
            into the tasks.
        NotImplementedError: an FSDP config with ``bucket_moo``.
    """

    _bucket_moo_one_train_dataset = False

    def __init__(self, *args: Any, bucket_moo=None, task_of_rank: Sequence[int | str] | None = None,
                 epoch_length: str | int = "max", **kwargs: Any):
        engine = type(self).__name__
        if len(args) > 3:  # Trainer(model, args, data_collator, train_dataset, ...): keep it a keyword
            args = list(args)
            kwargs["train_dataset"] = args.pop(3)
        tasks = kwargs.get("train_dataset")
        if tasks is not None and not isinstance(tasks, Mapping):
            raise ValueError(f"train_dataset must be a mapping {{task name: dataset}} (one task per rank); got "
                             f"{type(tasks).__name__}")
        if tasks is not None and not tasks:
            raise ValueError("train_dataset must name at least one task; got an empty mapping")
        if tasks is not None and self._bucket_moo_one_train_dataset:
            kwargs["train_dataset"] = next(iter(tasks.values()))  # prepared by the base, reused below
        super().__init__(*args, **kwargs)
        self.bucket_moo = bucket_moo
        self.epoch_length = epoch_length
        check_distributed_launch(self.args, engine)
        self.task_plan: TaskPlan | None = None
        if tasks is not None:
            if self._bucket_moo_one_train_dataset:
                first = next(iter(tasks))
                self.train_dataset = {name: (self.train_dataset if name == first
                                             else self._bucket_moo_prepare_task_dataset(name, ds))
                                      for name, ds in tasks.items()}
            self.task_plan = plan_for_state(self.train_dataset, bucket_moo, self.args.world_size, task_of_rank)
        if bucket_moo is not None and getattr(self, "is_fsdp_enabled", False):
            raise NotImplementedError(
                f"{engine} does not drive FSDP through the Trainer yet: remove the fsdp arguments "
                "(plain DDP), use DeepSpeed ZeRO-1/2, or call bucketmoo_kernels.fsdp.apply_bucket_moo on "
                "an FSDP2 model in your own loop")
        if bucket_moo is not None and getattr(self, "is_deepspeed_enabled", False):
            self._deepspeed_apply()  # fail now, not after the engine is built

    def _bucket_moo_prepare_task_dataset(self, name: str, dataset):
        """The dataset of task ``name`` as the base Trainer would have prepared its
        ``train_dataset`` (only called when ``_bucket_moo_one_train_dataset``)."""
        raise NotImplementedError(f"{type(self).__name__} sets _bucket_moo_one_train_dataset and must prepare "
                                  "every task's dataset in _bucket_moo_prepare_task_dataset")

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """Rank r's loader over its own task's dataset (see :class:`~bucketmoo_kernels.data.TaskSampler`)."""
        if self.train_dataset is None or self.task_plan is None:
            raise ValueError(f"{type(self).__name__}: training requires train_dataset={{task name: dataset}}")
        rank = self.args.process_index
        task = self.task_plan.task_name(rank)
        dataset = self.train_dataset[task]
        collator = self.data_collator
        try:
            import datasets as hf_datasets
        except ImportError:
            hf_datasets = None
        if hf_datasets is not None and isinstance(dataset, hf_datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = TaskSampler(self.train_dataset, self.task_plan, rank, seed=seed, epoch_length=self.epoch_length)
        batches = _EpochBatchSampler(sampler, self._train_batch_size, self.args.dataloader_drop_last)
        params = dict(collate_fn=collator, num_workers=self.args.dataloader_num_workers,
                      pin_memory=self.args.dataloader_pin_memory)
        if self.args.dataloader_num_workers > 0:
            params.update(persistent_workers=self.args.dataloader_persistent_workers,
                          prefetch_factor=self.args.dataloader_prefetch_factor)
        return _TaskDataLoader(dataset, batch_sampler=batches, **params)

    # ------------------------------------------------------------------ the hook
    def _deepspeed_apply(self):
        try:
            from .deepspeed import apply_bucket_moo
        except ImportError as exc:
            raise RuntimeError(
                f"{type(self).__name__} with a DeepSpeed config needs bucketmoo_kernels.integrations.deepspeed "
                f"(pip install 'bucketmoo_kernels[deepspeed]'): {exc}. Without DeepSpeed the Trainer uses "
                "plain DDP and the comm hook") from exc
        return apply_bucket_moo

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader,
                                                                resume_from_checkpoint)
        if self.bucket_moo is not None:
            if resume_from_checkpoint is not None:
                self._load_bucket_moo(resume_from_checkpoint)
            if getattr(self, "is_deepspeed_enabled", False):
                if getattr(model, "_bucketmoo_state", None) is not self.bucket_moo:
                    self._deepspeed_apply()(model, self.bucket_moo)
                    model._bucketmoo_state = self.bucket_moo
            else:
                register_ddp_hook(model, self.bucket_moo, "transformers.Trainer")
        return model, train_dataloader

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_dir(self, trial) -> str:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        return os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.bucket_moo is not None and self.args.should_save:
            path = os.path.join(self._checkpoint_dir(trial), STATE_FILE)
            torch.save(self.bucket_moo.state_dict(), path)

    def _load_bucket_moo(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming {type(self).__name__} from {checkpoint!r}, but it has no {STATE_FILE} (the BucketMOOState "
                "saved with every checkpoint); was it written by a plain Trainer or with bucket_moo=None?")
        # weights_only=True: the state is plain tensors, numbers and strings; a crafted file
        # cannot run code on resume (it raises an UnpicklingError instead)
        self.bucket_moo.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log`` plus the hook's ``bucket_moo/...`` diagnostics on training logs."""
        if self.bucket_moo is not None and "loss" in logs:
            logs = dict(logs)
            tasks = self.task_plan.tasks if self.task_plan is not None else None
            logs.update(diagnostics_scalars(self.bucket_moo, tasks))
        super().log(logs, *args, **kwargs)


class BucketMOOTrainer(BucketMOOTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that trains one task per rank with Bucket-Level MOO:
    :class:`BucketMOOTrainerMixin` on ``transformers.Trainer`` (see the mixin for the
    arguments)."""
