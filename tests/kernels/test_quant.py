"""W8A8 kernels against their torch references: activation quantization (alone and fused into
RMSNorm / SiLU-and-mul), the 8-bit GEMV, and the batched 8-bit matmul.

Codes must be identical: the same scale and IEEE division on both sides, FP8
rounded to nearest even, INT8 half away from zero. In float32 that holds
everywhere; in 16-bit the producer's own rounding to the dtype (truncated by
Triton's interpreter) may move a value across a rounding boundary, so there
codes may be neighbours.
"""

import pytest
import torch

from fleetlm.kernels import qlinear, quant
from fleetlm.kernels.quant import QuantizedActivation

requires_triton = pytest.mark.triton
QDTYPES = [torch.float8_e4m3fn, torch.int8]


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _same(a: QuantizedActivation, b: QuantizedActivation, exact: bool):
    assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and a.scale.shape == b.scale.shape
    if exact:
        torch.testing.assert_close(a.scale, b.scale, rtol=2e-6, atol=0)
        if torch.equal(a.scale, b.scale):
            assert torch.equal(_bits(a.data), _bits(b.data))
        else:  # a scale one ulp apart (reduction order): codes may differ by one step
            torch.testing.assert_close(a.data.float(), b.data.float(), rtol=0.07, atol=1)
    else:  # codes equal or neighbours (FP8: 12.5% apart at most; INT8: one step)
        torch.testing.assert_close(a.scale, b.scale, rtol=2e-2, atol=0)  # a bf16 ulp of the max
        torch.testing.assert_close(a.data.float(), b.data.float(), rtol=0.13, atol=1)


def _x(rows, cols, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Magnitudes over ten decades: FP8 subnormals, zeros and the row's max all occur.
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-8, 2, cols)[torch.randperm(cols, generator=g)]
    x[0, :3] = torch.tensor([0.0, -0.0, 1e-30])
    return x.to(dtype).to(device)


@requires_triton
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 1077)])
def test_quantize_matches_reference(device, qdtype, dtype, rows, cols):
    x = _x(rows, cols, dtype, device)
    _same(quant.quantize(x, qdtype), quant.quantize_ref(x, qdtype), exact=True)
    static = torch.tensor([1e-3], device=device)
    _same(quant.quantize(x, qdtype, static), quant.quantize_ref(x, qdtype, static), exact=True)
    assert quant.quantize(x[:0], qdtype).data.shape == (0, cols)


@requires_triton
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_quant_matches_reference(device, qdtype, dtype):
    x, r = _x(5, 577, dtype, device), _x(5, 577, dtype, device, seed=1)
    w = (torch.rand(577) + 0.5).to(dtype).to(device)
    _same(quant.rms_norm_quant(x, w, 1e-5, qdtype), quant.rms_norm_quant_ref(x, w, 1e-5, qdtype), dtype == torch.float32)
    (a, ra), (b, rb) = (quant.fused_add_rms_norm_quant(x, r, w, 1e-5, qdtype),
                        quant.fused_add_rms_norm_quant_ref(x, r, w, 1e-5, qdtype))
    _same(a, b, dtype == torch.float32)
    torch.testing.assert_close(ra, rb)


@requires_triton
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [19, 2100])  # one block, and several (two sweeps per row)
def test_silu_and_mul_quant_matches_reference(device, qdtype, dtype, inter):
    x = (_x(3, 2 * inter, torch.float32, device) * 0 + torch.randn(3, 2 * inter).to(device) * 4).to(dtype)
    _same(quant.silu_and_mul_quant(x, qdtype), quant.silu_and_mul_quant_ref(x, qdtype), dtype == torch.float32)
    static = torch.tensor([0.05], device=device)
    _same(quant.silu_and_mul_quant(x, qdtype, static), quant.silu_and_mul_quant_ref(x, qdtype, static),
          dtype == torch.float32)


def test_launchers_check_their_operands():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="float8_e4m3fn or torch.int8"):
        quant.quantize_ref(x, torch.float16)
    with pytest.raises(ValueError, match="a static scale must be one float32"):
        quant.quantize_ref(x, torch.int8, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="row-major 2-D FP8/INT8"):
        qlinear.qgemv_ref(x, torch.randn(4, 8), torch.ones(4))
    with pytest.raises(ValueError, match="weight scales must be contiguous float32"):
        qlinear.qgemv_ref(x, torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, dtype=torch.float16))


def _weights(n, k, qdtype, device, seed=2):
    from fleetlm.parallel.formats.w8a8 import quantize_weight

    g = torch.Generator().manual_seed(seed)
    w, s = quantize_weight(torch.randn(n, k, generator=g) / k ** 0.5, qdtype)
    return w.to(device), s.to(device)


TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@requires_triton
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(64, 4096), (37, 1500), (8, 2048)])  # even, ragged, one block
def test_qgemv_matches_reference(device, qdtype, dtype, n, k):
    w, s = _weights(n, k, qdtype, device)
    x = torch.randn(1, k).to(dtype).to(device)
    torch.testing.assert_close(qlinear.qgemv(x, w, s), qlinear.qgemv_ref(x, w, s), **TOL[dtype])
    bias = torch.randn(n).to(dtype).to(device)
    torch.testing.assert_close(qlinear.qgemv(x, w, s, bias), qlinear.qgemv_ref(x, w, s, bias), **TOL[dtype])
    for cfg in ({"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 2}, {"BLOCK_N": 2, "BLOCK_K": 512, "num_warps": 1}):
        torch.testing.assert_close(qlinear.qgemv(x, w, s, config=cfg), qlinear.qgemv_ref(x, w, s), **TOL[dtype])
    # The fused gate: rows [0, n/2) gate, [n/2, n) up.
    if n % 2 == 0:
        w8 = _weights(n, k, qdtype, device, seed=3)
        out = qlinear.qgemv_silu_mul(x, *w8)
        assert out.shape == (1, n // 2)
        torch.testing.assert_close(out, qlinear.qgemv_silu_mul_ref(x, *w8), atol=4e-2, rtol=4e-2)


def _dequantized_product(xq, w, s, bias):
    y = (xq.data.float() @ w.float().T) * xq.scale * s
    return (y if bias is None else y + bias.float()).to(xq.dtype)


@requires_triton
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_scaled_mm_matches_the_dequantized_product(device, qdtype, dtype, m):
    """torch._scaled_mm (FP8, row-wise scales) / torch._int_mm (INT8, padded below 17 rows on CUDA) + scales."""
    if device.type == "cuda" and dtype == torch.float32 and qdtype == torch.float8_e4m3fn:
        pytest.skip("row-wise _scaled_mm on CUDA writes bf16")
    n, k = 48, 96
    w, s = _weights(n, k, qdtype, device)
    xq = quant.quantize_ref(torch.randn(m, k).to(dtype).to(device), qdtype)
    bias = torch.randn(n).to(dtype).to(device)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[torch.bfloat16]
    for b in (None, bias):
        for mm in (qlinear.scaled_mm, qlinear.scaled_mm_ref):
            out = mm(xq, w, s, b)
            assert out.dtype == dtype and out.shape == (m, n)
            torch.testing.assert_close(out, _dequantized_product(xq, w, s, b), **tol)
