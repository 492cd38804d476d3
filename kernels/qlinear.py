"""Linear layers on 8-bit weights with one fp32 scale per output channel (FP8 E4M3 or INT8).

``W [N, K]`` (8-bit codes) with ``s_w [N]`` stands for ``W * s_w[:, None]``.

- ``qgemv(x, W, s_w, bias)``: one token of 16-bit ``x`` (decode):
  ``y[n] = s_w[n] * sum_k x[k] W[n, k]`` with fp32 accumulation, rounded once
  to the dtype of ``x``. Batch-1 decode is bound by the weight bytes: ``N K``
  (half of bf16's) plus ``4 N`` of scales; kernels/gemv.py's split-free
  scheme (each program owns ``BLOCK_N`` rows and streams their whole K) with
  an 8-bit load. ``torch._scaled_mm`` row-wise at one row read an FP8 weight
  at 2.19 TB/s on an H200 (copy 4.28 TB/s); this must beat it. The
  activation stays 16-bit here: it is ``K`` elements, quantizing it would
  save nothing and cost a rounding. ``qgemv_silu_mul`` fuses Llama's gate
  on a merged ``[gate; up]`` weight as kernels/gemv.py does.
- ``small_mm(xq, W, s_w, bias)``: 1-16 rows whose activation is quantized
  per token (decode of W8A8): ``tl.dot`` on the 8-bit codes (tensor cores,
  rows padded to 16 in registers), scales and bias in the epilogue. Reads
  ``N K`` weight bytes once; ``2 M N K`` operations are nothing next to
  them. A CUDA-core GEMV must convert each weight byte to fp32 (INT8: I2F
  at a quarter of the FP32 rate, about what 3 TB/s of int8 needs per SM);
  ``tl.dot`` takes INT8 codes as they are (FP8: two per packed convert).
- ``scaled_mm(xq, W, s_w, bias)``: any batch whose activation is quantized
  per token (``kernels/quant.py``); 1-16 rows on CUDA go to ``small_mm``,
  more (prefill, big decode batches): FP8 through
  ``torch._scaled_mm`` with row-wise scales (2 M N K FLOPs at the FP8 tensor
  core rate, 1,333 TFLOP/s measured on an H200), INT8 through
  ``torch._int_mm`` (917 TOP/s) and one epilogue pass applying both scales.
  On CPU (how CI runs the quantized path) the references compute the same
  numbers faster than torch's CPU ``_scaled_mm`` / ``_int_mm``: FP8 codes
  through a 256-entry table, dequantized, one float32 matmul (bit for bit
  what CPU ``_scaled_mm`` gives); INT8 through a float64 matmul (exact).
"""

from __future__ import annotations

import torch

from fleetlm.kernels.activation import silu_and_mul_ref
from fleetlm.kernels.quant import QuantizedActivation

try:
    import triton
    import triton.language as tl

    from fleetlm.kernels.gemv import _dot_rows

    HAS_TRITON = True
except ImportError:  # CPU-only install: the references run.
    HAS_TRITON = False

WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.int8)
# One program: BLOCK_N rows, K streamed in BLOCK_K-byte chunks (the bf16 GEMV's 2 KiB per row per step).
GEMV_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 2048, "num_warps": 4}
# torch._int_mm on CUDA needs more than 16 rows; smaller batches are padded to this.
_INT_MM_MIN_ROWS = 17
# Up to this many quantized rows (decode of a small batch) take _small_mm_kernel instead of cuBLAS:
# bound by the weight's bytes, where cuBLAS at a few rows reads an FP8 weight at 2.19 TB/s (H200,
# copy 4.28) and _int_mm needs padding to 17 rows. One program: all rows x BLOCK_N weight rows; 16 rows
# keep 256+ programs (2 per SM of 132) for the 8B shape's smallest projections (N = 4096).
SMALL_M_MAX = 16
SMALL_MM_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 4}


if HAS_TRITON:

    @triton.jit
    def _qgemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rn < N
        y = _dot_rows(x_ptr, w_ptr, rn, row_mask, K, stride_wn, BLOCK_N, BLOCK_K, EVEN)
        y = y * tl.load(s_ptr + rn, mask=row_mask, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _qgemv_silu_mul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, inter, K, stride_wn,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rn < inter
        dtype = y_ptr.dtype.element_ty
        gate = _dot_rows(x_ptr, w_ptr, rn, row_mask, K, stride_wn, BLOCK_N, BLOCK_K, EVEN)
        gate = (gate * tl.load(s_ptr + rn, mask=row_mask, other=0.0)).to(dtype)
        up = _dot_rows(x_ptr, w_ptr, rn + inter, row_mask, K, stride_wn, BLOCK_N, BLOCK_K, EVEN)
        up = (up * tl.load(s_ptr + rn + inter, mask=row_mask, other=0.0)).to(dtype)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype)
        tl.store(y_ptr + rn, (act.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=row_mask)

    @triton.jit
    def _small_mm_kernel(q_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr, M, N, K, stride_q, stride_wn, stride_y,
                         HAS_BIAS: tl.constexpr, IS_INT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        # A few quantized rows times BLOCK_N weight rows on the tensor cores: the codes go to tl.dot as
        # they are (no per-element conversion of the weight, which bounds a CUDA-core 8-bit GEMV), the
        # 8-bit weight is read once in 16-byte vectors along K; rows past M are masked to zero.
        rm = tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_mask, n_mask = rm < M, rn < N
        q_ptrs = q_ptr + rm[:, None] * stride_q + rk[None, :]
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                q = tl.load(q_ptrs, mask=m_mask[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
            else:
                k_mask = k * BLOCK_K + rk < K
                q = tl.load(q_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
            acc = tl.dot(q, tl.trans(w), acc, out_dtype=tl.int32 if IS_INT else tl.float32)
            q_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        # The reference's order: (acc * s_x) * s_w (+ bias), rounded once.
        y = acc.to(tl.float32) * tl.load(sx_ptr + rm, mask=m_mask, other=0.0)[:, None]
        y = y * tl.load(sw_ptr + rn, mask=n_mask, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _int_mm_epilogue_kernel(acc_ptr, sx_ptr, sw_ptr, b_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        acc = tl.load(acc_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], mask=mask, other=0)
        y = acc.to(tl.float32) * tl.load(sx_ptr + rm, mask=rm < M, other=0.0)[:, None]
        y = y * tl.load(sw_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _check_weight(w: torch.Tensor, s_w: torch.Tensor) -> None:
    if w.dtype not in WEIGHT_DTYPES or w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"weight must be a row-major 2-D FP8/INT8 tensor, got {w.dtype} {tuple(w.shape)} "
                         f"strides {w.stride()}")
    if s_w.shape != (w.shape[0],) or s_w.dtype != torch.float32 or not s_w.is_contiguous():
        raise ValueError(f"weight scales must be contiguous float32 ({w.shape[0]},), got {s_w.dtype} "
                         f"{tuple(s_w.shape)}")


def qgemv_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`qgemv` takes the Triton path: one contiguous 16-bit row on the weight's device."""
    return (HAS_TRITON and x.numel() == x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16)
            and x.is_contiguous() and x.device == w.device and w.device.type != "cpu")


def _even(n: int, k: int, cfg: dict) -> bool:
    return n % cfg["BLOCK_N"] == 0 and k % cfg["BLOCK_K"] == 0


def qgemv_applies_ref(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The references never take a GEMV path of their own."""
    return False


def qgemv(x: torch.Tensor, w: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None = None,
          config: dict | None = None) -> torch.Tensor:
    """Triton ``y = (x W^T) * s_w (+ bias)`` for one row of 16-bit ``x``; ``config`` overrides GEMV_CONFIG."""
    _check_weight(w, s_w)
    if x.numel() != x.shape[-1] or x.shape[-1] != w.shape[1] or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be one bf16/fp16 row of {w.shape[1]} features, got {x.dtype} {tuple(x.shape)}")
    if bias is not None and (bias.shape != (w.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous ({w.shape[0]},), got {tuple(bias.shape)}")
    cfg = {**GEMV_CONFIG, **(config or {})}
    n, k = w.shape
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _qgemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x, w, s_w, bias if bias is not None else s_w, y, n, k, w.stride(0), HAS_BIAS=bias is not None,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], EVEN=_even(n, k, cfg), num_warps=cfg["num_warps"],
        num_stages=3,
    )
    return y


def qgemv_silu_mul(x: torch.Tensor, w: torch.Tensor, s_w: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """Triton ``silu_and_mul(qgemv(x, W, s_w))`` of a merged ``[W_gate; W_up]`` in one kernel."""
    _check_weight(w, s_w)
    if x.numel() != x.shape[-1] or x.shape[-1] != w.shape[1] or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be one bf16/fp16 row of {w.shape[1]} features, got {x.dtype} {tuple(x.shape)}")
    if w.shape[0] % 2:
        raise ValueError(f"a merged [gate; up] weight has an even number of rows, got {w.shape[0]}")
    cfg = {**GEMV_CONFIG, **(config or {})}
    n, k = w.shape
    inter = n // 2
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    _qgemv_silu_mul_kernel[(triton.cdiv(inter, cfg["BLOCK_N"]),)](
        x, w, s_w, y, inter, k, w.stride(0), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        EVEN=_even(inter, k, cfg), num_warps=cfg["num_warps"], num_stages=3,
    )
    return y


_E4M3_TABLES: dict[torch.device, torch.Tensor] = {}


def codes_float(t: torch.Tensor) -> torch.Tensor:
    """8-bit codes as float32, exactly. FP8 goes through a table of its 256 values: on CPU, torch's
    elementwise E4M3 conversion is ~3x slower than the lookup (2.3 vs 0.7 ms for a 1536 x 576 weight)."""
    if t.dtype != torch.float8_e4m3fn or t.is_cuda:
        return t.float()
    table = _E4M3_TABLES.get(t.device)
    if table is None:
        table = torch.arange(256, dtype=torch.uint8, device=t.device).view(torch.float8_e4m3fn).float()
        _E4M3_TABLES[t.device] = table
    return table.index_select(0, t.reshape(-1).view(torch.uint8).int()).view(t.shape)


def qgemv_ref(x, w, s_w, bias=None, config=None) -> torch.Tensor:
    """Torch reference of :func:`qgemv` (any number of rows)."""
    _check_weight(w, s_w)
    y = (x.float() @ codes_float(w).T) * s_w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def qgemv_silu_mul_ref(x, w, s_w, config=None) -> torch.Tensor:
    """Torch reference of :func:`qgemv_silu_mul`."""
    return silu_and_mul_ref(qgemv_ref(x, w, s_w))


def _check_mm(xq: QuantizedActivation, w: torch.Tensor, s_w: torch.Tensor) -> None:
    _check_weight(w, s_w)
    q = xq.data
    if q.dtype != w.dtype or q.dim() != 2 or q.shape[1] != w.shape[1]:
        raise ValueError(f"activation {q.dtype} {tuple(q.shape)} does not fit weight {w.dtype} {tuple(w.shape)}")


def _int_mm(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``q w^T`` of int8 codes as int32. On CPU a float64 matmul gives the same integers (every partial sum
    is an integer below 2^53) about 10x faster than torch's CPU ``_int_mm``."""
    m = q.shape[0]
    if not q.is_cuda:
        return (q.double() @ w.double().t()).to(torch.int32)
    if m < _INT_MM_MIN_ROWS:
        q = torch.cat([q, q.new_zeros(_INT_MM_MIN_ROWS - m, q.shape[1])])
    return torch._int_mm(q, w.t())[:m]


def scaled_mm(xq: QuantizedActivation, w: torch.Tensor, s_w: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(xq.data W^T) * xq.scale * s_w (+ bias)`` in ``xq.dtype``: ``torch._scaled_mm`` (FP8); ``_int_mm``
    (INT8) with both scales and the bias applied in one Triton epilogue pass."""
    _check_mm(xq, w, s_w)
    if xq.data.shape[0] <= SMALL_M_MAX and xq.data.is_cuda:
        return small_mm(xq, w, s_w, bias)
    if xq.data.dtype == torch.float8_e4m3fn:
        return scaled_mm_ref(xq, w, s_w, bias)
    acc = _int_mm(xq.data, w).contiguous()
    m, n = acc.shape
    y = torch.empty((m, n), dtype=xq.dtype, device=acc.device)
    if m:
        _int_mm_epilogue_kernel[(triton.cdiv(m, 32), triton.cdiv(n, 128))](
            acc, xq.scale, s_w, bias if bias is not None else s_w, y, m, n, HAS_BIAS=bias is not None,
            BLOCK_M=32, BLOCK_N=128, num_warps=4)
    return y


def small_mm(xq: QuantizedActivation, w: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None = None,
             config: dict | None = None) -> torch.Tensor:
    """Triton :func:`scaled_mm` for at most 16 rows (decode): ``_small_mm_kernel``; ``config`` overrides
    SMALL_MM_CONFIG. INT8 accumulates exactly in int32 (the reference's result bit for bit); FP8 in fp32."""
    _check_mm(xq, w, s_w)
    q, sx = xq.data, xq.scale
    m, k = q.shape
    n = w.shape[0]
    if m > SMALL_M_MAX or q.stride(1) != 1 or sx.shape != (m, 1) or sx.dtype != torch.float32:
        raise ValueError(f"small_mm takes at most {SMALL_M_MAX} row-major rows with float32 [M, 1] scales, got "
                         f"{tuple(q.shape)} strides {q.stride()} scales {sx.dtype} {tuple(sx.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous ({n},), got {tuple(bias.shape)}")
    cfg = {**SMALL_MM_CONFIG, **(config or {})}
    y = torch.empty((m, n), dtype=xq.dtype, device=q.device)
    if m:
        sx = sx.contiguous()
        _small_mm_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            q, sx, w, s_w, bias if bias is not None else s_w, y, m, n, k, q.stride(0), w.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, IS_INT=q.dtype == torch.int8, BLOCK_M=16, BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"], EVEN_K=k % cfg["BLOCK_K"] == 0, num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    return y


def scaled_mm_ref(xq: QuantizedActivation, w: torch.Tensor, s_w: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`scaled_mm`: the same matmuls, the INT8 epilogue in torch ops."""
    _check_mm(xq, w, s_w)
    if xq.data.dtype == torch.float8_e4m3fn and xq.data.is_cuda:
        # Row-wise scales on CUDA write bf16 only: an fp16 model gets the bf16 result cast.
        y = torch._scaled_mm(xq.data, w.t(), scale_a=xq.scale, scale_b=s_w.view(1, -1), out_dtype=torch.bfloat16)
        y = y if bias is None else y + bias
        return y.to(xq.dtype)
    if xq.data.dtype == torch.float8_e4m3fn:
        # CPU: what torch's CPU _scaled_mm computes (both operands dequantized to float32, then one matmul),
        # ~4x faster: it converts the weight elementwise on every call, here a table lookup does.
        y = (codes_float(xq.data) * xq.scale) @ (codes_float(w) * s_w.view(-1, 1)).t()
        y = y.to(xq.dtype)
        return y if bias is None else (y + bias).to(xq.dtype)
    y = _int_mm(xq.data, w).float() * xq.scale * s_w
    return (y if bias is None else y + bias.float()).to(xq.dtype)
