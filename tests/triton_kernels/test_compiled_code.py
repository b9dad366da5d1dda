"""What the Triton compiler makes of the kernels, checked on CPU: compiled for sm_90 (PTX,
cubin) in a subprocess without TRITON_INTERPRET, no GPU needed.

* The Gram and combine kernels get 128-bit vector loads (``ld.global.v4``, or 16-byte
  ``cp.async.cg`` copies in the pipelined ``tl.dot`` loop) when the rows are
  16-byte aligned (what Triton's launcher specialises on), and the same kernels without that
  alignment do not: so the check can tell the two apart. What the interpreter cannot show.
* The solve kernels address their inputs with int64 offsets (no int32 overflow past 2^29
  segments).
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import bucketmoo_kernels.triton.combine as C
import bucketmoo_kernels.triton.gram as G
import bucketmoo_kernels.triton.solve as S

target = GPUTarget("cuda", 90, 32)
A16 = [["tt.divisibility", 16]]
rows = {"stride_t": "i64", **{f"d{i}": "i64" for i in range(8)}}
out = {}

def build(fn, sig, const, attrs, warps=4):
    src = ASTSource(fn, sig, const, attrs={(fn.arg_names.index(k),): A16 for k in attrs})
    return triton.compile(src, target=target, options={"num_warps": warps}).asm

for aligned in (True, False):
    attrs = ["x_ptr", "stride_t", "out_ptr", "partial_ptr"] if aligned else []
    for dt, use_dot, tp, block in (("*fp32", False, 4, 128), ("*bf16", True, 16, 256)):
        asm = build(G._gram_kernel, {"x_ptr": dt, **rows, "tiles_ptr": "*i64", "offsets_ptr": "*i64",
                    "partial_ptr": "*fp32", "out_ptr": "*fp32", "T": "constexpr", "TP": "constexpr",
                    "BLOCK_N": "constexpr", "NCOLS": "constexpr", "USE_DELTAS": "constexpr",
                    "UPCAST": "constexpr", "USE_DOT": "constexpr"},
                    {"T": 4, "TP": tp, "BLOCK_N": block, "NCOLS": 7, "USE_DELTAS": False,
                     "UPCAST": dt == "*fp32", "USE_DOT": use_dot}, attrs)
        # 128-bit: ld.global.v4 (registers), or cp.async.cg (16-byte copies into shared memory,
        # what the pipelined tl.dot loop uses)
        out[f"gram {dt} aligned={aligned}"] = (len(re.findall(r"ld\.global(\.[a-z0-9]+)*\.v4", asm["ptx"]))
                                               + asm["ptx"].count("cp.async.cg.shared.global"))
    cattrs = ["x_ptr", "stride_t", "out_ptr"] if aligned else []
    asm = build(C._combine_kernel, {"x_ptr": "*bf16", **rows, "w_ptr": "*fp32", "blocks_ptr": "*i64",
                "offsets_ptr": "*i64", "out_ptr": "*bf16", "N": "i64", "T": "constexpr",
                "BLOCK_N": "constexpr", "USE_DELTAS": "constexpr"},
                {"T": 4, "BLOCK_N": 1024, "USE_DELTAS": False}, cattrs)
    out[f"combine aligned={aligned}"] = len(re.findall(r"ld\.global(\.[a-z0-9]+)*\.v4", asm["ptx"]))

asm = build(G._gram_reduce_kernel, {"partial_ptr": "*fp32", "reduce_ptr": "*i64", "out_ptr": "*fp32",
            "TT": "constexpr", "TTP": "constexpr", "R": "constexpr"}, {"TT": 16, "TTP": 16, "R": 32}, [])
out["reduce compiled"] = "cubin" in asm

f64 = {"g_ptr": "*fp64", "c_ptr": "*fp64", "w_ptr": "*fp64"}
for name, fn, sig, const in (
        ("closed_form", S._mgda_closed_form_kernel, {**f64, "S": "i32", "BLOCK_S": "constexpr"}, {"BLOCK_S": 256}),
        ("pcgrad", S._pcgrad_kernel, {"g_ptr": "*fp64", "order_ptr": "*i32", "w_ptr": "*fp64", "S": "i32",
         "T": "constexpr", "TP": "constexpr", "BLOCK_S": "constexpr"}, {"T": 5, "TP": 8, "BLOCK_S": 32})):
    ttir = build(fn, sig, const, [])["ttir"]
    addptr = [l for l in ttir.splitlines() if "tt.addptr" in l and "tensor<" in l]
    out[f"{name} addptr"] = len(addptr)
    out[f"{name} addptr i32"] = sum(1 for l in addptr if re.search(r"tensor<[0-9x]+xi32>\s*$", l.strip()))
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled by the other tests")
def test_aligned_rows_get_vector_loads_and_solvers_use_int64_offsets():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                            timeout=900)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("no ptxas for Triton's CUDA backend here")
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    res = json.loads(result.stdout.split("RESULT", 1)[1])
    for kernel in ("gram *fp32", "gram *bf16", "combine"):
        assert res[f"{kernel} aligned=True"] > 0, (kernel, res)
        assert res[f"{kernel} aligned=False"] == 0, (kernel, res)  # the check can tell
    assert res["reduce compiled"]
    for name in ("closed_form", "pcgrad"):
        assert res[f"{name} addptr"] > 0 and res[f"{name} addptr i32"] == 0, res
