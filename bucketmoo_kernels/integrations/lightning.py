"""Bucket-Level MOO in PyTorch Lightning: ``BucketMOOStrategy``, a ``DDPStrategy``.

    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.lightning import BucketMOOStrategy

    strategy = BucketMOOStrategy(bucket_moo=BucketMOOState(method="mgda"))   # + any DDPStrategy kwargs
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy)

    class MyModule(L.LightningModule):
        def train_dataloader(self):   # rank r reads only its task's data
            return self.trainer.strategy.task_dataloader({"de": ds_de, "fr": ds_fr}, batch_size=8)

Why a strategy and not ``DDPStrategy(ddp_comm_hook=bucket_moo_hook, ddp_comm_state=state)``:
Lightning's ``DDPStrategy._register_ddp_hooks`` registers a comm hook only when the root
device is CUDA (checked with Lightning 2.6); on CPU (gloo) the hook is silently never
registered and training is plain DDP. ``BucketMOOStrategy`` registers ``bucket_moo_hook`` on
the DDP model on every device type.

``bucket_moo=None`` is plain ``DDPStrategy`` (the baseline on the same per-task data).
The state is saved in Lightning checkpoints (key ``"bucket_moo"``) and restored on resume;
with ``record_diagnostics=True`` the hook's per-bucket diagnostics go to the trainer's
loggers after every optimizer step. Gradient accumulation works as with DDP: Lightning runs
the accumulating backwards under ``no_sync()``, so the hook combines the accumulated task
gradients once per optimizer step.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ._common import diagnostics_scalars, plan_for_state, register_ddp_hook, require

require("lightning", "lightning", "bucketmoo_kernels.integrations.lightning")

import lightning.pytorch as _pl  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from ..data import TaskPlan, TaskSampler  # noqa: E402
from ..ddp import BucketMOOState  # noqa: E402

__all__ = ["BucketMOOStrategy", "LightningTaskSampler", "CHECKPOINT_KEY"]

CHECKPOINT_KEY = "bucket_moo"


class LightningTaskSampler(TaskSampler, DistributedSampler):
    """A :class:`~bucketmoo_kernels.data.TaskSampler` that Lightning leaves alone.

    With ``use_distributed_sampler=True`` (the default) Lightning wraps every sampler that is
    not a ``DistributedSampler`` in a ``DistributedSamplerWrapper``, which would split the
    rank's task indices again among all ranks. Being a ``DistributedSampler`` (only for that
    ``isinstance`` check: every method is ``TaskSampler``'s) keeps the task split intact.
    Lightning calls :meth:`set_epoch` every epoch.
    """

    def __init__(self, lengths, plan: TaskPlan, rank: int | None = None, **kwargs: Any):
        TaskSampler.__init__(self, lengths, plan, rank, **kwargs)
        # DistributedSampler's attributes, for code that reads them
        self.num_replicas = self.num_shards
        self.drop_last = False
        self.total_size = self.num_samples * self.num_shards


class BucketMOOStrategy(_pl.strategies.DDPStrategy):
    """Lightning ``DDPStrategy`` that runs :func:`~bucketmoo_kernels.ddp.bucket_moo_hook`.

    Args:
        bucket_moo: the :class:`~bucketmoo_kernels.ddp.BucketMOOState` (``mode="ranks"``:
            rank r trains task ``task_of_rank[r]``); None: plain DDP.
        **ddp_strategy_kwargs: everything ``DDPStrategy`` takes (``process_group_backend``,
            ``find_unused_parameters``, ``static_graph``, ``timeout``, ...) except the comm-hook
            arguments, which this strategy sets itself.

    Raises:
        TypeError: ``bucket_moo`` is not a ``BucketMOOState``, or a comm-hook argument is given.
        ValueError: ``mode="stash"`` (one backward per step in Lightning's automatic
            optimisation), or at setup the world does not divide into the tasks.
    """

    strategy_name = "bucket_moo_ddp"

    def __init__(self, bucket_moo: BucketMOOState | None = None, **ddp_strategy_kwargs: Any):
        taken = [k for k in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")
                 if k in ddp_strategy_kwargs]
        if taken:
            raise TypeError(f"BucketMOOStrategy registers bucket_moo_hook itself; do not pass {taken}")
        if bucket_moo is not None and not isinstance(bucket_moo, BucketMOOState):
            raise TypeError(f"bucket_moo must be a BucketMOOState or None; got {type(bucket_moo).__name__}")
        if bucket_moo is not None and bucket_moo.mode != "ranks":
            raise ValueError(f"BucketMOOStrategy feeds one task per rank: bucket_moo needs mode='ranks'; got "
                             f"mode={bucket_moo.mode!r} (stash mode needs one backward per task and step: use "
                             "the DDP hook with manual optimisation)")
        super().__init__(**ddp_strategy_kwargs)
        self.bucket_moo = bucket_moo
        self._task_plan: TaskPlan | None = None

    # ------------------------------------------------------------------ the hook
    def _register_ddp_hooks(self) -> None:
        if self.bucket_moo is None:
            super()._register_ddp_hooks()
            return
        self.bucket_moo.task_layout()  # ValueError naming task_of_rank when the world does not fit
        register_ddp_hook(self.model, self.bucket_moo, "Lightning's DDPStrategy")

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        state = self.bucket_moo
        if state is not None and state.record_diagnostics and self.is_global_zero:
            trainer = self.lightning_module.trainer
            names = self._task_plan.tasks if self._task_plan is not None else None
            scalars = diagnostics_scalars(state, names)
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
        return out

    # ------------------------------------------------------------------ per-task data
    def task_plan(self, tasks: Sequence[str] | Mapping[str, Any],
                  task_of_rank: Sequence[int | str] | None = None) -> TaskPlan:
        """The :class:`~bucketmoo_kernels.data.TaskPlan` of ``tasks`` on this trainer's world,
        consistent with the state's ``task_of_rank`` (a state without one gets the plan's)."""
        self._task_plan = plan_for_state(tasks, self.bucket_moo, self.world_size, task_of_rank)
        return self._task_plan

    def task_dataloader(self, datasets: Mapping[str, Any], batch_size: int = 1, *,
                        task_of_rank: Sequence[int | str] | None = None, seed: int = 0, shuffle: bool = True,
                        epoch_length: str | int = "max", **loader_kwargs: Any) -> DataLoader:
        """A ``DataLoader`` over this rank's task: ``datasets[task of this rank]``, sharded among
        the ranks of that task, reshuffled every epoch from ``seed`` (see
        :class:`~bucketmoo_kernels.data.TaskSampler`). Call it from a LightningModule's
        ``train_dataloader`` (the strategy is ``self.trainer.strategy``)."""
        for bad in ("sampler", "batch_sampler", "shuffle"):
            if bad in loader_kwargs:
                raise TypeError(f"task_dataloader sets the sampler itself; do not pass {bad}=")
        plan = self.task_plan(datasets, task_of_rank)
        sampler = LightningTaskSampler(datasets, plan, self.global_rank, seed=seed, shuffle=shuffle,
                                       epoch_length=epoch_length)
        return DataLoader(datasets[sampler.task_name], batch_size=batch_size, sampler=sampler, **loader_kwargs)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self.bucket_moo is not None:
            checkpoint = dict(checkpoint)
            checkpoint[CHECKPOINT_KEY] = self.bucket_moo.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is not None and self.bucket_moo is not None:
            self.bucket_moo.load_state_dict(saved)
        return checkpoint

