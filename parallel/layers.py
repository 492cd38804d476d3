"""Tensor-parallel layers: models use these and read like single-device code.

Column-parallel layers split the output features over the TP ranks (no
communication in forward); row-parallel layers split the input features and
all-reduce the partial sums; the vocabulary-parallel embedding and LM head
split the vocabulary. Each layer loads its own shard from a ``LazyTensor``
(``load(rows=, cols=)``), so a rank reads only the slice it keeps.

With tp_size == 1 every layer is a plain linear / embedding. The matmul
itself is ``linear`` (``F.linear``'s signature), given by the model from its
kernel namespace (``ops.linear``: a split-free GEMV for one decode token on
GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.parallel.context import ParallelContext


def _split(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({parts})")
    return n // parts


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight {name}: checkpoint shard {tuple(src.shape)} != parameter {tuple(dst.shape)}")
    dst.copy_(src)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's rows (output features) split over TP ranks."""

    def __init__(self, in_features, out_features, bias, ctx: ParallelContext, dtype, device, linear=F.linear):
        super().__init__()
        self.ctx, self.linear = ctx, linear
        self.out_per_rank = _split(out_features, ctx.tp_size, "output features")
        self.weight = _param((self.out_per_rank, in_features), dtype, device)
        self.bias = _param((self.out_per_rank,), dtype, device) if bias else None

    def load(self, name: str, lazy) -> None:
        lo = self.ctx.tp_rank * self.out_per_rank
        rows = slice(lo, lo + self.out_per_rank)
        target = self.bias if name.endswith("bias") else self.weight
        _copy(target.data, lazy.load(rows=rows), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (gate_up)."""

    def __init__(self, in_features, out_sizes: list[int], bias, ctx, dtype, device, linear=F.linear):
        super().__init__(in_features, sum(out_sizes), bias, ctx, dtype, device, linear)
        self.shard_sizes = [_split(n, ctx.tp_size, "output features") for n in out_sizes]

    def load_shard(self, shard: int, name: str, lazy) -> None:
        size = self.shard_sizes[shard]
        offset = sum(self.shard_sizes[:shard])
        lo = self.ctx.tp_rank * size
        target = self.bias if name.endswith("bias") else self.weight
        _copy(target.data[offset : offset + size], lazy.load(rows=slice(lo, lo + size)), name)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections fused; heads split over TP ranks.

    With fewer KV heads than ranks, each KV head is replicated on
    ``tp_size // num_kv_heads`` consecutive ranks (rank r keeps KV head
    ``r * num_kv_heads // tp_size``), which keeps GQA's grouping intact.
    """

    def __init__(self, hidden, head_dim, num_heads, num_kv_heads, bias, ctx: ParallelContext, dtype, device,
                 linear=F.linear):
        tp = ctx.tp_size
        self.num_heads = _split(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _split(num_kv_heads, tp, "num_key_value_heads")
        else:
            if tp % num_kv_heads:
                raise ValueError(
                    f"tensor_parallel_size ({tp}) must be a multiple of num_key_value_heads "
                    f"({num_kv_heads}) when it exceeds it"
                )
            self.num_kv_heads = 1
        self.total_kv_heads = num_kv_heads
        self.head_dim = head_dim
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden, (q + 2 * kv) * tp, bias, ctx, dtype, device, linear)
        self.q_size, self.kv_size = q, kv

    def load_shard(self, shard: str, name: str, lazy) -> None:
        rank, d = self.ctx.tp_rank, self.head_dim
        if shard == "q":
            lo, size, offset = rank * self.q_size, self.q_size, 0
        else:
            if self.total_kv_heads >= self.ctx.tp_size:
                head = rank * self.num_kv_heads
            else:
                head = rank * self.total_kv_heads // self.ctx.tp_size
            lo, size = head * d, self.kv_size
            offset = self.q_size + (0 if shard == "k" else self.kv_size)
        target = self.bias if name.endswith("bias") else self.weight
        _copy(target.data[offset : offset + size], lazy.load(rows=slice(lo, lo + size)), name)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T) (+ b): W's columns (input features) split."""

    def __init__(self, in_features, out_features, bias, ctx: ParallelContext, dtype, device, linear=F.linear):
        super().__init__()
        self.ctx, self.linear = ctx, linear
        self.in_per_rank = _split(in_features, ctx.tp_size, "input features")
        self.weight = _param((out_features, self.in_per_rank), dtype, device)
        self.bias = _param((out_features,), dtype, device) if bias else None

    def load(self, name: str, lazy) -> None:
        if name.endswith("bias"):
            _copy(self.bias.data, lazy.load(), name)
            return
        lo = self.ctx.tp_rank * self.in_per_rank
        _copy(self.weight.data, lazy.load(cols=slice(lo, lo + self.in_per_rank)), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ctx.all_reduce(self.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over TP ranks (padded to a multiple of tp)."""

    def __init__(self, vocab_size, hidden, ctx: ParallelContext, dtype, device):
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // ctx.tp_size)
        self.lo = ctx.tp_rank * self.per_rank
        self.rows = max(0, min(vocab_size, self.lo + self.per_rank) - self.lo)
        self.weight = _param((self.per_rank, hidden), dtype, device)

    def load(self, name: str, lazy) -> None:
        self.weight.data.zero_()
        _copy(self.weight.data[: self.rows], lazy.load(rows=slice(self.lo, self.lo + self.rows)), name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.lo
        mask = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        out.masked_fill_(mask.unsqueeze(-1), 0)
        return self.ctx.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocabulary-parallel output projection; logits are gathered to full vocab."""

    def __init__(self, vocab_size, hidden, ctx: ParallelContext, dtype, device, linear=F.linear):
        super().__init__(vocab_size, hidden, ctx, dtype, device)
        self.linear = linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = self.linear(hidden, self.weight)
        if self.ctx.tp_size > 1:
            logits = self.ctx.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
