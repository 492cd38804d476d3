"""The quantization plumbing: the `quantization` argument, config.json detection, the per-layer choice.

A test-only format registered for the duration of each test stands in for
the real ones, so these rules are pinned independently of any format.
"""

from __future__ import annotations

import pytest
import torch

from fleetlm.engine.args import EngineArgs
from fleetlm.kernels import select_ops
from fleetlm.parallel.formats import QUANTIZATIONS, DenseMethod, Quantization, checkpoint_names, linear_methods
from fleetlm.parallel.formats.registry import checkpoint_quant_method, resolve_quantization
from fleetlm.workers.loader.lazy import LazyTensor


class _Marked(DenseMethod):
    name = "marked"


@pytest.fixture
def fake_formats(monkeypatch):
    seen = []

    def build(ops, checkpoint_config):
        seen.append(checkpoint_config)
        ignored = set((checkpoint_config or {}).get("ignore", []))
        dense, marked = DenseMethod(ops), _Marked(ops)
        return lambda layer: dense if set(checkpoint_names(layer)) & ignored else marked

    monkeypatch.setitem(QUANTIZATIONS, "zz-online", Quantization("zz-online", build, ("zz-online",), online=True))
    monkeypatch.setitem(QUANTIZATIONS, "zz-packed", Quantization("zz-packed", build, ("zz-packed", "zz-old")))
    return seen


def _cfg(method=None):
    cfg = {"architectures": ["LlamaForCausalLM"]}
    if method:
        cfg["quantization_config"] = {"quant_method": method}
    return cfg


def test_detected_from_config_json_without_a_flag(fake_formats):
    assert resolve_quantization(None, _cfg()) is None
    assert resolve_quantization(None, _cfg("zz-packed")) == "zz-packed"
    assert resolve_quantization(None, _cfg("ZZ-Old")) == "zz-packed"  # an older spelling the format also reads
    assert checkpoint_quant_method(_cfg("ZZ-Old")) == "zz-old"


def test_a_flag_must_agree_with_the_checkpoint(fake_formats):
    assert resolve_quantization("zz-packed", _cfg("zz-old")) == "zz-packed"
    with pytest.raises(ValueError, match=r"quantization='zz-online' contradicts the checkpoint, which is quantized "
                                         r"with 'zz-packed'.*pass quantization='zz-packed' or leave it unset"):
        resolve_quantization("zz-online", _cfg("zz-packed"))
    # Online quantization of a float checkpoint; a checkpoint-only format needs its checkpoint.
    assert resolve_quantization("zz-online", _cfg()) == "zz-online"
    with pytest.raises(ValueError, match=r"quantization='zz-packed' needs a checkpoint quantized that way.*"
                                         r"quantize a float checkpoint at load: .*zz-online"):
        resolve_quantization("zz-packed", _cfg())


def test_unknown_values_name_the_accepted_ones(fake_formats):
    with pytest.raises(ValueError, match=r"unknown quantization 'fp4'; accepted: .*zz-online, zz-packed"):
        resolve_quantization("fp4", _cfg())
    with pytest.raises(ValueError, match=r"checkpoint quantization 'bitsandbytes' .* is not supported; supported: "):
        resolve_quantization(None, _cfg("bitsandbytes"))
    with pytest.raises(ValueError, match="no quant_method"):
        resolve_quantization(None, {"quantization_config": {"bits": 4}})


def test_engine_args_resolve_it_once_at_the_edge(fake_formats):
    config = EngineArgs(model="tiny-llama-8h4kv", load_format="dummy", quantization="zz-online").create_engine_config()
    assert config.model.quantization == "zz-online"
    assert EngineArgs(model="tiny-llama-8h4kv", load_format="dummy").create_engine_config().model.quantization is None
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        EngineArgs(model="tiny-llama-8h4kv", load_format="dummy", quantization="int3").create_engine_config()


def test_per_layer_choice_and_the_lm_head_stays_dense(fake_formats):
    from fleetlm.engine.config import ModelConfig
    from fleetlm.parallel.context import ParallelContext
    from fleetlm.workers.loader import resolve_model
    from fleetlm.workers.models.llama import LlamaForCausalLM

    hf = dict(resolve_model("tiny-llama-8h4kv", "dummy").hf_config)
    hf["quantization_config"] = {"quant_method": "zz-packed", "ignore": ["model.layers.0.mlp.down_proj",
                                                                        "model.layers.1.self_attn.k_proj"]}
    cfg = ModelConfig(model="t", served_name="t", kind="dummy", path=None, hf_config=hf, dtype="float32",
                      max_model_len=64, quantization="zz-packed")
    model = LlamaForCausalLM(cfg, ParallelContext(), select_ops("cpu"), torch.float32, "cpu")
    assert fake_formats == [hf["quantization_config"]]
    names = {n: type(m.method).__name__ for n, m in model.named_modules() if hasattr(m, "method")}
    assert names["layers.0.mlp.down_proj"] == "DenseMethod" and names["layers.1.self_attn.qkv_proj"] == "DenseMethod"
    assert names["layers.0.mlp.gate_up_proj"] == "_Marked" and names["layers.0.self_attn.qkv_proj"] == "_Marked"
    assert names["lm_head"] == "DenseMethod"


def test_checkpoint_names_of_fused_layers():
    assert checkpoint_names("model.layers.3.self_attn.qkv_proj") == (
        "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj")
    assert checkpoint_names("model.layers.3.mlp.gate_up_proj") == ("model.layers.3.mlp.gate_proj",
                                                                   "model.layers.3.mlp.up_proj")
    assert checkpoint_names("model.layers.3.mlp.down_proj") == ("model.layers.3.mlp.down_proj",)


def test_quantized_tensors_are_read_as_stored_and_never_cast_silently():
    from fleetlm.parallel.context import ParallelContext
    from fleetlm.parallel.formats.base import ParamSpec, register
    from fleetlm.parallel.layers import ColumnParallelLinear

    class Int8Weight(DenseMethod):
        name = "int8-test"

        def create_weights(self, layer, in_features, out_features, dtype, device):
            return [register(layer, ParamSpec("weight", (out_features, in_features), torch.int8), device),
                    register(layer, ParamSpec("weight_scale", (out_features,), torch.float32, in_dim=None), device)]

    w = torch.randint(-128, 128, (6, 4), dtype=torch.int8)
    stored = lambda t: LazyTensor(tuple(t.shape), torch.bfloat16, torch.device("cpu"),  # noqa: E731
                                  lambda r, c: t if r is None else t[r])
    layer = ColumnParallelLinear(4, 6, False, ParallelContext(tp_rank=1, tp_size=2), torch.bfloat16, "cpu",
                                 Int8Weight(select_ops("cpu")))
    layer.load("x.weight", stored(w))
    assert layer.weight.dtype == torch.int8 and torch.equal(layer.weight, w[3:])
    # A size-1 dimension is every feature's: a per-tensor scale reaches every rank whole.
    with pytest.raises(ValueError, match=r"checkpoint shard \(1,\) != parameter \(3,\)"):
        layer.load("x.weight_scale", stored(torch.tensor([0.5])))  # reaches the format uncut; dense refuses it
    with pytest.raises(ValueError, match="cannot be stored as torch.int8"):
        layer.load("x.weight", stored(w.float()))


def test_fleetlm_bench_and_serve_take_quantization():
    from fleetlm.benchmarks import cli as bench
    from fleetlm.cluster.cli import build_parser
    from fleetlm.cluster.serve_config import ModelDeploymentConfig

    ns = bench.build_parser().parse_args(["latency", "--model", "llama-3.1-8b", "--quantization", "fp8"])
    assert bench.engine_kwargs(ns)["quantization"] == "fp8"
    ns = build_parser().parse_args(["serve", "m", "--quantization", "int8"])
    assert ns.quantization == "int8"
    assert ModelDeploymentConfig(quantization="fp8").engine_kwargs()["quantization"] == "fp8"
    with pytest.raises(ValueError, match="quantization must be a"):
        ModelDeploymentConfig(quantization=8)
