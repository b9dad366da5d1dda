"""The configurations of the golden-number test (``test_golden_numbers.py``).

A few optimizer steps of a tiny model through every distributed front end -- the DDP hook
(tasks on ranks and stashed tasks, bucket / param / chunk / global granularity, mgda,
pcgrad, gradvac, ``ema``, compression, the all-gather protocol), FSDP2's custom
reduce-scatter and the DeepSpeed ZeRO-0/1/2 patch -- on 2 gloo processes, in one spawn.
Each configuration's final parameters are hashed (SHA-256 of their float32 bytes); the
golden file ``golden/params.json`` holds the hashes written by the code before the bucket
engine refactor (main at ee8865d), so any change of a number in any front end shows.

Everything the numbers depend on (model, data, optimizer, settings) is written here, apart
from the library: a change elsewhere in the tests cannot move them.

Regenerate (only when a change of numbers is intended and explained)::

    OMP_NUM_THREADS=1 python -m tests.ddp.golden_workers --write
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_FILE = GOLDEN_DIR / "params.json"
#: A ``BucketMOOState.state_dict()`` written by main at ee8865d (gradvac + ema, after training).
CHECKPOINT_FILE = GOLDEN_DIR / "state_dict_ee8865d.pt"
WORLD = 2
STEPS = 3
IN, HIDDEN, OUT = 5, 6, 3

#: DDP hook configurations: BucketMOOState keyword arguments (``mode`` included).
DDP_CONFIGS = {
    "ddp/ranks-sharded-overlap-bucket-mgda": dict(method="mgda"),
    "ddp/ranks-sharded-bucket-mgda-nooverlap": dict(method="mgda", overlap=False),
    "ddp/ranks-sharded-param-pcgrad": dict(method="pcgrad", granularity="param", seed=3),
    "ddp/ranks-sharded-chunk-mgda-bf16": dict(method="mgda", granularity="chunk:7", compress="bf16"),
    "ddp/ranks-sharded-global-mgda": dict(method="mgda", granularity="global"),
    "ddp/ranks-sharded-bucket-gradvac": dict(method="gradvac", granularity="bucket"),
    "ddp/ranks-sharded-param-ema": dict(method="mgda", granularity="param", ema=0.5),
    "ddp/ranks-allgather-bucket-gradvac": dict(method="gradvac", protocol="allgather"),
    "ddp/ranks-allgather-global-pcgrad": dict(method="pcgrad", protocol="allgather", granularity="global"),
    "ddp/ranks-allgather-graddrop": dict(method="graddrop", protocol="allgather"),
    "ddp/ranks-mean": dict(method="mean"),
    "ddp/stash-tasks-bucket-mgda": dict(method="mgda", mode="stash", num_tasks=2),
    "ddp/stash-tasks-param-pcgrad": dict(method="pcgrad", mode="stash", num_tasks=2, granularity="param"),
    "ddp/stash-tasks-global-mgda": dict(method="mgda", mode="stash", num_tasks=2, granularity="global"),
    "ddp/stash-tasks-bucket-gradvac": dict(method="gradvac", mode="stash", num_tasks=2),
    "ddp/stash-combined-bucket-mgda": dict(method="mgda", mode="stash", num_tasks=2, stash_reduce="combined"),
    "ddp/stash-combined-param-ema": dict(method="mgda", mode="stash", num_tasks=2, stash_reduce="combined",
                                         granularity="param", ema=0.5),
    "ddp/stash-combined-global-gradvac": dict(method="gradvac", mode="stash", num_tasks=2,
                                              stash_reduce="combined", granularity="global"),
}

#: FSDP2 configurations (mode="ranks").
FSDP_CONFIGS = {
    "fsdp/bucket-mgda": dict(method="mgda"),
    "fsdp/param-pcgrad": dict(method="pcgrad", granularity="param", seed=1),
    "fsdp/bucket-gradvac": dict(method="gradvac"),
    "fsdp/param-ema-bf16": dict(method="mgda", granularity="param", ema=0.5, compress="bf16"),
    "fsdp/mean": dict(method="mean"),
}

#: DeepSpeed configurations: (ZeRO stage, zero_optimization extras, state keyword arguments).
DS_CONFIGS = {
    "ds/z0-param-mgda": (0, {}, dict(method="mgda", granularity="param")),
    "ds/z0-global-mgda": (0, {}, dict(method="mgda", granularity="global")),
    "ds/z1-bucket-gradvac": (1, {}, dict(method="gradvac")),
    "ds/z2-param-pcgrad": (2, {}, dict(method="pcgrad", granularity="param", seed=5)),
    "ds/z2-global-mgda": (2, {}, dict(method="mgda", granularity="global")),
    "ds/z2-noncontig-param-ema": (2, {"contiguous_gradients": False}, dict(method="mgda", granularity="param",
                                                                            ema=0.5)),
}


def param_hash(params: torch.Tensor) -> str:
    return hashlib.sha256(params.detach().to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh()),
                               torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh()),
                               torch.nn.Linear(HIDDEN, OUT))


def _batch(step: int, task: int, micro: int = 0):
    gen = torch.Generator().manual_seed(1000 * step + 10 * task + micro)
    x = torch.randn(4, IN, generator=gen)
    y = torch.randn(4, OUT, generator=gen) + (1.5 if task == 0 else -1.5)
    return x, y


def _loss(model, data) -> torch.Tensor:
    x, y = data
    return torch.nn.functional.mse_loss(model(x), y)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def run_ddp(rank: int, kwargs: dict, steps: int = STEPS, return_state: bool = False):
    from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook

    ddp = torch.nn.parallel.DistributedDataParallel(_model(), bucket_cap_mb=0.0002)
    state = BucketMOOState(**kwargs)
    ddp.register_comm_hook(state, bucket_moo_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        if state.settings.mode == "stash":
            for t in range(state.settings.num_tasks):
                with state.task(t):
                    _loss(ddp, _batch(step, t, rank)).backward()
        else:
            _loss(ddp, _batch(step, rank)).backward()
        opt.step()
    params = _flat(ddp.module.parameters())
    return (params, state) if return_state else params


def run_fsdp(rank: int, kwargs: dict) -> torch.Tensor:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.fsdp import apply_bucket_moo

    model = _model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in list(model)[:2]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    apply_bucket_moo(model, BucketMOOState(mode="ranks", **kwargs))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        opt.zero_grad()
        _loss(model, _batch(step, rank)).backward()
        opt.step()
    return _flat(p.full_tensor() for p in model.parameters())


def _import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # The CPU accelerator would JIT-compile a shared-memory all-reduce op; gloo is used instead.
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def run_deepspeed(deepspeed, rank: int, stage: int, extra: dict, kwargs: dict) -> torch.Tensor:
    from bucketmoo_kernels.ddp import BucketMOOState
    from bucketmoo_kernels.integrations.deepspeed import apply_bucket_moo

    model = _model()
    zero = {"stage": stage, **({"reduce_bucket_size": 40, "allgather_bucket_size": 40} if stage else {}), **extra}
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": zero,
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
              "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                           config=config)
    apply_bucket_moo(engine, BucketMOOState(mode="ranks", **kwargs))
    for step in range(STEPS):
        loss = _loss(engine, _batch(step, rank))
        engine.backward(loss)
        engine.step()
    return _flat(engine.module.parameters())


def checkpoint_state(rank: int) -> dict:
    """The state_dict of a gradvac + ema state after 2 DDP steps (layout, method states)."""
    _, state = run_ddp(rank, dict(method="gradvac", granularity="param", ema=0.3, beta=0.2), steps=2,
                       return_state=True)
    return state.state_dict()


def all_configs(rank: int, world: int, with_deepspeed: bool) -> dict:
    """Every configuration on this rank: name -> hash (or ``{"error": traceback}``), plus the
    checkpoint state_dict."""
    out: dict = {}

    def attempt(name, fn):
        try:
            out[name] = param_hash(fn())
        except Exception:  # noqa: BLE001  (reported per configuration)
            out[name] = {"error": traceback.format_exc()}
        dist.barrier()

    for name, kwargs in DDP_CONFIGS.items():
        attempt(name, lambda kwargs=kwargs: run_ddp(rank, kwargs))
    for name, kwargs in FSDP_CONFIGS.items():
        attempt(name, lambda kwargs=kwargs: run_fsdp(rank, kwargs))
    if with_deepspeed:
        deepspeed = _import_deepspeed()
        for name, (stage, extra, kwargs) in DS_CONFIGS.items():
            attempt(name, lambda stage=stage, extra=extra, kwargs=kwargs: run_deepspeed(deepspeed, rank, stage,
                                                                                         extra, kwargs))
    out["_checkpoint"] = checkpoint_state(rank)
    return out


def _write() -> None:
    from tests.ddp.ddp_helpers import run_distributed

    ranks = run_distributed(all_configs, WORLD, True, timeout_s=300)
    for r in ranks:
        errors = {k: v for k, v in r.items() if isinstance(v, dict) and "error" in v}
        if errors:
            raise SystemExit(f"configurations failed: {errors}")
    hashes = {k: v for k, v in ranks[0].items() if not k.startswith("_")}
    differ = [k for k in hashes if any(r[k] != hashes[k] for r in ranks)]
    if differ:
        raise SystemExit(f"the ranks ended with different parameters in {differ}")
    GOLDEN_DIR.mkdir(exist_ok=True)
    GOLDEN_FILE.write_text(json.dumps({"written_by": "main ee8865d", "world": WORLD, "steps": STEPS,
                                       "hashes": hashes}, indent=1, sort_keys=True) + "\n")
    torch.save(ranks[0]["_checkpoint"], CHECKPOINT_FILE)
    print(f"wrote {GOLDEN_FILE} ({len(hashes)} configurations) and {CHECKPOINT_FILE}")


if __name__ == "__main__":
    if "--write" not in sys.argv:
        raise SystemExit(__doc__)
    _write()
