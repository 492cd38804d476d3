"""Rotary position embedding, NeoX / Hugging Face ``rotate_half`` style.

For each token ``t`` at position ``p = positions[t]`` and each head of ``q``
``[T, H, D]`` and ``k`` ``[T, KH, D]``, with ``cos, sin = cos_sin_cache[p]``
split in halves of ``D/2`` (``cos_sin_cache [max_pos, D]`` float32 holds
``cat(cos, sin)``), cast to ``q.dtype`` first as HF does::

    x1, x2 = x[:D/2], x[D/2:]
    x[:D/2] = x1 * cos - x2 * sin
    x[D/2:] = x2 * cos + x1 * sin

which is HF's ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`` with the
same roundings (each product rounded to the dtype, then the sum).

q and k are rotated IN PLACE (they may be strided views of a fused qkv
buffer) and returned, so ``q, k = rotary_embedding(...)`` also works.

Cost per token: read and write ``(H + KH) * D`` elements, read ``D`` float32
of cache (hot in L2); ~3 FLOPs per element: memory bound.
"""

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch reference below still works.
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _rotate_heads(
        x_ptr, stride_t, stride_h, token, num_heads, cos, sin, HALF: tl.constexpr, HALF_P: tl.constexpr,
        HEADS_P: tl.constexpr,
    ):
        heads = tl.arange(0, HEADS_P)
        offs = tl.arange(0, HALF_P)
        mask = (heads[:, None] < num_heads) & (offs[None, :] < HALF)
        ptrs = x_ptr + token * stride_t + heads[:, None] * stride_h + offs[None, :]
        x1 = tl.load(ptrs, mask=mask, other=0.0)
        x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        # Round each product to the dtype before the sum, as torch does op by op.
        x1_cos = (x1 * cos).to(dtype).to(tl.float32)
        x2_cos = (x2 * cos).to(dtype).to(tl.float32)
        x1_sin = (x1 * sin).to(dtype).to(tl.float32)
        x2_sin = (x2 * sin).to(dtype).to(tl.float32)
        tl.store(ptrs, (x1_cos - x2_sin).to(dtype), mask=mask)
        tl.store(ptrs + HALF, (x2_cos + x1_sin).to(dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(
        positions_ptr,
        q_ptr,
        k_ptr,
        cache_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_cache,
        num_heads,
        num_kv_heads,
        HALF: tl.constexpr,
        HALF_P: tl.constexpr,
        HEADS_P: tl.constexpr,
        KV_HEADS_P: tl.constexpr,
    ):
        # One program rotates every q and k head of one token.
        token = tl.program_id(0).to(tl.int64)
        pos = tl.load(positions_ptr + token).to(tl.int64)
        offs = tl.arange(0, HALF_P)
        cmask = offs < HALF
        cos = tl.load(cache_ptr + pos * stride_cache + offs, mask=cmask, other=0.0)
        sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs, mask=cmask, other=0.0)
        # HF casts cos/sin to the activation dtype before multiplying.
        dtype = q_ptr.dtype.element_ty
        cos = cos.to(dtype).to(tl.float32)[None, :]
        sin = sin.to(dtype).to(tl.float32)[None, :]
        _rotate_heads(q_ptr, stride_qt, stride_qh, token, num_heads, cos, sin, HALF, HALF_P, HEADS_P)
        _rotate_heads(k_ptr, stride_kt, stride_kh, token, num_kv_heads, cos, sin, HALF, HALF_P, KV_HEADS_P)


def _check(positions, q, k, cos_sin_cache) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q [T, H, D] and k [T, KH, D] expected, got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, _, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be int32/int64 of shape ({num_tokens},), got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"cos_sin_cache must be float32 [max_pos, {head_dim}], got {cos_sin_cache.dtype} "
                         f"{tuple(cos_sin_cache.shape)}")
    if cos_sin_cache.stride(1) != 1:
        raise ValueError("cos_sin_cache must have a unit-stride last dim")
    if q.dtype != k.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q and k must share a float dtype, got {q.dtype} and {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must have a unit-stride last dim")
    devices = {t.device for t in (positions, q, k, cos_sin_cache)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton NeoX rotary embedding, in place on ``q`` and ``k``; returns them."""
    _check(positions, q, k, cos_sin_cache)
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions,
        q,
        k,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_heads,
        k.shape[1],
        HALF=half,
        HALF_P=triton.next_power_of_2(half),
        HEADS_P=triton.next_power_of_2(num_heads),
        KV_HEADS_P=triton.next_power_of_2(k.shape[1]),
        num_warps=4,
        enable_fp_fusion=False,  # keep torch's rounding (no FMA contraction)
    )
    return q, k


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: HF ``apply_rotary_pos_emb``, written back into q and k."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] float32 each
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(q.dtype)  # [T, 1, D]
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(q.dtype)
    q.copy_(q * cos + _rotate_half(q) * sin)
    k.copy_(k * cos + _rotate_half(k) * sin)
    return q, k
