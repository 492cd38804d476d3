"""LoRA on the parallel linear layers: a ``LinearMethod`` that adds the adapters' delta to its base format's output.

``attach_lora(model, ...)`` gives every adaptable projection (Llama's fused
``qkv_proj`` and ``gate_up_proj``, ``o_proj``, ``down_proj``) ``max_loras``
device slots of LoRA weights and wraps the layer's own method, whatever its
format (dense, quantized): ``y = base(x); y += scale * (x A^T) B^T`` for the
tokens of each slot (``kernels/lora.py``), so the model file knows nothing
of LoRA. The slots are fixed tensors, so CUDA graphs captured once stay
valid whichever adapters they hold.

Tensor parallelism follows the base layer: a column-parallel layer keeps
all of ``A`` and this rank's rows of ``B`` (the output features it owns); a
row-parallel layer keeps this rank's columns of ``A`` (its input features)
and all of ``B``, so ``(x_shard A_shard^T) B^T`` is this rank's share of the
delta, added to its partial output and summed by the layer's one
all-reduce.

Per layer, slot ``s`` holds ``lora_a[s]``: ``[n_slices * max_lora_rank,
in_features]`` and ``lora_b[s]``: ``[out_features, max_lora_rank]`` (this
rank's shares), ranks below the maximum and projections an adapter does not
target left zero. ``pack_adapter`` lays an adapter's PEFT tensors out in
exactly that form, once, so loading it into a slot is two copies per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fleetlm.kernels.lora import LoRABatch, shrink_shape
from fleetlm.parallel.formats.base import LinearMethod
from fleetlm.parallel.layers import LinearBase, RowParallelLinear

# Fused layers -> the PEFT modules (HF projections) they hold, in output order.
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
ADAPTABLE = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRAState:
    """What every wrapped layer reads in a forward: the step's tile table, and whether any token is adapted."""

    def __init__(self, batch: LoRABatch, side_stream=None) -> None:
        self.batch = batch
        # False: no token of this step has an adapter; eager forwards skip the kernels.
        # CUDA graphs are captured with it True (the kernels are then in the graph).
        self.active = True
        # CUDA: in a captured graph the shrink runs on this stream beside the base
        # projection (both read only x), hiding its latency in batch-1 decode.
        self.side_stream = side_stream


class LoRALinearMethod(LinearMethod):
    """The base method's output plus the LoRA delta of each token's adapter."""

    def __init__(self, base: LinearMethod, ops, state: LoRAState) -> None:
        self.base, self.state = base, state
        self.shrink, self.expand = ops.lora_shrink, ops.lora_expand
        self.name = base.name

    def create_weights(self, layer, in_features, out_features, dtype, device):
        return self.base.create_weights(layer, in_features, out_features, dtype, device)

    def load_tensor(self, layer, spec, block, part, name) -> None:
        self.base.load_tensor(layer, spec, block, part, name)

    def process_weights_after_loading(self, layer) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        state = self.state
        if not state.active:
            return self.base.apply(layer, x, bias)
        x2 = x.reshape(-1, x.shape[-1])
        side = state.side_stream
        if side is None or not torch.cuda.is_current_stream_capturing():
            y = self.base.apply(layer, x, bias)
            h = self.shrink(x2, layer.lora_a, state.batch)
        else:
            # Fork and join inside the capture: h lives on the main stream (allocated
            # there, freed there after the expand), the side stream only writes it.
            h = torch.empty(shrink_shape(x2.shape[0], x2.shape[1], layer.lora_a.shape[1]), dtype=torch.float32,
                            device=x.device)
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self.shrink(x2, layer.lora_a, state.batch, out=h)
            y = self.base.apply(layer, x, bias)
            main.wait_stream(side)
        self.expand(y.view(-1, y.shape[-1]), h, layer.lora_b, state.batch, layer.lora_slices)
        return y

    def apply_silu_mul(self, layer, x, bias, silu_and_mul):
        # The delta goes onto the gate and up projections before the activation: no fused GEMV.
        return silu_and_mul(self.apply(layer, x, bias))


@dataclass(frozen=True)
class LoRALayer:
    name: str  # the fused layer's global name, e.g. "model.layers.3.self_attn.qkv_proj"
    layer_index: int
    modules: tuple[str, ...]  # PEFT module names of its slices
    module: LinearBase


def attach_lora(model: torch.nn.Module, ops, num_slots: int, max_rank: int, state: LoRAState, dtype: torch.dtype,
                device: torch.device) -> list[LoRALayer]:
    """Give each adaptable projection ``num_slots`` zeroed slots and wrap its method; returns them in model order."""
    first = model.layer_range.start
    found = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if not isinstance(module, LinearBase) or leaf not in ADAPTABLE:
            continue
        _, local, rest = name.split(".", 2)  # "layers.<i>.<block>.<leaf>"
        index = first + int(local)
        modules = PACKED.get(leaf, (leaf,))
        module.register_buffer("lora_a", torch.zeros(num_slots, len(modules) * max_rank, module.in_per_rank,
                                                     dtype=dtype, device=device), persistent=False)
        module.register_buffer("lora_b", torch.zeros(num_slots, module.out_per_rank, max_rank, dtype=dtype,
                                                     device=device), persistent=False)
        module.lora_slices = tuple(size for _, size, _ in module.output_shards())
        module.method = LoRALinearMethod(module.method, ops, state)
        found.append(LoRALayer(f"model.layers.{index}.{rest}", index, modules, module))
    return found


def pack_adapter(layers: list[LoRALayer], tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                 max_rank: int, pin: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """An adapter's (A, B) per layer in slot layout, this rank's shares, on the CPU (one
    allocation, pinned if ``pin``: a slot load is then asynchronous copies from it).

    ``tensors[(layer index, PEFT module)] = (A [r, in], B [out, r])``, unsharded.
    """
    shapes = [s for lay in layers for s in (lay.module.lora_a.shape[1:], lay.module.lora_b.shape[1:])]
    dtype = layers[0].module.lora_a.dtype if layers else torch.float32
    flat = torch.zeros(sum(s.numel() for s in shapes), dtype=dtype, pin_memory=pin)
    views = iter(t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))
    packed = []
    for lay in layers:
        m = lay.module
        a, b = next(views), next(views)
        row = isinstance(m, RowParallelLinear)
        for c, (module, (lo, size, offset)) in enumerate(zip(lay.modules, m.output_shards())):
            pair = tensors.get((lay.layer_index, module))
            if pair is None:
                continue
            lora_a, lora_b = pair
            r = lora_a.shape[0]
            if row:  # this rank's input features: its columns of A
                cols = m.ctx.tp_rank * m.in_per_rank
                a[c * max_rank:c * max_rank + r] = lora_a[:, cols:cols + m.in_per_rank]
            else:
                a[c * max_rank:c * max_rank + r] = lora_a
            b[offset:offset + size, :r] = lora_b[lo:lo + size]
        packed.append((a, b))
    return packed
