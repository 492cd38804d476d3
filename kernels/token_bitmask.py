"""Grammar token bitmask applied to logits, in place: a constrained row's disallowed tokens become -inf.

``logits [B, V]`` (float32/float16/bfloat16, unit stride over V); ``rows [R]``
int64, the logits rows that are constrained (distinct); ``bitmask [R, W]``
int32 with ``W = ceil(V / 32)``: bit ``t % 32`` of word ``t // 32`` of
``bitmask[r]`` is 1 when token ``t`` is allowed in row ``rows[r]`` (the
layout xgrammar and llguidance fill). Rows not in ``rows`` are untouched.

Cost: the kernel never reads the logits; it reads the ``R * W * 4`` bytes of
mask and writes -inf over each disallowed entry (at most ``R * V`` elements).
256 rows of a 128k vocabulary: 4 MB read, up to 131 MB written (float32),
~0.05 ms at 3 TB/s. Memory bound, no FLOPs.
"""

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: the torch reference below still works.
    HAS_TRITON = False

_BLOCK = 2048  # tokens per program: 64 mask words


if HAS_TRITON:

    @triton.jit
    def _apply_token_bitmask_kernel(logits_ptr, rows_ptr, mask_ptr, stride_logits, stride_mask, vocab,
                                    BLOCK: tl.constexpr):
        # Program (constrained row, block of tokens).
        r = tl.program_id(0)
        row = tl.load(rows_ptr + r).to(tl.int64)
        tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_vocab = tokens < vocab
        words = tl.load(mask_ptr + r.to(tl.int64) * stride_mask + tokens // 32, mask=in_vocab, other=-1)
        allowed = (words >> (tokens % 32)) & 1
        neg_inf = tl.full((BLOCK,), float("-inf"), dtype=logits_ptr.dtype.element_ty)
        tl.store(logits_ptr + row * stride_logits + tokens, neg_inf, mask=in_vocab & (allowed == 0))


def _check(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [B, V] with a unit-stride last dim, got {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits dtype must be float32/float16/bfloat16, got {logits.dtype}")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be a 1-D int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    words = -(-logits.shape[1] // 32)
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or tuple(bitmask.shape) != (rows.shape[0], words):
        raise ValueError(f"bitmask must be int32 [{rows.shape[0]}, {words}] (one row of ceil(V/32) words per "
                         f"constrained row), got {bitmask.dtype} {tuple(bitmask.shape)}")
    if bitmask.stride(1) != 1:
        raise ValueError(f"bitmask must have a unit-stride last dim, got strides {bitmask.stride()}")
    if not (logits.device == rows.device == bitmask.device):
        raise ValueError(f"logits, rows and bitmask must be on one device, got {logits.device}, "
                         f"{rows.device}, {bitmask.device}")


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Triton: set ``logits[rows[r], t] = -inf`` wherever bit t of ``bitmask[r]`` is 0 (in place)."""
    _check(logits, rows, bitmask)
    if rows.numel() and logits.shape[1]:
        grid = (rows.shape[0], triton.cdiv(logits.shape[1], _BLOCK))
        _apply_token_bitmask_kernel[grid](logits, rows, bitmask, logits.stride(0), bitmask.stride(0),
                                          logits.shape[1], BLOCK=_BLOCK, num_warps=4)


def unpack_token_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[R, W]`` int32 words -> ``[R, vocab]`` bool, True = allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def apply_token_bitmask_ref(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Torch reference of :func:`apply_token_bitmask` (same checks, same result)."""
    _check(logits, rows, bitmask)
    if rows.numel():
        allowed = unpack_token_bitmask(bitmask, logits.shape[1])
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
