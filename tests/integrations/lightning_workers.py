"""The Lightning scenarios of ``test_lightning.py``, run in 2 spawned gloo processes (the
harness sets RANK / LOCAL_RANK / WORLD_SIZE, so Lightning uses the existing processes and
process group instead of launching its own)."""

from __future__ import annotations

import os
import tempfile
import time
import traceback

import torch
from torch.utils.data import DataLoader, TensorDataset

from integration_helpers import BATCH, LR, flat_params, loss_fn, make_model, task_batch

STEPS = 3  # batches per epoch per rank
TASKS = ("t0", "t1")


def task_datasets(batches: int = STEPS) -> dict:
    """Task t's dataset: its ``batches`` batches of ``task_batch`` laid end to end, so that with
    ``shuffle=False`` rank t's k-th batch is ``task_batch(t, k)``."""
    out = {}
    for t, name in enumerate(TASKS):
        xs, ys = zip(*(task_batch(t, k) for k in range(batches)))
        out[name] = TensorDataset(torch.cat(xs), torch.cat(ys))
    return out


def _module_class():
    import lightning.pytorch as L

    from bucketmoo_kernels.data import TaskPlan
    from bucketmoo_kernels.integrations.lightning import LightningTaskSampler

    class TinyModule(L.LightningModule):
        def __init__(self, shuffle: bool, batches: int):
            super().__init__()
            self.net = make_model()
            self.shuffle = shuffle
            self.batches = batches

        def training_step(self, batch, batch_idx):
            x, y = batch
            return loss_fn(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

        def train_dataloader(self):
            strategy = self.trainer.strategy
            datasets = task_datasets(self.batches)
            if hasattr(strategy, "task_dataloader"):
                return strategy.task_dataloader(datasets, batch_size=BATCH, shuffle=self.shuffle)
            # Lightning's own DDPStrategy: the same per-task data, built by hand
            plan = TaskPlan.build(datasets, strategy.world_size)
            sampler = LightningTaskSampler(datasets, plan, strategy.global_rank, shuffle=self.shuffle)
            return DataLoader(datasets[sampler.task_name], batch_size=BATCH, sampler=sampler)

    return TinyModule


def _memory_logger():
    from lightning.pytorch.loggers.logger import Logger

    class MemoryLogger(Logger):
        """Keeps what the strategy logs (rank 0)."""

        def __init__(self):
            super().__init__()
            self.metrics = []

        @property
        def name(self):
            return "memory"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.metrics.append((step, dict(metrics)))

    return MemoryLogger()


def fit(strategy, epochs: int, shuffle: bool = False, ckpt_in: str | None = None, ckpt_out: str | None = None,
        accumulate: int = 1, logger=False):
    import lightning.pytorch as L

    module = _module_class()(shuffle, STEPS * accumulate)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accumulate_grad_batches=accumulate)
    trainer.fit(module, ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return flat_params(module.net), trainer


def all_scenarios(rank: int, world: int) -> dict:
    from lightning.pytorch.strategies import DDPStrategy

    from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook
    from bucketmoo_kernels.integrations.lightning import BucketMOOStrategy

    import torch.distributed as dist

    results, times = {}, {}
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder, src=0)
    ckpt = os.path.join(folder[0], "mid.ckpt")

    def plain():
        return {"params": fit(DDPStrategy(), 1)[0]}

    def none_state():
        return {"params": fit(BucketMOOStrategy(bucket_moo=None), 1)[0]}

    def mean():
        state = BucketMOOState(method="mean")
        return {"params": fit(BucketMOOStrategy(bucket_moo=state), 1)[0], "step": state.step}

    def mgda_param():
        state = BucketMOOState(method="mgda", granularity="param")
        params, trainer = fit(BucketMOOStrategy(bucket_moo=state), 1)
        return {"params": params, "step": state.step, "hook_calls": state.runtime.hook_calls,
                "global_step": trainer.global_step}

    def accumulate():
        state = BucketMOOState(method="mgda", granularity="param")
        params, trainer = fit(BucketMOOStrategy(bucket_moo=state), 1, accumulate=2)
        return {"params": params, "step": state.step, "global_step": trainer.global_step}

    def diagnostics():
        state = BucketMOOState(method="mgda", record_diagnostics=True)
        logger = _memory_logger()
        fit(BucketMOOStrategy(bucket_moo=state), 1, logger=logger)
        return {"metrics": logger.metrics, "step": state.step}

    def lightning_own_hook():
        # what a new user tries first: Lightning registers comm hooks only on CUDA
        state = BucketMOOState(method="mgda", granularity="param")
        params, _ = fit(DDPStrategy(ddp_comm_state=state, ddp_comm_hook=bucket_moo_hook), 1)
        return {"params": params, "step": state.step, "hook_calls": state.runtime.hook_calls}

    def uninterrupted():
        state = BucketMOOState(method="mgda")
        return {"params": fit(BucketMOOStrategy(bucket_moo=state), 2, shuffle=True)[0], "step": state.step}

    def resumed():
        first = BucketMOOState(method="mgda")
        fit(BucketMOOStrategy(bucket_moo=first), 1, shuffle=True, ckpt_out=ckpt)
        dist.barrier()
        state = BucketMOOState(method="mgda")
        params, _ = fit(BucketMOOStrategy(bucket_moo=state), 2, shuffle=True, ckpt_in=ckpt)
        saved = torch.load(ckpt, weights_only=False).get("bucket_moo")
        return {"params": params, "step": state.step, "saved_step": None if saved is None else saved["step"]}

    def misuse():
        out = {}
        try:
            fit(BucketMOOStrategy(bucket_moo=BucketMOOState(method="mgda", num_tasks=3)), 1)
        except Exception as exc:  # noqa: BLE001
            out["tasks"] = (type(exc).__name__, str(exc))
        return out

    for name, fn in [("plain", plain), ("none", none_state), ("mean", mean), ("mgda-param", mgda_param),
                     ("accumulate", accumulate), ("diagnostics", diagnostics),
                     ("lightning-own-hook", lightning_own_hook), ("uninterrupted", uninterrupted),
                     ("resumed", resumed), ("misuse", misuse)]:
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception:  # noqa: BLE001
            results[name] = {"error": traceback.format_exc()}
        times[name] = time.perf_counter() - start
        dist.barrier()
    return {"results": results, "times": times}
