"""Linear layers on weights kept quantized: ``y = x W^T (+ b)``, W dequantized in registers.

The weight is a :class:`~fleetlm.kernels.wq_layout.QuantWeight` (its layout
and the exact float32 formula: ``kernels/wq_layout.py``): int32 words of
4/8-bit fields along K, output columns contiguous, per-group scales and
zeros, GGUF mins and super-block scales, GPTQ's act-order ``g_idx``.
Unpacking avoids the slow int->float conversion: ``(word >> s) & mask |
0x4B000000`` read as float32 is exactly ``2^23 + q``, and one subtraction of
``2^23 + z`` gives ``q - z`` (the mask and the exponent bits come in as
kernel arguments so the compiler can fuse the AND and the OR into one LOP3).

Three kernels (``kernels/wq_configs.py`` picks one per launch, by table):

- ``gemv`` (one row): each program owns ``BLOCK_N`` output columns and a
  range of K (split-K when the columns alone do not fill the GPU); a
  ``[groups, words, columns]`` tile per step, the sum over a group's
  words taken in fp32 registers before its scale. Bytes: the packed
  weight once (K N bits / 8) plus scales; FLOPs 2 N K.
- ``mm`` (more rows): each step dequantizes a ``[BLOCK_K, BLOCK_N]`` weight
  tile to the activation dtype and feeds ``tl.dot``; with ``swap_ab`` the
  weight tile is the MMA's M side and the rows its N side (skinny
  batches). When the tile lies in one group the dot takes ``q - z``
  exactly and the scale multiplies the dot's result (post-scale: no
  rounding of the weight at all); otherwise each weight is scaled, then
  rounded to the activation dtype. Bytes ~ K N bits / 8 per block of rows.
- ``dequant`` (big batches, prefill): the weight is written once in x's dtype
  ``[N, K]`` (read K N bits / 8, write 2 K N bytes) and cuBLAS multiplies.

Split-K partial sums go to an fp32 workspace; the last program of each
output tile (an atomic counter in ``QuantWeight.locks``, reset by that
program) adds them in split order, so results do not depend on timing.

Never a whole-weight dequantization per step on the fused paths. The torch
reference (:func:`wq_linear_ref`) dequantizes the whole weight (float32)
and calls ``F.linear``: on CPU that is the exact path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fleetlm.kernels import wq_configs
from fleetlm.kernels.wq_configs import WQConfig
from fleetlm.kernels.wq_layout import LOCKS, SUPPORTED_BITS, QuantWeight, dequantize

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch reference still works.
    HAS_TRITON = False


MAGIC = 0x4B000000  # float32 2^23: OR-ing a field below 2^23 into it gives 2^23 + field, exactly


def wq_linear_ref(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`wq_linear`: the whole weight dequantized (float32), then ``F.linear``."""
    w = dequantize(qw)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _field(words, J: tl.constexpr, BITS: tl.constexpr, mask, magic):
        """Field ``J`` of each (uint32) word as float32 ``2^23 + q``, exactly (one shift, one LOP3)."""
        return (((words >> (J * BITS)) & mask) | magic).to(tl.float32, bitcast=True)

    @triton.jit
    def _group_params(s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, goff, soff, msk, ZERO_POINT: tl.constexpr,
                      HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_SUPER: tl.constexpr,
                      HAS_SUPER_MINS: tl.constexpr):
        """Scale, ``2^23 + zero`` and min (float32) at offsets ``goff`` (groups) / ``soff`` (super-blocks)."""
        s = tl.load(s_ptr + goff, mask=msk, other=0).to(tl.float32)
        if HAS_SUPER:
            s = s * tl.load(ss_ptr + soff, mask=msk, other=0.0)
        if HAS_ZEROS:
            zf = tl.load(z_ptr + goff, mask=msk, other=0).to(tl.float32) + 8388608.0
        else:
            zf = ZERO_POINT + 8388608.0
        if HAS_MINS:
            mn = tl.load(m_ptr + goff, mask=msk, other=0).to(tl.float32)
            if HAS_SUPER_MINS:
                mn = mn * tl.load(sm_ptr + soff, mask=msk, other=0.0)
        else:
            mn = 0.0
        return s, zf, mn

    @triton.jit
    def _splitk_epilogue(part, ws_ptr, lock_ptr, b_ptr, y_ptr, ws_off, y_off, b_off, msk, tile, split_stride,
                         n_splits, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Store this split's fp32 partial; the last split of the tile sums all of them in order and writes y."""
        if not SPLIT:
            if HAS_BIAS:
                part += tl.load(b_ptr + b_off, mask=msk, other=0.0).to(tl.float32)
            tl.store(y_ptr + y_off, part.to(y_ptr.dtype.element_ty), mask=msk)
        else:
            pid_k = tl.program_id(1)
            tl.store(ws_ptr + pid_k * split_stride + ws_off, part, mask=msk)
            tl.debug_barrier()  # every lane's partial is written before the count is released
            count = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
            if count == n_splits - 1:
                tl.debug_barrier()
                total = tl.load(ws_ptr + ws_off, mask=msk, other=0.0, cache_modifier=".cg")
                for s in range(1, n_splits):
                    total += tl.load(ws_ptr + s * split_stride + ws_off, mask=msk, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(b_ptr + b_off, mask=msk, other=0.0).to(tl.float32)
                tl.store(y_ptr + y_off, total.to(y_ptr.dtype.element_ty), mask=msk)
                tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch (CUDA graph replays too)

    @triton.jit(do_not_specialize=["KW_SPLIT", "n_splits"])
    def _wq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
                        N, KW, KW_SPLIT, n_splits, mask, magic,
                        BITS: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr, ZERO_POINT: tl.constexpr,
                        HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_SUPER: tl.constexpr,
                        HAS_SUPER_MINS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
        """One row: ``y[n] = sum_k x[k] W[n, k]`` for BLOCK_N columns over one K split."""
        PACK: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // PACK  # words per group
        WG: tl.constexpr = WPG if WPG < BLOCK_KW else BLOCK_KW  # words of one group in a tile
        GB: tl.constexpr = BLOCK_KW // WG  # group slices per tile
        pid_n = tl.program_id(0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        # Tile [GB, WG, BLOCK_N]: group slices of WG words; the scale, zero and min of a slice are one row.
        rg = tl.arange(0, GB)
        rows = rg[:, None, None] * WG + tl.arange(0, WG)[None, :, None]  # [GB, WG, 1] word rows of a tile
        cols = rn[None, None, :]
        acc = tl.zeros((GB, WG, BLOCK_N), dtype=tl.float32)
        kw_lo = tl.program_id(1) * KW_SPLIT
        kw_hi = tl.minimum(kw_lo + KW_SPLIT, KW)
        for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
            kw = kw0 + rows
            if EVEN_K and EVEN_N:
                words = tl.load(qw_ptr + kw * N + cols, eviction_policy="evict_first")
            else:
                words = tl.load(qw_ptr + kw * N + cols, mask=(kw < KW) & n_mask[None, None, :], other=0,
                                eviction_policy="evict_first")
            words = words.to(tl.uint32, bitcast=True)
            slice0 = (kw0 + rg * WG)[:, None, None]  # [GB, 1, 1] first word of each group slice
            pmask = (slice0 < KW) & n_mask[None, None, :]
            s, zf, mn = _group_params(s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, (slice0 // WPG) * N + cols,
                                      (slice0 * PACK // SUPER) * N + cols, pmask, ZERO_POINT, HAS_ZEROS, HAS_MINS,
                                      HAS_SUPER, HAS_SUPER_MINS)
            p = tl.zeros((GB, WG, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((GB, WG, 1), dtype=tl.float32)
            for j in tl.static_range(PACK):
                if EVEN_K:
                    xj = tl.load(x_ptr + kw * PACK + j).to(tl.float32)
                else:
                    xj = tl.load(x_ptr + kw * PACK + j, mask=kw < KW, other=0.0).to(tl.float32)
                p += (_field(words, j, BITS, mask, magic) - zf) * xj
                if HAS_MINS:
                    xs += xj
            acc += p * s
            if HAS_MINS:
                acc += xs * mn
        y = tl.sum(tl.sum(acc, axis=1), axis=0)
        _splitk_epilogue(y, ws_ptr, lock_ptr, b_ptr, y_ptr, rn, rn, rn, n_mask, pid_n, N, n_splits, SPLIT, HAS_BIAS)

    @triton.jit
    def _join_fields(w0, w1, w2, w3, w4, w5, w6, w7, PACK: tl.constexpr):
        """P tensors ``[R, C]`` (field j of each word) -> ``[R, C, P]`` with field j at index j."""
        if PACK == 8:
            # join() appends a dim: [.., a, b, c] holds field 4a + 2b + c
            t = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
        else:
            t = tl.join(tl.join(w0, w2), tl.join(w1, w3))
        return tl.reshape(t, (w0.shape[0], w0.shape[1], PACK))

    @triton.jit
    def _scaled(words, J: tl.constexpr, BITS: tl.constexpr, mask, magic, s, zf, mn, POST: tl.constexpr,
                HAS_MINS: tl.constexpr, dtype: tl.constexpr):
        """Field J as weights in ``dtype``: ``q - z`` (POST: exact) or ``(q - z) * s (+ m)`` rounded once."""
        w = _field(words, J, BITS, mask, magic) - zf
        if not POST:
            w = w * s
            if HAS_MINS:
                w = w + mn
        return w.to(dtype)

    @triton.jit
    def _gidx_field(words, J: tl.constexpr, BITS: tl.constexpr, mask, magic, ks, g_ptr, s_ptr, z_ptr, m_ptr, cols,
                    m2, kw_mask, N, ZERO_POINT: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr,
                    dtype: tl.constexpr):
        """Field J with act-order groups: each input feature reads its own group's scale and zero."""
        goff = tl.load(g_ptr + ks + J, mask=kw_mask, other=0)[:, None] * N + cols
        s = tl.load(s_ptr + goff, mask=m2, other=0).to(tl.float32)
        if HAS_ZEROS:
            zf = tl.load(z_ptr + goff, mask=m2, other=0).to(tl.float32) + 8388608.0
        else:
            zf = ZERO_POINT + 8388608.0
        w = (_field(words, J, BITS, mask, magic) - zf) * s
        if HAS_MINS:
            w = w + tl.load(m_ptr + goff, mask=m2, other=0).to(tl.float32)
        return w.to(dtype)

    @triton.jit
    def _weight_tile(words, zrow, s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, g_ptr, kw0, rkw, rn, kw_mask, n_mask, N,
                     mask, magic, BITS: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr,
                     ZERO_POINT: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr,
                     HAS_SUPER: tl.constexpr, HAS_SUPER_MINS: tl.constexpr, HAS_GIDX: tl.constexpr,
                     POST: tl.constexpr, dtype: tl.constexpr):
        """Words ``[BKW, BN]`` -> weights ``[BN, BKW * P]`` (K contiguous, k = word * P + field) in ``dtype``.

        POST: the tile lies in one group whose ``2^23 + zero`` row is ``zrow``; the weights are ``q - z``,
        exact, and the caller scales the dot. Otherwise every word row reads its own group's scale (with
        g_idx every input feature its own), and the weights are scaled here, then rounded.
        """
        PACK: tl.constexpr = 32 // BITS
        WPG: tl.constexpr = GROUP // PACK
        if POST:
            s, zf, mn = 1.0, zrow, 0.0
        elif HAS_GIDX:
            s, zf, mn = 1.0, 0.0, 0.0
        else:
            kws = (kw0 + rkw)[:, None]
            m2 = kw_mask[:, None] & n_mask[None, :]
            s, zf, mn = _group_params(s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, (kws // WPG) * N + rn[None, :],
                                      (kws * PACK // SUPER) * N + rn[None, :], m2, ZERO_POINT, HAS_ZEROS, HAS_MINS,
                                      HAS_SUPER, HAS_SUPER_MINS)
        if HAS_GIDX and not POST:
            ks = (kw0 + rkw) * PACK
            cols = rn[None, :]
            m2 = kw_mask[:, None] & n_mask[None, :]
            w0 = _gidx_field(words, 0, BITS, mask, magic, ks, g_ptr, s_ptr, z_ptr, m_ptr, cols, m2, kw_mask, N,
                             ZERO_POINT, HAS_ZEROS, HAS_MINS, dtype)
            w1 = _gidx_field(words, 1, BITS, mask, magic, ks, g_ptr, s_ptr, z_ptr, m_ptr, cols, m2, kw_mask, N,
                             ZERO_POINT, HAS_ZEROS, HAS_MINS, dtype)
            w2 = _gidx_field(words, 2, BITS, mask, magic, ks, g_ptr, s_ptr, z_ptr, m_ptr, cols, m2, kw_mask, N,
                             ZERO_POINT, HAS_ZEROS, HAS_MINS, dtype)
            w3 = _gidx_field(words, 3, BITS, mask, magic, ks, g_ptr, s_ptr, z_ptr, m_ptr, cols, m2, kw_mask, N,
                             ZERO_POINT, HAS_ZEROS, HAS_MINS, dtype)
            if PACK == 8:
                w4 = _gidx_field(words, 4, BITS, mask, magic, ks, g_ptr, s_ptr, z_ptr, m_ptr, cols, m2, kw_mask, N,
                                 ZERO_POINT, HAS_ZEROS, HAS_MINS, dtype)
                w5 = _gidx_field(words, 5, BITS, mask, magic, ks, g_ptr, s_ptr, z_ptr, m_ptr, cols, m2, kw_mask, N,
                                 ZERO_POINT, HAS_ZEROS, HAS_MINS, dtype)
                w6 = _gidx_field(words, 6, BITS, mask, magic, ks, g_ptr, s_ptr, z_ptr, m_ptr, cols, m2, kw_mask, N,
                                 ZERO_POINT, HAS_ZEROS, HAS_MINS, dtype)
                w7 = _gidx_field(words, 7, BITS, mask, magic, ks, g_ptr, s_ptr, z_ptr, m_ptr, cols, m2, kw_mask, N,
                                 ZERO_POINT, HAS_ZEROS, HAS_MINS, dtype)
            else:
                w4, w5, w6, w7 = w0, w0, w0, w0
        else:
            w0 = _scaled(words, 0, BITS, mask, magic, s, zf, mn, POST, HAS_MINS, dtype)
            w1 = _scaled(words, 1, BITS, mask, magic, s, zf, mn, POST, HAS_MINS, dtype)
            w2 = _scaled(words, 2, BITS, mask, magic, s, zf, mn, POST, HAS_MINS, dtype)
            w3 = _scaled(words, 3, BITS, mask, magic, s, zf, mn, POST, HAS_MINS, dtype)
            if PACK == 8:
                w4 = _scaled(words, 4, BITS, mask, magic, s, zf, mn, POST, HAS_MINS, dtype)
                w5 = _scaled(words, 5, BITS, mask, magic, s, zf, mn, POST, HAS_MINS, dtype)
                w6 = _scaled(words, 6, BITS, mask, magic, s, zf, mn, POST, HAS_MINS, dtype)
                w7 = _scaled(words, 7, BITS, mask, magic, s, zf, mn, POST, HAS_MINS, dtype)
            else:
                w4, w5, w6, w7 = w0, w0, w0, w0
        t = _join_fields(w0, w1, w2, w3, w4, w5, w6, w7, PACK)  # [BKW, BN, P]
        return tl.reshape(tl.permute(t, (1, 0, 2)), (t.shape[1], t.shape[0] * PACK))

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit(do_not_specialize=["M", "KW_SPLIT", "n_splits"])  # one binary for every batch size
    def _wq_mm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, g_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
                      M, N, KW, KW_SPLIT, n_splits, stride_xm, stride_ym, mask, magic,
                      BITS: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr, ZERO_POINT: tl.constexpr,
                      HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_SUPER: tl.constexpr,
                      HAS_SUPER_MINS: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
                      POST: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                      EVEN_K: tl.constexpr, IEEE: tl.constexpr):
        """Rows ``[BLOCK_M]`` x columns ``[BLOCK_N]`` of ``y`` over one K split, ``tl.dot`` on dequantized tiles."""
        PACK: tl.constexpr = 32 // BITS
        BLOCK_K: tl.constexpr = BLOCK_KW * PACK
        WPG: tl.constexpr = GROUP // PACK
        dtype = x_ptr.dtype.element_ty
        n_tiles = tl.cdiv(N, BLOCK_N)
        pid_n = tl.program_id(0) % n_tiles
        pid_m = tl.program_id(0) // n_tiles
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rkw = tl.arange(0, BLOCK_KW)
        rk = tl.arange(0, BLOCK_K)
        m_mask, n_mask = rm < M, rn < N
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        kw_lo = tl.program_id(1) * KW_SPLIT
        kw_hi = tl.minimum(kw_lo + KW_SPLIT, KW)
        for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
            kw_mask = kw0 + rkw < KW
            words = tl.load(qw_ptr + (kw0 + rkw)[:, None] * N + rn[None, :],
                            mask=kw_mask[:, None] & n_mask[None, :], other=0, eviction_policy="evict_first")
            words = words.to(tl.uint32, bitcast=True)
            if EVEN_K:
                x = tl.load(x_rows + (kw0 * PACK + rk)[None, :], mask=m_mask[:, None], other=0.0)
            else:
                x = tl.load(x_rows + (kw0 * PACK + rk)[None, :],
                            mask=m_mask[:, None] & (kw0 * PACK + rk < KW * PACK)[None, :], other=0.0)
            if POST:
                # The tile lies in group kw0 // WPG: q - z goes into the dot, the scale multiplies its result.
                s, zf, mn = _group_params(s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, (kw0 // WPG) * N + rn,
                                          (kw0 * PACK // SUPER) * N + rn, n_mask, ZERO_POINT, HAS_ZEROS, HAS_MINS,
                                          HAS_SUPER, HAS_SUPER_MINS)
                if HAS_ZEROS:
                    zrow = zf[None, :]
                else:
                    zrow = zf
            else:
                zrow = 0.0
            wt = _weight_tile(words, zrow, s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, g_ptr, kw0, rkw, rn, kw_mask, n_mask,
                              N, mask, magic, BITS, GROUP, SUPER, ZERO_POINT, HAS_ZEROS, HAS_MINS, HAS_SUPER,
                              HAS_SUPER_MINS, HAS_GIDX, POST, dtype)  # [BLOCK_N, BLOCK_K]
            if POST:
                if SWAP_AB:
                    part = _dot(wt, tl.trans(x), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IEEE)
                    acc += part * s[:, None]
                    if HAS_MINS:
                        acc += mn[:, None] * tl.sum(x.to(tl.float32), axis=1)[None, :]
                else:
                    part = _dot(x, tl.trans(wt), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
                    acc += part * s[None, :]
                    if HAS_MINS:
                        acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * mn[None, :]
            elif SWAP_AB:
                acc = _dot(wt, tl.trans(x), acc, IEEE)
            else:
                acc = _dot(x, tl.trans(wt), acc, IEEE)
        if SWAP_AB:
            out = tl.trans(acc)
        else:
            out = acc
        y_off = rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        ws_off = rm.to(tl.int64)[:, None] * N + rn[None, :]
        _splitk_epilogue(out, ws_ptr, lock_ptr, b_ptr, y_ptr, ws_off, y_off, rn[None, :],
                         m_mask[:, None] & n_mask[None, :], tl.program_id(0), M * N, n_splits, SPLIT, HAS_BIAS)

    @triton.jit
    def _wq_dequant_kernel(qw_ptr, s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, g_ptr, w_ptr, N, KW, mask, magic,
                           BITS: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr, ZERO_POINT: tl.constexpr,
                           HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_SUPER: tl.constexpr,
                           HAS_SUPER_MINS: tl.constexpr, HAS_GIDX: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
        """``W`` ``[N, K]`` in ``w_ptr``'s dtype (the nn.Linear layout), one ``[BLOCK_N, BLOCK_KW * P]`` tile each."""
        PACK: tl.constexpr = 32 // BITS
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        kw0 = tl.program_id(1) * BLOCK_KW
        rkw = tl.arange(0, BLOCK_KW)
        kw_mask, n_mask = kw0 + rkw < KW, rn < N
        words = tl.load(qw_ptr + (kw0 + rkw)[:, None] * N + rn[None, :], mask=kw_mask[:, None] & n_mask[None, :],
                        other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        wt = _weight_tile(words, 0.0, s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, g_ptr, kw0, rkw, rn, kw_mask, n_mask, N,
                          mask, magic, BITS, GROUP, SUPER, ZERO_POINT, HAS_ZEROS, HAS_MINS, HAS_SUPER,
                          HAS_SUPER_MINS, HAS_GIDX, False, w_ptr.dtype.element_ty)  # [BN, BK]
        rk = kw0 * PACK + tl.arange(0, BLOCK_KW * PACK)
        tl.store(w_ptr + rn.to(tl.int64)[:, None] * (KW * PACK) + rk[None, :], wt,
                 mask=n_mask[:, None] & (rk < KW * PACK)[None, :])


def gemv_applies(qw: QuantWeight, cfg: WQConfig) -> bool:
    """Whether the GEMV kernel takes this weight with this tile: a tile's group slices must be whole words."""
    wpg = qw.group // qw.pack
    if qw.g_idx is not None:
        return False
    if wpg >= cfg.block_kw:
        return wpg % cfg.block_kw == 0
    return cfg.block_kw % wpg == 0 and wpg & (wpg - 1) == 0


def post_scale_applies(qw: QuantWeight, cfg: WQConfig) -> bool:
    """Whether every mm tile lies in one group (so the scale can multiply the dot's result)."""
    wpg = qw.group // qw.pack
    return cfg.post_scale and qw.g_idx is None and wpg % cfg.block_kw == 0


def _split_words(kw: int, cfg: WQConfig) -> tuple[int, int]:
    """(words per split, number of splits): whole tiles per split, at least one tile each."""
    steps = -(-kw // cfg.block_kw)
    per = -(-steps // max(1, min(cfg.split_k, steps))) * cfg.block_kw
    return per, -(-kw // per)


def _common(qw: QuantWeight) -> dict:
    return dict(BITS=qw.bits, GROUP=qw.group, SUPER=max(qw.super_group, 1), ZERO_POINT=qw.zero_point,
                HAS_ZEROS=qw.zeros is not None, HAS_MINS=qw.mins is not None,
                HAS_SUPER=qw.super_scales is not None, HAS_SUPER_MINS=qw.super_mins is not None)


def _tensors(qw: QuantWeight) -> tuple:
    dummy = qw.scales
    return (qw.qweight, qw.scales, qw.zeros if qw.zeros is not None else dummy,
            qw.mins if qw.mins is not None else dummy, qw.super_scales if qw.super_scales is not None else dummy,
            qw.super_mins if qw.super_mins is not None else dummy)


_SCRATCH = object()  # the place in a plan's arguments of the scratch tensor (split-K workspace or dequantized W)


def _plan(x2, qw, bias, cfg, y, m, n, k):
    """(kernel, grid, args, constexprs, path, scratch shape) of one launch (``m, n, k`` given: a compile may fake x)."""
    kw = k // qw.pack
    mask = (1 << qw.bits) - 1
    meta = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    path = cfg.path
    if path == "gemv" and (m != 1 or not gemv_applies(qw, cfg)):
        path = "mm"
    g_idx = qw.g_idx if qw.g_idx is not None else qw.scales
    if path == "dequant":
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(kw, cfg.block_kw))
        return (_wq_dequant_kernel, grid, [*_tensors(qw), g_idx, _SCRATCH, n, kw, mask, MAGIC],
                dict(**_common(qw), HAS_GIDX=qw.g_idx is not None, BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw,
                     **meta), path, (n, k))
    per, splits = _split_words(kw, cfg)
    tiles = triton.cdiv(n, cfg.block_n) * (1 if path == "gemv" else triton.cdiv(m, cfg.block_m))
    if splits > 1 and tiles > LOCKS:
        per, splits = kw, 1
    b = bias if bias is not None else qw.scales
    flags = dict(**_common(qw), HAS_BIAS=bias is not None, SPLIT=splits > 1, BLOCK_N=cfg.block_n,
                 BLOCK_KW=cfg.block_kw, EVEN_K=kw % cfg.block_kw == 0, **meta)
    ws = (splits, m, n) if splits > 1 else None
    if path == "gemv":
        return (_wq_gemv_kernel, (tiles, splits), [x2, *_tensors(qw), b, y, _SCRATCH, qw.locks, n, kw, per, splits, mask,
                                                    MAGIC], dict(flags, EVEN_N=n % cfg.block_n == 0), path, ws)
    return (_wq_mm_kernel, (tiles, splits), [x2, *_tensors(qw), g_idx, b, y, _SCRATCH, qw.locks, m, n, kw, per, splits,
                                              k, n, mask, MAGIC],
            dict(flags, HAS_GIDX=qw.g_idx is not None, POST=post_scale_applies(qw, cfg), SWAP_AB=cfg.swap_ab,
                 BLOCK_M=cfg.block_m, IEEE=x2.dtype == torch.float32), path, ws)


def launch(x2: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None, cfg: WQConfig) -> torch.Tensor:
    """``x2 [M, K] -> y [M, N]`` with one explicit config (the sweep and the tests call this directly).

    A config that does not fit the weight is adapted, never refused: the GEMV
    only takes one row and whole-word group slices (else the mm kernel runs
    with the same tile width), post-scale only tiles inside one group, and
    split-K only when the output tiles fit the weight's counters.
    """
    m, k = x2.shape
    n = qw.out_features
    if x2.stride(1) != 1 or (m > 1 and x2.stride(0) != k):
        raise ValueError("x2 must be a contiguous [M, K]")
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    kernel, grid, args, kwargs, path, scratch = _plan(x2, qw, bias, cfg, y, m, n, k)
    if path == "dequant":  # W [N, K] in x's dtype, then cuBLAS
        w = torch.empty(scratch, dtype=x2.dtype, device=x2.device)
        kernel[grid](*[w if a is _SCRATCH else a for a in args], **kwargs)
        return F.linear(x2, w, bias)
    ws = torch.empty(scratch, dtype=torch.float32, device=x2.device) if scratch is not None else y
    kernel[grid](*[ws if a is _SCRATCH else a for a in args], **kwargs)
    return y


def compile_launch(qw: QuantWeight, cfg: WQConfig, m: int, n: int, k: int, dtype: torch.dtype,
                   bias: bool = False) -> None:
    """Compile (not run) the kernel ``launch`` would run for ``x [m, k]`` of ``dtype`` and an ``[n, k]`` weight.

    ``qw`` only lends its format (bits, group, which tensors, their dtypes):
    its tensors may be small. The sweep compiles its candidates in parallel
    processes with this, so the timed process finds them in Triton's cache.
    """
    dev = qw.qweight.device
    x2 = torch.empty((1, 16), dtype=dtype, device=dev)
    b = torch.empty(16, dtype=dtype, device=dev) if bias else None
    y = torch.empty((1, 16), dtype=dtype, device=dev)
    kernel, grid, args, kwargs, path, _ = _plan(x2, qw, b, cfg, y, m, n, k)
    scratch = torch.empty(16, dtype=dtype if path == "dequant" else torch.float32, device=dev)
    kernel.warmup(*[scratch if a is _SCRATCH else a for a in args], grid=grid, **kwargs)


def wq_linear(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T (+ bias)`` with ``W`` kept quantized (``x [..., K]`` float32/bf16/fp16, contiguous rows)."""
    n, k = qw.out_features, qw.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x dtype must be float32/float16/bfloat16, got {x.dtype}")
    if x.device != qw.qweight.device:
        raise ValueError(f"x on {x.device}, weight on {qw.qweight.device}")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{n}], got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != k):
        x2 = x2.contiguous()
    cfg = wq_configs.lookup(qw.kind, max(1, x2.shape[0]), n, k)
    return launch(x2, qw, bias, cfg).reshape(*lead, n)


__all__ = ["HAS_TRITON", "SUPPORTED_BITS", "QuantWeight", "WQConfig", "compile_launch", "dequantize", "launch",
           "wq_linear", "wq_linear_ref"]
