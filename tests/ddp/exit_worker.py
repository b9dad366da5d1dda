"""One rank of ``test_clean_exit.py``: a few DDP steps through ``bucket_moo_hook`` on gloo, then
a plain return, so that the interpreter shuts down as a user's script does (no ``os._exit``).

Run as ``python -m tests.ddp.exit_worker RANK WORLD PORT``; the exit status must be 0.
"""

from __future__ import annotations

import datetime
import faulthandler
import sys

import torch
import torch.distributed as dist

from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook

#: (state keyword arguments): the code paths that launch asynchronous collectives.
CONFIGS = (
    dict(method="mgda"),  # sharded, overlap: all-to-all and all-gather in flight across calls
    dict(method="mgda", granularity="global"),
    dict(method="mean"),  # DDP's own async all-reduce
    dict(method="gradvac", mode="stash", num_tasks=2, stash_reduce="combined"),
)


def main(rank: int, world: int, port: int) -> None:
    faulthandler.enable(all_threads=True)  # an abort prints every thread's Python stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    for kwargs in CONFIGS:
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0001)
        state = BucketMOOState(process_group=dist.group.WORLD, **kwargs)
        ddp.register_comm_hook(state, bucket_moo_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(3):
            opt.zero_grad()
            tasks = range(state.num_tasks) if state.mode == "stash" else [None]
            for t in tasks:
                x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step * 10 + rank))
                loss = ddp(x).sub(1.0 if rank == 0 else -1.0).pow(2).mean()
                if t is None:
                    loss.backward()
                else:
                    with state.task(t):
                        loss.backward()
            opt.step()
    # Leave the DDP models, states and the process group to the interpreter's shutdown, as
    # many scripts do; only the group is destroyed, as torchrun-launched scripts commonly do.
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
