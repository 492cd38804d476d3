"""One-token GEMV (and its fused SiLU gate): Triton vs torch reference."""

import pytest
import torch

from fleetlm.kernels import select_ops
from fleetlm.kernels.gemv import gemv_applies, linear, linear_ref, linear_silu_mul, linear_silu_mul_ref

requires_triton = pytest.mark.triton  # skipped by conftest.py when Triton cannot run here

# fp32 accumulation on both sides, different summation order; one rounding
# of the output to the dtype (two for the fused gate: projections, then silu * up).
TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# The gate rounds four times (gate, up, silu, product), each up to a bf16 ulp
# of 2^-7 relative (the interpreter truncates casts).
TOL_GATE = {torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def _operands(n, k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=gen).to(dtype).to(device)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
    return x, w


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(64, 2048), (37, 1500), (8, 1024)])  # even, ragged rows and K, one block
def test_gemv_matches_linear(device, dtype, n, k):
    x, w = _operands(n, k, dtype, device)
    assert gemv_applies(x, w)
    torch.testing.assert_close(linear(x, w), linear_ref(x, w), **TOL[dtype])
    bias = torch.randn(n).to(dtype).to(device)
    torch.testing.assert_close(linear(x, w, bias), linear_ref(x, w, bias), **TOL[dtype])
    x3 = x.reshape(1, 1, k)  # leading dims are kept
    assert linear(x3, w).shape == (1, 1, n)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inter,k", [(32, 2048), (19, 1100)])
def test_fused_gate_matches_silu_of_linear(device, dtype, inter, k):
    x, w = _operands(2 * inter, k, dtype, device, seed=1)
    w = w * 8  # gate values over silu's curved range
    out = linear_silu_mul(x, w)
    assert out.shape == (1, inter) and out.dtype == dtype
    torch.testing.assert_close(out, linear_silu_mul_ref(x, w), **TOL_GATE[dtype])


@requires_triton
def test_other_operands_take_the_matmul(device):
    x, w = _operands(16, 1024, torch.bfloat16, device)
    two = torch.cat([x, -x])  # two rows: not a GEMV
    assert not gemv_applies(two, w)
    torch.testing.assert_close(linear(two, w), linear_ref(two, w))
    xf, wf = x.float(), w.float()  # fp32 stays on the matmul (exact-token parity runs in fp32)
    assert not gemv_applies(xf, wf)
    torch.testing.assert_close(linear(xf, wf), linear_ref(xf, wf))
    wt = w.t().contiguous().t()  # column-major weight
    assert not gemv_applies(x, wt)
    torch.testing.assert_close(linear(x, wt), linear_ref(x, wt))
    b = torch.randn(16, dtype=torch.bfloat16, device=device)
    torch.testing.assert_close(linear_silu_mul(x, w, b), linear_silu_mul_ref(x, w, b), **TOL_GATE[torch.bfloat16])


def test_cpu_ops_are_plain_linear():
    ops = select_ops("cpu")
    x, w = _operands(6, 32, torch.float32, "cpu")
    torch.testing.assert_close(ops.linear(x, w), x @ w.t())
    g, u = (x @ w.t()).chunk(2, dim=-1)
    torch.testing.assert_close(ops.linear_silu_mul(x, w), torch.nn.functional.silu(g) * u)
