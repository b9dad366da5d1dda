"""``BucketMOOStrategy`` argument checks and the Lightning-proof task sampler (no processes)."""

import pytest

pytest.importorskip("lightning", reason="needs the lightning extra: pip install 'bucketmoo_kernels[lightning]'")

pytestmark = pytest.mark.slow  # importing lightning takes seconds

from torch.utils.data import DistributedSampler  # noqa: E402

from bucketmoo_kernels.data import TaskPlan, TaskSampler  # noqa: E402
from bucketmoo_kernels.ddp import BucketMOOState  # noqa: E402
from bucketmoo_kernels.integrations.lightning import BucketMOOStrategy, LightningTaskSampler  # noqa: E402


@pytest.mark.parametrize("kwarg", ["ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"])
def test_comm_hook_arguments_are_refused(kwarg):
    with pytest.raises(TypeError, match=kwarg):
        BucketMOOStrategy(bucket_moo=BucketMOOState(method="mgda"), **{kwarg: object()})


def test_bad_state_is_refused():
    with pytest.raises(TypeError, match="BucketMOOState"):
        BucketMOOStrategy(bucket_moo="mgda")
    with pytest.raises(ValueError, match="mode='ranks'"):
        BucketMOOStrategy(bucket_moo=BucketMOOState(method="mgda", mode="stash", num_tasks=2))


def test_ddp_kwargs_pass_through():
    strategy = BucketMOOStrategy(bucket_moo=None, find_unused_parameters=True, static_graph=False)
    assert strategy._ddp_kwargs["find_unused_parameters"] is True


def test_task_sampler_is_a_distributed_sampler_with_the_same_indices():
    plan = TaskPlan.build(["a", "b"], world_size=4)
    for rank in range(4):
        mine = LightningTaskSampler({"a": 10, "b": 7}, plan, rank, seed=3)
        ref = TaskSampler({"a": 10, "b": 7}, plan, rank, seed=3)
        assert isinstance(mine, DistributedSampler)  # Lightning then leaves it unwrapped
        for epoch in (0, 1):
            mine.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(mine) == list(ref) and len(mine) == len(ref)
