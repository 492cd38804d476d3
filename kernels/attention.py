"""Paged attention: ragged prefill (with cached prefix), chunked prefill and decode in one op.

Request ``i`` owns query rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` (``q_len_i``
of them) and ``seq_len_i = seq_lens[i]`` keys in the paged cache (read through
``block_tables[i]``; key ``p`` lives at ``k_cache[block_tables[i, p // bs], p % bs]``).
Its query ``j`` sits at position ``c_i + j`` with ``c_i = seq_len_i - q_len_i``
and attends causally::

    out[t, h] = softmax(scale * q[t, h] @ K[:c_i + j + 1, h // G].T) @ V[:c_i + j + 1, h // G]

where ``G = H // KH`` query heads share one KV head (GQA).

Kernels (the launcher picks one from ``max_seqlen_q``):

* ``_prefill_kernel`` (any batch): a program owns ``BLOCK_Q`` query tokens of
  one request and one KV head; its ``BLOCK_M = BLOCK_Q * G_P`` rows are the
  (token, query head of the group) pairs, so each K/V tile gathered through the
  block table serves the whole GQA group. Flash-attention online softmax in
  float32; key tiles entirely below the causal diagonal skip the mask.
  Programs are numbered over ``T // BLOCK_Q + num_reqs`` tiles (request ``r``'s
  tiles start at ``cu_seqlens_q[r] // BLOCK_Q + r``, found by binary search), so
  the grid does not depend on ``max_seqlen_q``.
* ``_decode_kernel`` (``max_seqlen_q == 1``): a program owns one request, one
  KV head (the ``G`` query heads padded to 16 rows for the tensor cores) and one
  of ``num_splits`` slices of the context (split-K), so that a few long
  sequences still fill all SMs; ``_decode_reduce_kernel`` merges the slices
  with their log-sum-exps.

FP8 cache (``k_cache.dtype == torch.float8_e4m3fn``, written by
``kernels/kv_cache.py``): an element means ``e4m3 * scale[kv_head]`` with one
float32 scale per KV head for K and one for V (``k_scale``/``v_scale``,
``[KH]``). Tiles are loaded as E4M3 and widened to the query's dtype (exact:
every E4M3 value is a bfloat16/float16 value) right before the tensor-core dot;
the scales never touch the inner loop: a program owns one KV head, so
``k_scale`` folds into the softmax scale and ``v_scale`` multiplies the
normalized output once.

Cost. Decode is memory bound: each request reads its whole context once,
``2 * seq_len * KH * D * e`` bytes (``e`` bytes per element: 2 in bf16, 1 in FP8), e.g. 64
requests of 4096 tokens with KH=8, D=128 in bf16: 1.07 GB per layer, ~0.33 ms
at 3.35 TB/s; in FP8 half of that. Prefill is compute bound: ``4 * H * D * n_pairs`` FLOPs, with
``n_pairs = q_len * c + q_len * (q_len + 1) / 2`` (query, key) pairs per request.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fleetlm.kernels.kv_cache import FP8_DTYPE, check_scales

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch reference below still works.
    HAS_TRITON = False

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape of ``_prefill_kernel``: ``block_m`` rows = query tokens x GQA group."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DecodeConfig:
    """Tile shape and split-K factor of ``_decode_kernel``."""

    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int


if HAS_TRITON:

    @triton.jit
    def _attend_tile(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        start,
        kv_end,
        k_cache_ptr,
        v_cache_ptr,
        block_table_ptr,
        kv_head,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_vb,
        stride_vs,
        stride_vh,
        scale_log2,
        offs_d,
        d_mask,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        MASK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One online-softmax step over keys ``start:start + BLOCK_N``.

        MASK: "none" (every key visible to every row), "keys" (keys >= kv_end
        hidden) or "causal" (key > q_pos hidden; kv_end <= max q_pos + 1).
        """
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_end
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_block = offs_n % BLOCK_SIZE
        k_offs = block_ids * stride_kb + in_block * stride_ks + kv_head * stride_kh
        v_offs = block_ids * stride_vb + in_block * stride_vs + kv_head * stride_vh
        k = tl.load(
            k_cache_ptr + k_offs[None, :] + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0
        )  # [D, N]
        s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION) * scale_log2  # [M, N], log2 domain
        if MASK == "causal":
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        elif MASK == "keys":
            s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_cache_ptr + v_offs[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0
        )  # [N, D]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=PRECISION)
        return acc, l_i, m_new

    # Integer arguments that change from step to step are not specialized on (Triton would compile a
    # variant per class: == 1, multiple of 16, other): the block table's width (the longest request's
    # block count), the number of requests, the split count. Each new class met mid-serving compiled
    # for seconds: the first H100 run of the FP8 cache timed such compilations in its offline figure
    # (bf16's variants were already in the on-disk cache). They only address the block table row and
    # bound loops, so the hints were worth nothing.
    @triton.jit(do_not_specialize=["num_reqs", "stride_bt"])
    def _prefill_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        out_ptr,
        cu_seqlens_q_ptr,
        seq_lens_ptr,
        block_tables_ptr,
        k_scale_ptr,
        v_scale_ptr,
        scale_log2,
        num_reqs,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_bt,
        GROUP: tl.constexpr,
        GROUP_P: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_P: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        FP8_KV: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        if FP8_KV:  # K's scale folds into the softmax scale
            scale_log2 = scale_log2 * tl.load(k_scale_ptr + kv_head)

        # Find the request of this tile: the last r with cu_seqlens_q[r] // BLOCK_Q + r <= tile
        # (a strictly increasing function of r, so a binary search).
        lo = tl.zeros([], tl.int32)
        hi = tl.zeros([], tl.int32) + num_reqs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            mid_first_tile = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
            lo = tl.where(mid_first_tile <= tile, mid, lo)
            hi = tl.where(mid_first_tile <= tile, hi, mid - 1)
        req = lo
        q_start = tl.load(cu_seqlens_q_ptr + req)
        q_len = tl.load(cu_seqlens_q_ptr + req + 1) - q_start
        first_q = (tile - (q_start // BLOCK_Q + req)) * BLOCK_Q  # first query token of the tile
        if first_q >= q_len:
            return
        context_len = tl.load(seq_lens_ptr + req) - q_len

        # Rows: (query token, query head within the GQA group), the group padded to GROUP_P.
        offs_m = tl.arange(0, BLOCK_M)
        q_tok = first_q + offs_m // GROUP_P
        head_in_group = offs_m % GROUP_P
        head = kv_head * GROUP + head_in_group
        row_mask = (q_tok < q_len) & (head_in_group < GROUP)
        offs_d = tl.arange(0, HEAD_DIM_P)
        d_mask = offs_d < HEAD_DIM
        q_rows = (q_start + q_tok).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        q_pos = context_len + q_tok

        # A finite floor instead of -inf: rows that see no key in a tile never produce NaN.
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
        block_table_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt

        # Keys < context_len + first_q + 1 are visible to every row: full tiles there need no mask.
        full_end = (context_len + first_q + 1) // BLOCK_N * BLOCK_N
        kv_end = context_len + tl.minimum(first_q + BLOCK_Q, q_len)
        for start in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, q_pos, start, kv_end, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2, offs_d, d_mask,
                BLOCK_N, BLOCK_SIZE, "none", PRECISION,
            )
        for start in range(full_end, kv_end, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, q_pos, start, kv_end, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2, offs_d, d_mask,
                BLOCK_N, BLOCK_SIZE, "causal", PRECISION,
            )

        l_i = tl.where(l_i > 0.0, l_i, 1.0)  # only padding rows have l == 0; they are not stored
        out = acc / l_i[:, None]
        if FP8_KV:
            out = out * tl.load(v_scale_ptr + kv_head)
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & d_mask[None, :],
        )

    @triton.jit(do_not_specialize=["num_splits", "stride_bt"])
    def _decode_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        out_ptr,
        part_out_ptr,
        part_lse_ptr,
        cu_seqlens_q_ptr,
        seq_lens_ptr,
        block_tables_ptr,
        k_scale_ptr,
        v_scale_ptr,
        scale_log2,
        num_heads,
        num_splits,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_bt,
        GROUP: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_P: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        SPLIT: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        FP8_KV: tl.constexpr,
    ):
        req = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        if FP8_KV:  # K's scale folds into the softmax scale, V's into the normalized output
            scale_log2 = scale_log2 * tl.load(k_scale_ptr + kv_head)
        q_start = tl.load(cu_seqlens_q_ptr + req)
        if tl.load(cu_seqlens_q_ptr + req + 1) == q_start:
            return  # a request with no query this step
        seq_len = tl.load(seq_lens_ptr + req)

        # This split's slice of the context, in whole tiles.
        tiles_per_split = ((seq_len + BLOCK_N - 1) // BLOCK_N + num_splits - 1) // num_splits
        start = split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

        offs_h = tl.arange(0, BLOCK_H)
        head = kv_head * GROUP + offs_h
        h_mask = offs_h < GROUP
        offs_d = tl.arange(0, HEAD_DIM_P)
        d_mask = offs_d < HEAD_DIM
        row = q_start.to(tl.int64)
        q = tl.load(
            q_ptr + row * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=h_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM_P], tl.float32)
        block_table_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt
        for tile_start in range(start, end, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, offs_h, tile_start, end,  # q_pos (offs_h) unused: MASK="keys"
                k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale_log2, offs_d, d_mask,
                BLOCK_N, BLOCK_SIZE, "keys", PRECISION,
            )

        mask = h_mask[:, None] & d_mask[None, :]
        if SPLIT:
            # Normalized partial output and its log2-sum-exp; an empty split gets lse = -inf.
            has_keys = l_i > 0.0
            lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
            out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
            if FP8_KV:
                out = out * tl.load(v_scale_ptr + kv_head)
            part_row = (row * num_heads + head) * num_splits + split
            tl.store(part_lse_ptr + part_row, lse, mask=h_mask)
            tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
        else:
            out = acc / l_i[:, None]
            if FP8_KV:
                out = out * tl.load(v_scale_ptr + kv_head)
            tl.store(
                out_ptr + row * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=mask,
            )

    @triton.jit(do_not_specialize=["num_splits"])
    def _decode_reduce_kernel(
        part_out_ptr,
        part_lse_ptr,
        out_ptr,
        num_heads,
        num_splits,
        stride_ot,
        stride_oh,
        SPLITS_P: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_P: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS_P)
        s_mask = offs_s < num_splits
        offs_d = tl.arange(0, HEAD_DIM_P)
        d_mask = offs_d < HEAD_DIM
        part_row = (token * num_heads + head) * num_splits + offs_s
        lse = tl.load(part_lse_ptr + part_row, mask=s_mask, other=float("-inf"))
        # Split 0 always holds key 0, so the max is finite.
        weight = tl.exp2(lse - tl.max(lse, axis=0))
        parts = tl.load(
            part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        out = tl.sum(weight[:, None] * parts, axis=0) / tl.sum(weight, axis=0)
        tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, k_scale, v_scale) -> bool:
    """Validate the inputs; True when the cache is FP8 (with its scales)."""
    if q.dim() != 3 or q.stride(-1) != 1:
        raise ValueError(f"q must be [T, H, D] with a unit-stride last dim, got {tuple(q.shape)} {q.stride()}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q dtype must be float32/float16/bfloat16, got {q.dtype}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, KH, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    fp8 = check_scales(k_cache, v_cache, k_scale, v_scale)
    if not fp8 and (k_cache.dtype != q.dtype or v_cache.dtype != q.dtype):
        raise ValueError(f"cache dtypes ({k_cache.dtype}, {v_cache.dtype}) must equal q's {q.dtype} "
                         f"(or be {FP8_DTYPE} with scales)")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have a unit-stride last dim")
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    num_reqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if num_reqs < 0 or cu_seqlens_q.shape != (num_reqs + 1,):
        raise ValueError(f"seq_lens [num_reqs] and cu_seqlens_q [num_reqs + 1] expected, got "
                         f"{tuple(seq_lens.shape)} and {tuple(cu_seqlens_q.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_reqs:
        raise ValueError(f"block_tables must be [{num_reqs}, max_blocks], got {tuple(block_tables.shape)}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens), ("block_tables", block_tables)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 (or int64), got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit-stride last dim")
    devices = {t.device for t in (q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    return fp8


def _dot_mode(dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """(upcast operands to float32, tl.dot input_precision).

    float32 needs "ieee" (the default tf32 loses ~3 digits). The CPU interpreter
    of triton 3.9 multiplies bfloat16 dots as raw uint16 bits, so there bf16
    operands are upcast to float32 first (GPU runs the native bf16 MMA).
    """
    upcast = device.type == "cpu" and dtype == torch.bfloat16
    return upcast, "ieee" if (dtype == torch.float32 or upcast) else "tf32"


def default_prefill_config(q: torch.Tensor, num_kv_heads: int) -> PrefillConfig:
    """Tiles tuned on an H100 (bf16, head_dim 128, GQA 4): 128 rows x 32 keys, 4 warps, 3 stages.

    Measured there (triton 3.6): 258 TFLOP/s on 4 x 2048 causal prompts vs 239
    for 128x64 / 8 warps. float32 and head_dim > 128 take smaller tiles.
    """
    group_p = triton.next_power_of_2(q.shape[1] // num_kv_heads)
    if q.element_size() == 2 and q.shape[2] <= 128:
        return PrefillConfig(block_m=max(128, group_p), block_n=32, num_warps=4, num_stages=3)
    return PrefillConfig(block_m=max(64, group_p), block_n=32, num_warps=4, num_stages=2)


def default_decode_config(q: torch.Tensor, num_reqs: int, num_kv_heads: int, max_seqlen_k: int,
                          kv_dtype: torch.dtype | None = None) -> DecodeConfig:
    """Split the context until about four programs per SM run; never below 4 tiles (FP8: 2) per split.

    Tuned on an H100 (bf16, KH=8, D=128): 64 x 4096 runs unsplit at 2570 GB/s;
    8 x 8192 is best with 8 splits (1700 GB/s vs 810 unsplit); 1 x 32768 with
    64. The split count depends only on the batch shape and ``max_seqlen_k``
    (not on the device-side lengths), so a CUDA graph captured with a fixed
    ``max_seqlen_k`` replays with the same grid.

    An FP8 cache (``kv_dtype``, default q's dtype) under 16-bit queries takes 128-key tiles with 2
    stages: the same 16 KB per K tile as bf16's 64 keys. Measured on an H100
    (triton 3.6, 16 x 2048): 1279 GB/s of E4M3 read vs 688 with bf16's 64-key,
    3-stage tiles (which made the FP8 cache no faster than bf16, and 2.4x
    slower at 1 x 8192). A split keeps >= 256 keys in both (2 FP8 tiles).
    """
    fp8 = kv_dtype == FP8_DTYPE and q.element_size() == 2  # float32 queries keep the small tiles
    block_n = 128 if fp8 else 64 if q.element_size() == 2 else 32
    num_stages = 2 if fp8 else 3
    num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    num_splits = 4 * num_sms // max(num_reqs * num_kv_heads, 1)
    min_keys = 2 * block_n if fp8 else 4 * block_n  # per split: 256 keys in bf16 and FP8
    num_splits = max(1, min(num_splits, triton.cdiv(max(max_seqlen_k, 1), min_keys), 64))
    return DecodeConfig(block_n=block_n, num_splits=num_splits, num_warps=4, num_stages=num_stages)


def paged_attention_prefill(
    q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, config: PrefillConfig | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch ``_prefill_kernel`` (valid for every batch, including decode-only ones)."""
    fp8 = _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    num_reqs = seq_lens.shape[0]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_reqs == 0:
        return out
    config = config or default_prefill_config(q, num_kv_heads)
    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    if config.block_m % group_p or config.block_m < 16 or config.block_n < 16:
        raise ValueError(f"{config}: block_m must be >= 16 and a multiple of the padded GQA group {group_p}, "
                         "block_n >= 16 (tensor-core tiles)")
    block_q = config.block_m // group_p
    upcast, precision = _dot_mode(q.dtype, q.device)
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables,
        k_scale if fp8 else seq_lens, v_scale if fp8 else seq_lens,  # unused unless FP8
        float(scale) * _LOG2E, num_reqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        HEAD_DIM=head_dim, HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        UPCAST=upcast, PRECISION=precision, FP8_KV=fp8,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
    )
    return out


def paged_attention_decode(
    q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, max_seqlen_k: int,
    config: DecodeConfig | None = None, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the split-K ``_decode_kernel`` (+ reduce). Every request must have q_len <= 1."""
    fp8 = _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    num_reqs = seq_lens.shape[0]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_reqs == 0:
        return out
    config = config or default_decode_config(q, num_reqs, num_kv_heads, max_seqlen_k, k_cache.dtype)
    if config.block_n < 16 or config.num_splits < 1:
        raise ValueError(f"{config}: block_n must be >= 16 (tensor-core tiles) and num_splits >= 1")
    group = num_heads // num_kv_heads
    head_dim_p = max(16, triton.next_power_of_2(head_dim))
    split = config.num_splits > 1
    if split:
        part_out = torch.empty((num_tokens, num_heads, config.num_splits, head_dim), dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty((num_tokens, num_heads, config.num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    upcast, precision = _dot_mode(q.dtype, q.device)
    _decode_kernel[(num_reqs, num_kv_heads, config.num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, cu_seqlens_q, seq_lens, block_tables,
        k_scale if fp8 else seq_lens, v_scale if fp8 else seq_lens,  # unused unless FP8
        float(scale) * _LOG2E, num_heads, config.num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=config.block_n,
        HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, BLOCK_SIZE=block_size,
        SPLIT=split, UPCAST=upcast, PRECISION=precision, FP8_KV=fp8,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
    )
    if split:
        _decode_reduce_kernel[(num_tokens, num_heads)](
            part_out, part_lse, out, num_heads, config.num_splits, out.stride(0), out.stride(1),
            SPLITS_P=triton.next_power_of_2(config.num_splits), HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
            num_warps=4, enable_fp_fusion=True,
        )
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton paged attention; split-K decode kernel when ``max_seqlen_q == 1``.

    ``k_scale``/``v_scale`` (float32 ``[KH]``) are required for, and only for, an FP8 cache.
    """
    if max_seqlen_q == 1:
        return paged_attention_decode(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, max_seqlen_k,
                                      k_scale=k_scale, v_scale=v_scale)
    return paged_attention_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale,
                                   k_scale=k_scale, v_scale=v_scale)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference: per request, gather K/V through the block table and call SDPA.

    The SDPA call mirrors Hugging Face's for the same shapes (``enable_gqa``,
    ``is_causal`` for a whole prompt, no mask for one query), so float32 CPU
    results track HF's; a chunk after a cached prefix gets the bottom-right
    aligned boolean causal mask. ``max_seqlen_*`` are unused here. An FP8
    cache is dequantized (``e4m3 * scale`` in float32, then q's dtype) as it
    is gathered.
    """
    fp8 = check_scales(k_cache, v_cache, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    cu = cu_seqlens_q.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = cu[i], cu[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        blocks = block_tables[i, : math.ceil(seq_len / block_size)]
        if fp8:  # gathered as bytes (not every device's index kernel takes float8), then dequantized
            k = k_cache.view(torch.uint8)[blocks].flatten(0, 1)[:seq_len].view(FP8_DTYPE)  # [S, KH, D]
            v = v_cache.view(torch.uint8)[blocks].flatten(0, 1)[:seq_len].view(FP8_DTYPE)
            k = (k.float() * k_scale.view(-1, 1)).to(q.dtype)
            v = (v.float() * v_scale.view(-1, 1)).to(q.dtype)
        else:
            k = k_cache[blocks].flatten(0, 1)[:seq_len]  # [S, KH, D]
            v = v_cache[blocks].flatten(0, 1)[:seq_len]
        k = k.transpose(0, 1).unsqueeze(0)  # [1, KH, S, D]
        v = v.transpose(0, 1).unsqueeze(0)
        qi = q[q_start:q_end].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        mask = None
        if 1 < q_len < seq_len:
            pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= pos_q[:, None]
        o = F.scaled_dot_product_attention(
            qi, k, v, attn_mask=mask, is_causal=(q_len == seq_len and q_len > 1), scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out[q_start:q_end] = o[0].transpose(0, 1)
    return out
