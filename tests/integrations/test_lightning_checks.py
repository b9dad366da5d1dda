"""``BucketMOOStrategy`` argument checks and the Lightning-proof task sampler (no processes)."""

import pytest
from torch.utils.data import DistributedSampler

from bucketmoo_kernels.data import TaskPlan, TaskSampler
from bucketmoo_kernels.ddp import BucketMOOState

pytestmark = pytest.mark.slow  # importing lightning takes seconds


@pytest.fixture(scope="module")
def lit():
    # imported here, not at collection, so that deselected runs do not pay for it
    pytest.importorskip("lightning", reason="needs the lightning extra: pip install 'bucketmoo_kernels[lightning]'")
    import bucketmoo_kernels.integrations.lightning as module

    return module


@pytest.mark.parametrize("kwarg", ["ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"])
def test_comm_hook_arguments_are_refused(lit, kwarg):
    with pytest.raises(TypeError, match=kwarg):
        lit.BucketMOOStrategy(bucket_moo=BucketMOOState(method="mgda"), **{kwarg: object()})


def test_bad_state_is_refused(lit):
    with pytest.raises(TypeError, match="BucketMOOState"):
        lit.BucketMOOStrategy(bucket_moo="mgda")
    with pytest.raises(ValueError, match="mode='ranks'"):
        lit.BucketMOOStrategy(bucket_moo=BucketMOOState(method="mgda", mode="stash", num_tasks=2))


def test_ddp_kwargs_pass_through(lit):
    strategy = lit.BucketMOOStrategy(bucket_moo=None, find_unused_parameters=True, static_graph=False)
    assert strategy._ddp_kwargs["find_unused_parameters"] is True


def test_task_sampler_is_a_distributed_sampler_with_the_same_indices(lit):
    plan = TaskPlan.build(["a", "b"], world_size=4)
    for rank in range(4):
        mine = lit.LightningTaskSampler({"a": 10, "b": 7}, plan, rank, seed=3)
        ref = TaskSampler({"a": 10, "b": 7}, plan, rank, seed=3)
        assert isinstance(mine, DistributedSampler)  # Lightning then leaves it unwrapped
        for epoch in (0, 1):
            mine.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(mine) == list(ref) and len(mine) == len(ref)
