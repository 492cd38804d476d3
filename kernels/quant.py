"""Activation quantization for W8A8 matmuls, fused into the kernel that makes the activation.

W8A8 layers (FP8 E4M3 or INT8 weights, ``parallel/formats/w8a8.py``) take
their input quantized per token (row) with a dynamic scale, or with the
checkpoint's static per-tensor ``input_scale``::

    s_t     = max(max_k |v[t, k]|, 1e-12) / QMAX      # fp32; QMAX = 448 (E4M3), 127 (INT8)
    q[t, k] = round(clamp(v[t, k] / s_t, -QMAX, QMAX))

where ``v`` is the activation as its producer rounds it to the model dtype.
FP8 rounds to nearest even (the E4M3 conversion); INT8 rounds half away from
zero; the division is IEEE in both the kernels and the references, so they
agree bit for bit.

vLLM's first FP8 was slower than fp16 for want of this fusion (vllm #4118):
a separate pass reads the 16-bit activation again. Here the producers
quantize what they computed: ``rms_norm_quant`` / ``fused_add_rms_norm_quant``
(one row per program; the row's max is in registers) and
``silu_and_mul_quant`` (one row per program, two sweeps: the max, then the
values; the second re-reads gate and up from L2). ``quantize`` is the pass
for an input no kernel of ours produces (the attention output before o_proj).

Bytes per token of ``K`` features: the fused kernels write ``K + 4`` bytes
(codes and a scale) instead of ``2K`` (the 16-bit output they replace) and
read what the plain kernel reads; ``quantize`` reads ``2K`` and writes ``K + 4``.
A few FLOPs per element: memory bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    from fleetlm.kernels.e4m3 import round_to_e4m3
    from fleetlm.kernels.rmsnorm import rms_norm_row

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch references below still work.
    HAS_TRITON = False

QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
MIN_AMAX = 1e-12  # an all-zero row still gets a finite scale
_SILU_BLOCK = 1024


@dataclass(frozen=True)
class QuantizedActivation:
    """``data`` [T, K] (FP8 or INT8) times ``scale`` [T, 1] fp32 is the activation; ``dtype`` the model's."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self) -> torch.Tensor:
        return (self.data.float() * self.scale).to(self.dtype)


if HAS_TRITON:

    @triton.jit
    def _store_quantized(ptrs, v, s, mask, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
        """Store the codes of ``v / s`` at ``ptrs`` (an FP8 or INT8 pointer).

        The codes are computed as float32 values (E4M3-rounded or integers) and
        the store converts them exactly: one type for both formats, as Triton 3.6
        refuses a helper returning float8 from one constexpr branch and int8 from
        the other ("Return type mismatch": the first H100 run's failure).
        """
        y = tl.math.div_rn(v, tl.zeros_like(v) + s)
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        if IS_FP8:
            y = round_to_e4m3(y)
        else:
            y = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))
        tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_scale(v, mask, s_in_ptr, QMAX: tl.constexpr, STATIC: tl.constexpr):
        if STATIC:
            return tl.load(s_in_ptr).to(tl.float32)
        amax = tl.max(tl.where(mask, tl.abs(v), 0.0), axis=0)
        return tl.math.div_rn(tl.maximum(amax, 1e-12), QMAX)

    @triton.jit
    def _rms_norm_quant_kernel(x_ptr, residual_ptr, weight_ptr, q_ptr, s_ptr, s_in_ptr, residual_out_ptr,
                               stride_x, stride_residual, stride_q, stride_residual_out, hidden, eps,
                               BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, QMAX: tl.constexpr,
                               IS_FP8: tl.constexpr, STATIC: tl.constexpr):
        # kernels/rmsnorm.py's row, then the quantization of its rounded output.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        v = rms_norm_row(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, stride_x, stride_residual,
                         stride_residual_out, hidden, eps, row, cols, mask, HAS_RESIDUAL)
        v = v.to(x_ptr.dtype.element_ty).to(tl.float32)
        s = _row_scale(v, mask, s_in_ptr, QMAX, STATIC)
        _store_quantized(q_ptr + row * stride_q + cols, v, s, mask, QMAX, IS_FP8)
        tl.store(s_ptr + row, s)

    @triton.jit
    def _silu_mul_values(x_ptr, row, stride_x, inter, cols, mask):
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
        dtype = gate.dtype
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype)
        return (act.to(tl.float32) * up.to(tl.float32)).to(dtype).to(tl.float32)

    @triton.jit
    def _silu_and_mul_quant_kernel(x_ptr, q_ptr, s_ptr, s_in_ptr, stride_x, stride_q, inter,
                                   BLOCK: tl.constexpr, QMAX: tl.constexpr, IS_FP8: tl.constexpr,
                                   STATIC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if STATIC:
            s = tl.load(s_in_ptr).to(tl.float32)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, inter, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < inter
                v = _silu_mul_values(x_ptr, row, stride_x, inter, cols, mask)
                amax = tl.maximum(amax, tl.where(mask, tl.abs(v), 0.0))
            s = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), QMAX)
        for start in range(0, inter, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < inter
            v = _silu_mul_values(x_ptr, row, stride_x, inter, cols, mask)
            _store_quantized(q_ptr + row * stride_q + cols, v, s, mask, QMAX, IS_FP8)
        tl.store(s_ptr + row, s)

    @triton.jit
    def _quantize_kernel(x_ptr, q_ptr, s_ptr, s_in_ptr, stride_x, stride_q, K, BLOCK: tl.constexpr,
                         QMAX: tl.constexpr, IS_FP8: tl.constexpr, STATIC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        v = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        s = _row_scale(v, mask, s_in_ptr, QMAX, STATIC)
        _store_quantized(q_ptr + row * stride_q + cols, v, s, mask, QMAX, IS_FP8)
        tl.store(s_ptr + row, s)


def _check(x: torch.Tensor, qdtype: torch.dtype, scale: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be 2-D with a unit-stride last dim, got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x dtype must be float32/float16/bfloat16, got {x.dtype}")
    if qdtype not in QMAX:
        raise ValueError(f"quantized dtype must be torch.float8_e4m3fn or torch.int8, got {qdtype}")
    if scale is not None and (scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != x.device):
        raise ValueError(f"a static scale must be one float32 on {x.device}, got {tuple(scale.shape)} {scale.dtype}")


def _outputs(rows: int, cols: int, qdtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((rows, cols), dtype=qdtype, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


def _consts(qdtype: torch.dtype, scale: torch.Tensor | None) -> dict:
    return dict(QMAX=QMAX[qdtype], IS_FP8=qdtype == torch.float8_e4m3fn, STATIC=scale is not None)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, qdtype: torch.dtype,
                   scale: torch.Tensor | None = None) -> QuantizedActivation:
    """Triton ``quantize(rms_norm(x, weight, eps))`` in one pass."""
    return _norm_quant(x, None, weight, eps, qdtype, scale)[0]


def fused_add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             qdtype: torch.dtype, scale: torch.Tensor | None = None
                             ) -> tuple[QuantizedActivation, torch.Tensor]:
    """Triton ``(quantize(rms_norm(x + residual)), x + residual)`` in one pass."""
    return _norm_quant(x, residual, weight, eps, qdtype, scale)


def _norm_quant(x, residual, weight, eps, qdtype, scale):
    _check(x, qdtype, scale)
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous ({x.shape[1]},) {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    rows, hidden = x.shape
    q, s = _outputs(rows, hidden, qdtype, x.device)
    residual_out = torch.empty_like(x) if residual is not None else x
    if rows:
        r = residual if residual is not None else x
        block = triton.next_power_of_2(hidden)
        _rms_norm_quant_kernel[(rows,)](
            x, r, weight, q, s, scale if scale is not None else s, residual_out,
            x.stride(0), r.stride(0), q.stride(0), residual_out.stride(0), hidden, float(eps),
            BLOCK=block, HAS_RESIDUAL=residual is not None, **_consts(qdtype, scale),
            num_warps=min(max(block // 512, 1), 16), enable_fp_fusion=False,
        )
    return QuantizedActivation(q, s, x.dtype), residual_out


def silu_and_mul_quant(x: torch.Tensor, qdtype: torch.dtype, scale: torch.Tensor | None = None
                       ) -> QuantizedActivation:
    """Triton ``quantize(silu(x[:, :I]) * x[:, I:])`` for ``x [T, 2I]``."""
    _check(x, qdtype, scale)
    if x.shape[1] % 2:
        raise ValueError(f"x must be [T, 2*I], got {tuple(x.shape)}")
    rows, inter = x.shape[0], x.shape[1] // 2
    q, s = _outputs(rows, inter, qdtype, x.device)
    if rows:
        _silu_and_mul_quant_kernel[(rows,)](
            x, q, s, scale if scale is not None else s, x.stride(0), q.stride(0), inter,
            BLOCK=min(_SILU_BLOCK, triton.next_power_of_2(inter)), **_consts(qdtype, scale),
            num_warps=4, enable_fp_fusion=False,
        )
    return QuantizedActivation(q, s, x.dtype)


def quantize(x: torch.Tensor, qdtype: torch.dtype, scale: torch.Tensor | None = None) -> QuantizedActivation:
    """Triton per-token (or static-scale) quantization of ``x [T, K]``."""
    _check(x, qdtype, scale)
    rows, k = x.shape
    q, s = _outputs(rows, k, qdtype, x.device)
    if rows:
        block = triton.next_power_of_2(k)
        _quantize_kernel[(rows,)](
            x, q, s, scale if scale is not None else s, x.stride(0), q.stride(0), k,
            BLOCK=block, **_consts(qdtype, scale), num_warps=min(max(block // 512, 1), 16),
        )
    return QuantizedActivation(q, s, x.dtype)


# -- references (CPU; the same numerics) ------------------------------------------


def quantize_ref(x: torch.Tensor, qdtype: torch.dtype, scale: torch.Tensor | None = None) -> QuantizedActivation:
    """Torch reference of :func:`quantize`."""
    _check(x, qdtype, scale)
    qmax = QMAX[qdtype]
    v = x.float()
    if scale is None:
        s = v.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_AMAX) / qmax
    else:
        s = scale.reshape(1, 1).expand(x.shape[0], 1).contiguous()
    y = (v / s).clamp(-qmax, qmax)
    if qdtype == torch.float8_e4m3fn:
        q = y.to(qdtype)
    else:
        q = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5)).to(torch.int8)
    return QuantizedActivation(q, s, x.dtype)


def rms_norm_quant_ref(x, weight, eps, qdtype, scale=None) -> QuantizedActivation:
    """Torch reference of :func:`rms_norm_quant`."""
    from fleetlm.kernels.rmsnorm import rms_norm_ref

    return quantize_ref(rms_norm_ref(x, weight, eps), qdtype, scale)


def fused_add_rms_norm_quant_ref(x, residual, weight, eps, qdtype, scale=None):
    """Torch reference of :func:`fused_add_rms_norm_quant`."""
    from fleetlm.kernels.rmsnorm import fused_add_rms_norm_ref

    out, new_residual = fused_add_rms_norm_ref(x, residual, weight, eps)
    return quantize_ref(out, qdtype, scale), new_residual


def silu_and_mul_quant_ref(x, qdtype, scale=None) -> QuantizedActivation:
    """Torch reference of :func:`silu_and_mul_quant`."""
    from fleetlm.kernels.activation import silu_and_mul_ref

    return quantize_ref(silu_and_mul_ref(x), qdtype, scale)
