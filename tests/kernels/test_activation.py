"""SiLU-and-mul: Triton vs torch reference."""

import pytest
import torch

from fleetlm.kernels.activation import silu_and_mul, silu_and_mul_ref

requires_triton = pytest.mark.triton  # skipped by conftest.py when Triton cannot run here

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# silu in float32 (exp may differ in the last bits), then two roundings to the
# dtype on both sides; bf16 gets two ulps (the interpreter truncates casts).
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(7, 100), (1, 1100)])
def test_silu_and_mul_matches_ref(device, dtype, num_tokens, inter):
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(num_tokens, 2 * inter, generator=gen)).to(dtype).to(device)
    out = silu_and_mul(x)
    assert out.shape == (num_tokens, inter) and out.dtype == dtype
    torch.testing.assert_close(out, silu_and_mul_ref(x), **TOL[dtype])


@requires_triton
def test_silu_and_mul_strided_rows_and_empty(device):
    x = torch.randn(5, 300, device=device)[:, :200]  # row stride 300
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **TOL[torch.float32])
    assert silu_and_mul(torch.empty(0, 8, device=device)).shape == (0, 4)


def test_launcher_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[T, 2\*I\]"):
        silu_and_mul(torch.randn(3, 7))
    with pytest.raises(ValueError, match="unit-stride"):
        silu_and_mul(torch.randn(8, 3).t())
    with pytest.raises(ValueError, match="dtype"):
        silu_and_mul(torch.randn(3, 8).double())
