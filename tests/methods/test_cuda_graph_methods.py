"""Every method's weight step captured in a CUDA graph (``gpu``: skipped without a GPU).

For each method (stateful ones with a :class:`MethodState`, element-wise ones through
``fused_bucket_moo``) and backend (``torch``: the methods' torch functions; ``auto``: the
native weight step where it runs the method): warm up on a side stream, capture
``fused_bucket_moo(..., check_finite=False)`` into a ``torch.cuda.CUDAGraph``, replay it on
new gradients and compare with eager calls on the same data. A stateful step is compared
over one replay with the eager second step (the capture reads the state left by the warm-up
step, as the eager run does); a stateless one over two replays on different data.

Methods listed in ``test_host_sync_free.KNOWN_SYNC`` (a weight step that still reads device
data on the host; none now) would be xfails here: capture refuses the sync.
"""

from __future__ import annotations

import pytest
import torch

import bucketmoo_kernels as bmk
from bucketmoo_kernels.inputs import Segments
from bucketmoo_kernels.methods import MethodState, available_methods
from bucketmoo_kernels.weight_step import WeightStep

from test_host_sync_free import KNOWN_SYNC

pytestmark = pytest.mark.gpu

NUM_TASKS = 3
OPTIONS = {"constant": {"weights": [1.0, 2.0, 3.0]}, "graddrop": {"seed": 3}, "mgda": {"solver": "pgd"},
           "cagrad": {"solver": "iterative"}}


def _cases():
    out = []
    for method in available_methods():
        for backend in ("torch", "auto"):
            # strict for the torch functions; with 'auto' a native weight step may run the method
            marks = [pytest.mark.xfail(raises=RuntimeError, strict=backend == "torch", reason=KNOWN_SYNC[method])] \
                if method in KNOWN_SYNC else []
            out.append(pytest.param(method, backend, id=f"{method}-{backend}", marks=marks))
    out.append(pytest.param("mgda", "torch", id="mgda-ema-torch"))
    return out


def _grads(seed: int, n: int = 4099) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(NUM_TASKS, n, generator=gen)
    g[1:] -= 0.5 * g[0]  # conflicts
    return g.cuda()


@pytest.mark.parametrize("method, backend", _cases())
def test_capture_replay_equals_eager(method, backend, request):
    options = dict(OPTIONS.get(method, {}))
    if "ema" in request.node.callspec.id:
        options["ema"] = 0.5
    step = WeightStep(method, options)
    stateful = step.needs_state
    segs = Segments.from_lengths([1000, 3, 0, 3096])
    static = _grads(0)
    out = torch.empty(static.shape[1], device="cuda")

    def run(grads, state, target=None):
        return bmk.fused_bucket_moo(grads, segments=segs, out=target, backend=backend, check_finite=False,
                                    weight_step=step, method_state=state)

    state_graph = MethodState() if stateful else None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: allocator, library handles, the state's tensors
        run(static, state_graph, out)
        if not stateful:
            run(static, None, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(static, state_graph, out)

    if stateful:
        state_eager = MethodState()
        run(_grads(0), state_eager)
        expected = run(_grads(1), state_eager)
        static.copy_(_grads(1))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        return
    for seed in (1, 2):
        static.copy_(_grads(seed))
        graph.replay()
        torch.cuda.synchronize()
        expected = run(_grads(seed), None)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        assert torch.isfinite(out).all()
