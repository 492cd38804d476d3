"""Linear layers on weights kept quantized: ``y = x W^T (+ b)``, W dequantized in registers.

One layout serves AWQ, GPTQ and the GGUF block formats (each format
repacks its checkpoint into it once, at load; see :class:`QuantWeight`)::

    q[n, k]  = bits (4 or 8) of word qweight[n, k // P], at (k % P) * bits   (P = 32 // bits)
    g        = k // group            (or g_idx[k]: GPTQ's act-order groups)
    s        = scales[n, g]          (* super_scales[n, k // super_group]: GGUF K-quant sub-scales)
    z        = zeros[n, g]           (or the constant zero_point)
    m        = mins[n, g]            (* super_mins[n, k // super_group]); 0 without mins
    W[n, k]  = (q - z) * s + m       in float32

Every term is exact in float32 (q, z: < 9 bits; s: an fp16 value times a
sub-scale below 2^8), so W is the float32 weight the format's own
dequantization gives (gguf.quants' numpy code, AutoAWQ's and AutoGPTQ's
formulas); only the order of the matmul's sums differs.

Two kernels, one dequantization (``_dequant``):

- rows <= 16 (decode): each program owns ``BLOCK_N`` output rows and streams
  their whole K. One row accumulates ``w * x`` in float32 registers (no MMA);
  2-16 rows go through ``tl.dot`` with M padded to 16. Cost: the packed
  weight once (K * N * bits / 8 bytes, plus scales) per step, and
  ~6 integer/float ops per weight, which at 4 bits stays under the memory
  time on an H100/H200 (int4 GEMV roofline ~ 4x bf16 on weight bytes).
- more rows (prefill, big batches): M x N tiles; each K step dequantizes a
  ``[BLOCK_N, BLOCK_K]`` weight tile to the activation dtype in registers
  and feeds ``tl.dot``. FLOPs 2 M N K, bytes ~ K N bits / 8 per M tile.

Never a whole-weight dequantization per step. The torch reference
(:func:`wq_linear_ref`) dequantizes the whole weight (float32) and calls
``F.linear``: on CPU that is the exact path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch reference still works.
    HAS_TRITON = False

SUPPORTED_BITS = (4, 8)
SKINNY_MAX_ROWS = 16


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A ``[N, K]`` weight in the kernels' layout (see the module docstring); tensors on one device."""

    qweight: torch.Tensor  # int32 [N, K // (32 // bits)]
    scales: torch.Tensor  # [N, groups]: float, or int8/uint8 sub-scales under super_scales
    bits: int
    group: int  # input features per group (K: one group per row)
    zeros: torch.Tensor | None = None  # [N, groups], any integer or float dtype; None: zero_point
    zero_point: int = 0
    mins: torch.Tensor | None = None  # [N, groups], added after scaling
    super_scales: torch.Tensor | None = None  # float32 [N, K // super_group]
    super_mins: torch.Tensor | None = None  # float32 [N, K // super_group]
    super_group: int = 0
    g_idx: torch.Tensor | None = None  # int32 [K]: each input feature's group (GPTQ desc_act)

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * self.pack

    def check(self) -> None:
        """Shapes, dtypes and strides the kernels rely on; a ValueError naming what is wrong."""
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"{self.bits}-bit weights are not supported (supported: {SUPPORTED_BITS})")
        n, k = self.out_features, self.in_features
        if self.qweight.dtype != torch.int32 or self.qweight.dim() != 2 or not self.qweight.is_contiguous():
            raise ValueError(f"qweight must be a contiguous int32 [N, K/{self.pack}], got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        if self.group <= 0 or self.group % self.pack or (self.g_idx is None and k % self.group):
            raise ValueError(f"group size {self.group} must divide K ({k}) in whole {self.pack}-value words")
        groups = self.scales.shape[1] if self.scales.dim() == 2 else -1
        if self.g_idx is None and groups != k // self.group:
            raise ValueError(f"scales {tuple(self.scales.shape)} != [{n}, {k // self.group}]")
        for name in ("scales", "zeros", "mins"):
            t = getattr(self, name)
            if t is not None and (tuple(t.shape) != (n, groups) or (groups > 1 and t.stride(1) != 1)
                                  or (n > 1 and t.stride(0) != groups)):
                raise ValueError(f"{name} must be contiguous [{n}, {groups}], got {tuple(t.shape)}")
        if self.super_scales is not None:
            s = self.super_group
            if s <= 0 or s % self.group or k % s:
                raise ValueError(f"super group {s} must be a multiple of the group {self.group} dividing K ({k})")
            for t in (self.super_scales, self.super_mins):
                if t is not None and (tuple(t.shape) != (n, k // s) or t.dtype != torch.float32
                                      or not t.is_contiguous()):
                    raise ValueError(f"super scales must be contiguous float32 [{n}, {k // s}]")
        elif self.super_mins is not None:
            raise ValueError("super_mins without super_scales")
        if self.g_idx is not None:
            if tuple(self.g_idx.shape) != (k,) or self.g_idx.dtype != torch.int32:
                raise ValueError(f"g_idx must be int32 [{k}], got {self.g_idx.dtype} {tuple(self.g_idx.shape)}")


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """The float32 ``[N, K]`` weight (the formula of the module docstring)."""
    n, k, pack = qw.out_features, qw.in_features, qw.pack
    shifts = torch.arange(0, 32, qw.bits, device=qw.qweight.device, dtype=torch.int32)
    q = ((qw.qweight.unsqueeze(-1) >> shifts) & ((1 << qw.bits) - 1)).reshape(n, k).float()
    group = qw.g_idx.long() if qw.g_idx is not None else torch.arange(k, device=q.device) // qw.group

    def per_k(t: torch.Tensor) -> torch.Tensor:
        return t.float()[:, group]

    scales = per_k(qw.scales)
    if qw.super_scales is not None:
        scales = scales * qw.super_scales.repeat_interleave(qw.super_group, dim=1)
    zeros = per_k(qw.zeros) if qw.zeros is not None else float(qw.zero_point)
    w = (q - zeros) * scales
    if qw.mins is not None:
        mins = per_k(qw.mins)
        if qw.super_mins is not None:
            mins = mins * qw.super_mins.repeat_interleave(qw.super_group, dim=1)
        w = w + mins
    return w


def wq_linear_ref(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`wq_linear`: the whole weight dequantized (float32), then ``F.linear``."""
    w = dequantize(qw)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _dequant(qw_ptr, s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, g_ptr, rn, n_mask, kw, kw_mask,
                 stride_qn, stride_sn, stride_ssn,
                 BITS: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr, ZERO_POINT: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_SUPER: tl.constexpr,
                 HAS_SUPER_MINS: tl.constexpr, HAS_GIDX: tl.constexpr):
        """float32 weights ``[BLOCK_N, BLOCK_KW, P]`` of rows ``rn`` and words ``kw``."""
        PACK: tl.constexpr = 32 // BITS
        rj = tl.arange(0, PACK)
        mask2 = n_mask[:, None] & kw_mask[None, :]
        words = tl.load(qw_ptr + rn[:, None].to(tl.int64) * stride_qn + kw[None, :], mask=mask2, other=0,
                        eviction_policy="evict_first")
        q = ((words[:, :, None] >> (rj * BITS)[None, None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        row_s = rn[:, None].to(tl.int64) * stride_sn
        if HAS_GIDX:
            # Groups per input feature: gather [BLOCK_N, BLOCK_KW, P] scales (cached: few distinct).
            g = tl.load(g_ptr + kw[:, None] * PACK + rj[None, :], mask=kw_mask[:, None], other=0)
            off = row_s[:, :, None] + g[None, :, :]
            mask = mask2[:, :, None]
        else:
            # Groups are whole words: one scale per word.
            off = (row_s + (kw * PACK // GROUP)[None, :])[:, :, None]
            mask = mask2[:, :, None]
        s = tl.load(s_ptr + off, mask=mask, other=0).to(tl.float32)
        if HAS_SUPER:
            soff = rn[:, None].to(tl.int64) * stride_ssn + (kw * PACK // SUPER)[None, :]
            s = s * tl.load(ss_ptr + soff, mask=mask2, other=0.0)[:, :, None]
        if HAS_ZEROS:
            w = (q - tl.load(z_ptr + off, mask=mask, other=0).to(tl.float32)) * s
        else:
            w = (q - ZERO_POINT) * s
        if HAS_MINS:
            m = tl.load(m_ptr + off, mask=mask, other=0).to(tl.float32)
            if HAS_SUPER_MINS:
                m = m * tl.load(sm_ptr + soff, mask=mask2, other=0.0)[:, :, None]
            w = w + m
        return w

    @triton.jit
    def _wq_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, g_ptr, b_ptr, y_ptr,
                   M, N, KW, stride_xm, stride_ym, stride_qn, stride_sn, stride_ssn,
                   BITS: tl.constexpr, GROUP: tl.constexpr, SUPER: tl.constexpr, ZERO_POINT: tl.constexpr,
                   HAS_ZEROS: tl.constexpr, HAS_MINS: tl.constexpr, HAS_SUPER: tl.constexpr,
                   HAS_SUPER_MINS: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                   IEEE: tl.constexpr):
        PACK: tl.constexpr = 32 // BITS
        BLOCK_K: tl.constexpr = BLOCK_KW * PACK
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask, n_mask = rm < M, rn < N
        rkw = tl.arange(0, BLOCK_KW)
        rj = tl.arange(0, PACK)
        x_rows = x_ptr + rm.to(tl.int64) * stride_xm
        if BLOCK_M == 1:
            acc3 = tl.zeros((BLOCK_N, BLOCK_KW, PACK), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kw0 in range(0, KW, BLOCK_KW):
            kw = kw0 + rkw
            kw_mask = kw < KW
            w = _dequant(qw_ptr, s_ptr, z_ptr, m_ptr, ss_ptr, sm_ptr, g_ptr, rn, n_mask, kw, kw_mask,
                         stride_qn, stride_sn, stride_ssn, BITS, GROUP, SUPER, ZERO_POINT, HAS_ZEROS,
                         HAS_MINS, HAS_SUPER, HAS_SUPER_MINS, HAS_GIDX)
            if BLOCK_M == 1:
                x = tl.load(x_ptr + kw[:, None] * PACK + rj[None, :], mask=kw_mask[:, None], other=0.0)
                acc3 += w * x.to(tl.float32)[None, :, :]
            else:
                rk = kw0 * PACK + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows[:, None] + rk[None, :], mask=m_mask[:, None] & (rk < KW * PACK)[None, :],
                            other=0.0)
                wt = tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)).to(x.dtype))
                if IEEE:
                    acc = tl.dot(x, wt, acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, wt, acc)
        if BLOCK_M == 1:
            y = tl.sum(tl.sum(acc3, axis=2), axis=1)
            if HAS_BIAS:
                y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _config(m: int, n: int, bits: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_KW, num_warps, num_stages) for ``m`` rows and ``n`` outputs.

    One row: 8 output rows x 512 input features per step (~2 KiB of int4 per
    program per step). Up to 16 rows: one 16-row MMA tile, 16 outputs x 256
    features. More rows: 64 x N tiles, N shrinking until the grid covers about
    two waves of an H100's 132 SMs (a 4-bit tile is 4x less data than the
    bf16 one, so smaller tiles still keep the tensor cores fed at batch 64).
    """
    pack = 32 // bits
    if m == 1:
        return 1, 8, 512 // pack, 4, 3
    if m <= SKINNY_MAX_ROWS:
        return 16, 16, 256 // pack, 4, 3
    block_m = 64 if m <= 64 else 128
    block_n = 128
    while block_n > 32 and triton.cdiv(m, block_m) * triton.cdiv(n, block_n) < 264:
        block_n //= 2
    return block_m, block_n, 64 // pack, 4, 3


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
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    block_m, block_n, block_kw, warps, stages = _config(m, n, qw.bits)
    dummy = qw.scales
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _wq_kernel[grid](
        x2, qw.qweight, qw.scales,
        qw.zeros if qw.zeros is not None else dummy, qw.mins if qw.mins is not None else dummy,
        qw.super_scales if qw.super_scales is not None else dummy,
        qw.super_mins if qw.super_mins is not None else dummy,
        qw.g_idx if qw.g_idx is not None else dummy, bias if bias is not None else dummy, y,
        m, n, k // qw.pack, x2.stride(0), y.stride(0), qw.qweight.stride(0), qw.scales.stride(0),
        qw.super_scales.stride(0) if qw.super_scales is not None else 0,
        BITS=qw.bits, GROUP=qw.group, SUPER=max(qw.super_group, 1), ZERO_POINT=qw.zero_point,
        HAS_ZEROS=qw.zeros is not None, HAS_MINS=qw.mins is not None, HAS_SUPER=qw.super_scales is not None,
        HAS_SUPER_MINS=qw.super_mins is not None, HAS_GIDX=qw.g_idx is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KW=block_kw, IEEE=x.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )
    return y.reshape(*lead, n)


__all__ = ["HAS_TRITON", "SUPPORTED_BITS", "QuantWeight", "dequantize", "wq_linear", "wq_linear_ref"]
