"""The W8A8 kernels compile for Hopper (sm_90) with the installed Triton, without a GPU.

The interpreter runs a kernel's Python, not Triton's compiler: the first H100
run found an activation-quantization kernel that passed every interpreter
test and did not compile ("Return type mismatch"). Triton's NVIDIA backend
lowers to PTX (and, with the ptxas in its wheel, to a cubin) on any machine,
so each kernel is compiled here for ``GPUTarget("cuda", 90, 32)`` in a child
process (``TRITON_INTERPRET`` must be unset before triton is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fleetlm.kernels import kv_cache, qlinear, quant

    target = GPUTarget("cuda", 90, 32)

    def compile_(fn, sig, consts, **options):
        sig = {**sig, **{k: "constexpr" for k in consts}}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=options)
        return k.asm["ptx"]

    row = {"s_ptr": "*fp32", "s_in_ptr": "*fp32", "stride_x": "i32", "stride_q": "i32"}
    for qt, qmax in (("*fp8e4nv", 448.0), ("*i8", 127.0)):
        for static in (False, True):
            c = {"QMAX": qmax, "IS_FP8": qt == "*fp8e4nv", "STATIC": static}
            compile_(quant._quantize_kernel, {"x_ptr": "*bf16", "q_ptr": qt, **row, "K": "i32"}, {"BLOCK": 4096, **c})
            compile_(quant._silu_and_mul_quant_kernel, {"x_ptr": "*bf16", "q_ptr": qt, **row, "inter": "i32"},
                     {"BLOCK": 1024, **c})
            compile_(quant._rms_norm_quant_kernel, {
                "x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "q_ptr": qt, "s_ptr": "*fp32",
                "s_in_ptr": "*fp32", "residual_out_ptr": "*bf16", "stride_x": "i32", "stride_residual": "i32",
                "stride_q": "i32", "stride_residual_out": "i32", "hidden": "i32", "eps": "fp32"},
                {"BLOCK": 4096, "HAS_RESIDUAL": True, **c})
        for even in (True, False):
            ptx = compile_(qlinear._small_mm_kernel, {
                "q_ptr": qt, "sx_ptr": "*fp32", "w_ptr": qt, "sw_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16",
                "M": "i32", "N": "i32", "K": "i32", "stride_q": "i32", "stride_wn": "i32", "stride_y": "i32"},
                {"HAS_BIAS": True, "IS_INT": qt == "*i8", "BLOCK_M": 16, "BLOCK_N": qlinear.SMALL_MM_CONFIG["BLOCK_N"],
                 "BLOCK_K": qlinear.SMALL_MM_CONFIG["BLOCK_K"], "EVEN_K": even},
                num_warps=qlinear.SMALL_MM_CONFIG["num_warps"], num_stages=qlinear.SMALL_MM_CONFIG["num_stages"])
            assert "mma" in ptx, "small_mm must run on the tensor cores"
    compile_(kv_cache._store_kv_cache_kernel, {
        "k_ptr": "*bf16", "v_ptr": "*bf16", "k_cache_ptr": "*u8", "v_cache_ptr": "*u8",  # FP8 bytes, as launched
        "slot_mapping_ptr": "*i64", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "stride_kt": "i32",
        "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32", "num_kv_heads": "i32"},
        {"HEAD_DIM": 128, "HEAD_DIM_P": 128, "KV_HEADS_P": 8, "FP8": True})
    print("compiled", triton.__version__)
''')


def test_w8a8_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
