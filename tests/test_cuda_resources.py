"""Resources of the CUDA kernels: the local-memory budget check (runs anywhere: it parses
ptxas reports) and, on a GPU, how much device memory the first PGD weight step reserves."""

import shutil
import subprocess
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
