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

The hook reads ``state.settings`` and calls the public methods of ``state.runtime``.
"""

# No ``from __future__ import annotations`` here: DDP's register_comm_hook compares the
# hook's annotations with ``dist.GradBucket`` / ``Future[Tensor]`` objects, not strings.
import torch
import torch.distributed as dist

from ..api import combine, fused_bucket_moo, gram
from ..distributed import collectives
from ..distributed.protocol import (allgather_tasks, finish_scatter_tasks, reduce_gram, sharded_moo,
                                    solve_weights, start_gather_combined, start_scatter_tasks)
from ..distributed.state import BucketMOOState
from ..inputs import Segments

__all__ = ["bucket_moo_hook"]


def _completed(tensor: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def _fused_kwargs(state: BucketMOOState, index: int) -> dict:
    kwargs = state.solve_kwargs(index)
    return dict(weight_step=state.weight_step(), backend=kwargs.pop("backend"), **kwargs,
                check_finite=False, return_info=True)


def _all_reduce_mean(buf: torch.Tensor, group, world: int) -> None:
    # DDP's reducer multiplies by 1/world before its all-reduce; do the same, bit for bit.
    buf.mul_(1.0 / world)
    collectives.all_reduce_sum(buf, group)


def _protocol_of(state: BucketMOOState) -> str:
    """The collectives the hook will issue: what the backend check validates."""
    s = state.settings
    if s.mode != "ranks" or s.plain_average:
        return "allreduce"
    return s.protocol


def _check_once(state: BucketMOOState, buf: torch.Tensor) -> None:
    state.check_once(buf.device, _protocol_of(state))


# ---------------------------------------------------------------------------- tasks on ranks
def _chain(source: torch.futures.Future, target: torch.futures.Future) -> None:
    """Complete ``target`` with ``source``'s value (or exception) when ``source`` completes."""

    def done(f: torch.futures.Future) -> None:
        try:
            target.set_result(f.value())
        except BaseException as exc:  # noqa: BLE001  (handed to DDP through the future)
            target.set_exception(exc)

    source.add_done_callback(done)


def _ranks_global(state: BucketMOOState, buf: torch.Tensor, index: int, is_last: bool):
    """One weight vector for the whole model: every bucket waits for the last one.

    Sharded protocol: each bucket's all-to-all is launched in its own call (it runs during
    the rest of the backward); the last call finishes them all, sums the partial Grams,
    all-reduces once, solves, and launches every bucket's all-gather.
    """
    s, rt = state.settings, state.runtime
    tasks = state.task_layout()
    group = state.process_group
    fut: torch.futures.Future = torch.futures.Future()
    segs = Segments.single(buf.numel())
    if s.protocol == "sharded":
        handle = start_scatter_tasks(buf, segs, tasks, group=group, wire_dtype=s.wire_dtype, backend=s.backend)
        rt.add_pending((buf, handle, None, fut))
    else:
        rows, extra = allgather_tasks(buf, tasks, group=group, wire_dtype=s.wire_dtype)
        rt.add_pending((buf, rows, gram(rows, None, backend=s.backend), fut))
        rt.add_step_extra_bytes(extra)
    if not is_last:
        return fut
    pending = rt.take_pending()
    if s.protocol == "sharded":
        finished = [finish_scatter_tasks(p[1]) for p in pending]
        rt.add_step_extra_bytes(sum(sh.extra_bytes for sh in finished))
        pending = [(b, sh, sh.partial_gram, f) for (b, _, _, f), sh in zip(pending, finished)]
    total = torch.stack([p[2] for p in pending]).sum(0)  # [1, T, T], fixed order on every rank
    if s.protocol == "sharded":
        total = reduce_gram(total, group)
    weights = solve_weights(total, state.weight_step(), **state.solve_kwargs(-1))
    gather_extra = 0
    for bucket_buf, payload, _, bucket_fut in pending:
        if s.protocol == "sharded":
            gather_fut, extra = start_gather_combined(payload, weights, bucket_buf, group=group, backend=s.backend)
            gather_extra += extra
            _chain(gather_fut, bucket_fut)
            continue
        if payload.dtype == bucket_buf.dtype:
            combine(payload, weights, None, out=bucket_buf, backend=s.backend)
        else:  # compressed rows: combine in the wire dtype, then widen into the bucket
            bucket_buf.copy_(combine(payload, weights, None, backend=s.backend))
        bucket_fut.set_result(bucket_buf)
    rt.note_extra_bytes(rt.add_step_extra_bytes(0) + gather_extra)
    state.record(-1, total, weights)
    return fut


def _finish_inflight(state: BucketMOOState) -> None:
    """Finish the bucket whose all-to-all is in flight: Gram, all-reduce, solve, combine,
    launch the all-gather; its future completes when the all-gather lands."""
    inflight = state.runtime.take_inflight()
    if inflight is None:
        return
    handle, buf, index, fut = inflight
    group = state.process_group
    try:
        sharded = finish_scatter_tasks(handle)
        gram_matrix = reduce_gram(sharded.partial_gram, group)
        weights = solve_weights(gram_matrix, state.weight_step(), **state.solve_kwargs(index))
        gather_fut, extra = start_gather_combined(sharded, weights, buf, group=group, backend=state.settings.backend)
    except BaseException as exc:
        fut.set_exception(exc)
        raise
    state.note_extra_bytes(sharded.extra_bytes + extra)
    state.record(index, gram_matrix, weights)
    _chain(gather_fut, fut)


def _ranks_hook(state: BucketMOOState, bucket) -> torch.futures.Future:
    s, rt = state.settings, state.runtime
    buf = bucket.buffer()
    index, is_last = bucket.index(), bucket.is_last()
    tasks = state.task_layout()
    group = state.process_group
    kind, _ = s.granularity_kind
    if index == 0:
        rt.begin_backward()

    if s.plain_average:
        # Plain averaging over tasks of equal rank counts is the average over ranks: run
        # DDP's own all-reduce, which makes 'mean' bit-identical to DDP without a hook.
        buf.mul_(1.0 / tasks.world_size)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda f: f.value()[0])
        if is_last:
            rt.finish_step()
        return fut

    if kind == "global":
        fut = _ranks_global(state, buf, index, is_last)
    else:
        params = bucket.parameters() if kind == "param" else None
        sizes = [p.numel() for p in params] if params is not None else None
        segs, shards = state.segments_for(index, buf.numel(), sizes)
        if s.protocol == "sharded" and s.overlap:
            _finish_inflight(state)  # the previous bucket: its all-to-all ran during our backward
            local = state.shard_segments_for(segs, shards, collectives.group_rank(group), tasks.world_size)
            handle = start_scatter_tasks(buf, segs, tasks, group=group, wire_dtype=s.wire_dtype,
                                         backend=s.backend, local_segments=local)
            fut = torch.futures.Future()
            rt.set_inflight((handle, buf, index, fut))
            if is_last:
                _finish_inflight(state)
                rt.finish_step()
            return fut
        if s.protocol == "sharded":
            local = state.shard_segments_for(segs, shards, collectives.group_rank(group), tasks.world_size)
            gram_matrix, weights, extra = sharded_moo(
                buf, segs, tasks, state.weight_step(), group=group, wire_dtype=s.wire_dtype,
                local_segments=local, **state.solve_kwargs(index))
        else:
            rows, extra = allgather_tasks(buf, tasks, group=group, wire_dtype=s.wire_dtype)
            out = buf if rows.dtype == buf.dtype else torch.empty_like(buf, dtype=rows.dtype)
            out, info = fused_bucket_moo(rows, segments=segs, out=out, **_fused_kwargs(state, index))
            if out is not buf:
                extra += out.numel() * out.element_size()
                buf.copy_(out)
            gram_matrix, weights = info.gram, info.weights
        state.note_extra_bytes(extra)
        state.record(index, gram_matrix, weights)
        fut = _completed(buf)
    if is_last:
        rt.finish_step()
    return fut


# ---------------------------------------------------------------------------- stashed tasks
def _stash_hook(state: BucketMOOState, bucket) -> torch.futures.Future:
    s, rt = state.settings, state.runtime
    task = rt.current_task
    if task is None:
        raise RuntimeError(
            "mode='stash': a backward reached bucket_moo_hook outside `with state.task(t):`; wrap each "
            "task's backward in the context manager so the hook knows which task it is"
        )
    buf = bucket.buffer()
    index, is_last = bucket.index(), bucket.is_last()
    params = bucket.parameters()
    group = state.process_group
    world = collectives.group_size(group)
    kind, _ = s.granularity_kind
    final = rt.final_task()
    if s.stash_reduce == "tasks" and world > 1:
        _all_reduce_mean(buf, group, world)
    if not final:
        rt.stash_bucket(task, buf, params)
        buf.zero_()  # the next task's backward accumulates into zeroed gradients
        return _completed(buf)

    rows = [buf if t == task else rt.stashed_row(t, buf, params) for t in range(s.num_tasks)]
    if index == 0:
        rt.begin_backward()
    if kind == "global":
        fut: torch.futures.Future = torch.futures.Future()
        rt.add_pending((buf, rows, gram(rows, None, backend=s.backend), fut))
        if not is_last:
            return fut
        pending = rt.take_pending()
        total = torch.stack([p[2] for p in pending]).sum(0)
        weights = solve_weights(total, state.weight_step(), **state.solve_kwargs(-1))
        for bucket_buf, bucket_rows, _, _ in pending:
            combine(bucket_rows, weights, None, out=bucket_buf, backend=s.backend)
            if s.stash_reduce == "combined" and world > 1:
                _all_reduce_mean(bucket_buf, group, world)
        state.record(-1, total, weights)
        _share_states(state, buf, world)
        for bucket_buf, _, _, bucket_fut in pending:
            bucket_fut.set_result(bucket_buf)
        return fut

    sizes = [p.numel() for p in params] if kind == "param" else None
    segs, _ = state.segments_for(index, buf.numel(), sizes)
    _, info = fused_bucket_moo(rows, segments=segs, out=buf, **_fused_kwargs(state, index))
    if s.stash_reduce == "combined" and world > 1:
        _all_reduce_mean(buf, group, world)
    state.record(index, info.gram, info.weights)
    if is_last:
        _share_states(state, buf, world)
    return _completed(buf)


def _share_states(state: BucketMOOState, buf: torch.Tensor, world: int) -> None:
    """The step's last bucket with ``stash_reduce="combined"``: each rank's method states come from
    its own weights, so every rank keeps every rank's for the checkpoint of any one rank."""
    if state.settings.stash_reduce == "combined" and world > 1 and state.weight_step().needs_state:
        state.gather_rank_method_states(buf.device)


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
    return _completed(buf)


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
