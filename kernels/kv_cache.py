"""Store the step's new keys and values into the paged KV cache.

For each token ``t`` with ``slot = slot_mapping[t] >= 0``::

    k_cache[slot // block_size, slot % block_size] = k[t]     # [KH, D]
    v_cache[slot // block_size, slot % block_size] = v[t]

Tokens with ``slot == -1`` are skipped (padding, or tokens whose KV is already
cached). In place; nothing is returned.

FP8 cache (``k_cache.dtype == torch.float8_e4m3fn``): each element is stored
quantized with its KV head's scale (``k_scale``/``v_scale``, float32 ``[KH]``)::

    k_cache[...] = e4m3(clamp(k[t] / k_scale[h], -448, 448))     # round to nearest even

and the attention kernels read ``e4m3 * scale`` back. The scales are powers of
two (workers/kv_cache.py makes them so): dividing by one is exact, so this
kernel and its reference store the same bits.

Cost per stored token: read ``2 * KH * D`` elements of the model's dtype and
write as many cache elements (1 byte each in FP8, plus 8 bytes of slot); a
multiply per element in FP8. Memory bound; one program per token.
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 (fn: no infinities; past it the cast would give NaN)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch reference below still works.
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def _round_to_e4m3(x):
        """float32 in [-448, 448] -> the nearest E4M3 value (ties to even), still float32.

        The cast of an exact E4M3 value is exact on every backend; the CPU
        interpreter of triton 3.9 rounds float32 -> fp8 casts itself, wrongly
        (no carry into the exponent, ties away from zero). A few integer ops
        in a memory-bound kernel.
        """
        bits = x.to(tl.int32, bitcast=True)
        # Normals: keep 3 mantissa bits of 23, rounding to nearest even; a carry bumps the exponent.
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 == 0xFFF00000 as int32
        normal = bits.to(tl.float32, bitcast=True)
        # Below 2^-6, E4M3's subnormals are multiples of 2^-9: adding 2^14 (ulp 2^-9) rounds to one, ties to even.
        a = tl.abs(x)
        sub = (a + 16384.0) - 16384.0
        sub = tl.where(x < 0, -sub, sub)
        return tl.where(a < 0.015625, sub, normal)

    @triton.jit
    def _store_kv_cache_kernel(
        k_ptr,
        v_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_mapping_ptr,
        k_scale_ptr,
        v_scale_ptr,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        num_kv_heads,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_P: tl.constexpr,
        KV_HEADS_P: tl.constexpr,
        FP8: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot < 0:
            return
        heads = tl.arange(0, KV_HEADS_P)
        offs_d = tl.arange(0, HEAD_DIM_P)
        mask = (heads[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_DIM)
        # The cache is contiguous: slot * (KH * D) addresses [block, offset].
        dst = slot * num_kv_heads * HEAD_DIM + heads[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
        if FP8:
            head_mask = heads < num_kv_heads
            # IEEE division (plain "/" may compile to an approximate one): 1 / 2^e is exact.
            one = tl.full([KV_HEADS_P], 1.0, tl.float32)
            inv_k = tl.math.div_rn(one, tl.load(k_scale_ptr + heads, mask=head_mask, other=1.0))
            inv_v = tl.math.div_rn(one, tl.load(v_scale_ptr + heads, mask=head_mask, other=1.0))
            k = _round_to_e4m3(tl.clamp(k.to(tl.float32) * inv_k[:, None], -448.0, 448.0))
            v = _round_to_e4m3(tl.clamp(v.to(tl.float32) * inv_v[:, None], -448.0, 448.0))
            k = k.to(k_cache_ptr.dtype.element_ty)
            v = v.to(v_cache_ptr.dtype.element_ty)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


def check_scales(k_cache, v_cache, k_scale, v_scale) -> bool:
    """True for an FP8 cache (whose float32 ``[KH]`` scales must be given), False for a plain one."""
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache dtypes differ: {k_cache.dtype}, {v_cache.dtype}")
    if k_cache.dtype != FP8_DTYPE:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale are for a {FP8_DTYPE} cache, not {k_cache.dtype}")
        return False
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            raise ValueError(f"an {FP8_DTYPE} cache needs {name}")
        if s.dtype != torch.float32 or s.shape != (k_cache.shape[2],) or s.stride(0) != 1:
            raise ValueError(f"{name} must be float32 [num_kv_heads={k_cache.shape[2]}] and contiguous, "
                             f"got {s.dtype} {tuple(s.shape)}")
        if s.device != k_cache.device:
            raise ValueError(f"{name} is on {s.device}, the cache on {k_cache.device}")
    return True


def _check(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> bool:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [T, KH, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, KH, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"cache heads/head_dim {tuple(k_cache.shape[2:])} != k's {tuple(k.shape[1:])}")
    fp8 = check_scales(k_cache, v_cache, k_scale, v_scale)
    if k.dtype != v.dtype or (not fp8 and k.dtype != k_cache.dtype):
        raise ValueError(f"dtypes differ: k {k.dtype}, v {v.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 of shape ({k.shape[0]},), got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v must have a unit-stride last dim")
    devices = {t.device for t in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    return fp8


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Triton scatter of ``k``/``v`` rows into their cache slots (in place), quantized for an FP8 cache."""
    fp8 = _check(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_cache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale if fp8 else slot_mapping,  # unused unless FP8
        v_scale if fp8 else slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=triton.next_power_of_2(head_dim),
        KV_HEADS_P=triton.next_power_of_2(num_kv_heads),
        FP8=fp8,
        num_warps=4,
    )


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [..., KH, D]`` -> E4M3 of ``x / scale[h]``, saturated at +-448 (the reference's quantizer)."""
    inv = (1.0 / scale).view(-1, 1)
    return (x.float() * inv).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def store_kv_cache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Torch reference: ``index_copy_`` into the cache viewed as ``[slots, KH, D]`` (FP8: quantized first)."""
    slots = slot_mapping.long()
    if bool((slots < 0).any()):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    num_kv_heads, head_dim = k_cache.shape[2:]
    if k_cache.dtype == FP8_DTYPE:
        # index_copy_ has no float8 kernel: copy the bytes.
        k, v = quantize_fp8(k, k_scale).view(torch.uint8), quantize_fp8(v, v_scale).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)
