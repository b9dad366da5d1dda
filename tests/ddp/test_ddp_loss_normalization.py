"""Loss-based normalisation in tasks-on-ranks mode: every rank all-gathers the task losses
(``state.gather_losses``) and the hook solves on the normalised Gram; the combined gradient
must equal the float64 oracle (``tests.references``: MGDA on the task gradients divided by
their losses, or by loss times norm) with the same losses."""

import pytest
import torch

from bucketmoo_kernels.ddp import BucketMOOState, bucket_moo_hook
from tests.ddp.ddp_helpers import (batch, gradient_scale, loss_of, make_model, reference_combined, run_distributed,
                                   task_gradients)

pytestmark = pytest.mark.distributed


def loss_normalization_worker(rank: int, world: int, normalization: str) -> dict:
    model = make_model()
    ref_model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0004)
    state = BucketMOOState(method="mgda", normalization=normalization)
    ddp.register_comm_hook(state, bucket_moo_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    errors, seen = [], []
    for step in range(2):
        ref_model.load_state_dict(model.state_dict())
        opt.zero_grad(set_to_none=True)
        loss = loss_of(ddp, batch(step, rank, 0))
        losses = state.gather_losses(loss)
        loss.backward()
        expected_losses = torch.tensor([loss_of(ref_model, batch(step, r, 0)).item() for r in range(world)],
                                       dtype=torch.float64)
        seen.append(torch.allclose(losses, expected_losses, rtol=1e-6, atol=0))
        task_grads = task_gradients(ref_model, [[[batch(step, r, 0)]] for r in range(world)])
        expected = reference_combined(ref_model, model, state, task_grads, "mgda", "bucket",
                                      {"normalization": normalization, "losses": losses}, step)
        params = list(model.parameters())
        for idx, combined in expected:
            got = torch.cat([params[i].grad.reshape(-1) for i in idx]).double()
            errors.append((got - combined).abs().max().item() / gradient_scale(task_grads, idx))
        opt.step()
    return {"errors": errors, "losses_ok": seen}


def test_loss_normalizations_match_reference():
    for normalization in ("loss", "loss+"):
        for rank, res in enumerate(run_distributed(loss_normalization_worker, 2, normalization)):
            assert all(res["losses_ok"]), f"{normalization} rank {rank}: gathered losses differ"
            assert max(res["errors"]) < 1e-5, f"{normalization} rank {rank}: errors {res['errors']}"
