"""``bucket_moo_hook``: Bucket-Level MOO as a DDP communication hook.

Register it like PyTorch's own hooks::

    state = BucketMOOState(method="mgda", mode="ranks", granularity="bucket")
    ddp_model.register_comm_hook(state, bucket_moo_hook)

The hook issues every collective from the autograd thread, in DDP's bucket order (the same
on every rank). With ``overlap=True`` (tasks on ranks, sharded protocol) bucket k's
all-to-all is launched in k's call and finished in the call of bucket k+1, and its
all-gather completes in the background, so the transfers overlap the backward; otherwise
a bucket is finished inside its own call and its future is returned completed (for the
``global`` granularity, the futures of all buckets complete when the last bucket arrives).

The first call compares the settings of all ranks (one tiny all-gather). DDP's initial
single bucket (first iteration; two with ``static_graph=True``) is run as the buckets DDP
builds after its rebuild (:mod:`bucketmoo_kernels.distributed.bucket_layout`).

The hook only adapts DDP's objects: a ``GradBucket`` becomes a flat tensor for the state's
:class:`~bucketmoo_kernels.distributed.engine.BucketEngine` (``state.engine``), DDP's first
single bucket becomes the rebuilt buckets, and stash mode stashes each task's bucket.
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook compares the
# hook's annotations with ``dist.GradBucket`` / ``Future[Tensor]`` objects, not strings.
import torch
import torch.distributed as dist

from ..distributed import collectives
from ..distributed.engine import completed_future
from ..distributed.state import BucketMOOState

__all__ = ["bucket_moo_hook"]


def _protocol_of(state: BucketMOOState) -> str:
    """The collectives the hook will issue: what the backend check validates."""
    s = state.settings
    if s.mode != "ranks" or s.plain_average:
        return "allreduce"
    return s.protocol


def _check_once(state: BucketMOOState, buf: torch.Tensor) -> None:
    state.check_once(buf.device, _protocol_of(state))


# ---------------------------------------------------------------------------- tasks on ranks
def _ranks_hook(state: BucketMOOState, bucket) -> torch.futures.Future:
    s, engine = state.settings, state.engine
    buf = bucket.buffer()
    if s.plain_average:
        # Plain averaging over tasks of equal rank counts is the average over ranks: run
        # DDP's own all-reduce, which makes 'mean' bit-identical to DDP without a hook.
        buf.mul_(1.0 / engine.task_layout().world_size)
        collectives.note_async_collective()
        fut = dist.all_reduce(buf, group=state.process_group, async_op=True).get_future().then(
            lambda f: f.value()[0])
    else:
        sizes = [p.numel() for p in bucket.parameters()] if s.granularity_kind[0] == "param" else None
        fut = engine.reduce(bucket.index(), buf, sizes)
    if bucket.is_last():
        engine.finish_backward()
        engine.finish_step()
    return fut


# ---------------------------------------------------------------------------- stashed tasks
def _stash_hook(state: BucketMOOState, bucket) -> torch.futures.Future:
    s, rt, engine = state.settings, state.runtime, state.engine
    task = rt.current_task
    if task is None:
        raise RuntimeError(
            "mode='stash': a backward reached bucket_moo_hook outside `with state.task(t):`; wrap each "
            "task's backward in the context manager so the hook knows which task it is"
        )
    buf = bucket.buffer()
    params = bucket.parameters()
    group = state.process_group
    world = collectives.group_size(group)
    if s.stash_reduce == "tasks" and world > 1:
        # DDP's reducer multiplies by 1/world before its all-reduce; the same, bit for bit.
        buf.mul_(1.0 / world)
        collectives.all_reduce_sum(buf, group)
    if not rt.final_task():
        rt.stash_bucket(task, buf, params)
        buf.zero_()  # the next task's backward accumulates into zeroed gradients
        return completed_future(buf)
    rows = [buf if t == task else rt.stashed_row(t, buf, params) for t in range(s.num_tasks)]
    sizes = [p.numel() for p in params] if s.granularity_kind[0] == "param" else None
    fut = engine.combine_rows(bucket.index(), rows, buf, sizes)
    if bucket.is_last():
        engine.finish_backward()  # the step is counted when the last task's block ends
    return fut


# ---------------------------------------------------------------------------- DDP's first iteration
def _as_rebuilt_buckets(state: BucketMOOState, bucket, virtual: list, mode_hook) -> torch.futures.Future:
    """Run DDP's initial single bucket as the buckets of its rebuilt layout: each virtual bucket
    goes through the hook as a real one would, then the combined copies are written back."""
    rt = state.runtime
    futures = []
    for vb in virtual:
        rt.begin_bucket(vb.index(), vb.buffer(), vb.parameters())
        futures.append(mode_hook(state, vb))
    torch.futures.collect_all(futures).wait()
    for fut in futures:
        fut.value()  # re-raise a failed bucket's error
    buf = bucket.buffer()
    for vb in virtual:
        vb.write_back(buf)
    state.note_extra_bytes(sum(vb.buffer().numel() * vb.buffer().element_size() for vb in virtual))
    return completed_future(buf)


# ---------------------------------------------------------------------------- the hook
def bucket_moo_hook(state: BucketMOOState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    r"""Replace DDP's gradient averaging by a per-bucket multi-objective combination.

    For each gradient bucket DDP hands over, the T task gradients of the bucket are
    combined as ``d_s = sum_t w_{s,t} g_{s,t}`` per segment s (the bucket, its parameters,
    fixed chunks, or the whole model), with weights from ``state.method`` solved on the
    segment's Gram matrix; ``d`` replaces the bucket, identical on every rank.

    Tasks on ranks (``mode="ranks"``, sharded protocol), for a bucket of n elements on P ranks:

    1. ``all_to_all``: rank p receives shard p (n/P elements) of every rank's bucket and
       averages the rows of ranks that train the same task -> ``[T, n/P]``;
    2. partial Gram of the shard per segment, ``all_reduce`` of the ``[S, T, T]`` floats;
    3. every rank solves the same weights from the same all-reduced Gram;
    4. each rank combines its own shard; ``all_gather`` writes the bucket.

    Stashed tasks (``mode="stash"``): the backward of task t (inside ``state.task(t)``)
    averages the bucket over ranks, stashes it and zeroes it; the last task's backward
    combines the stashed buckets with its own.

    The first call checks that every rank has the same settings. DDP's initial single
    bucket is run as the buckets DDP uses after its rebuild (see ``docs/ddp.md``).

    Args:
        state (BucketMOOState): settings and runtime; see its docstring.
        bucket (dist.GradBucket): the bucket DDP hands over; its ``buffer()`` is overwritten.

    Returns:
        Future[torch.Tensor]: the bucket's buffer holding the combined gradient.

    Raises:
        ValueError: the ranks' settings differ (on every rank, naming the settings).
        RuntimeError: an invalid setup (backend without the needed collective, stash-mode
            backward outside ``state.task``); NotImplementedError: DDP's python reducer.

    Example::
        >>> # xdoctest: +SKIP
        >>> state = BucketMOOState(method="mgda", mode="ranks", granularity="bucket")
        >>> ddp_model.register_comm_hook(state, bucket_moo_hook)
        >>> loss_fn(ddp_model(batch_of_my_task)).backward()  # gradient of this rank's task
        >>> optimizer.step()  # the conflict-resolved update, identical on every rank
    """
    if isinstance(bucket, tuple):
        raise NotImplementedError(
            "bucket_moo_hook got a (grad, param) pair: DDP's python reducer "
            "(torch._dynamo.config.optimize_ddp='python_reducer' with compiled autograd) calls comm "
            "hooks per parameter inside the compiled graph, where this hook's eager collectives cannot "
            "run. Use torch.compile with the default optimize_ddp=True (DDPOptimizer): DDP's C++ "
            "reducer then calls this hook between the compiled subgraphs."
        )
    if not isinstance(state, BucketMOOState):
        raise TypeError(f"state must be a BucketMOOState; got {type(state).__name__}")
    s, rt = state.settings, state.runtime
    buf = bucket.buffer()
    _check_once(state, buf)
    mode_hook = _ranks_hook if s.mode == "ranks" else _stash_hook
    # DDP's initial single bucket: run it as the rebuilt buckets. Not needed for plain
    # averaging (element-wise) nor for the stashing tasks of stash mode (they are kept per
    # parameter); the combining task is.
    decompose = not s.plain_average if s.mode == "ranks" else rt.current_task is not None and rt.final_task()
    virtual = rt.first_iteration_buckets(bucket, s.bucket_cap_mb) if decompose else None
    if virtual is not None:
        rt.begin_single_bucket(buf)
        return _as_rebuilt_buckets(state, bucket, virtual, mode_hook)
    rt.begin_bucket(bucket.index(), buf, bucket.parameters())
    rt.observe_bucket(bucket, order_matters=s.granularity_kind[0] == "chunk")
    return mode_hook(state, bucket)
