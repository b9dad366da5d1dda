"""The DeepSpeed scenarios of ``test_deepspeed.py``, run in 2 spawned gloo processes.

One spawn runs every scenario (DeepSpeed's import and first ``initialize`` cost most of the
time); each scenario's outcome -- final parameters, ``state.step``, or the error raised -- is
returned to the parent, which checks it against the float64 reference.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
import traceback

import torch

from integration_helpers import LR, flat_params, loss_fn, make_model, task_batch

STEPS = 3
BUCKET = 30  # elements: the tiny model's 83 parameters make 3 ZeRO buckets, one an oversized parameter

# ZeRO stage and the zero_optimization options of each reduction path.
VARIANTS = {
    "z0": (0, {}),
    "z1": (1, {}),
    "z1-noncontig": (1, {"contiguous_gradients": False}),
    "z2": (2, {}),
    "z2-overlap": (2, {"overlap_comm": True}),
    "z2-noncontig": (2, {"contiguous_gradients": False}),
    "z2-allreduce": (2, {"reduce_scatter": False}),
    "z2-overlap-noncontig": (2, {"overlap_comm": True, "contiguous_gradients": False}),
}


def _import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # The CPU accelerator JIT-compiles a shared-memory all-reduce op on first use (minutes);
    # these tests use gloo collectives only, so skip building it.
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def ds_config(stage: int, zero_extra: dict | None = None, gas: int = 1) -> dict:
    zero = {"stage": stage}
    if stage in (1, 2):
        zero.update(reduce_bucket_size=BUCKET, allgather_bucket_size=BUCKET)
    zero.update(zero_extra or {})
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 by default
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def make_engine(deepspeed, stage: int, zero_extra: dict | None = None, gas: int = 1):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(stage, zero_extra, gas))
    return engine


def train(engine, rank: int, first: int, steps: int, gas: int = 1) -> None:
    """``steps`` optimizer steps of ``gas`` micro-batches each (micro-batch k: ``task_batch(rank, k)``)."""
    for k in range(first * gas, (first + steps) * gas):
        x, y = task_batch(rank, k)
        loss = loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()


def run(deepspeed, rank: int, variant: str, state_kwargs: dict | None, steps: int = STEPS, gas: int = 1) -> dict:
    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.deepspeed import apply_bucket_moo

    stage, extra = VARIANTS[variant]
    engine = make_engine(deepspeed, stage, extra, gas)
    state = None
    if state_kwargs is not None:
        state = BucketMOOState(**state_kwargs)
        apply_bucket_moo(engine, state)
    train(engine, rank, 0, steps, gas)
    out = {"params": flat_params(engine.module), "step": None if state is None else state.step}
    if state is not None and state.record_diagnostics:
        out["records"] = len(state.diagnostics)
    return out


def checkpoint_roundtrip(deepspeed, rank: int, variant: str, state_kwargs: dict, root: str) -> dict:
    """Train 2 steps, save, rebuild engine and state, load, train 1 more."""
    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.deepspeed import apply_bucket_moo

    stage, extra = VARIANTS[variant]
    engine = make_engine(deepspeed, stage, extra)
    apply_bucket_moo(engine, BucketMOOState(**state_kwargs))
    train(engine, rank, 0, 2)
    engine.save_checkpoint(root, tag="t", client_state={"mine": 7})
    resumed = make_engine(deepspeed, stage, extra)
    state = BucketMOOState(**state_kwargs)
    apply_bucket_moo(resumed, state)
    _, client = resumed.load_checkpoint(root, tag="t")
    step_after_load = state.step
    train(resumed, rank, 2, STEPS - 2)
    return {"params": flat_params(resumed.module), "step": state.step, "step_after_load": step_after_load,
            "client_mine": client.get("mine"), "client_has_state": "bucket_moo" in client}


def _error_of(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)
    return None


def misuse(deepspeed, rank: int) -> dict:
    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.deepspeed import apply_bucket_moo

    out = {}
    engine3 = make_engine(deepspeed, 3, {})
    out["zero3"] = _error_of(lambda: apply_bucket_moo(engine3, BucketMOOState(method="mgda")))
    engine = make_engine(deepspeed, 2, {})
    out["tasks"] = _error_of(lambda: apply_bucket_moo(engine, BucketMOOState(method="mgda", num_tasks=3)))
    out["stash"] = _error_of(lambda: apply_bucket_moo(engine, BucketMOOState(method="mgda", mode="stash",
                                                                              num_tasks=2)))
    out["not_engine"] = _error_of(lambda: apply_bucket_moo(engine.module, BucketMOOState(method="mgda")))
    apply_bucket_moo(engine, BucketMOOState(method="mgda"))
    out["twice"] = _error_of(lambda: apply_bucket_moo(engine, BucketMOOState(method="mgda")))
    return out


SCENARIOS = {}
for _v in VARIANTS:
    SCENARIOS[f"{_v}/plain"] = ("run", _v, None)
    SCENARIOS[f"{_v}/mean"] = ("run", _v, {"method": "mean"})
    SCENARIOS[f"{_v}/mgda-param"] = ("run", _v, {"method": "mgda", "granularity": "param"})
for _v in ("z0", "z1", "z2", "z2-noncontig"):
    SCENARIOS[f"{_v}/mgda-global"] = ("run", _v, {"method": "mgda", "granularity": "global"})
for _v in ("z0", "z1", "z2"):
    SCENARIOS[f"{_v}/mgda-param-gas2"] = ("run", _v, {"method": "mgda", "granularity": "param"}, 2)
SCENARIOS["z2/mgda-bucket"] = ("run", "z2", {"method": "mgda", "granularity": "bucket"})
SCENARIOS["z2/mean-protocol"] = ("run", "z2", {"method": "mean", "record_diagnostics": True})
SCENARIOS["z2/ckpt"] = ("ckpt", "z2", {"method": "mgda", "granularity": "param"})
SCENARIOS["misuse"] = ("misuse",)


def all_scenarios(rank: int, world: int) -> dict:
    deepspeed = _import_deepspeed()
    results, times = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "ckpt")
        import torch.distributed as dist

        obj = [root]
        dist.broadcast_object_list(obj, src=0)  # one checkpoint folder for both ranks
        root = obj[0]
        for name, spec in SCENARIOS.items():
            start = time.perf_counter()
            try:
                if spec[0] == "run":
                    results[name] = run(deepspeed, rank, spec[1], spec[2], gas=spec[3] if len(spec) > 3 else 1)
                elif spec[0] == "ckpt":
                    results[name] = checkpoint_roundtrip(deepspeed, rank, spec[1], spec[2], root)
                else:
                    results[name] = misuse(deepspeed, rank)
            except Exception:  # noqa: BLE001  (reported per scenario)
                results[name] = {"error": traceback.format_exc()}
            times[name] = time.perf_counter() - start
            dist.barrier()
    return {"results": results, "times": times}
