"""``BucketMOOSFTTrainer``: Bucket-Level MOO in TRL's ``SFTTrainer`` (extra ``[trl]``).

::

    from trl import SFTConfig
    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.trl import BucketMOOSFTTrainer

    trainer = BucketMOOSFTTrainer(model=model, args=SFTConfig(...), processing_class=tokenizer,
                                  train_dataset={"de": sft_de, "fr": sft_fr},   # one task per rank
                                  eval_dataset={"de": ev_de, "fr": ev_fr},      # optional, per task
                                  bucket_moo=BucketMOOState(method="mgda"))     # None: plain DDP
    trainer.train()

It is :class:`~bucketmoo_kernels.integrations.transformers.BucketMOOTrainerMixin` on
``trl.SFTTrainer``: the data, hook, checkpoint and logging behaviour is the mixin's, the
same code as ``BucketMOOTrainer``. What differs is only the datasets: ``SFTTrainer`` takes one
training dataset and prepares it (chat template for ``messages``, tokenisation, packing), so
the first task's dataset goes through ``SFTTrainer.__init__`` and every other task's through
the same ``SFTTrainer._prepare_dataset`` with the same ``SFTConfig`` (packing, ``max_length``,
formatting function), each packed within its own task. Every ``SFTConfig`` dataset format
(``text``, ``messages``, prompt-completion) works as it does in ``SFTTrainer``.

For another Trainer subclass, put the mixin first among its bases the same way.
"""

from __future__ import annotations

from ._common import require

_trl = require("trl", "trl", "bucketmoo_kernels.integrations.trl")
SFTTrainer = _trl.SFTTrainer

from .transformers import BucketMOOTrainerMixin  # noqa: E402 - after the check that names the extra

__all__ = ["BucketMOOSFTTrainer"]


class BucketMOOSFTTrainer(BucketMOOTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` training one task per rank with Bucket-Level MOO.

    Arguments: those of ``trl.SFTTrainer``, with ``train_dataset={task name: dataset}`` (each in
    an SFT format: ``text``, ``messages``, prompt-completion, or already tokenised), plus the
    mixin's ``bucket_moo``, ``task_of_rank`` and ``epoch_length``
    (:class:`~bucketmoo_kernels.integrations.transformers.BucketMOOTrainerMixin`).
    ``eval_dataset={name: dataset}`` is prepared by ``SFTTrainer`` and logged per name as
    ``eval_<name>_loss``.
    """

    _bucket_moo_one_train_dataset = True

    def _bucket_moo_prepare_task_dataset(self, name: str, dataset):
        if self._skip_prepare_dataset:  # dataset_kwargs={"skip_prepare_dataset": True}
            return dataset
        return self._prepare_dataset(dataset, self.processing_class, self.args, self.args.packing,
                                     self._formatting_func, f"train_{name}")
