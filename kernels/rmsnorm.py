"""RMSNorm, alone and fused with the residual add before it.

For each row ``x`` of ``[..., hidden]`` (Hugging Face ``LlamaRMSNorm``, bit for
bit in the torch reference)::

    h   = x.float()
    out = weight * (h * rsqrt(mean(h * h) + eps)).to(x.dtype)

``fused_add_rms_norm(x, residual, weight, eps)`` first forms the new residual
stream ``x + residual`` in the model dtype (as HF's decoder layer does) and
returns ``(rms_norm(x + residual), x + residual)``. Inputs are not modified.

Cost per row of ``hidden`` elements of ``e`` bytes: ``rms_norm`` reads ``hidden
* e`` and writes ``hidden * e`` (the weight stays in L2); the fused op reads
``2 * hidden * e`` and writes ``2 * hidden * e``. About 4 FLOPs per element:
purely memory bound, one pass, one row per program.
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
    def rms_norm_row(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, stride_x, stride_residual,
                     stride_residual_out, hidden, eps, row, cols, mask, HAS_RESIDUAL: tl.constexpr):
        """One row's ``weight * rms_norm(x (+ residual))`` in float32 (stores the new residual);
        shared with the fused RMSNorm + quantize kernel of kernels/quant.py."""
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        dtype = x.dtype
        if HAS_RESIDUAL:
            r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
            # The residual stream is kept (and rounded) in the model dtype, as in HF.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
        h = x.to(tl.float32)
        variance = tl.sum(h * h, axis=0) / hidden
        normed = (h * tl.rsqrt(variance + eps)).to(dtype)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        # Product of two 16-bit floats is exact in float32: one rounding, like torch.
        return w.to(tl.float32) * normed.to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        residual_ptr,
        weight_ptr,
        out_ptr,
        residual_out_ptr,
        stride_x,
        stride_residual,
        stride_out,
        stride_residual_out,
        hidden,
        eps,
        BLOCK: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
    ):
        # One program normalizes one row; the whole row lives in registers.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        out = rms_norm_row(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, stride_x, stride_residual,
                           stride_residual_out, hidden, eps, row, cols, mask, HAS_RESIDUAL)
        tl.store(out_ptr + row * stride_out + cols, out.to(x_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() < 1 or x.stride(-1) != 1:
        raise ValueError(f"x must have a unit-stride last dim, got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x dtype must be float32/float16/bfloat16, got {x.dtype}")
    if weight.shape != (x.shape[-1],) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous of shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match x ({x.dtype}, {x.device})")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
            )
        if residual.stride(-1) != 1:
            raise ValueError("residual must have a unit-stride last dim")


def _launch(x, residual, weight, eps):
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else out
    if x2.shape[0] > 0:
        r2 = residual.reshape(-1, hidden) if residual is not None else x2
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out,
            residual_out,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            residual_out.stride(0),
            hidden,
            float(eps),
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            num_warps=min(max(block // 512, 1), 16),
            enable_fp_fusion=False,  # keep torch's rounding (no FMA contraction)
        )
    return out.view(x.shape), residual_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim of ``x`` (any leading dims)."""
    _check(x, weight, None)
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``(rms_norm(x + residual), x + residual)`` in one pass."""
    _check(x, weight, residual)
    return _launch(x, residual, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference: HF ``LlamaRMSNorm.forward``."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`fused_add_rms_norm`."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual
