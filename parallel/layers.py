"""Tensor-parallel layers: models use these and read like single-device code.

Column-parallel layers split the output features over the TP ranks (no
communication in forward); row-parallel layers split the input features and
all-reduce the partial sums; the vocabulary-parallel embedding and LM head
split the vocabulary. With tp_size == 1 every layer is a plain linear /
embedding.

What a linear layer holds and how it multiplies is its weight format's
(``parallel/formats/``: a ``LinearMethod`` declares the tensors and how each
follows the output and input features). The layer only knows which
features are this rank's, and cuts every checkpoint tensor to them from a
``LazyTensor`` (``load(rows=, cols=)``), so a rank reads only the slice it
keeps, whatever the format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fleetlm.parallel.context import ParallelContext
from fleetlm.parallel.formats import DenseMethod, LinearMethod, ParamSpec
from fleetlm.parallel.formats.base import copy_block


def _split(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({parts})")
    return n // parts


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


_copy = copy_block


def _read(lazy, spec: ParamSpec, out_range: tuple[int, int] | None, in_range: tuple[int, int] | None):
    """The block of a checkpoint tensor covering output features ``out_range`` and input features ``in_range``.

    A dimension of size 1, or one the tensor lacks, is broadcast over the
    features (a per-tensor scale, 0-d or ``[1]``, or the trailing 1 of
    ``[out, 1]`` scales): every rank keeps it whole.
    Float tensors are read in the layer's dtype; integer and FP8 tensors as
    stored (a float block for an FP8 tensor is the format's to quantize).
    """
    cuts: dict[int, slice] = {}
    if out_range is not None and spec.out_dim is not None:
        cuts[spec.out_dim] = spec.element_range(out_range, spec.out_per, "output")
    if in_range is not None and spec.in_dim is not None:
        cuts[spec.in_dim] = spec.element_range(in_range, spec.in_per, "input")
    cuts = {d: c for d, c in cuts.items() if d < len(lazy.shape) and lazy.shape[d] != 1}
    if set(cuts) - {0, 1}:
        raise ValueError(f"{spec.name}: only the first two dimensions of a tensor can be split")
    dtype = spec.dtype if _CASTABLE.get(spec.dtype) else None
    return lazy.load(rows=cuts.get(0), cols=cuts.get(1), dtype=dtype)


_CASTABLE = {torch.float32: True, torch.float16: True, torch.bfloat16: True}


class LinearBase(nn.Module):
    """A linear layer of this rank's ``in_features x out_features``, its tensors owned by ``method``."""

    input_is_parallel = False  # whether the input features are split over the TP ranks (row-parallel)

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext, dtype, device,
                 method: LinearMethod) -> None:
        super().__init__()
        self.ctx, self.method = ctx, method
        self.in_per_rank, self.out_per_rank = in_features, out_features
        self.specs = {s.name: s for s in method.create_weights(self, in_features, out_features, dtype, device)}
        self.bias = _param((out_features,), dtype, device) if bias else None
        if bias:
            self.specs["bias"] = ParamSpec("bias", (out_features,), dtype, out_dim=0, in_dim=None)

    def _spec(self, name: str) -> ParamSpec:
        suffix = name.rpartition(".")[2]
        spec = self.specs.get(suffix)
        if spec is None:
            raise ValueError(f"weight {name}: a {self.method.name} {type(self).__name__} has no tensor {suffix!r} "
                             f"(it holds {', '.join(sorted(self.specs))})")
        return spec

    def _load_part(self, name: str, lazy, out_range, in_range, out_offset: int, out_size: int | None) -> None:
        """Hand the checkpoint block to the format, for output features [out_offset, +out_size) of this rank."""
        spec = self._spec(name)
        block = _read(lazy, spec, out_range, in_range)
        self.method.load_tensor(self, spec, block, None if out_size is None else (out_offset, out_size), name)

    def part(self, tensor: str, part: tuple[int, int] | None) -> torch.Tensor:
        """Tensor ``tensor`` of this layer, narrowed to output features ``part`` = (offset, count) (None: whole)."""
        spec, dst = self.specs[tensor], getattr(self, tensor).data
        if part is None or spec.out_dim is None:
            return dst
        rng = spec.element_range((part[0], part[0] + part[1]), spec.out_per, "output")
        return dst.narrow(spec.out_dim, rng.start, rng.stop - rng.start)

    def input_quant(self, x):
        """How this layer wants ``x`` quantized by the kernel producing it (None: as it is); see formats/base.py."""
        return self.method.input_quant(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """y = x W^T (+ b) with W's rows (output features) split over TP ranks."""

    def __init__(self, in_features, out_features, bias, ctx: ParallelContext, dtype, device, method: LinearMethod):
        super().__init__(in_features, _split(out_features, ctx.tp_size, "output features"), bias, ctx, dtype,
                         device, method)

    def load(self, name: str, lazy) -> None:
        lo = self.ctx.tp_rank * self.out_per_rank
        self._load_part(name, lazy, (lo, lo + self.out_per_rank), None, 0, None)

    def output_shards(self) -> list[tuple[int, int, int]]:
        """Per fused projection: (first output feature this rank keeps, how many, where they sit here)."""
        return [(self.ctx.tp_rank * self.out_per_rank, self.out_per_rank, 0)]


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (gate_up)."""

    def __init__(self, in_features, out_sizes: list[int], bias, ctx, dtype, device, method: LinearMethod):
        super().__init__(in_features, sum(out_sizes), bias, ctx, dtype, device, method)
        self.shard_sizes = [_split(n, ctx.tp_size, "output features") for n in out_sizes]

    def load_shard(self, shard: int, name: str, lazy) -> None:
        lo, size, offset = self.output_shards()[shard]
        self._load_part(name, lazy, (lo, lo + size), None, offset, size)

    def output_shards(self) -> list[tuple[int, int, int]]:
        rank = self.ctx.tp_rank
        return [(rank * size, size, sum(self.shard_sizes[:i])) for i, size in enumerate(self.shard_sizes)]

    def silu_mul(self, x: torch.Tensor, silu_and_mul, quant=None) -> torch.Tensor:
        """``silu(gate) * up`` of the two halves (a format may fuse it into the matmul, and quantize it as
        ``quant``, the next layer's ``input_quant``, asks)."""
        return self.method.apply_silu_mul(self, x, self.bias, silu_and_mul, quant)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections fused; heads split over TP ranks.

    With fewer KV heads than ranks, each KV head is replicated on
    ``tp_size // num_kv_heads`` consecutive ranks (rank r keeps KV head
    ``r * num_kv_heads // tp_size``), which keeps GQA's grouping intact.
    """

    def __init__(self, hidden, head_dim, num_heads, num_kv_heads, bias, ctx: ParallelContext, dtype, device,
                 method: LinearMethod):
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
        super().__init__(hidden, (q + 2 * kv) * tp, bias, ctx, dtype, device, method)
        self.q_size, self.kv_size = q, kv

    def load_shard(self, shard: str, name: str, lazy) -> None:
        lo, size, offset = self.output_shards()["qkv".index(shard)]
        self._load_part(name, lazy, (lo, lo + size), None, offset, size)

    def output_shards(self) -> list[tuple[int, int, int]]:
        """q, k, v: (first checkpoint row this rank keeps, how many, offset in the fused output)."""
        rank = self.ctx.tp_rank
        if self.total_kv_heads >= self.ctx.tp_size:
            head = rank * self.num_kv_heads
        else:
            head = rank * self.total_kv_heads // self.ctx.tp_size
        kv_lo = head * self.head_dim
        return [(rank * self.q_size, self.q_size, 0), (kv_lo, self.kv_size, self.q_size),
                (kv_lo, self.kv_size, self.q_size + self.kv_size)]


class RowParallelLinear(LinearBase):
    """y = all_reduce(x_shard W_shard^T) (+ b): W's columns (input features) split."""

    input_is_parallel = True

    def __init__(self, in_features, out_features, bias, ctx: ParallelContext, dtype, device, method: LinearMethod):
        super().__init__(_split(in_features, ctx.tp_size, "input features"), out_features, bias, ctx, dtype, device,
                         method)

    def load(self, name: str, lazy) -> None:
        lo = self.ctx.tp_rank * self.in_per_rank
        self._load_part(name, lazy, None, (lo, lo + self.in_per_rank), 0, None)

    def output_shards(self) -> list[tuple[int, int, int]]:
        return [(0, self.out_per_rank, 0)]  # every rank computes every output feature (partial sums)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, after the sum over ranks.
        y = self.ctx.all_reduce(self.method.apply(self, x, None))
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
    """Vocabulary-parallel output projection; logits are gathered to full vocab.

    Dense, in the model's dtype (its rows may be the tied embedding's): the
    matmul is the dense format's (``DenseMethod``), GEMV included.
    """

    def __init__(self, vocab_size, hidden, ctx: ParallelContext, dtype, device, method: DenseMethod):
        super().__init__(vocab_size, hidden, ctx, dtype, device)
        self.method = method

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = self.method.apply(self, hidden, None)
        if self.ctx.tp_size > 1:
            logits = self.ctx.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
