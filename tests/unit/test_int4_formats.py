"""AWQ / GPTQ / GGUF formats: packing conventions, block decoding, refusals and corrupt input."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from fleetlm.engine.args import EngineArgs
from fleetlm.kernels.wq_linear import dequantize
from fleetlm.parallel.formats import awq, gguf_blocks, gptq, resolve_quantization
from fleetlm.parallel.formats.gguf_blocks import BLOCKS, decode, encode
from fleetlm.parallel.formats.packing import AWQ_ORDER, awq_order, pack, unpack
from fleetlm.workers.loader.gguf_format import GGUFTensorInfo, tensor_bytes


def test_pack_roundtrip_and_field_order():
    values = torch.randint(0, 16, (3, 16), dtype=torch.int32)
    words = pack(values, 4, 1)
    assert words.dtype == torch.int32 and words.shape == (3, 2)
    assert torch.equal(unpack(words, 4, 1), values)
    assert int(pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4, 1)) == np.int32(np.uint32(0xF7654321))
    assert torch.equal(unpack(pack(values.t(), 8 if False else 4, 0), 4, 0), values.t())
    with pytest.raises(ValueError, match="cannot be packed"):
        pack(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]), 4, 1)


def test_awq_order_is_autoawqs():
    cols = torch.arange(16).view(1, 16)
    fields = awq_order(cols, reverse=False)  # field i of word c holds column 8c + AWQ_ORDER[i]
    assert fields[0, :8].tolist() == list(AWQ_ORDER) and fields[0, 8:].tolist() == [8 + o for o in AWQ_ORDER]
    assert torch.equal(awq_order(fields, reverse=True), cols)


@pytest.mark.parametrize("qtype", sorted(BLOCKS))
def test_gguf_blocks_decode_exactly_as_gguf_py(qtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(7, 512, generator=gen) * 0.1
    raw = encode(w, qtype)
    ours = dequantize(decode(raw, qtype)).numpy()
    theirs = gguf_dequantize(raw.reshape(7, -1).numpy(), GGMLQuantizationType[qtype])
    assert np.array_equal(ours, theirs)
    assert np.abs(theirs - w.numpy()).max() < 0.1  # a real quantization, not noise
    # Arbitrary bytes (finite block scales): every field of the layout, not only what our encoder writes.
    rnd = torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen)
    scale_bytes = {"Q8_0": [0, 1], "Q4_0": [0, 1], "Q4_1": [0, 1, 2, 3], "Q4_K": [0, 1, 2, 3], "Q5_K": [0, 1, 2, 3],
                   "Q6_K": [208, 209]}[qtype]
    rnd[..., scale_bytes] = raw[..., scale_bytes]
    theirs_rnd = gguf_dequantize(rnd.reshape(7, -1).numpy(), GGMLQuantizationType[qtype])
    assert np.array_equal(dequantize(decode(rnd, qtype)).numpy(), theirs_rnd)
    # The loader's float32 dequantization (the types it does in torch; the others are gguf-py's own).
    loaded = gguf_blocks.dequantize(rnd.reshape(7, -1), qtype)
    assert (loaded is None) == (qtype not in ("Q8_0", "Q4_0", "Q4_1"))
    if loaded is not None:
        assert loaded.dtype == torch.float32 and np.array_equal(loaded.numpy(), theirs_rnd)
        assert np.array_equal(gguf_blocks.dequantize(raw.reshape(7, -1), qtype).numpy(), theirs)


class _Ops:
    backend, linear, wq_linear = "torch", None, None


@pytest.mark.parametrize("cfg,match", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "3-bit weights are not supported; supported bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 12}, "group_size 12 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, "lm_head"),
])
def test_gptq_refusals_name_what_is_supported(cfg, match):
    with pytest.raises(ValueError, match=match):
        gptq.build(_Ops(), cfg)


@pytest.mark.parametrize("cfg,match", [
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, r"supported bits: \(4,\)"),
    ({"quant_method": "awq", "bits": 4, "group_size": 100}, "multiple of 8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "supported: gemm"),
])
def test_awq_refusals(cfg, match):
    with pytest.raises(ValueError, match=match):
        awq.build(_Ops(), cfg)


def test_unknown_method_and_contradicting_flag():
    with pytest.raises(ValueError, match="'bitsandbytes'.*not supported; supported: .*awq.*gguf.*gptq"):
        resolve_quantization(None, {"quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(ValueError, match="contradicts"):
        resolve_quantization("awq", {"quantization_config": {"quant_method": "gptq"}})


def test_truncated_gguf_tensor_is_named():
    info = GGUFTensorInfo("blk.0.attn_q.weight", (4, 64), GGMLQuantizationType.Q4_0, 100)
    with pytest.raises(ValueError, match="blk.0.attn_q.weight: the file is truncated"):
        tensor_bytes(np.zeros(150, np.uint8), info)


def test_gguf_default_on_cpu_stays_dequantized(embedded_model):
    assert EngineArgs(model=embedded_model, device="cpu").create_engine_config().model.quantization is None
    assert EngineArgs(model=embedded_model, device="cpu", quantization="gguf").create_engine_config() \
        .model.quantization == "gguf"


def _gptq_layer(desc_act=False):
    from fleetlm.kernels import select_ops
    from fleetlm.parallel.context import SINGLE
    from fleetlm.parallel.layers import ColumnParallelLinear

    cfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": desc_act, "sym": True}
    method = gptq.build(select_ops("cpu"), cfg)("model.layers.0.mlp.down_proj")
    return ColumnParallelLinear(64, 16, False, SINGLE, torch.float32, "cpu", method)


class _Lazy:
    def __init__(self, t):
        self.t, self.shape = t, tuple(t.shape)

    def load(self, rows=None, cols=None, dtype=None):
        return self.t[rows if rows is not None else slice(None)]


def _load(layer, tensors):
    for name, t in tensors.items():
        layer.load(f"x.{name}", _Lazy(t))
    layer.method.process_weights_after_loading(layer)


def _gptq_tensors():
    return {"qweight": torch.zeros(8, 16, dtype=torch.int32), "qzeros": torch.full((2, 2), 0x77777777, dtype=torch.int32),
            "scales": torch.ones(2, 16, dtype=torch.float16), "g_idx": (torch.arange(64) // 32).to(torch.int32)}


def test_gptq_layer_loads_and_refuses_corrupt_tensors():
    layer = _gptq_layer()
    _load(layer, _gptq_tensors())
    assert torch.equal(layer.weight, torch.full((16, 64), -8.0))  # q 0, v1 zero 7 + 1, scale 1
    bad = _gptq_tensors() | {"g_idx": torch.full((64,), 5, dtype=torch.int32)}
    with pytest.raises(ValueError, match="g_idx is not k // group_size"):
        _load(_gptq_layer(), bad)
    with pytest.raises(ValueError, match=r"g_idx holds values outside \[0, 2\)"):
        _load(_gptq_layer(desc_act=True), bad)
    nan = _gptq_tensors() | {"scales": torch.full((2, 16), float("nan"), dtype=torch.float16)}
    with pytest.raises(ValueError, match="NaN"):
        _load(_gptq_layer(), nan)
    short = _gptq_tensors() | {"qweight": torch.zeros(7, 16, dtype=torch.int32)}
    with pytest.raises(ValueError, match="qweight"):
        _load(_gptq_layer(), short)
    missing = {k: v for k, v in _gptq_tensors().items() if k != "qzeros"}
    with pytest.raises(ValueError, match="qzeros for 0 of its 16 output features"):
        _load(_gptq_layer(), missing)


def test_row_parallel_split_inside_a_group_names_the_numbers():
    from fleetlm.kernels import select_ops
    from fleetlm.parallel.layers import RowParallelLinear

    class Ctx:
        tp_size, tp_rank = 3, 0

    method = gptq.build(select_ops("cpu"), {"quant_method": "gptq", "bits": 4, "group_size": 128})("m.o_proj")
    with pytest.raises(ValueError, match="192 input x 64 output.*group size 128"):
        RowParallelLinear(576, 64, False, Ctx(), torch.float32, "cpu", method)


def _float_lazy(w: torch.Tensor):
    from fleetlm.workers.loader.lazy import LazyTensor

    return LazyTensor(tuple(w.shape), w.dtype, w.device, lambda rows, cols: w[rows, cols if cols is not None else slice(None)])


@pytest.mark.parametrize("tp_size,tp_rank", [(1, 0), (2, 1)])
def test_dummy_gguf_row_parallel_layer_loads_its_input_features(tp_size, tp_rank):
    """A dummy source's float weight reaches a GGUF row-parallel layer cut by input features (all of K at TP=1)."""
    from fleetlm.kernels import select_ops
    from fleetlm.parallel.context import ParallelContext
    from fleetlm.parallel.formats import gguf
    from fleetlm.parallel.layers import MergedColumnParallelLinear, RowParallelLinear

    ctx = ParallelContext(tp_rank=tp_rank, tp_size=tp_size)
    method_for = gguf.build(select_ops("cpu"), {"quant_method": "gguf", "default_type": "Q4_K"})
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    down = RowParallelLinear(512, 64, False, ctx, torch.float32, "cpu", method_for("model.layers.0.mlp.down_proj"))
    down.load("model.layers.0.mlp.down_proj.weight", _float_lazy(w))
    down.method.process_weights_after_loading(down)
    cut = w[:, tp_rank * 512 // tp_size:(tp_rank + 1) * 512 // tp_size]
    assert torch.equal(down.weight, dequantize(decode(encode(cut, "Q4_K"), "Q4_K")))
    # column-parallel shards of a merged layer: whole rows, K untouched
    gate_up = MergedColumnParallelLinear(256, [32, 32], False, ctx, torch.float32, "cpu",
                                         method_for("model.layers.0.mlp.gate_up_proj"))
    g, u = w[:32, :256], w[32:, :256]
    gate_up.load_shard(0, "model.layers.0.mlp.gate_proj.weight", _float_lazy(g))
    gate_up.load_shard(1, "model.layers.0.mlp.up_proj.weight", _float_lazy(u))
    gate_up.method.process_weights_after_loading(gate_up)
    rows = slice(tp_rank * 32 // tp_size, (tp_rank + 1) * 32 // tp_size)
    expect = torch.cat([dequantize(decode(encode(t[rows], "Q4_K"), "Q4_K")) for t in (g, u)])
    assert torch.equal(gate_up.weight, expect)


def test_dummy_gguf_engine_loads_and_generates(tmp_path):
    """The benchmark's setup in small: load_format="dummy" with a GGUF quantization_config (Q4_K) builds and runs."""
    from fleetlm import LLM, SamplingParams

    cfg = json.loads((__import__("pathlib").Path(__file__).parents[2] / "configs/models/tiny-llama-8h4kv.json")
                     .read_text())
    cfg.update(hidden_size=256, intermediate_size=512, head_dim=32,
               quantization_config={"quant_method": "gguf", "default_type": "Q4_K"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    llm = LLM(model=str(path), load_format="dummy", quantization="gguf", device="cpu", dtype="float32",
              max_model_len=64, cpu_kv_cache_bytes=8 << 20)
    try:
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
        assert llm.engine.config.model.quantization == "gguf"
    finally:
        llm.engine.shutdown()
