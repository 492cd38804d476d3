"""The layout of a weight kept quantized: one for AWQ, GPTQ and the GGUF block formats.

Each format repacks its checkpoint into it once, at load
(``parallel/formats/{awq,gptq,gguf_blocks}.py``). It is K-major, GPTQ's
own: ``P = 32 // bits`` consecutive input features of one output column
share an int32 word, and output columns are contiguous::

    q[n, k]  = bits (4 or 8) of word qweight[k // P, n], at (k % P) * bits
    g        = k // group            (or g_idx[k]: GPTQ's act-order groups)
    s        = scales[g, n]          (* super_scales[k // super_group, n]: GGUF K-quant sub-scales)
    z        = zeros[g, n]           (or the constant zero_point)
    m        = mins[g, n]            (* super_mins[k // super_group, n]); 0 without mins
    W[n, k]  = (q - z) * s + m       in float32

Every term is exact in float32 (q, z: < 9 bits; s: an fp16 value times a
sub-scale below 2^8), so W is the float32 weight the format's own
dequantization gives (gguf.quants' numpy code, AutoAWQ's and AutoGPTQ's
formulas); only the order of the matmul's sums differs.

Why K-major: a warp's 32 lanes read consecutive output columns of one row
of words (16-byte vector loads, coalesced), every lane unpacks its own
words in registers, and the sum over K stays inside each lane; scales and
zeros of a group are one contiguous row.

:func:`dequantize` is the formula above in torch (float32): the CPU path
and the reference of every kernel in ``kernels/wq_linear.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fleetlm.kernels import wq_configs

SUPPORTED_BITS = (4, 8)
LOCKS = 4096  # split-K counters per weight: output tiles of one launch that may split K


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A ``[N, K]`` weight in the kernels' K-major layout (see the module docstring); tensors on one device."""

    qweight: torch.Tensor  # int32 [K // (32 // bits), N]
    scales: torch.Tensor  # [groups, N]: float, or int8/uint8 sub-scales under super_scales
    bits: int
    group: int  # input features per group (K: one group per column)
    zeros: torch.Tensor | None = None  # [groups, N], any integer or float dtype; None: zero_point
    zero_point: int = 0
    mins: torch.Tensor | None = None  # [groups, N], added after scaling
    super_scales: torch.Tensor | None = None  # float32 [K // super_group, N]
    super_mins: torch.Tensor | None = None  # float32 [K // super_group, N]
    super_group: int = 0
    g_idx: torch.Tensor | None = None  # int32 [K]: each input feature's group (GPTQ desc_act)
    locks: torch.Tensor | None = field(default=None, repr=False)  # int32 [LOCKS], zero between launches

    def __post_init__(self) -> None:
        if self.locks is None:  # frozen: set once, here
            object.__setattr__(self, "locks", torch.zeros(LOCKS, dtype=torch.int32, device=self.qweight.device))

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * self.pack

    @property
    def kind(self) -> str:
        """The config table's key for this weight's kernel specialization."""
        return wq_configs.kind_of(self.bits, self.group, self.super_scales is not None, self.mins is not None,
                                  self.g_idx is not None)

    def nbytes(self) -> int:
        """Bytes a kernel streams per use: packed words, scales, zeros, mins, super-block scales."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.mins,
                                                             self.super_scales, self.super_mins, self.g_idx)
                   if t is not None)

    def check(self) -> None:
        """Shapes, dtypes and strides the kernels rely on; a ValueError naming what is wrong."""
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"{self.bits}-bit weights are not supported (supported: {SUPPORTED_BITS})")
        n, k = self.out_features, self.in_features
        if self.qweight.dtype != torch.int32 or self.qweight.dim() != 2 or not self.qweight.is_contiguous():
            raise ValueError(f"qweight must be a contiguous int32 [K/{self.pack}, N], got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        if self.group <= 0 or self.group % self.pack or (self.g_idx is None and k % self.group):
            raise ValueError(f"group size {self.group} must divide K ({k}) in whole {self.pack}-value words")
        groups = self.scales.shape[0] if self.scales.dim() == 2 else -1
        if self.g_idx is None and groups != k // self.group:
            raise ValueError(f"scales {tuple(self.scales.shape)} != [{k // self.group}, {n}]")
        for name in ("scales", "zeros", "mins"):
            t = getattr(self, name)
            if t is not None and (tuple(t.shape) != (groups, n) or not t.is_contiguous()):
                raise ValueError(f"{name} must be contiguous [{groups}, {n}], got {tuple(t.shape)}")
        if self.super_scales is not None:
            s = self.super_group
            if s <= 0 or s % self.group or k % s:
                raise ValueError(f"super group {s} must be a multiple of the group {self.group} dividing K ({k})")
            for t in (self.super_scales, self.super_mins):
                if t is not None and (tuple(t.shape) != (k // s, n) or t.dtype != torch.float32
                                      or not t.is_contiguous()):
                    raise ValueError(f"super scales must be contiguous float32 [{k // s}, {n}]")
        elif self.super_mins is not None:
            raise ValueError("super_mins without super_scales")
        if self.g_idx is not None:
            if tuple(self.g_idx.shape) != (k,) or self.g_idx.dtype != torch.int32:
                raise ValueError(f"g_idx must be int32 [{k}], got {self.g_idx.dtype} {tuple(self.g_idx.shape)}")


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """The float32 ``[N, K]`` weight (the formula of the module docstring)."""
    k = qw.in_features
    shifts = torch.arange(0, 32, qw.bits, device=qw.qweight.device, dtype=torch.int32)
    # [K/P, P, N] -> [K, N]: field j of word w is input feature w * P + j
    q = ((qw.qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << qw.bits) - 1)).reshape(k, -1).float()
    group = qw.g_idx.long() if qw.g_idx is not None else torch.arange(k, device=q.device) // qw.group

    def per_k(t: torch.Tensor) -> torch.Tensor:
        return t.float()[group]

    scales = per_k(qw.scales)
    if qw.super_scales is not None:
        scales = scales * qw.super_scales.repeat_interleave(qw.super_group, dim=0)
    zeros = per_k(qw.zeros) if qw.zeros is not None else float(qw.zero_point)
    w = (q - zeros) * scales
    if qw.mins is not None:
        mins = per_k(qw.mins)
        if qw.super_mins is not None:
            mins = mins * qw.super_mins.repeat_interleave(qw.super_group, dim=0)
        w = w + mins
    return w.t()


__all__ = ["LOCKS", "SUPPORTED_BITS", "QuantWeight", "dequantize"]
