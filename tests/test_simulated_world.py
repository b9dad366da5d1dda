"""Simulated worlds: one rank of a P-rank world (P = 8 .. 1024) on torch's fake process group.

The DDP hook (ranks mode) and the FSDP2 reduce-scatter run on real-size buckets of a
Llama-style layout; a dispatch-mode recorder sees every collective, allocation and operator
(benchmarks/simulated_world.py). Invariants checked at every P:

* every rank issues the same collectives in the same order, with the same sizes;
* the sharded protocol moves, per rank, the bytes of a ring all-reduce of the same buckets
  plus the S*T*T Gram all-reduce (within 2 %);
* its extra memory is bounded by a small number of buckets, and grows with the model only
  for ``global``;
* the cost model (benchmarks/scale_model.py) predicts the bytes exactly and the memory to
  within the small [S, T, T] tensors.

Select with ``-k simulated_world``.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmarks package, under plain `pytest` too

from benchmarks.llm_layout import CONFIGS, ddp_buckets, fsdp_groups, mlp_shapes, param_shapes
from benchmarks.scale_model import plain_allreduce_bytes, predict_ddp, predict_fsdp, reduce_scatter_bytes
from benchmarks.simulated_world import simulate_ddp_step, simulate_fsdp_step

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

WORLDS = [8, 64, 256, 1024]
SMALL_TENSORS = 16 * 1024  # Grams, weights, index tensors: left out of the memory model


def _ranks(world):
    return sorted({0, 1, world // 2 + 1, world - 1})


def _check_world(records, model, world, tasks, protocol="sharded", granularity="bucket", overlap=True,
                 element_size=4):
    buckets = ddp_buckets(CONFIGS[model], element_size=element_size)
    numels = [b.numel for b in buckets]
    sigs = {tuple(r.signature()) for r in records}
    assert len(sigs) == 1, f"ranks disagree on the collective sequence at P={world}"
    largest = max(numels) * element_size
    for r in records:
        pred = predict_ddp(buckets, world, tasks, protocol=protocol, granularity=granularity, overlap=overlap,
                           element_size=element_size, rank=r.rank)
        assert r.sent == pred["sent"] and r.received == pred["received"]
        assert len(r.collectives) == pred["collectives"]
        assert abs(r.peak_extra_bytes - pred["peak_extra"]) <= SMALL_TENSORS
        if protocol == "sharded":
            ring = plain_allreduce_bytes(numels, world, element_size) + pred["gram_bytes"]
            assert abs(r.sent - ring) <= 0.02 * ring, (r.sent, ring)
            if granularity != "global":
                # received rows + task rows + own shard + (padding) gather buffer: under 2.5 buckets
                assert r.peak_extra_bytes <= 2.5 * largest
    return records


@pytest.mark.parametrize("world", WORLDS)
def test_simulated_world_ddp_sharded_bucket(world):
    tasks = 8
    records = [simulate_ddp_step("tiny", world, r, num_tasks=tasks, steps=1) for r in _ranks(world)]
    _check_world(records, "tiny", world, tasks)
    kinds = records[0].by_kind()
    k = len(records[0].bucket_numels)
    assert kinds == {"all_to_all": k, "all_reduce": k, "all_gather": k}


@pytest.mark.parametrize("granularity,overlap", [("param", True), ("bucket", False), ("chunk:65536", True)])
@pytest.mark.parametrize("world", [8, 1024])
def test_simulated_world_ddp_granularity(world, granularity, overlap):
    records = [simulate_ddp_step("tiny", world, r, num_tasks=4, granularity=granularity, overlap=overlap)
               for r in (0, world - 1)]
    _check_world(records, "tiny", world, 4, granularity=granularity, overlap=overlap)


@pytest.mark.parametrize("world", [8, 256])
def test_simulated_world_global_holds_the_model(world):
    tasks = 8
    rec = _check_world([simulate_ddp_step("tiny", world, r, num_tasks=tasks, granularity="global")
                        for r in (0, world - 1)], "tiny", world, tasks, granularity="global")
    bucket = simulate_ddp_step("tiny", world, 0, num_tasks=tasks)
    model_bytes = sum(rec[0].bucket_numels) * 4
    # global keeps every bucket's received rows until the last bucket: about one model copy
    assert rec[0].peak_extra_bytes >= model_bytes
    assert rec[0].peak_extra_bytes > bucket.peak_extra_bytes
    assert rec[0].by_kind()["all_reduce"] == 1


@pytest.mark.slow
def test_simulated_world_allgather_grows_with_world():
    peaks = {}
    for world in (8, 16):
        recs = [simulate_ddp_step("tiny", world, r, num_tasks=8, protocol="allgather") for r in (0, world - 1)]
        _check_world(recs, "tiny", world, 8, protocol="allgather")
        peaks[world] = recs[0].peak_extra_bytes
        largest = max(recs[0].bucket_numels) * 4
        assert peaks[world] >= world * largest  # every rank's whole bucket
        assert recs[0].sent == sum((world - 1) * n * 4 for n in recs[0].bucket_numels)
    assert peaks[16] > 1.9 * peaks[8]


@pytest.mark.parametrize("world", WORLDS)
def test_simulated_world_fsdp(world):
    tasks = 8
    groups = fsdp_groups(CONFIGS["tiny"], world)
    records = [simulate_fsdp_step("tiny", world, r, num_tasks=tasks) for r in (0, world - 1)]
    assert len({tuple(r.signature()) for r in records}) == 1
    for r in records:
        pred = predict_fsdp(groups, world, tasks, rank=r.rank)
        assert (r.sent, r.received) == (pred["sent"], pred["received"])
        assert abs(r.peak_extra_bytes - pred["peak_extra"]) <= SMALL_TENSORS
        # the bytes of FSDP's own reduce-scatter plus the Gram all-reduce; no all-gather
        rs = reduce_scatter_bytes([world * g["shard"] for g in groups], world, 4)
        assert abs(r.sent - rs - pred["gram_bytes"]) <= 0.02 * rs
        assert "all_gather" not in r.by_kind()


def test_simulated_world_compressed_wire_halves_bytes():
    full = simulate_ddp_step("tiny", 64, 0, num_tasks=8)
    half = simulate_ddp_step("tiny", 64, 0, num_tasks=8, compress="bf16")
    grams = predict_ddp(ddp_buckets(CONFIGS["tiny"]), 64, 8)["gram_bytes"]
    assert half.sent - grams == (full.sent - grams) // 2
    pred = predict_ddp(ddp_buckets(CONFIGS["tiny"]), 64, 8, wire_size=2)
    assert half.sent == pred["sent"] and abs(half.peak_extra_bytes - pred["peak_extra"]) <= SMALL_TENSORS


def test_simulated_world_bf16_buckets():
    """bf16 gradients (P > T): the row grouping's fp32 transient is in the model and the sim."""
    buckets = ddp_buckets(CONFIGS["tiny"], element_size=2)
    for world in (8, 64):
        rec = simulate_ddp_step("tiny", world, 0, num_tasks=4, dtype=torch.bfloat16)
        pred = predict_ddp(buckets, world, 4, element_size=2)
        assert (rec.sent, rec.received) == (pred["sent"], pred["received"])
        assert abs(rec.peak_extra_bytes - pred["peak_extra"]) <= SMALL_TENSORS
        # received (1 bucket) + its fp32 copy (2) + the fp32 task rows (T/P x 2): the fp32 transient
        # of the row grouping dominates; the hook's own peak_extra_bytes does not count it
        assert rec.peak_extra_bytes <= 4 * max(b.numel for b in buckets) * 2 + SMALL_TENSORS
        assert rec.peak_extra_bytes > rec.state_peak_extra_bytes


def test_simulated_world_layout_matches_ddp_bucketing():
    """Our DDP bucket rule against torch's own ``_compute_bucket_assignment_by_size``."""
    for shapes in (list(reversed(param_shapes(CONFIGS["small"]))), list(reversed(mlp_shapes(1152, 8)))):
        tensors = [torch.zeros(1).expand(*s) for _, s in shapes]  # sizes only, no storage
        for cap_mb in (1, 25):
            idx, _ = dist._compute_bucket_assignment_by_size(tensors, [1 << 20, cap_mb << 20], [False] * len(tensors))
            ours = ddp_buckets(list(reversed(shapes)), bucket_cap_mb=cap_mb)
            assert [len(b) for b in idx] == [len(b.names) for b in ours]


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("protocol,granularity,overlap", [("sharded", "bucket", True), ("sharded", "param", True),
                                                          ("sharded", "bucket", False), ("sharded", "global", True)])
def test_simulated_world_small_llama_25mb(world, protocol, granularity, overlap):
    """The 40M-parameter Llama layout: several real 25 MB buckets per step."""
    records = [simulate_ddp_step("small", world, r, num_tasks=8, protocol=protocol, granularity=granularity,
                                 overlap=overlap) for r in (0, world - 1)]
    _check_world(records, "small", world, 8, protocol=protocol, granularity=granularity, overlap=overlap)
