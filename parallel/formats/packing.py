"""Integer packing of AWQ and GPTQ checkpoints, and round-to-nearest group quantization.

Both formats store 32 // bits values per int32 word, value ``j`` of a word at
bits ``[j * bits, (j + 1) * bits)``:

- GPTQ (AutoGPTQ / GPTQModel / optimum): ``qweight [K / P, N]`` packs P
  consecutive input features of one output column; ``qzeros [groups, N / P]``
  packs P consecutive output columns; ``scales [groups, N]`` float16;
  ``g_idx [K]`` int32, the group of each input feature (``k // group`` unless
  the checkpoint was quantized in activation order, ``desc_act``). The v1
  format ("gptq", the default ``checkpoint_format``) stores each zero point
  minus one (a zero of 0 wraps to all ones in its field, hence 2**bits on
  reading); "gptq_v2" stores it as is.
- AWQ, GEMM version (AutoAWQ, llm-awq): ``qweight [K, N / 8]`` and
  ``qzeros [groups, N / 8]`` pack 8 output columns in AWQ's order: the word's
  field ``i`` holds column ``AWQ_ORDER[i]`` of its eight, i.e. columns
  0 2 4 6 1 3 5 7; ``scales [groups, N]`` float16.

Either way the weight is ``(q - zero) * scale`` of its group.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column j of eight sits in field AWQ_REVERSE_ORDER[j]


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> int32 values (0 .. 2**bits - 1), ``dim`` grown by 32 // bits, fields in order."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed tensors are int32, got {packed.dtype}")
    dim = dim % packed.dim()
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(dim + 1) >> shifts.view([-1] + [1] * (packed.dim() - dim - 1))) & ((1 << bits) - 1)
    shape = list(packed.shape)
    shape[dim] *= 32 // bits
    return values.reshape(shape)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`unpack`: ``dim`` (a multiple of 32 // bits) shrinks by 32 // bits."""
    per = 32 // bits
    dim = dim % values.dim()
    if values.shape[dim] % per:
        raise ValueError(f"{values.shape[dim]} values along dim {dim} do not fill whole {per}-value words")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"values outside 0..{(1 << bits) - 1} cannot be packed in {bits} bits")
    shape = list(values.shape)
    shape[dim : dim + 1] = [shape[dim] // per, per]
    fields = values.to(torch.int64).reshape(shape)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (fields << shifts.view([-1] + [1] * (values.dim() - dim - 1))).sum(dim + 1)
    return (words - ((words >= 1 << 31).to(torch.int64) << 32)).to(torch.int32)  # two's complement


def awq_order(values: torch.Tensor, reverse: bool) -> torch.Tensor:
    """Permute the columns (last dim) within each eight: into AWQ's field order, or back out of it."""
    order = torch.tensor(AWQ_REVERSE_ORDER if reverse else AWQ_ORDER, device=values.device)
    cols = values.shape[-1]
    index = (torch.arange(0, cols, 8, device=values.device).view(-1, 1) + order).reshape(-1)
    return values[..., index]


def quantize_groups(w: torch.Tensor, bits: int, group: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Round-to-nearest ``[N, K]`` -> (q int32 [N, K], scales float16 [N, K / group], zeros int32 [N, K / group]).

    ``w ~ (q - zero) * scale``; the scale is rounded to float16 before ``q``
    is computed, so dequantizing gives exactly the weight the file holds.
    Symmetric: zero = 2**(bits - 1), as GPTQ's ``sym=True`` writes it.
    """
    n, k = w.shape
    if group == -1:
        group = k
    maxq = (1 << bits) - 1
    g = w.float().reshape(n, k // group, group)
    if sym:
        amax = g.abs().amax(-1).clamp_min(1e-8)
        scales = (2 * amax / maxq).half()
        zeros = torch.full_like(amax, (maxq + 1) // 2, dtype=torch.int32)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scales = ((hi - lo).clamp_min(1e-8) / maxq).half()
        zeros = torch.round(-lo / scales.float()).clamp(0, maxq).to(torch.int32)
    q = torch.round(g / scales.float().unsqueeze(-1)) + zeros.unsqueeze(-1)
    return q.clamp(0, maxq).to(torch.int32).reshape(n, k), scales, zeros
