"""``BucketMOOTrainer`` in a single process (no process group): a clear error."""

import pytest


@pytest.mark.slow
def test_no_process_group_gives_a_clear_error(tmp_path):
    pytest.importorskip("transformers", reason="needs pip install 'bucketmoo_kernels[hf]'")
    import torch.distributed as dist

    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.transformers import BucketMOOTrainer
    from hf_scenarios import make_datasets, make_model, training_args

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs a torch.distributed process group"):
        BucketMOOTrainer(model=make_model(), args=training_args(str(tmp_path), ddp_backend=None), train_dataset=make_datasets(),
                         bucket_moo=BucketMOOState(method="mgda"))
