"""SiLU-and-mul, the gate of Llama's MLP on the fused gate_up projection.

``x [T, 2 * I]`` holds ``cat(gate, up)`` per token; the result ``[T, I]`` is::

    silu(gate) * up        # silu(g) = g / (1 + exp(-g)), rounded to the dtype

the same two roundings as HF's ``act_fn(gate_proj(x)) * up_proj(x)``.

Cost per token: read ``2 * I`` elements, write ``I``; ~5 FLOPs per output
element: memory bound.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch reference below still works.
    HAS_TRITON = False

_BLOCK = 1024


if HAS_TRITON:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, inter, BLOCK: tl.constexpr):
        # Program (token, column block).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
        dtype = gate.dtype
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype)
        out = act.to(tl.float32) * up.to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, out.to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(x[:, :I]) * x[:, I:]`` for ``x [T, 2I]``."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [T, 2*I], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x must have a unit-stride last dim, got strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x dtype must be float32/float16/bfloat16, got {x.dtype}")
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens > 0 and inter > 0:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, _BLOCK))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=_BLOCK, num_warps=4,
            enable_fp_fusion=False,  # keep torch's rounding (no FMA contraction)
        )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`silu_and_mul`."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
