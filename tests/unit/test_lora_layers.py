"""LoRA at the layer seam (parallel/lora.py), without processes: each tensor-parallel rank's share of
an adapter, put side by side (column-parallel) or summed (row-parallel), gives the unsharded delta;
pipeline stages name their layers by global index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fleetlm.kernels import select_ops
from fleetlm.kernels.lora import LoRABatch, build_tile_table
from fleetlm.parallel.context import ParallelContext
from fleetlm.parallel.formats import DenseMethod
from fleetlm.parallel.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fleetlm.parallel.lora import LoRAState, attach_lora, pack_adapter

OPS = select_ops("cpu")
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, RANK, MAX_RANK = 48, 12, 2, 4, 40, 3, 4


def _state(rows: int, slot: int = 1, slots: int = 2) -> LoRAState:
    order, ts, tst, te = build_tile_table(np.full(rows, slot, dtype=np.int32), rows, slots)
    order = np.concatenate([order, np.full(rows - order.size, -1, dtype=np.int32)])  # capacity-sized
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return LoRAState(LoRABatch(t(order), t(ts), t(tst), t(te), torch.tensor([0.0, 1.5])))


class _Stage(torch.nn.Module):
    """The attention and MLP projections of one decoder layer, named as in the Llama model."""

    def __init__(self, ctx, layer_range=range(1)):
        super().__init__()
        self.layer_range = layer_range
        self.layers = torch.nn.ModuleList(_Layer(ctx) for _ in layer_range)


class _Layer(torch.nn.Module):
    def __init__(self, ctx):
        super().__init__()
        dense = DenseMethod(OPS)
        f32 = torch.float32
        self.self_attn = torch.nn.Module()
        self.self_attn.qkv_proj = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, False, ctx, f32, "cpu", dense)
        self.self_attn.o_proj = RowParallelLinear(HEADS * HEAD_DIM, HIDDEN, False, ctx, f32, "cpu", dense)
        self.mlp = torch.nn.Module()
        self.mlp.gate_up_proj = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], False, ctx, f32, "cpu", dense)
        self.mlp.down_proj = RowParallelLinear(INTER, HIDDEN, False, ctx, f32, "cpu", dense)


SHAPES = {"q_proj": (HIDDEN, HEADS * HEAD_DIM), "k_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
          "v_proj": (HIDDEN, KV_HEADS * HEAD_DIM), "o_proj": (HEADS * HEAD_DIM, HIDDEN),
          "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}


def _adapter(layers=(0,)):
    gen = torch.Generator().manual_seed(0)
    return {(i, m): (torch.randn(RANK, d_in, generator=gen), torch.randn(d_out, RANK, generator=gen))
            for i in layers for m, (d_in, d_out) in SHAPES.items()}


def _rank_outputs(tp: int, x: dict[str, torch.Tensor], tensors):
    """Each rank's output of every adapted projection (base weights zero: the delta alone)."""
    outs = []
    for rank in range(tp):
        ctx = ParallelContext(tp_rank=rank, tp_size=tp)
        model = _Stage(ctx)
        for p in model.parameters():
            p.data.zero_()
        state = _state(rows=5)
        lora_layers = attach_lora(model, OPS, 2, MAX_RANK, state, torch.float32, torch.device("cpu"))
        for lay, (a, b) in zip(lora_layers, pack_adapter(lora_layers, tensors, MAX_RANK)):
            lay.module.lora_a[1].copy_(a)
            lay.module.lora_b[1].copy_(b)
        got = {}
        for lay in lora_layers:
            m = lay.module
            leaf = lay.name.rsplit(".", 1)[1]
            inp = x[leaf]
            if isinstance(m, RowParallelLinear):
                inp = inp[:, rank * m.in_per_rank:(rank + 1) * m.in_per_rank]
            got[leaf] = (m, m.method.apply(m, inp.contiguous(), None))
        outs.append(got)
    return outs


@pytest.mark.parametrize("tp", [1, 2, 4])  # at 4, each of the 2 KV heads lives on 2 ranks
def test_rank_shares_rebuild_the_unsharded_delta(tp):
    tensors = _adapter()
    gen = torch.Generator().manual_seed(1)
    x = {"qkv_proj": torch.randn(5, HIDDEN, generator=gen), "gate_up_proj": torch.randn(5, HIDDEN, generator=gen),
         "o_proj": torch.randn(5, HEADS * HEAD_DIM, generator=gen), "down_proj": torch.randn(5, INTER, generator=gen)}

    def delta(module, inp):
        a, b = tensors[(0, module)]
        return inp @ a.t() @ b.t() * 1.5

    outs = _rank_outputs(tp, x, tensors)
    for leaf, modules in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
        for c, module in enumerate(modules):
            want = delta(module, x[leaf])
            for got in outs:
                m, y = got[leaf]
                lo, size, offset = m.output_shards()[c]
                torch.testing.assert_close(y[:, offset:offset + size], want[:, lo:lo + size], atol=1e-4, rtol=1e-4)
    for leaf, module in (("o_proj", "o_proj"), ("down_proj", "down_proj")):
        summed = sum(got[leaf][1] for got in outs)  # what the layer's all-reduce adds up
        torch.testing.assert_close(summed, delta(module, x[leaf]), atol=1e-4, rtol=1e-4)


def test_untargeted_modules_and_base_tokens_are_left_alone():
    tensors = {k: v for k, v in _adapter().items() if k[1] in ("q_proj", "down_proj")}
    ctx = ParallelContext()
    model = _Stage(ctx)
    lora_layers = attach_lora(model, OPS, 2, MAX_RANK, _state(rows=3, slot=-1), torch.float32, torch.device("cpu"))
    packed = dict(zip([lay.name for lay in lora_layers], pack_adapter(lora_layers, tensors, MAX_RANK)))
    a, b = packed["model.layers.0.self_attn.qkv_proj"]
    assert a[:RANK].abs().sum() > 0 and a[MAX_RANK:].abs().sum() == 0  # k and v slices zero
    assert b[:HEADS * HEAD_DIM, :RANK].abs().sum() > 0 and b[HEADS * HEAD_DIM:].abs().sum() == 0
    assert packed["model.layers.0.mlp.gate_up_proj"][0].abs().sum() == 0
    qkv = model.layers[0].self_attn.qkv_proj
    qkv.lora_a[1].copy_(a)
    qkv.lora_b[1].copy_(b)
    with torch.no_grad():  # the stage's weights are allocated, not initialized: NaNs would fail torch.equal
        qkv.weight.copy_(torch.randn(qkv.weight.shape))
    x = torch.randn(3, HIDDEN)
    assert torch.equal(qkv.method.apply(qkv, x, None), x @ qkv.weight.t())  # no token has an adapter


def test_pipeline_stage_names_layers_by_global_index():
    ctx = ParallelContext(pp_rank=1, pp_size=2)
    model = _Stage(ctx, layer_range=range(3, 5))
    layers = attach_lora(model, OPS, 1, MAX_RANK, _state(rows=1), torch.float32, torch.device("cpu"))
    assert [lay.name for lay in layers][:4] == [
        "model.layers.3.self_attn.qkv_proj", "model.layers.3.self_attn.o_proj",
        "model.layers.3.mlp.gate_up_proj", "model.layers.3.mlp.down_proj"]
    assert {lay.layer_index for lay in layers} == {3, 4}
    tensors = _adapter(layers=(0, 4))  # layer 0 is another stage's: not packed here
    packed = pack_adapter(layers, tensors, MAX_RANK)
    assert all(a.abs().sum() == 0 for lay, (a, _) in zip(layers, packed) if lay.layer_index == 3)
    assert all(a.abs().sum() > 0 for lay, (a, _) in zip(layers, packed) if lay.layer_index == 4)

