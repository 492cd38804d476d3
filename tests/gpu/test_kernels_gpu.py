"""Triton kernels vs torch references at full size on CUDA (Llama-3-8B shapes, bf16).

Run on the device machine: ``pytest -m gpu tests/gpu/test_kernels_gpu.py``.
"""

import pytest
import torch

from fleetlm.kernels import HAS_TRITON, select_ops
from fleetlm.kernels import activation, attention, gemv, kv_cache, rmsnorm, rotary
from fleetlm.kernels.bench import bench_kernels, make_paged_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable"),
]

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
# bf16: a couple of ulps (GPU casts round to nearest even). Attention: the
# reference's SDPA and our kernel both round P to bf16 before P @ V.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
ATTN_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _randn(*shape, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)


def test_select_ops_picks_triton_on_cuda():
    assert select_ops(torch.device("cuda")).backend == "triton"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm(dtype):
    x, residual, weight = _randn(4097, HIDDEN, dtype=dtype), _randn(4097, HIDDEN, dtype=dtype, seed=1), _randn(
        HIDDEN, dtype=dtype, seed=2
    )
    torch.testing.assert_close(rmsnorm.rms_norm(x, weight, 1e-5), rmsnorm.rms_norm_ref(x, weight, 1e-5), **TOL[dtype])
    out, new_residual = rmsnorm.fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_residual = rmsnorm.fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, ref_residual)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


def test_rotary():
    tokens = 3001
    qkv = _randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q = qkv[:, : HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM))
    freqs = torch.arange(8192, device="cuda", dtype=torch.float32)[:, None] * inv_freq[None, :]
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    q_ref, k_ref = q.clone(), k.clone()
    rotary.rotary_embedding_ref(positions, q_ref, k_ref, cache)
    rotary.rotary_embedding(positions, q, k, cache)
    torch.testing.assert_close(q, q_ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(k, k_ref, **TOL[torch.bfloat16])


def test_silu_and_mul():
    x = _randn(2049, 2 * INTER)
    torch.testing.assert_close(activation.silu_and_mul(x), activation.silu_and_mul_ref(x), **TOL[torch.bfloat16])


@pytest.mark.parametrize("n,k", [(6144, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, INTER), (128256, HIDDEN)])
def test_gemv_llama_shapes(n, k):
    x = _randn(1, k)
    w = _randn(n, k, seed=1) / k**0.5
    torch.testing.assert_close(gemv.linear(x, w), torch.nn.functional.linear(x, w), **TOL[torch.bfloat16])


def test_gemv_fused_gate():
    x = _randn(1, HIDDEN)
    w = _randn(2 * INTER, HIDDEN, seed=2) / HIDDEN**0.5 * 4
    ref = activation.silu_and_mul(torch.nn.functional.linear(x, w))
    torch.testing.assert_close(gemv.linear_silu_mul(x, w), ref, atol=3e-2, rtol=3e-2)


def test_store_kv_cache():
    tokens, num_blocks = 3001, 400
    k, v = _randn(tokens, KV_HEADS, HEAD_DIM), _randn(tokens, KV_HEADS, HEAD_DIM, seed=1)
    slots = torch.randperm(num_blocks * 16, device="cuda")[:tokens]
    slots[::7] = -1
    k_cache, v_cache = _randn(num_blocks, 16, KV_HEADS, HEAD_DIM, seed=2), _randn(num_blocks, 16, KV_HEADS, HEAD_DIM,
                                                                                seed=3)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_cache.store_kv_cache_ref(k, v, k_ref, v_ref, slots)
    kv_cache.store_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


ATTENTION_CASES = {
    "decode_64x4096": ([1] * 64, [4096] * 64),
    "decode_ragged": ([1] * 7, [1, 17, 4096, 8191, 300, 16, 2049]),
    "decode_1x32768": ([1], [32768]),
    "prefill_ragged": ([2048, 1000, 513, 1], [2048, 1000, 513, 1]),
    "prefill_cached_prefix": ([1024, 777], [4096, 2377]),
    "chunked_mixed": ([1, 512, 1, 1, 300], [4096, 1536, 77, 2049, 300]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_paged_attention_bf16(case):
    q_lens, seq_lens = ATTENTION_CASES[case]
    batch = make_paged_batch(q_lens, seq_lens, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, "cuda")
    out = attention.paged_attention(*batch.args())
    ref = attention.paged_attention_ref(*batch.args())
    torch.testing.assert_close(out, ref, **ATTN_TOL[torch.bfloat16])
    assert (out.float() - ref.float()).abs().mean() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("case", ["decode_ragged", "chunked_mixed"])
def test_paged_attention_other_dtypes(case, dtype):
    q_lens, seq_lens = ATTENTION_CASES[case]
    batch = make_paged_batch(q_lens, seq_lens, HEADS, KV_HEADS, HEAD_DIM, dtype, "cuda", seed=1)
    out = attention.paged_attention(*batch.args())
    torch.testing.assert_close(out, attention.paged_attention_ref(*batch.args()), **ATTN_TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 5, 16])
def test_decode_split_counts(num_splits):
    batch = make_paged_batch([1] * 3, [3000, 20, 9000], HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, "cuda", seed=2)
    config = attention.DecodeConfig(block_n=64, num_splits=num_splits, num_warps=4, num_stages=3)
    out = attention.paged_attention_decode(*batch.args()[:7], batch.max_seqlen_k, config)
    torch.testing.assert_close(out, attention.paged_attention_ref(*batch.args()), **ATTN_TOL[torch.bfloat16])


def test_bench_kernels_quick():
    results = bench_kernels(iters=3, quick=True)
    for name in ("rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "store_kv_cache"):
        assert results["kernels"][name]["triton_gbps"] > 0
    assert any(name.startswith("paged_decode") for name in results["kernels"])
