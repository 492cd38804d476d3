"""The W8A8 format (parallel/formats/w8a8.py, compressed_tensors.py) on single layers, CPU.

Tensor parallelism cuts codes and per-channel scales with the output
features (column-parallel ranks reproduce the unsplit layer) and
keeps every scale on row-parallel ranks; per-tensor scales of merged shards
stay each shard's own; online quantization turns a float block into codes
and scales as it is loaded; configs FleetLM cannot serve are refused by name.
"""

from __future__ import annotations

import pytest
import torch

from fleetlm.kernels import select_ops
from fleetlm.kernels.quant import quantize_ref
from fleetlm.parallel.context import ParallelContext
from fleetlm.parallel.formats import DenseMethod, linear_methods
from fleetlm.parallel.formats.w8a8 import W8A8Method, quantize_weight
from fleetlm.parallel.layers import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from fleetlm.workers.loader.lazy import LazyTensor

OPS = select_ops("cpu")
QDTYPES = [torch.float8_e4m3fn, torch.int8]


def lazy(t: torch.Tensor) -> LazyTensor:
    def read(rows, cols):
        block = t[rows] if rows is not None else t
        return block[:, cols] if cols is not None else block
    return LazyTensor(tuple(t.shape), torch.float32, torch.device("cpu"), read)


def layer_of(cls, tp, rank, in_f, out_f, method, **tensors):
    layer = cls(in_f, out_f, False, ParallelContext(tp_rank=rank, tp_size=tp), torch.float32, "cpu", method)
    for name, t in tensors.items():
        layer.load(f"x.{name}", lazy(t))
    return layer


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_column_parallel_ranks_reproduce_the_unsplit_layer(qdtype):
    codes, scale = quantize_weight(torch.randn(12, 32), qdtype)
    tensors = dict(weight=codes, weight_scale=scale[:, None])  # compressed-tensors' [out, 1]
    x = torch.randn(5, 32)
    whole = layer_of(ColumnParallelLinear, 1, 0, 32, 12, W8A8Method(OPS, qdtype), **tensors)
    parts = [layer_of(ColumnParallelLinear, 2, r, 32, 12, W8A8Method(OPS, qdtype), **tensors) for r in range(2)]
    assert torch.equal(_bits(parts[1].weight), _bits(codes[6:])) and torch.equal(parts[1].weight_scale, scale[6:])
    # Same codes, scales and activation quantization; only the matmul's summation order may differ.
    torch.testing.assert_close(torch.cat([p(x) for p in parts], dim=-1), whole(x), rtol=1e-6, atol=1e-5)
    # W8A8 is close to the float product of the dequantized weight.
    assert _rel_err(whole(x), x @ (codes.float() * scale[:, None]).T) < 0.05


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_row_parallel_ranks_keep_every_scale_and_sum_to_the_product(qdtype):
    codes, scale = quantize_weight(torch.randn(12, 32), qdtype)
    x = torch.randn(5, 32)
    parts = [layer_of(RowParallelLinear, 2, r, 32, 12, W8A8Method(OPS, qdtype), weight=codes, weight_scale=scale)
             for r in range(2)]
    assert torch.equal(parts[0].weight_scale, scale) and torch.equal(_bits(parts[1].weight), _bits(codes[:, 16:]))
    total = sum(p.method.apply(p, x[:, 16 * r:16 * r + 16], None) for r, p in enumerate(parts))
    assert _rel_err(total, x @ (codes.float() * scale[:, None]).T) < 0.05


def test_per_tensor_scales_of_merged_shards_stay_their_own_and_static_input_scales_take_the_largest():
    method = W8A8Method(OPS, torch.float8_e4m3fn, "static")
    layer = MergedColumnParallelLinear(16, [8, 8], False, ParallelContext(), torch.float32, "cpu", method)
    shards = [quantize_weight(torch.randn(8, 16) * (1 + 9 * i), torch.float8_e4m3fn)[0] for i in range(2)]
    for i, (codes, s, a) in enumerate(zip(shards, (0.5, 2.0), (0.01, 0.03))):
        layer.load_shard(i, "x.weight", lazy(codes))
        layer.load_shard(i, "x.weight_scale", lazy(torch.tensor(s)))  # 0-d, as AutoFP8 writes it
        layer.load_shard(i, "x.input_scale", lazy(torch.tensor(a)))
    assert torch.equal(layer.weight_scale, torch.tensor([0.5] * 8 + [2.0] * 8))
    assert layer.input_scale.item() == pytest.approx(0.03)
    x = torch.randn(3, 16)
    w = torch.cat([shards[0].float() * 0.5, shards[1].float() * 2.0])
    xq = quantize_ref(x, torch.float8_e4m3fn, layer.input_scale)
    torch.testing.assert_close(layer(x), (xq.data.float() * xq.scale) @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_online_quantization_quantizes_each_block_as_it_is_read(qdtype):
    w = torch.randn(12, 32)
    layer = layer_of(ColumnParallelLinear, 2, 1, 32, 12, W8A8Method(OPS, qdtype, online=True), weight=w)
    codes, scale = quantize_weight(w[6:], qdtype)
    assert torch.equal(_bits(layer.weight), _bits(codes)) and torch.equal(layer.weight_scale, scale)
    with pytest.raises(ValueError, match=f"the checkpoint stores torch.float32, this .* layer expects {qdtype}"):
        layer_of(ColumnParallelLinear, 1, 0, 32, 12, W8A8Method(OPS, qdtype), weight=w)


def test_weight_only_is_the_dequantized_float_product_exactly():
    codes, scale = quantize_weight(torch.randn(12, 32), torch.float8_e4m3fn)
    layer = layer_of(ColumnParallelLinear, 1, 0, 32, 12, W8A8Method(OPS, torch.float8_e4m3fn, "none"),
                     weight=codes, weight_scale=scale)
    x = torch.randn(4, 32)
    assert layer.input_quant(x) is None
    assert torch.equal(layer(x), torch.nn.functional.linear(x, codes.float() * scale[:, None]))


def test_fp8_configs_fleetlm_cannot_serve_are_refused():
    build = lambda cfg: linear_methods(OPS, "fp8", cfg)  # noqa: E731
    with pytest.raises(ValueError, match=r"block-wise scales \(weight_block_size=\[128, 128\]\) are not supported"):
        build({"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="activation_scheme 'token'"):
        build({"quant_method": "fp8", "activation_scheme": "token"})
    method_for = build({"quant_method": "fp8", "ignored_layers": ["model.layers.0.mlp.down_proj",
                                                                 "model.layers.1.self_attn.q_proj"]})
    assert isinstance(method_for("model.layers.0.mlp.down_proj"), DenseMethod)
    assert isinstance(method_for("model.layers.0.mlp.gate_up_proj"), W8A8Method)
    with pytest.raises(ValueError, match="q_proj unquantized but the rest of model.layers.1.self_attn.qkv_proj"):
        method_for("model.layers.1.self_attn.qkv_proj")


def test_compressed_tensors_schemes_are_read_with_the_package_and_others_refused():
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    def config(preset, **kw):
        qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                ignore=["lm_head", "re:.*layers\\.3\\.mlp\\..*"], **kw)
        return {**qc.model_dump(), "quant_method": "compressed-tensors"}

    method_for = linear_methods(OPS, "compressed-tensors", config("W8A8", format="int-quantized"))
    m = method_for("model.layers.0.self_attn.qkv_proj")
    assert (m.qdtype, m.activations) == (torch.int8, "dynamic")
    assert isinstance(method_for("model.layers.3.mlp.gate_up_proj"), DenseMethod)
    m = linear_methods(OPS, "compressed-tensors", config("FP8", format="float-quantized"))("model.layers.0.mlp.down_proj")
    assert (m.qdtype, m.activations) == (torch.float8_e4m3fn, "static")
    with pytest.raises(ValueError, match=r"4-bit int weights, weight strategy group not supported; supported: 8-bit"):
        linear_methods(OPS, "compressed-tensors", config("W4A16", format="naive-quantized"))
    with pytest.raises(ValueError, match="format 'pack-quantized' not supported"):
        linear_methods(OPS, "compressed-tensors", config("W8A8", format="pack-quantized"))
