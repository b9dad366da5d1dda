"""``BucketEngine`` driven directly, as a new front end would: flat tensors in, futures out.

On 2 gloo processes, rank r's flat buckets hold task r's gradient; the engine's combined
buckets must match the float64 oracle of ``tests.references`` per segment (bucket, param,
global over all buckets), in place and into ``out``, with and without pipelining, and as a
reduce-scatter (``out`` = this rank's shard of a rank-major input). The step counter moves
once per ``finish_step`` (or per ``reductions_per_step`` reductions).
"""

from __future__ import annotations

import pytest
import torch

from bucketmoo_kernels.ddp import BucketMOOState
from bucketmoo_kernels.distributed.engine import BucketEngine
from tests import references
from tests.ddp.ddp_helpers import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SIZES = [[3, 4], [5], [2, 6, 1]]  # three buckets, their parameter sizes
WORLD = 2


def _bucket(rank: int, index: int) -> torch.Tensor:
    n = sum(SIZES[index])
    gen = torch.Generator().manual_seed(100 * index + rank)
    return torch.randn(n, generator=gen) + (1.0 if rank == 0 else -1.0)


def _engine_worker(rank: int, world: int) -> dict:
    out = {}
    for granularity in ("bucket", "param", "global"):
        for holds in (True, False):
            state = BucketMOOState(method="mgda", granularity=granularity)
            engine = BucketEngine(state, holds_buffers=holds)
            flats = [_bucket(rank, i) for i in range(len(SIZES))]
            targets = [torch.empty_like(f) for f in flats] if not holds else flats
            futures = [engine.reduce(i, flats[i], SIZES[i], out=None if holds else targets[i])
                       for i in range(len(SIZES))]
            engine.finish_backward()
            engine.finish_step()
            out[(granularity, holds)] = {"combined": [f.wait().clone() for f in futures], "step": state.step,
                                         "same_object": [f.wait() is t for f, t in zip(futures, targets)]}
    # a reduce-scatter: rank-major input [world * shard], this rank's shard as the output
    state = BucketMOOState(method="mgda")
    engine = BucketEngine(state, holds_buffers=False, reductions_per_step=2)
    shard = 4
    full = [_bucket(r, 2)[:WORLD * shard] for r in range(world)]
    outs = []
    for index in range(2):
        shard_out = torch.empty(shard)
        engine.reduce(index, full[rank].clone(), [shard], out=shard_out).wait()
        engine.end_of_reduction()
        outs.append(shard_out)
    out["reduce_scatter"] = {"shards": outs, "step": state.step}
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_engine_worker, WORLD)


def _expected(granularity: str) -> list[torch.Tensor]:
    rows = [torch.stack([_bucket(r, i) for r in range(WORLD)]).double() for i in range(len(SIZES))]
    if granularity == "global":
        whole = references.combined_per_segment(torch.cat(rows, dim=1), None, "mgda")
        return list(torch.split(whole, [sum(s) for s in SIZES]))
    return [references.combined_per_segment(r, sizes if granularity == "param" else None, "mgda")
            for r, sizes in zip(rows, SIZES)]


@pytest.mark.parametrize("granularity", ["bucket", "param", "global"])
@pytest.mark.parametrize("holds", [True, False], ids=["holds-buffers", "reuses-buffers"])
def test_engine_reduce_matches_the_float64_oracle(results, granularity, holds):
    expected = _expected(granularity)
    for rank, res in enumerate(results):
        got = res[(granularity, holds)]
        assert got["step"] == 1 and all(got["same_object"])
        for b, (g, e) in enumerate(zip(got["combined"], expected)):
            err = float((g.double() - e).abs().max() / e.abs().max())
            assert err < 1e-5, f"rank {rank} bucket {b}: relative error {err:.2e}"
    for b in range(len(SIZES)):  # replicas bit-identical
        assert torch.equal(results[0][(granularity, holds)]["combined"][b], results[1][(granularity, holds)]["combined"][b])


def test_engine_reduce_scatter_writes_this_ranks_shard(results):
    shard = 4
    rows = torch.stack([_bucket(r, 2)[:WORLD * shard] for r in range(WORLD)]).double()
    expected = references.combined_per_segment(rows, None, "mgda")  # one segment: the whole group
    for rank, res in enumerate(results):
        got = res["reduce_scatter"]
        assert got["step"] == 1  # two reductions per step
        for shard_out in got["shards"]:
            part = expected[rank * shard:(rank + 1) * shard]
            assert float((shard_out.double() - part).abs().max() / expected.abs().max()) < 1e-5

