"""GGUF files kept quantized (``quantization="gguf"``; the default for a .gguf model on GPU).

Each projection arrives as its raw ggml blocks, uint8 ``[N, K / B, T]``
(``workers/loader/gguf_model.py``; ``gguf_blocks.py`` has the block
layouts); after loading, each shard is decoded once into the
``wq_linear`` layout. Shards of a merged layer may have different block
types (llama.cpp's Q4_K_M keeps some projections in Q6_K): shards of one
type are concatenated into one weight, otherwise each runs its own kernel
and the outputs are concatenated.

Tensor parallelism: column-parallel layers take whole rows (blocks never
cross rows); row-parallel layers cut the input features at whole blocks,
so a rank's share of K must be a multiple of the block size (32, or 256
for K-quants), or loading fails naming the numbers.

On the torch backend (CPU) each weight is dequantized once at load (float32:
gguf-py's values exactly), as the dense GGUF path does.

Config (``gguf_quantization_config``): ``tensor_types`` maps each checkpoint
projection to its type name. Dummy weights (a config without it) arrive as
float ``[out, in]`` tensors, are cut to the rank's features like any float
weight (row-parallel layers: the rank's input features, all of them at
TP=1) and encoded round-to-nearest as ``default_type`` (Q4_K unless given).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fleetlm.kernels.wq_linear import QuantWeight, dequantize
from fleetlm.parallel.formats.base import LinearMethod, ParamSpec
from fleetlm.parallel.formats.gguf_blocks import BLOCKS, SUPPORTED, decode, encode
from fleetlm.parallel.formats.registry import Quantization, checkpoint_names, register_quantization

_TYPE_OF_SIZE = {size: name for name, (_, size) in BLOCKS.items()}


class GGUFMethod(LinearMethod):
    name = "gguf"

    def __init__(self, ops, types: tuple[str, ...], dummy_type: str | None = None) -> None:
        self.wq_linear, self.linear = ops.wq_linear, ops.linear
        self.dequantize_at_load = ops.backend == "torch"
        self.types, self.dummy_type = types, dummy_type

    def create_weights(self, layer, in_features, out_features, dtype, device) -> list[ParamSpec]:
        block = max(BLOCKS[t][0] for t in self.types)
        if in_features % block:
            raise ValueError(f"gguf: {type(layer).__name__} of {in_features} input features per rank is not a "
                             f"whole number of {block}-weight {'/'.join(self.types)} blocks (tensor parallelism "
                             f"must split whole blocks)")
        layer.gguf_shards = {}  # output offset -> raw blocks, until process_weights_after_loading
        layer.compute_dtype = dtype
        if self.dummy_type is not None:
            # A dummy source yields float [out, in] weights: cut them by input features (a row-parallel
            # rank's K range, all of K at TP=1), then encode the rank's slice as it arrives.
            return [ParamSpec("weight", (out_features, in_features), dtype, out_dim=0, in_dim=1)]
        size = BLOCKS[self.types[0]][1]
        return [ParamSpec("weight", (out_features, in_features // block, size), torch.uint8, out_dim=0, in_dim=1,
                          in_per=block)]

    def load_tensor(self, layer, spec, block: torch.Tensor, part, name: str) -> None:
        offset, count = part if part is not None else (0, layer.out_per_rank)
        if block.is_floating_point():  # a dummy source's float weight
            if self.dummy_type is None:
                raise ValueError(f"weight {name}: a GGUF layer takes quantized blocks, got a float tensor")
            if block.dim() != 2 or block.shape[1] != layer.in_per_rank:
                raise ValueError(f"weight {name}: dummy float weight {tuple(block.shape)} is not [{count}, "
                                 f"{layer.in_per_rank}] (this rank's input features)")
            block = encode(block, self.dummy_type)
        if block.dtype != torch.uint8 or block.dim() != 3 or block.shape[0] != count:
            raise ValueError(f"weight {name}: expected raw GGUF blocks [{count}, blocks, bytes], got {block.dtype} "
                             f"{tuple(block.shape)}")
        qtype = _TYPE_OF_SIZE.get(block.shape[2])
        if qtype is None or block.shape[1] * BLOCKS[qtype][0] != layer.in_per_rank:
            raise ValueError(f"weight {name}: blocks {tuple(block.shape)} are not {layer.in_per_rank} input "
                             f"features of any supported type ({', '.join(SUPPORTED)})")
        if offset in layer.gguf_shards:
            raise ValueError(f"weight {name}: loaded twice")
        layer.gguf_shards[offset] = (qtype, block)

    def process_weights_after_loading(self, layer) -> None:
        shards = sorted(layer.gguf_shards.items())
        if sum(b.shape[0] for _, (_, b) in shards) != layer.out_per_rank:
            raise ValueError(f"gguf {type(layer).__name__}: the file gave {sum(b.shape[0] for _, (_, b) in shards)} "
                             f"of its {layer.out_per_rank} output rows (a missing projection)")
        runs: list[tuple[str, list[torch.Tensor]]] = []
        for _, (qtype, block) in shards:  # consecutive shards of one type decode as one weight
            if runs and runs[-1][0] == qtype:
                runs[-1][1].append(block)
            else:
                runs.append((qtype, [block]))
        weights = [decode(torch.cat(blocks), qtype) for qtype, blocks in runs]
        for qw in weights:
            qw.check()
            for t in (qw.scales, qw.mins, qw.super_scales, qw.super_mins):
                if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"gguf {type(layer).__name__}: block scales hold NaN or infinity "
                                     f"(a corrupt file)")
        del layer.gguf_shards
        if self.dequantize_at_load:
            w = torch.cat([dequantize(qw) for qw in weights]).to(layer.compute_dtype)
            layer.weight = nn.Parameter(w, requires_grad=False)
        else:
            layer.qws = weights

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.dequantize_at_load:
            return self.linear(x, layer.weight, bias)
        if len(layer.qws) == 1:
            return self.wq_linear(x, layer.qws[0], bias)
        y = torch.cat([self.wq_linear(x, qw) for qw in layer.qws], dim=-1)
        return y if bias is None else y + bias


def build(ops, cfg: dict[str, Any] | None):
    """``method_for(layer_name)`` from a GGUF file's block types (``gguf_quantization_config``)."""
    cfg = cfg or {}
    types: dict[str, str] | None = cfg.get("tensor_types")
    dummy = cfg.get("default_type", "Q4_K") if types is None else None
    if dummy is not None and dummy not in SUPPORTED:
        raise ValueError(f"gguf: default_type {dummy!r} is not supported; supported: {', '.join(SUPPORTED)}")

    def method_for(layer_name: str) -> GGUFMethod:
        if types is None:
            return GGUFMethod(ops, (dummy,), dummy)
        names = checkpoint_names(layer_name)
        missing = [n for n in names if n not in types]
        if missing:
            raise ValueError(f"gguf: the file has no projection {missing[0]}")
        found = tuple(types[n] for n in names)
        bad = sorted({t for t in found if t not in SUPPORTED})
        if bad:
            raise ValueError(f"gguf: {layer_name} is stored as {', '.join(bad)}, which cannot be kept quantized; "
                             f"supported: {', '.join(SUPPORTED)} (or run it dequantized: device='cpu', or a "
                             f"float checkpoint)")
        return GGUFMethod(ops, found)

    return method_for


def keeps_quantized(cfg: dict[str, Any]) -> bool:
    """Whether every projection of a GGUF file has a block type the kernels read."""
    return all(t in SUPPORTED for t in (cfg.get("tensor_types") or {}).values())


register_quantization(Quantization("gguf", build, checkpoint_methods=("gguf",)))
