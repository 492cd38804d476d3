"""RMSNorm: Triton vs torch reference, and the reference vs Hugging Face's LlamaRMSNorm."""

import pytest
import torch

from fleetlm.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

requires_triton = pytest.mark.triton  # skipped by conftest.py when Triton cannot run here

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Same formula and roundings on both sides; only the float32 sum order and
# rsqrt differ, so outputs agree to about one unit in the last place (ulp).
# bfloat16 allows two ulps: triton 3.9's CPU interpreter truncates float32 ->
# bfloat16 casts instead of rounding to nearest even (the GPU rounds).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
EPS = 1e-5


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).to(device)
    residual = torch.randn(shape, generator=gen).to(dtype).to(device)
    weight = (1.0 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).to(device)
    return x, residual, weight


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 200), (1, 64), (3, 5, 48)])
def test_rms_norm_matches_ref(device, dtype, shape):
    x, _, weight = _inputs(shape, dtype, device)
    out = rms_norm(x, weight, EPS)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, rms_norm_ref(x, weight, EPS), **TOL[dtype])


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_ref(device, dtype):
    x, residual, weight = _inputs((9, 200), dtype, device)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = fused_add_rms_norm(x, residual, weight, EPS)
    ref_out, ref_residual = fused_add_rms_norm_ref(x, residual, weight, EPS)
    if dtype == torch.bfloat16 and device.type == "cpu":  # interpreter truncates: within one ulp
        torch.testing.assert_close(new_residual, ref_residual, atol=0.0, rtol=2**-7)
    else:
        assert torch.equal(new_residual, ref_residual)  # one rounding of the same sum: bitwise equal
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs untouched


@requires_triton
def test_rms_norm_strided_rows(device):
    # A row-strided view (e.g. a slice of a fused projection) is read in place.
    big, _, weight = _inputs((5, 300), torch.float16, device)
    weight = weight[:96].contiguous()
    x = big[:, :96]
    torch.testing.assert_close(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS), **TOL[torch.float16])


@requires_triton
def test_rms_norm_empty(device):
    x, _, weight = _inputs((0, 64), torch.float32, device)
    assert rms_norm(x, weight, EPS).shape == (0, 64)


def test_launcher_rejects_bad_inputs():
    x, residual, weight = _inputs((3, 64), torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, weight[:32], EPS)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, weight.half(), EPS)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, residual[:2], weight, EPS)
    with pytest.raises(ValueError, match="unit-stride"):
        rms_norm(x.t(), weight[:3].contiguous(), EPS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_is_hf_llama_rms_norm(dtype):
    from transformers.models.llama import modeling_llama
    x, residual, weight = _inputs((6, 128), dtype, "cpu")
    norm = modeling_llama.LlamaRMSNorm(128, eps=EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        assert torch.equal(rms_norm_ref(x, weight, EPS), norm(x))
        out, new_residual = fused_add_rms_norm_ref(x, residual, weight, EPS)
        assert torch.equal(new_residual, residual + x)
        assert torch.equal(out, norm(residual + x))
