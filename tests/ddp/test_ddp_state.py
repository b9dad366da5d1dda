"""``BucketMOOState`` validation, checkpointing, the task layout, shard layouts, backend
checks and the diagnostics log -- no process group needed."""

import pickle

import pytest
import torch

import bucketmoo_kernels as bmk
from bucketmoo_kernels.ddp import BucketMOOState, DiagnosticsLog, TaskLayout, bucket_moo_hook
from bucketmoo_kernels.distributed.collectives import check_backend
from bucketmoo_kernels.distributed.diagnostics import BucketRecord
from bucketmoo_kernels.distributed.protocol import local_shard_length, shard_length, shard_segments


@pytest.mark.parametrize("kwargs,exc,words", [
    ({"method": "nope"}, ValueError, "unknown method 'nope'"),
    ({"mode": "tasks"}, ValueError, "mode must be one of"),
    ({"granularity": "layer"}, ValueError, "granularity must be"),
    ({"granularity": "chunk:0"}, ValueError, "granularity must be"),
    ({"granularity": "chunk:x"}, ValueError, "granularity must be"),
    ({"protocol": "ring"}, ValueError, "protocol must be one of"),
    ({"compress": "int8"}, ValueError, "compress must be"),
    ({"compress": "bf16", "mode": "stash", "num_tasks": 2}, ValueError, "compress='bf16' applies to mode='ranks'"),
    ({"mode": "stash"}, ValueError, "needs num_tasks"),
    ({"mode": "stash", "num_tasks": 2, "task_of_rank": [0, 1]}, ValueError, "task_of_rank applies"),
    ({"num_tasks": 0}, ValueError, "num_tasks must be a positive int"),
    ({"stash_reduce": "sum"}, ValueError, "stash_reduce must be"),
    ({"normalization": "l1"}, ValueError, "normalization must be"),
    ({"backend": "gpu"}, ValueError, "backend must be"),
    ({"max_iter_typo": 3}, TypeError, "unknown option(s) max_iter_typo"),
    ({"max_diagnostic_steps": 0}, ValueError, "max_diagnostic_steps"),
])
def test_invalid_settings_name_the_argument(kwargs, exc, words):
    with pytest.raises(exc, match=None) as info:
        BucketMOOState(**kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("task_of_rank,world,num_tasks,words", [
    ([0, 0, 0, 1], 4, None, "does not divide evenly"),
    ([0, 1, 2], 4, None, "one task id per rank"),
    ([0, 5], 2, None, "no rank to task"),
    ([0, 2], 2, 2, "task ids in [0, 2)"),
    ([0, -1], 2, None, "task ids in"),
    ([0, 1], 2, 3, "no rank to task(s) [2]"),
])
def test_task_layout_errors(task_of_rank, world, num_tasks, words):
    with pytest.raises(ValueError) as info:
        TaskLayout.build(task_of_rank, world, num_tasks)
    assert words in str(info.value)


def test_task_layout_groups():
    layout = TaskLayout.build([1, 0, 1, 0], 4)
    assert layout.num_tasks == 2 and layout.ranks_of_task == ((1, 3), (0, 2)) and not layout.identity
    assert TaskLayout.build(None, 3).identity


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (1, 4), (17, 2), (5, 4)])
def test_shard_segments_partition_the_segments(n, world):
    segs = bmk.Segments(torch.tensor([0, n // 3, n // 3, n]))  # includes an empty segment
    m = shard_length(n, world)
    assert m * world >= n > (m - 1) * world
    lengths = torch.zeros(segs.num_segments, dtype=torch.int64)
    for p in range(world):
        local = shard_segments(segs, p, m)
        assert local.numel == local_shard_length(n, world, p) == max(0, min(m, n - p * m))
        assert local.num_segments == segs.num_segments
        lengths += local.lengths
    assert torch.equal(lengths, segs.lengths)
    assert sum(local_shard_length(n, world, p) for p in range(world)) == n


def test_check_backend():
    check_backend("gloo", "cpu", "sharded")
    check_backend("gloo", "cuda", "allgather")
    check_backend("mybackend", "cpu", "sharded")  # unknown plugins pass through
    with pytest.raises(RuntimeError, match="protocol='allgather'"):
        check_backend("gloo", "cuda", "sharded")
    with pytest.raises(RuntimeError, match="cannot do"):
        check_backend("nccl", "cpu", "sharded")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        check_backend("nccl", "cpu", "allreduce")


def test_state_dict_roundtrip_and_pickle():
    state = BucketMOOState(method="pcgrad", granularity="chunk:64", compress="bf16", task_of_rank=[0, 0, 1, 1],
                           record_diagnostics=True, seed=7)
    state.step = 12
    sd = state.state_dict()
    assert "process_group" not in sd and sd["step"] == 12 and sd["method_options"] == {"seed": 7}
    other = BucketMOOState()
    other.load_state_dict(sd, replace_settings=True)
    assert other.state_dict() == sd
    assert other.method_call_options() == {"seed": 19}  # base seed + step: same on every rank
    clone = pickle.loads(pickle.dumps(state))
    assert clone.state_dict() == sd and clone.process_group is None
    with pytest.raises(ValueError, match="version"):
        other.load_state_dict({**sd, "version": 99})
    # version 1 (before bucket_cap_mb and bucket_layout) still loads
    v1 = {k: v for k, v in sd.items() if k not in ("bucket_cap_mb", "bucket_layout")}
    other.load_state_dict({**v1, "version": 1}, replace_settings=True)
    assert other.state_dict() == sd and other.bucket_layout is None
    # a saved layout must cover every parameter once
    other.load_state_dict({**sd, "bucket_layout": [[3, 2], [1, 0]]})
    assert other.bucket_layout == [[3, 2], [1, 0]] and other.state_dict()["bucket_layout"] == [[3, 2], [1, 0]]
    with pytest.raises(ValueError, match="bucket_layout must cover"):
        other.load_state_dict({**sd, "bucket_layout": [[0, 0], [1]]})
    with pytest.raises(ValueError, match="granularity"):
        other.load_state_dict({**sd, "granularity": "bogus"}, replace_settings=True)


def test_load_state_dict_refuses_other_settings_and_names_each():
    saved = BucketMOOState(method="gradvac", task_of_rank=[0, 1], bucket_cap_mb=1.0, beta=0.3)
    saved.step = 5
    sd = saved.state_dict()
    built = BucketMOOState(method="pcd", task_of_rank=[0, 0, 1, 1])
    with pytest.raises(ValueError) as info:
        built.load_state_dict(sd)
    msg = str(info.value)
    for line in ("method: saved 'gradvac', built 'pcd'", "task_of_rank: saved (0, 1), built (0, 0, 1, 1)",
                 "bucket_cap_mb: saved 1.0, built None", "replace_settings=True"):
        assert line in msg, msg
    assert "granularity" not in msg  # only what differs is named
    assert built.method == "pcd" and built.step == 0  # nothing half-loaded
    built.load_state_dict(sd, replace_settings=True)  # the explicit override adopts the saved settings
    assert built.settings == saved.settings and built.step == 5
    # the same settings load; an option given at its default equals one left out
    same = BucketMOOState(method="gradvac", task_of_rank=[0, 1], bucket_cap_mb=1.0, beta=0.3, eps=1e-8)
    same.load_state_dict(sd)
    assert same.step == 5 and same.method_options == {"beta": 0.3, "eps": 1e-8}
    # diagnostics may be switched between runs: the built choice stays
    diag = BucketMOOState(method="gradvac", task_of_rank=[0, 1], bucket_cap_mb=1.0, beta=0.3, record_diagnostics=True)
    diag.load_state_dict(sd)
    assert diag.record_diagnostics is True
    with pytest.raises(ValueError, match="unknown settings"):
        same.load_state_dict({**sd, "methd": "mgda"})
    with pytest.raises(TypeError, match="replace_settings must be a bool"):
        same.load_state_dict(sd, replace_settings="yes")


def test_task_context_outside_stash_mode():
    with pytest.raises(RuntimeError, match="mode='stash'"):
        with BucketMOOState().task(0):
            pass
    state = BucketMOOState(mode="stash", num_tasks=2)
    with pytest.raises(ValueError, match=r"task_id must be an int in \[0, 2\)"):
        with state.task(2):
            pass


def test_python_reducer_pair_is_refused():
    with pytest.raises(NotImplementedError, match="python_reducer"):
        bucket_moo_hook(BucketMOOState(), (torch.zeros(3), torch.nn.Parameter(torch.zeros(3))))


def test_hook_annotations_accepted_by_ddp():
    import inspect

    import torch.distributed as dist

    sig = inspect.signature(bucket_moo_hook)
    assert sig.parameters["bucket"].annotation is dist.GradBucket
    assert sig.return_annotation == torch.futures.Future[torch.Tensor]


def test_diagnostics_log():
    log = DiagnosticsLog(max_steps=2)
    g = torch.tensor([[[4.0, -1.0], [-1.0, 1.0]]])
    for step in range(4):
        w = bmk.solve(g, "mgda")
        log.append(BucketRecord.from_gram(step, 0, g, w))
    assert log.steps() == [2, 3]
    t = log.to_tensors(0)
    assert t["weights"].shape == (2, 1, 2) and t["cosine"].shape == (2, 1, 2, 2)
    torch.testing.assert_close(t["cosine"][0, 0, 0, 1], torch.tensor(-0.5))
    torch.testing.assert_close(t["residual"], t["combined_norm"], atol=1e-5, rtol=1e-5)
    assert (t["combined_norm"] <= t["mean_norm"]).all()
    with pytest.raises(KeyError, match="no diagnostics recorded for bucket 3"):
        log.to_tensors(3)
    assert set(log.summary()) == {"step", "bucket", "min_cosine", "combined_norm", "mean_norm", "residual",
                                  "nonfinite"}
    assert t["finite"].all() and log.summary()["nonfinite"].tolist() == [0, 0]


@pytest.mark.parametrize("kwargs, expected", [
    (dict(method="mean"), "allreduce"),
    (dict(method="mean", compress="bf16"), "sharded"),  # compressed mean runs the MOO protocol
    (dict(method="mean", normalization="l2"), "sharded"),
    (dict(method="mean", record_diagnostics=True), "sharded"),
    (dict(method="mgda"), "sharded"),
    (dict(method="mgda", protocol="allgather"), "allgather"),
])
def test_backend_check_follows_the_protocol_the_hook_runs(monkeypatch, kwargs, expected):
    """The one-time backend check must validate the collectives the hook will really issue:
    DDP's all-reduce only when ``plain_average`` sends ``mean`` down that path."""
    from bucketmoo_kernels.ddp import hook

    checked = []
    monkeypatch.setattr(hook.collectives, "backend_name", lambda group: "gloo")
    monkeypatch.setattr(hook.collectives, "check_backend", lambda backend, device, protocol: checked.append(protocol))
    state = BucketMOOState(**kwargs)
    hook._check_once(state, torch.zeros(4))
    assert checked == [expected]
    assert state.plain_average == (expected == "allreduce")


def test_predicted_rebuilt_layout_matches_what_ddp_builds():
    """The layouts DDP 2.13 built for the tests' model after its first iteration (recorded with
    a probe hook on 2 gloo processes): cap 0.0004 MiB -> [[5, 4, 3, 2], [1, 0]]; the default
    cap (25 MiB, 1 MiB first bucket) -> one bucket in reverse parameter order."""
    from bucketmoo_kernels.distributed.bucket_layout import bucket_caps, predict_rebuilt_layout, split_bucket
    from ddp_helpers import make_model

    params = list(make_model().parameters())
    assert predict_rebuilt_layout(params, 0.0004) == [[5, 4, 3, 2], [1, 0]]
    assert predict_rebuilt_layout(params, None) == [[5, 4, 3, 2, 1, 0]]
    assert bucket_caps(None) == (1024 * 1024, 25 * 1024 * 1024) and bucket_caps(0.0004) == (419, 419)
    buf = torch.arange(sum(p.numel() for p in params), dtype=torch.float32)
    virtual = split_bucket(buf, params, [[5, 4, 3, 2], [1, 0]])
    assert [vb.index() for vb in virtual] == [0, 1] and [vb.is_last() for vb in virtual] == [False, True]
    assert virtual[1].buffer().numel() == params[0].numel() + params[1].numel()
    target = torch.zeros_like(buf)
    for vb in virtual:
        vb.write_back(target)
    assert torch.equal(target, buf)  # the copies cover the single bucket exactly


class _FakeBucket:
    """The parts of ``GradBucket`` that ``MOORuntime.observe_bucket`` reads."""

    def __init__(self, index, is_last, params):
        self._index, self._is_last, self._params = index, is_last, params

    def index(self):
        return self._index

    def is_last(self):
        return self._is_last

    def parameters(self):
        return self._params

    def buffer(self):
        return torch.zeros(sum(p.numel() for p in self._params))


@pytest.mark.parametrize("observed,order_matters,warns", [
    ([[4, 5, 3, 2], [1, 0]], False, False),  # only the order inside a bucket: bucket/param segments alike
    ([[4, 5, 3, 2], [1, 0]], True, True),    # chunk segments cut across parameters: the order counts
    ([[5, 4, 3], [2, 1, 0]], False, True),   # other members: the first iteration's buckets differed
    ([[5, 4, 3, 2], [1, 0]], True, False),   # as predicted
])
def test_observed_layout_warns_only_when_the_first_iteration_differed(caplog, observed, order_matters, warns):
    from bucketmoo_kernels.distributed.bucket_layout import VirtualBucket
    from bucketmoo_kernels.distributed.runtime import MOORuntime

    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(6)]
    single = _FakeBucket(0, True, params)
    rt = MOORuntime(num_tasks=2)
    rt.bucket_layout = [[5, 4, 3, 2], [1, 0]]
    assert isinstance(rt.first_iteration_buckets(single, None)[0], VirtualBucket)
    with caplog.at_level("DEBUG", logger="bucketmoo_kernels"):
        for i, members in enumerate(observed):
            rt.observe_bucket(_FakeBucket(i, i == len(observed) - 1, [params[j] for j in members]),
                              order_matters=order_matters)
    assert rt.bucket_layout == observed
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "rebuilt its buckets" in r.message]
    assert bool(warned) == warns
