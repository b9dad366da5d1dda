"""Exact bytes and memory per rank of the Bucket-Level MOO protocols (DDP hook, FSDP2 path)
and of the stock reductions they replace, from a bucket layout (:mod:`benchmarks.llm_layout`).

The scale model (:mod:`benchmarks.scale_model`) builds its tables on these; the scale
validation (:mod:`benchmarks.scale_validation`) and ``tests/test_simulated_world.py`` check them
against simulated worlds, which run the hook itself on a fake process group.
Per-rank bytes count the bandwidth-optimal ring for all-reduce / all-gather / reduce-scatter
and the exact split sizes for the all-to-all.
"""

from __future__ import annotations

__all__ = ["shard_len", "own_len", "ring_bytes", "predict_ddp", "predict_fsdp", "plain_allreduce_bytes",
           "reduce_scatter_bytes"]


def shard_len(n: int, world: int) -> int:
    return -(-n // world)


def own_len(n: int, world: int, rank: int) -> int:
    m = shard_len(n, world)
    return max(0, min(m, n - rank * m))


def ring_bytes(kind: str, nbytes: int, world: int) -> int:
    if world <= 1:
        return 0
    return 2 * (world - 1) * nbytes // world if kind == "all_reduce" else (world - 1) * nbytes // world


def _segments(granularity: str, n: int, param_numels) -> int:
    if granularity in ("bucket", "global"):
        return 1
    if granularity == "param":
        return len(param_numels)
    if granularity.startswith("chunk:"):
        return shard_len(n, int(granularity.split(":", 1)[1]))
    raise ValueError(f"granularity must be bucket, param, global or chunk:<n>; got {granularity!r}")


class _Trace:
    """Live bytes of the buffers the protocol allocates, in program order, and their peak."""

    def __init__(self):
        self.live: dict[str, int] = {}
        self.peak = 0

    def alloc(self, name: str, nbytes: int) -> None:
        if nbytes:
            self.live[name] = self.live.get(name, 0) + nbytes
            self.peak = max(self.peak, sum(self.live.values()))

    def free(self, *names: str) -> None:
        for name in names:
            self.live.pop(name, None)


def _group_rows(tr: _Trace, key: str, world: int, tasks: int, length: int, wire: int) -> str | None:
    """``protocol._group_rows`` on [P, length] received rows: returns the name of the buffer
    that holds the task rows (None: a view of the received rows)."""
    if world == tasks:  # contiguous task_of_rank with P == T: the identity, a view
        return None
    if world // tasks == 1:  # pragma: no cover - contiguous layouts never get here
        tr.alloc(key + "rows", tasks * length * wire)
        return key + "rows"
    tr.alloc(key + "acc", tasks * length * 4)
    if wire != 4:
        tr.alloc(key + "recv32", world * length * 4)  # received.to(float32), a temporary
        tr.free(key + "recv32")
        tr.alloc(key + "rows", tasks * length * wire)
        tr.free(key + "acc")
        return key + "rows"
    return key + "acc"


def predict_ddp(buckets, world: int, tasks: int, *, protocol: str = "sharded", granularity: str = "bucket",
                overlap: bool = True, element_size: int = 4, wire_size: int | None = None, rank: int = 0) -> dict:
    """Bytes, collectives and peak extra memory of one step of the DDP hook on ``rank``.

    ``buckets``: :class:`~benchmarks.llm_layout.Bucket` list (or ``(numel, param_numels)`` pairs).
    The memory is replayed from the protocol's allocations in program order (the large
    buffers only: the [S, T, T] Grams and [S, T] weights are left out) and is the synchronous
    peak, what :mod:`benchmarks.simulated_world` measures (collectives complete at once).
    Returns ``sent``, ``received``, ``collectives``, ``peak_extra``, ``per_bucket_extra``
    and ``gram_bytes`` (the S*T*T all-reduces, ring bytes).
    """
    e = element_size
    w = wire_size or e
    sent = received = gram_bytes = 0
    colls = 0
    per_bucket = []
    tr = _Trace()  # global granularity: one trace over the whole step
    held_rows = []
    for k, b in enumerate(buckets):
        n, pn = (b.numel, b.param_numels) if hasattr(b, "numel") else b
        seg = _segments(granularity, n, pn)
        key = f"{k}:"
        if granularity != "global":
            tr = _Trace()
        tr.alloc(key + "send", n * w if w != e else 0)
        if protocol == "sharded":
            m, own = shard_len(n, world), own_len(n, world, rank)
            sent += (n - own) * w
            received += (world - 1) * own * w
            ag = ring_bytes("all_gather", world * m * w, world)
            sent += ag
            received += ag
            colls += 2
            tr.alloc(key + "recv", world * own * w)
            if granularity == "global":
                held_rows.append((key, own, m))
                continue
            rows = _group_rows(tr, key, world, tasks, own, w)
            if not overlap:  # sharded_moo: the scatter handle (send copy, received rows) is dropped
                tr.free(key + "send")
                if rows is not None:
                    tr.free(key + "recv")
            tr.alloc(key + "own", m * w)
            tr.alloc(key + "gathered", world * m * w if (n != world * m or w != e) else 0)
            g = ring_bytes("all_reduce", seg * tasks * tasks * 4, world)
            sent += g
            received += g
            gram_bytes += g
            colls += 1
            per_bucket.append(tr.peak)
        elif protocol == "allgather":
            ag = ring_bytes("all_gather", world * n * w, world)
            sent += ag
            received += ag
            colls += 1
            tr.alloc(key + "gathered", world * n * w)
            rows = _group_rows(tr, key, world, tasks, n, w)
            tr.free(key + "send")
            if rows is not None:
                tr.free(key + "gathered")
            if granularity == "global":
                continue
            tr.alloc(key + "out", n * w if w != e else 0)
            per_bucket.append(tr.peak)
        else:
            raise ValueError(f"protocol must be sharded or allgather; got {protocol!r}")
    if granularity == "global":
        if protocol == "sharded":
            # the last call finishes every all-to-all (rows of each bucket), then drops the
            # scatter handles and launches the all-gathers one bucket at a time
            kept = []
            for key, own, m in held_rows:
                rows = _group_rows(tr, key, world, tasks, own, w)
                kept.append(key + "recv" if rows is None else rows)
            for key, _, _ in held_rows:
                tr.free(*(name for name in (key + "send", key + "recv") if name not in kept))
            for key, own, m in held_rows:
                n = next(b.numel if hasattr(b, "numel") else b[0] for i, b in enumerate(buckets) if f"{i}:" == key)
                tr.alloc(key + "own", m * w)
                tr.alloc(key + "gathered", world * m * w if (n != world * m or w != e) else 0)
                tr.free(key + "own", key + "gathered")
            g = ring_bytes("all_reduce", tasks * tasks * 4, world)
            sent += g
            received += g
            gram_bytes += g
            colls += 1
        peak = tr.peak
    else:
        peak = max(per_bucket, default=0)
    return {"sent": sent, "received": received, "collectives": colls, "peak_extra": peak,
            "per_bucket_extra": per_bucket, "gram_bytes": gram_bytes}


def predict_fsdp(groups, world: int, tasks: int, *, granularity: str = "bucket", element_size: int = 4,
                 wire_size: int | None = None, rank: int = 0) -> dict:
    """Bytes and peak extra memory of the FSDP2 reduce-scatter replacement (one all-to-all and
    one S*T*T all-reduce per parameter group, no all-gather)."""
    e = element_size
    w = wire_size or e
    sent = received = gram_bytes = colls = 0
    per_group = []
    for g in groups:
        shard = g["shard"]
        n = world * shard
        seg = _segments(granularity, shard, g["param_sizes"])
        sent += (n - shard) * w
        received += (world - 1) * shard * w
        gb = ring_bytes("all_reduce", seg * tasks * tasks * 4, world)
        sent += gb
        received += gb
        gram_bytes += gb
        colls += 2
        tr = _Trace()
        tr.alloc("send", n * w if w != e else 0)
        tr.alloc("recv", n * w)
        rows = _group_rows(tr, "", world, tasks, shard, w)
        tr.free("send")
        if rows is not None:
            tr.free("recv")
        tr.alloc("out", shard * w if w != e else 0)
        per_group.append(tr.peak)
    return {"sent": sent, "received": received, "collectives": colls, "peak_extra": max(per_group, default=0),
            "per_bucket_extra": per_group, "gram_bytes": gram_bytes}


def plain_allreduce_bytes(bucket_numels, world: int, element_size: int) -> int:
    """Per-rank bytes sent (= received) by DDP's ring all-reduce of the buckets."""
    return sum(ring_bytes("all_reduce", n * element_size, world) for n in bucket_numels)


def reduce_scatter_bytes(bucket_numels, world: int, element_size: int) -> int:
    """Per-rank bytes sent (= received) by a ring reduce-scatter of the buckets (ZeRO-2, FSDP)."""
    return sum(ring_bytes("reduce_scatter", n * element_size, world) for n in bucket_numels)
