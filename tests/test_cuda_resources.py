"""Resources of the CUDA kernels: the local-memory budget check (runs anywhere: it parses
ptxas reports) and, on a GPU, how much device memory the first launch of each solver and
weight-step kernel reserves (the ptxas figures themselves are checked against the budgets in
CI by tools/check_cuda_compile.sh)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "check_cuda_local_memory.sh"

_PGD32 = "_ZN9bucketmoo4cuda6detail14weights_kernelILi32ELb0ELb0EEEvPKfliNS_6solver10MethodSpecEPKdPf"
_COMBINE = "_ZN9bucketmoo4cuda6detail14combine_kernelI13__nv_bfloat16Li1ELb0EEEvPvNS1_8GradPtrsElPKfPKll"
_UNKNOWN = "_ZN9bucketmoo4cuda6detail13mystery_kernelEv"


def _report(entries):
    """A ptxas -v report in nvcc's format for (mangled name, stack bytes) pairs."""
    lines = []
    for name, stack in entries:
        lines.append(f"ptxas info    : Compiling entry function '{name}' for 'sm_90'")
        lines.append("ptxas info    : Function properties for " + name)
        lines.append(f"    {stack} bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
        lines.append("ptxas info    : Used 40 registers, used 0 barriers, 0 bytes smem")
    return "\n".join(lines) + "\n"


def _run(tmp_path, entries):
    log = tmp_path / "kernels.ptxas"
    log.write_text(_report(entries))
    return subprocess.run(["bash", str(SCRIPT), str(log)], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("bash") is None or (shutil.which("c++filt") is None and shutil.which("cu++filt") is None),
                    reason="needs bash and c++filt")
def test_local_memory_budget_check_passes_and_fails(tmp_path):
    ok = _run(tmp_path, [(_PGD32, 2208), (_COMBINE, 0)])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "weights_kernel<32, false, false>" in ok.stdout and "2208" in ok.stdout
    # The 18 KiB frame the PGD weight step used to have is over its budget.
    over = _run(tmp_path, [(_PGD32, 18384), (_COMBINE, 0)])
    assert over.returncode == 1 and "OVER BUDGET" in over.stdout
    # A kernel without a budget line fails too, and so does a report with no kernel.
    unknown = _run(tmp_path, [(_UNKNOWN, 0)])
    assert unknown.returncode == 1 and "NO BUDGET" in unknown.stdout
    empty = _run(tmp_path, [])
    assert empty.returncode == 1


@pytest.mark.gpu
def test_first_pgd_weight_step_reserves_little_device_memory():
    """The driver reserves a kernel's stack frame for every resident thread. The PGD weight
    step used to need ~18 KiB a thread (about 5 GB on an H100); now ~2.2 KiB (about 0.6 GB).
    Measured as the drop of the driver's free memory across the first launch."""
    import bucketmoo_kernels as bm

    if bm.available_backends("cuda").get("cuda") is not None:
        pytest.skip("the cuda backend is not available")
    grads = torch.randn(12, 4096, device="cuda")
    out = torch.empty(4096, device="cuda")
    # Warm up everything but the PGD kernel (gram, combine, small weight step).
    bm.fused_bucket_moo(grads[:3], segments=512, out=out, backend="cuda", check_finite=False)
    torch.cuda.synchronize()
    free_before, total = torch.cuda.mem_get_info()
    bm.fused_bucket_moo(grads, segments=512, out=out, backend="cuda", check_finite=False, solver="pgd")
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    props = torch.cuda.get_device_properties(0)
    threads = props.multi_processor_count * props.max_threads_per_multi_processor
    drop = free_before - free_after
    # 4 KiB a thread bounds the 2.2 KiB frame plus the allocator's and the module's share.
    assert drop < 4096 * threads + (64 << 20), f"first PGD launch took {drop / 2**20:.0f} MiB"


# ---- every solver and weight-step kernel -------------------------------------------------------
# (kernel as the budget file names it, how to launch it). Ordered by budget: the driver keeps the
# largest reservation so far, so after the k-th launch the reservation is the largest stack frame
# of kernels 1..k, which must stay within the k-th (largest so far) budget.
WEIGHT_KERNELS = [
    ("solve_mgda_exact_kernel", "torch.ops.bucketmoo.solve_mgda(G64[5], 2, 100, 0.0)"),
    ("weights_kernel<8, false, false>", "bm.solve(G32[5], 'mgda', backend='cuda', solver='exact')"),
    ("solve_cagrad_kernel", "torch.ops.bucketmoo.solve_cagrad(G64[8], 0.5, 1)"),
    ("weights_kernel<8, true, false>", "bm.solve(G32[8], 'cagrad', backend='cuda', c=0.5)"),
    ("solve_mgda_pgd_kernel", "torch.ops.bucketmoo.solve_mgda(G64[12], 3, 50, 0.0)"),
    ("weights_kernel<32, false, false>", "bm.solve(G32[12], 'mgda', backend='cuda', solver='pgd')"),
    ("solve_dual_cone_kernel", "torch.ops.bucketmoo.solve_dual_cone(G64[16], 4, 0.0, 1e-4, 200)"),
    ("weights_kernel<16, false, true>", "bm.solve(G32[16], 'upgrad', backend='cuda')"),
]

_FIRST_LAUNCH_SCRIPT = """
import json, sys, torch, bucketmoo_kernels as bm
launches = json.loads(sys.argv[1])
# Inputs made before the baseline; warm up the allocator and the Gram/combine kernels (no stack
# frame), no solver.
G64 = {}
for t in (5, 8, 12, 16):
    g = torch.randn(64, t, t + 2, dtype=torch.float64, device="cuda")
    G64[t] = g @ g.transpose(1, 2)
G32 = {t: g.float() for t, g in G64.items()}
grads = torch.randn(2, 4096, device="cuda")
bm.gram(grads, 512, backend="cuda")
bm.combine(grads, torch.rand(8, 2, device="cuda"), 512, backend="cuda")
torch.cuda.synchronize()
base, _ = torch.cuda.mem_get_info()
drops = []
for name, call in launches:
    eval(call)
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    drops.append(base - free)
print("DROPS", json.dumps(drops))
"""


def _budgets():
    out = {}
    for line in (ROOT / "tools" / "cuda_local_memory_budget.txt").read_text().splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and not line.startswith("#"):
            out.setdefault(parts[1].strip(), int(parts[0]))
    return out


def test_weight_kernels_are_listed_in_budget_order():
    budgets = _budgets()
    listed = [budgets[name] for name, _ in WEIGHT_KERNELS]
    assert listed == sorted(listed), list(zip([n for n, _ in WEIGHT_KERNELS], listed))


@pytest.mark.gpu
def test_first_launch_of_each_weight_kernel_reserves_at_most_its_budget():
    """In a fresh process (a fresh context: no earlier reservation), launch every solver and
    weight-step kernel once, in budget order, and measure the drop of the driver's free memory
    since the warm-up. After the k-th launch the reservation covers the largest stack frame so
    far, so it must stay below the k-th budget per resident thread, plus 512 B a thread for
    the driver's rounding and 64 MiB for the outputs' allocator blocks and loaded modules. The
    CAGrad weight step's old 3680 B frame (~950 MiB on an H100) fails its 1280 B budget here."""
    import bucketmoo_kernels as bm

    if bm.available_backends("cuda").get("cuda") is not None:
        pytest.skip("the cuda backend is not available")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", _FIRST_LAUNCH_SCRIPT, json.dumps(WEIGHT_KERNELS)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    drops = json.loads(result.stdout.split("DROPS", 1)[1])
    props = torch.cuda.get_device_properties(0)
    threads = props.multi_processor_count * props.max_threads_per_multi_processor
    budgets = _budgets()
    report = []
    for (name, _), drop in zip(WEIGHT_KERNELS, drops):
        limit = (budgets[name] + 512) * threads + (64 << 20)
        report.append(f"{name}: {drop / 2**20:.0f} MiB (limit {limit / 2**20:.0f} MiB)")
        assert drop <= limit, "\n".join(report)
