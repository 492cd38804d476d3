"""Paged attention.

* The torch reference against a dense causal attention computed without paging
  (float64, explicit softmax), K/V scattered into random non-contiguous blocks.
* The Triton prefill and split-K decode kernels against the torch reference.

Unused cache slots (block 0, the padding of the block tables, the tail of each
request's last block) hold NaN: reading anything past ``seq_len`` shows up.
"""

import math
from dataclasses import dataclass

import pytest
import torch

from fleetlm.kernels.attention import (
    DecodeConfig,
    PrefillConfig,
    default_decode_config,
    paged_attention,
    paged_attention_decode,
    paged_attention_prefill,
    paged_attention_ref,
)
from fleetlm.kernels.kv_cache import quantize_fp8, store_kv_cache_ref

requires_triton = pytest.mark.triton  # skipped by conftest.py when Triton cannot run here

BLOCK_SIZE = 16
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Reference (SDPA) vs Triton (online softmax in float32): float32 agrees to
# rounding noise; 16-bit outputs to one or two ulps of the output dtype.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
# Reference vs float64 dense attention: the reference's own rounding.
TOL_DENSE = {
    torch.float32: dict(atol=2e-6, rtol=2e-6),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

# name -> (q_lens, seq_lens). seq_len - q_len tokens of each request are already cached.
SCENARIOS = {
    "prefill": ([5, 17, 3], [5, 17, 3]),
    "cached_prefix": ([7, 20, 9], [23, 52, 30]),  # prefixes of 16, 32 (block aligned) and 21
    "chunked_mixed": ([1, 7, 1, 20, 4], [33, 40, 5, 20, 50]),
    "decode": ([1, 1, 1, 1, 1], [1, 16, 17, 45, 70]),
}


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    scale: float
    max_seqlen_q: int
    max_seqlen_k: int
    keys: list[torch.Tensor]  # dense [seq_len, KH, D] per request, as written to the cache
    values: list[torch.Tensor]
    k_scale: torch.Tensor | None = None  # FP8 cache: float32 [KH]
    v_scale: torch.Tensor | None = None

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens, self.block_tables, self.scale)

    def scales(self) -> dict:
        return {"k_scale": self.k_scale, "v_scale": self.v_scale}


def make_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, seed=0, fp8=False) -> Batch:
    """Random q/K/V; each request's K/V stored through store_kv_cache_ref into random, shuffled blocks.

    ``fp8``: an E4M3 cache with per-head power-of-two scales (head h's K/V are N(0, (h + 1)^2), so
    the scales differ between heads); ``keys``/``values`` are then what the cache holds, dequantized."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [math.ceil(s / BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 4
    # Block 0 is never handed out: it pads the block tables and stays NaN.
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_tables = torch.zeros(len(q_lens), max(blocks_per_req) + 2, dtype=torch.int32)
    cache_shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    cache_dtype = torch.float8_e4m3fn if fp8 else dtype
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype).to(cache_dtype)  # E4M3 has a NaN too
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype).to(cache_dtype)
    keys, values, slots = [], [], []
    for i, (seq_len, n) in enumerate(zip(seq_lens, blocks_per_req)):
        block_tables[i, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
        pos = torch.arange(seq_len)
        slots.append(block_tables[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
        keys.append(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype))
        values.append(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype))
    k_scale = v_scale = None
    if fp8:
        head_gain = torch.arange(1, num_kv_heads + 1).view(-1, 1)  # heads of different ranges
        keys = [(k * head_gain).to(dtype) for k in keys]
        values = [(v * head_gain).to(dtype) for v in values]
        k_scale = torch.exp2(torch.ceil(torch.log2(head_gain.flatten() * 6.0 / 448)))
        v_scale = torch.exp2(torch.ceil(torch.log2(head_gain.flatten() * 12.0 / 448)))
    store_kv_cache_ref(torch.cat(keys), torch.cat(values), k_cache, v_cache, torch.cat(slots), k_scale, v_scale)
    if fp8:  # what the cache holds, for dense_attention
        keys = [(quantize_fp8(k, k_scale).float() * k_scale.view(-1, 1)).to(dtype) for k in keys]
        values = [(quantize_fp8(v, v_scale).float() * v_scale.view(-1, 1)).to(dtype) for v in values]
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return Batch(
        q=q.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        cu_seqlens_q=cu_seqlens_q.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        scale=head_dim**-0.5,
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(seq_lens),
        keys=keys,
        values=values,
        k_scale=None if k_scale is None else k_scale.to(device),
        v_scale=None if v_scale is None else v_scale.to(device),
    )


def dense_attention(batch: Batch) -> torch.Tensor:
    """Causal attention per request on the dense K/V, float64, no paging, no SDPA."""
    q = batch.q.cpu().double()
    num_heads = q.shape[1]
    out = torch.empty_like(q)
    cu = batch.cu_seqlens_q.tolist()
    for i, (k, v) in enumerate(zip(batch.keys, batch.values)):
        group = num_heads // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        v = v.double().repeat_interleave(group, dim=1)
        qi = q[cu[i] : cu[i + 1]]
        q_len, seq_len = qi.shape[0], k.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qi, k) * batch.scale
        q_pos = torch.arange(seq_len - q_len, seq_len)
        visible = torch.arange(seq_len)[None, :] <= q_pos[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[cu[i] : cu[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


# --- reference vs dense -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 2)])
def test_ref_matches_dense(scenario, num_heads, num_kv_heads, dtype):
    q_lens, seq_lens = SCENARIOS[scenario]
    batch = make_batch(q_lens, seq_lens, num_heads, num_kv_heads, 64, dtype, "cpu")
    out = paged_attention_ref(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), dense_attention(batch), **TOL_DENSE[dtype])


# --- Triton vs reference ------------------------------------------------------------------------

SMALL_TILES = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)

# (scenario, num_heads, num_kv_heads, head_dim, config): GQA ratios 1, 3, 4; a non power of two
# head_dim; default tiles (one q tile per request) and small ones (several q tiles, unmasked key tiles).
PREFILL_CASES = [
    ("prefill", 8, 2, 64, None),
    ("cached_prefix", 6, 2, 64, None),
    ("chunked_mixed", 4, 4, 64, None),
    ("cached_prefix", 4, 1, 64, SMALL_TILES),
    ("chunked_mixed", 6, 2, 80, SMALL_TILES),
]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario,num_heads,num_kv_heads,head_dim,config", PREFILL_CASES)
def test_prefill_kernel_matches_ref(device, scenario, num_heads, num_kv_heads, head_dim, config, dtype):
    q_lens, seq_lens = SCENARIOS[scenario]
    batch = make_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, device)
    ref = paged_attention_ref(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k)
    out = paged_attention_prefill(*batch.args(), config)
    assert out.shape == batch.q.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


# (num_heads, num_kv_heads, config): no split, 3 splits (some empty for short sequences), default.
DECODE_CASES = [
    (4, 4, DecodeConfig(block_n=32, num_splits=1, num_warps=4, num_stages=1)),
    (6, 2, DecodeConfig(block_n=16, num_splits=3, num_warps=4, num_stages=1)),
    (8, 2, None),
]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,config", DECODE_CASES)
def test_decode_kernel_matches_ref(device, num_heads, num_kv_heads, config, dtype):
    q_lens, seq_lens = SCENARIOS["decode"]
    batch = make_batch(q_lens, seq_lens, num_heads, num_kv_heads, 64, dtype, device)
    ref = paged_attention_ref(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k)
    out = paged_attention_decode(*batch.args(), batch.max_seqlen_k, config)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@requires_triton
@pytest.mark.parametrize("scenario", ["decode", "chunked_mixed"])
def test_dispatch_matches_ref(device, scenario):
    # paged_attention picks the decode kernel iff max_seqlen_q == 1; both agree with the reference.
    q_lens, seq_lens = SCENARIOS[scenario]
    batch = make_batch(q_lens, seq_lens, 8, 2, 64, torch.float16, device, seed=1)
    ref = paged_attention_ref(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k)
    out = paged_attention(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])


@requires_triton
def test_prefill_kernel_handles_decode_rows_and_strided_q(device):
    # A decode-only batch through the prefill kernel; q a strided view of a fused qkv buffer.
    q_lens, seq_lens = SCENARIOS["decode"]
    batch = make_batch(q_lens, seq_lens, 4, 1, 64, torch.float32, device)
    qkv = torch.cat([batch.q.flatten(1), torch.zeros(batch.q.shape[0], 128, device=device)], dim=1)
    batch.q = qkv[:, : 4 * 64].view(-1, 4, 64)
    ref = paged_attention_ref(*batch.args(), 1, batch.max_seqlen_k)
    torch.testing.assert_close(paged_attention_prefill(*batch.args()), ref, **TOL[torch.float32])
    torch.testing.assert_close(paged_attention_decode(*batch.args(), batch.max_seqlen_k), ref, **TOL[torch.float32])


def test_launcher_rejects_bad_inputs():
    batch = make_batch([3, 2], [3, 20], 4, 2, 64, torch.float32, "cpu")
    args = list(batch.args())
    bad = {
        "num_kv_heads": (0, batch.q[:, :3]),
        "dtype": (0, batch.q.half()),
        "int32": (4, batch.seq_lens.float()),
        "cu_seqlens_q": (3, batch.cu_seqlens_q[:2]),
        "block_tables": (5, batch.block_tables[:1]),
        "head_dim": (0, batch.q[..., :32]),
    }
    for message, (index, value) in bad.items():
        with pytest.raises(ValueError, match=message):
            paged_attention(*args[:index], value, *args[index + 1 :], 3, 20)


# --- FP8 (E4M3) cache: dequantized inside the kernels ------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fp8_ref_matches_dense(scenario, dtype):
    # The reference attends over exactly the dequantized values the cache holds.
    q_lens, seq_lens = SCENARIOS[scenario]
    batch = make_batch(q_lens, seq_lens, 6, 2, 64, dtype, "cpu", fp8=True)
    out = paged_attention_ref(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k, **batch.scales())
    assert out.dtype == dtype and not out.isnan().any()
    # K here is up to 2x larger than in the plain tests, so are the scores and their float32 rounding.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL_DENSE[dtype]
    torch.testing.assert_close(out.double(), dense_attention(batch), **tol)


def test_fp8_error_against_the_unquantized_cache():
    # E4M3 keeps 3 mantissa bits (each element within 1/16 relative): the output stays within a few
    # percent of the float32 cache's, and is not identical to it.
    q_lens, seq_lens = SCENARIOS["chunked_mixed"]
    exact = make_batch(q_lens, seq_lens, 8, 2, 64, torch.float32, "cpu")
    fp8 = make_batch(q_lens, seq_lens, 8, 2, 64, torch.float32, "cpu", fp8=True)
    # The same random draws, scaled per head as make_batch(fp8=True) scales them.
    gain = torch.arange(1, 3).view(1, -1, 1)
    k_cache = exact.k_cache * gain.unsqueeze(0)
    v_cache = exact.v_cache * gain.unsqueeze(0)
    ref = paged_attention_ref(exact.q, k_cache, v_cache, *exact.args()[3:], exact.max_seqlen_q, exact.max_seqlen_k)
    out = paged_attention_ref(*fp8.args(), fp8.max_seqlen_q, fp8.max_seqlen_k, **fp8.scales())
    err = (out - ref).norm() / ref.norm()
    assert 1e-3 < err < 0.04, err


# (scenario, num_heads, num_kv_heads, head_dim, config): GQA 3 and 4, a non power of two head_dim.
FP8_PREFILL_CASES = [
    ("cached_prefix", 6, 2, 64, None),
    ("chunked_mixed", 8, 2, 80, SMALL_TILES),
]


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario,num_heads,num_kv_heads,head_dim,config", FP8_PREFILL_CASES)
def test_fp8_prefill_kernel_matches_ref(device, scenario, num_heads, num_kv_heads, head_dim, config, dtype):
    q_lens, seq_lens = SCENARIOS[scenario]
    batch = make_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, fp8=True)
    ref = paged_attention_ref(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k, **batch.scales())
    out = paged_attention_prefill(*batch.args(), config, **batch.scales())
    assert out.shape == batch.q.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,config", DECODE_CASES[1:])
def test_fp8_decode_kernel_matches_ref(device, num_heads, num_kv_heads, config, dtype):
    q_lens, seq_lens = SCENARIOS["decode"]
    batch = make_batch(q_lens, seq_lens, num_heads, num_kv_heads, 64, dtype, device, fp8=True)
    ref = paged_attention_ref(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k, **batch.scales())
    out = paged_attention_decode(*batch.args(), batch.max_seqlen_k, config, **batch.scales())
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_default_decode_tiles_follow_the_cache_dtype():
    # FP8 under 16-bit queries: 128-key tiles, 2 stages (16 KB per K tile, as bf16's 64 keys); others unchanged.
    for q_dtype in (torch.bfloat16, torch.float16):
        q = torch.zeros(1, 8, 64, dtype=q_dtype)
        fp8 = default_decode_config(q, 1, 2, 8192, torch.float8_e4m3fn)
        plain = default_decode_config(q, 1, 2, 8192)
        assert (fp8.block_n, fp8.num_stages) == (128, 2)
        assert (plain.block_n, plain.num_stages) == (64, 3)
    q32 = torch.zeros(1, 8, 64)
    assert default_decode_config(q32, 1, 2, 8192, torch.float8_e4m3fn).block_n == 32


@requires_triton
@pytest.mark.parametrize("splits", [1, 3])
def test_fp8_decode_with_its_default_tile(device, splits):
    # The FP8 default tile (128 keys, 2 stages), unsplit and split, over ragged contexts.
    batch = make_batch([1] * 4, [1, 130, 300, 517], 8, 2, 64, torch.bfloat16, device, seed=3, fp8=True)
    config = DecodeConfig(block_n=128, num_splits=splits, num_warps=4, num_stages=2)
    ref = paged_attention_ref(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k, **batch.scales())
    out = paged_attention_decode(*batch.args(), batch.max_seqlen_k, config, **batch.scales())
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


@requires_triton
def test_fp8_dispatch_matches_ref(device):
    for scenario in ("decode", "prefill"):
        q_lens, seq_lens = SCENARIOS[scenario]
        batch = make_batch(q_lens, seq_lens, 4, 1, 64, torch.bfloat16, device, seed=2, fp8=True)
        ref = paged_attention_ref(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k, **batch.scales())
        out = paged_attention(*batch.args(), batch.max_seqlen_q, batch.max_seqlen_k, **batch.scales())
        torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


def test_fp8_launcher_rejects_bad_inputs():
    batch = make_batch([3, 2], [3, 20], 4, 2, 64, torch.float32, "cpu", fp8=True)
    with pytest.raises(ValueError, match="needs k_scale"):
        paged_attention(*batch.args(), 3, 20)
    with pytest.raises(ValueError, match=r"k_scale must be float32 \[num_kv_heads=2\]"):
        paged_attention(*batch.args(), 3, 20, k_scale=batch.k_scale[:1], v_scale=batch.v_scale)
    plain = make_batch([3, 2], [3, 20], 4, 2, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="are for a"):
        paged_attention(*plain.args(), 3, 20, **batch.scales())
