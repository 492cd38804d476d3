"""One-token linear layers: ``y = x W^T`` for a single row of ``x``, split-free.

Batch-1 decode reads every weight once per token, so each projection's
time is its weight bytes over the memory bandwidth. cuBLAS picks matrix
tiles for these shapes (8-row tiles; split-K plus a second reduce kernel
when K >> N): on one H100 (CUDA graph of 4-64 distinct weights, no L2
reuse; ``benchmarks/results/gemv-sweep-*.json``) it streamed the
Llama-3.1-8B projections at 2.0-2.8 TB/s. Here every program owns
``BLOCK_N`` output rows and streams their whole K in ``BLOCK_K`` chunks
into an fp32 accumulator: one kernel per projection, no reduce, 2.6-3.1
TB/s on the same shapes (swept over 504 launch configs; 4 x 1024 with two
warps was within 1% of the best on every shape).

``linear_silu_mul`` fuses Llama's gate: for a merged ``[gate; up]`` weight
``[2I, K]`` it computes both rows of each output feature in one program
and writes ``silu(g) * u`` ([1, I]) with the same roundings as
``silu_and_mul(linear(x, W))`` (each projection rounded to the dtype first).

Used for bf16/fp16 only (fp32 keeps cuBLAS: its parity tests compare exact
tokens with HF). Anything else (more rows, other dtypes, non-contiguous
weights, a biased gate) goes to ``F.linear`` (and ``silu_and_mul``).
"""

import torch
import torch.nn.functional as F

from fleetlm.kernels.activation import silu_and_mul, silu_and_mul_ref

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: callers use F.linear.
    HAS_TRITON = False

BLOCK_N = 4
BLOCK_K = 1024
NUM_WARPS = 2


if HAS_TRITON:

    @triton.jit
    def _dot_rows(x_ptr, w_ptr, rn, row_mask, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  EVEN: tl.constexpr):
        """fp32 ``sum_k x[k] * W[rn, k]`` for the rows ``rn`` ([BLOCK_N])."""
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        x_ptrs = x_ptr + rk
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                k_mask = k * BLOCK_K + rk < K
                x = tl.load(x_ptrs, mask=k_mask, other=0.0)
                w = tl.load(w_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0,
                            eviction_policy="evict_first")
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        return tl.sum(acc, axis=1)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rn < N
        y = _dot_rows(x_ptr, w_ptr, rn, row_mask, K, stride_wn, BLOCK_N, BLOCK_K, EVEN)
        if HAS_BIAS:
            # F.linear rounds x W^T + b once; so does this.
            y += tl.load(b_ptr + rn, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _gemv_silu_mul_kernel(x_ptr, w_ptr, y_ptr, inter, K, stride_wn,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rn < inter
        dtype = y_ptr.dtype.element_ty
        gate = _dot_rows(x_ptr, w_ptr, rn, row_mask, K, stride_wn, BLOCK_N, BLOCK_K, EVEN).to(dtype)
        up = _dot_rows(x_ptr, w_ptr, rn + inter, row_mask, K, stride_wn, BLOCK_N, BLOCK_K, EVEN).to(dtype)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype)
        tl.store(y_ptr + rn, (act.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=row_mask)


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the Triton path for these operands."""
    return (
        HAS_TRITON
        and x.numel() == x.shape[-1]
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and x.is_contiguous()
        and x.device == weight.device
    )


def _even(n: int, k: int) -> bool:
    return n % BLOCK_N == 0 and k % BLOCK_K == 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; one row of bf16/fp16 ``x`` runs the split-free GEMV."""
    if not gemv_applies(x, weight) or (bias is not None and bias.dtype != x.dtype):
        return F.linear(x, weight, bias)
    n, k = weight.shape
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN=_even(n, k),
        num_warps=NUM_WARPS, num_stages=3,
    )
    return y


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu_and_mul(linear(x, weight, bias))`` for a merged ``[W_gate; W_up]``; one unbiased row is one kernel."""
    if bias is not None or not gemv_applies(x, weight) or weight.shape[0] % 2:
        return silu_and_mul(linear(x, weight, bias))
    n, k = weight.shape
    inter = n // 2
    y = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    _gemv_silu_mul_kernel[(triton.cdiv(inter, BLOCK_N),)](
        x, weight, y, inter, k, weight.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN=_even(inter, k),
        num_warps=NUM_WARPS, num_stages=3,
    )
    return y


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`linear`."""
    return F.linear(x, weight, bias)


def linear_silu_mul_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`linear_silu_mul`."""
    return silu_and_mul_ref(F.linear(x, weight, bias))


__all__ = ["HAS_TRITON", "gemv_applies", "linear", "linear_ref", "linear_silu_mul", "linear_silu_mul_ref"]
