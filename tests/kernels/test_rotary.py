"""Rotary embedding: Triton vs torch reference, and the reference vs HF apply_rotary_pos_emb."""

import pytest
import torch

from fleetlm.kernels.rotary import rotary_embedding, rotary_embedding_ref

requires_triton = pytest.mark.triton  # skipped by conftest.py when Triton cannot run here

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Both sides round each product to the dtype, then the sum: fp32/fp16 agree to
# an ulp; bf16 to two (triton 3.9's interpreter truncates float32 -> bf16).
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
MAX_POS = 64


def _cos_sin_cache(head_dim: int, max_pos: int = MAX_POS, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    """q and k as strided views of one fused qkv buffer, as a model produces them."""
    gen = torch.Generator().manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(dtype).to(device)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, MAX_POS, (num_tokens,), generator=gen).to(device)
    return qkv, q, k, positions


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 64), (3, 1, 32), (6, 6, 48)])
def test_rotary_matches_ref(device, dtype, num_heads, num_kv_heads, head_dim):
    qkv, q, k, positions = _qkv(7, num_heads, num_kv_heads, head_dim, dtype, device)
    cache = _cos_sin_cache(head_dim).to(device)
    qkv_ref = qkv.clone()
    q_ref = qkv_ref[:, : q.shape[1] * head_dim].view_as(q)
    k_ref = qkv_ref[:, q.shape[1] * head_dim : (q.shape[1] + k.shape[1]) * head_dim].view_as(k)
    rotary_embedding_ref(positions, q_ref, k_ref, cache)
    q_out, k_out = rotary_embedding(positions, q, k, cache)
    assert q_out is q and k_out is k  # rotated in place
    torch.testing.assert_close(qkv, qkv_ref, **TOL[dtype])
    v_cols = slice((q.shape[1] + k.shape[1]) * head_dim, None)
    assert torch.equal(qkv[:, v_cols], qkv_ref[:, v_cols])  # v untouched


@requires_triton
def test_rotary_int32_positions_and_empty(device):
    _, q, k, positions = _qkv(5, 2, 1, 64, torch.float32, device)
    cache = _cos_sin_cache(64).to(device)
    q_ref, k_ref = q.clone(), k.clone()
    rotary_embedding_ref(positions, q_ref, k_ref, cache)
    rotary_embedding(positions.int(), q, k, cache)
    torch.testing.assert_close(q, q_ref, **TOL[torch.float32])
    torch.testing.assert_close(k, k_ref, **TOL[torch.float32])
    empty = torch.empty(0, 2, 64, device=device)
    rotary_embedding(positions[:0], empty, empty[:, :1], cache)


def test_launcher_rejects_bad_inputs():
    _, q, k, positions = _qkv(5, 2, 1, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary_embedding(positions, q, k, _cos_sin_cache(32))
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary_embedding(positions, q, k, _cos_sin_cache(64).half())
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(positions[:3], q, k, _cos_sin_cache(64))
    with pytest.raises(ValueError, match="dtype"):
        rotary_embedding(positions, q, k.half(), _cos_sin_cache(64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_is_hf_apply_rotary_pos_emb(dtype):
    from transformers.models.llama import modeling_llama
    config = modeling_llama.LlamaConfig(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS
    )
    head_dim = 64
    rope = modeling_llama.LlamaRotaryEmbedding(config)
    # HF's float32 cos/sin for every position, stored as the [max_pos, D] cat(cos, sin) cache.
    x32 = torch.zeros(1, 1, head_dim)
    cos, sin = rope(x32, torch.arange(MAX_POS)[None, :])
    cache = torch.cat((cos[0, :, : head_dim // 2], sin[0, :, : head_dim // 2]), dim=-1)
    assert torch.equal(cache, _cos_sin_cache(head_dim))

    _, q, k, positions = _qkv(9, 4, 2, head_dim, dtype, "cpu")
    # HF layout [B, H, T, D]; its rotary embedding casts cos/sin to the activation dtype.
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[:, positions].to(dtype), sin[:, positions].to(dtype)
    )
    q_ref, k_ref = rotary_embedding_ref(positions, q.clone(), k.clone(), cache)
    assert torch.equal(q_ref, q_hf[0].transpose(0, 1))
    assert torch.equal(k_ref, k_hf[0].transpose(0, 1))
