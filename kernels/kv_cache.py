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
two (workers/kv_cache.py makes them so): dividing by one is exact. The E4M3
byte is then computed with integer operations on the float32 bits
(``_e4m3_byte`` here, ``encode_e4m3`` in torch for the reference: the same
steps), never by a float -> fp8 conversion instruction: the bits are the same
on every backend (GPU, CPU interpreter, torch), and a test checks the encoding
equals torch's own ``.to(torch.float8_e4m3fn)`` (round to nearest even) for
every bfloat16 value and random float32 ones. A first H100 run found the
GPU kernel's bits differing from the torch reference while the interpreter
agreed; with no float -> fp8 conversion left in either, that class of
difference is gone by construction.

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
    def _e4m3_byte(x):
        """float32 -> its E4M3 byte (int32 in 0..255): saturated at +-448, rounded to nearest even.

        Integer steps only (see ``encode_e4m3``, the same in torch); NaN -> 0x7F/0xFF.
        """
        bits = x.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        a = tl.minimum(bits & 0x7FFFFFFF, 0x43E00000)  # |x| saturated at 448 (0x43E00000)
        # Normals (|x| >= 2^-6): keep 3 of 23 mantissa bits, ties to even; a carry bumps the exponent.
        r = a + 0x7FFFF + ((a >> 20) & 1)
        normal = (r >> 20) - 960  # (exponent << 3 | mantissa) rebiased from 127 to 7
        # Subnormals (|x| < 2^-6): the multiple of 2^-9, i.e. the 24-bit significand >> (14 - e), ties to even.
        e = (a >> 23) - 127
        sig = (a & 0x7FFFFF) | 0x800000
        shift = tl.minimum(14 - e, 25)  # >= 21 here; 25 already sends every significand to 0
        q = sig >> shift
        rem = sig - (q << shift)
        half = 1 << (shift - 1)
        q += ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
        mag = tl.where(a >= 0x3C800000, normal, q)  # 0x3C800000 == 2^-6
        mag = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7F, mag)  # NaN stays NaN
        return sign | mag

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
            # The caches arrive as bytes (uint8 views): the byte is computed, not converted.
            k = _e4m3_byte(k.to(tl.float32) * inv_k[:, None]).to(tl.uint8)
            v = _e4m3_byte(v.to(tl.float32) * inv_v[:, None]).to(tl.uint8)
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
        k_cache.view(torch.uint8) if fp8 else k_cache,
        v_cache.view(torch.uint8) if fp8 else v_cache,
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


def encode_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E4M3 bytes (uint8), saturated at +-448, rounded to nearest even; NaN -> 0x7F/0xFF.

    The store kernel's ``_e4m3_byte``, step for step, in int32 torch ops: the
    same bits on every device. Equal to ``x.clamp(-448, 448).to(float8_e4m3fn)``
    (tests/kernels/test_kv_cache.py checks every bfloat16 value).
    """
    bits = x.float().contiguous().view(torch.int32)
    sign = (bits >> 24) & 0x80
    a = torch.clamp(bits & 0x7FFFFFFF, max=0x43E00000)
    r = a + 0x7FFFF + ((a >> 20) & 1)
    normal = (r >> 20) - 960
    e = (a >> 23) - 127
    sig = (a & 0x7FFFFF) | 0x800000
    shift = torch.clamp(14 - e, max=25)
    q = sig >> shift
    rem = sig - (q << shift)
    half = 1 << (shift - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(torch.int32)
    mag = torch.where(a >= 0x3C800000, normal, q)
    mag = torch.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7F, mag)
    return (sign | mag).to(torch.uint8)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [..., KH, D]`` -> E4M3 of ``x / scale[h]``, saturated at +-448 (the reference's quantizer)."""
    inv = (1.0 / scale).view(-1, 1)
    return encode_e4m3(x.float() * inv).view(FP8_DTYPE)


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
