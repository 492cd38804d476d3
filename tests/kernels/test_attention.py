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
    paged_attention,
    paged_attention_decode,
    paged_attention_prefill,
    paged_attention_ref,
)
from fleetlm.kernels.kv_cache import store_kv_cache_ref

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

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.cu_seqlens_q, self.seq_lens, self.block_tables, self.scale)


def make_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, seed=0) -> Batch:
    """Random q/K/V; each request's K/V stored through store_kv_cache_ref into random, shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [math.ceil(s / BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 4
    # Block 0 is never handed out: it pads the block tables and stays NaN.
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    block_tables = torch.zeros(len(q_lens), max(blocks_per_req) + 2, dtype=torch.int32)
    cache_shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    keys, values, slots = [], [], []
    for i, (seq_len, n) in enumerate(zip(seq_lens, blocks_per_req)):
        block_tables[i, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
        pos = torch.arange(seq_len)
        slots.append(block_tables[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
        keys.append(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype))
        values.append(torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype))
    store_kv_cache_ref(torch.cat(keys), torch.cat(values), k_cache, v_cache, torch.cat(slots))
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
