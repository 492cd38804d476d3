"""kv_cache_dtype: vLLM's argument and values at every edge, the pool's bytes, and the FP8 scales.

The scales (workers/kv_cache.py) are per KV head, powers of two, from a bound on what the layer's
weights can produce; a tensor-parallel rank computes exactly the scales of its own heads.
"""

from __future__ import annotations

import pytest
import torch

from fleetlm.cluster import serve_config as sc
from fleetlm.cluster.cli import app_args_from_cli, build_parser
from fleetlm.engine.args import EngineArgs
from fleetlm.engine.config import KV_CACHE_DTYPES, resolve_kv_cache_dtype
from fleetlm.workers import kv_cache

TINY = dict(model="tiny-llama-8h4kv", load_format="dummy", device="cpu", dtype="float32")
ACCEPTED = "auto, fp8, fp8_e4m3"


def test_values_and_normal_form():
    assert KV_CACHE_DTYPES == sc.KV_CACHE_DTYPES  # the Serve config's copy (it imports only the stdlib)
    assert [resolve_kv_cache_dtype(v) for v in KV_CACHE_DTYPES] == ["auto", "fp8_e4m3", "fp8_e4m3"]
    for bad in ("fp8_e5m2", "int8", "FP8", "", None, 8):
        with pytest.raises(ValueError, match=f"kv_cache_dtype must be one of {ACCEPTED}; got {bad!r}"):
            resolve_kv_cache_dtype(bad)


def test_engine_args():
    assert EngineArgs(**TINY).create_engine_config().cache.cache_dtype == "auto"
    assert EngineArgs(**TINY, kv_cache_dtype="fp8").create_engine_config().cache.cache_dtype == "fp8_e4m3"
    assert EngineArgs(**TINY, kv_cache_dtype="fp8_e4m3").create_engine_config().cache.cache_dtype == "fp8_e4m3"
    # Refused before the model is even looked for.
    with pytest.raises(ValueError, match=f"kv_cache_dtype must be one of {ACCEPTED}; got 'fp16'"):
        EngineArgs(model="/no/such/model", kv_cache_dtype="fp16").create_engine_config()


def test_serve_config_key():
    (m,) = sc.parse_app_args({"models": [{"model": "m", "kv_cache_dtype": "fp8"}]}).models
    assert m.engine_kwargs()["kv_cache_dtype"] == "fp8"
    assert "kv_cache_dtype" not in sc.ModelDeploymentConfig().engine_kwargs()  # the engine's default applies
    with pytest.raises(ValueError, match=rf"models\[0\]: model 'm': kv_cache_dtype must be one of {ACCEPTED}"):
        sc.parse_app_args({"models": [{"model": "m", "kv_cache_dtype": "int8"}]})


def test_cli_flag(capsys):
    parser = build_parser()
    args, _, _ = app_args_from_cli(parser.parse_args(["serve", "m", "--kv-cache-dtype", "fp8"]), {})
    assert args["models"] == [{"model": "m", "kv_cache_dtype": "fp8"}]
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--kv-cache-dtype", "fp8_e5m2"])
    err = capsys.readouterr().err.replace("'", "")  # Python versions differ in quoting the choices
    assert "argument --kv-cache-dtype: invalid choice: fp8_e5m2 (choose from auto, fp8, fp8_e4m3)" in err
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--kv-cache-dtype" in help_text


def test_bench_flag():
    from fleetlm.benchmarks import cli as bench

    for sub in ("throughput", "latency", "prefix"):
        ns = bench.build_parser().parse_args([sub, "--kv-cache-dtype", "fp8"])
        assert bench.engine_kwargs(ns)["kv_cache_dtype"] == "fp8"
    assert "kv_cache_dtype" not in bench.engine_kwargs(bench.build_parser().parse_args(["throughput"]))


def test_fp8_blocks_take_half_the_bytes():
    args = (32, 16, 8, 128)
    assert kv_cache.kv_bytes_per_block(*args, "auto", torch.bfloat16) == 2 * 32 * 16 * 8 * 128 * 2
    assert kv_cache.kv_bytes_per_block(*args, "fp8_e4m3", torch.bfloat16) == 2 * 32 * 16 * 8 * 128
    assert kv_cache.kv_bytes_per_block(*args, "fp8_e4m3", torch.float32) == 2 * 32 * 16 * 8 * 128


def test_gpu_without_fp8_is_refused_at_start(monkeypatch):
    kv_cache.check_fp8_kv_supported(torch.device("cpu"))  # the torch references dequantize anywhere
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"compute capability >= 8.9 .* A100-SXM4-80GB has 8.0: use kv_cache_dtype='auto'"):
        kv_cache.check_fp8_kv_supported(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    kv_cache.check_fp8_kv_supported(torch.device("cuda"))


def test_scale_is_the_power_of_two_above_the_bound():
    bound = torch.tensor([448.0, 100.0, 1e-3, 0.0, 900.0])
    scale = kv_cache.scale_for(bound)
    # 448 * 1.02 slack -> 2; 100 -> 0.25; 1e-3 -> 2^-18; a zero bound (a dead head) -> 1; 900 -> 4.
    assert scale.tolist() == [2.0, 0.25, 2.0**-18, 1.0, 4.0]
    assert scale.dtype == torch.float32


def _tiny_model(tp_rank: int, tp_size: int):
    from fleetlm.kernels import select_ops
    from fleetlm.parallel.context import ParallelContext
    from fleetlm.workers.loader import iter_weights, resolve_model
    from fleetlm.workers.models import model_class

    config = EngineArgs(**TINY, tensor_parallel_size=tp_size).create_engine_config()
    ctx = ParallelContext(tp_rank=tp_rank, tp_size=tp_size)
    model = model_class(config.model.hf_config)(config.model, ctx, select_ops("cpu"), torch.float32, "cpu")
    source = resolve_model(config.model.model, "dummy")
    model.load_weights(iter_weights(source, device=torch.device("cpu"), dtype=torch.float32, seed=0))
    return model


def test_bound_matches_the_weights_and_holds_for_any_input():
    model = _tiny_model(0, 1)
    layer = model.layers[0]
    attn, qkv = layer.self_attn, layer.self_attn.qkv_proj
    k_bound, v_bound = kv_cache.kv_bounds(layer)
    # Against the weight itself: rows of W_k / W_v scaled by the norm's gamma.
    w = qkv.weight.float() * layer.input_layernorm.weight.float()
    hidden, d, kv_heads = w.shape[1], attn.head_dim, attn.num_kv_heads
    w_k = w[qkv.q_size:qkv.q_size + qkv.kv_size].view(kv_heads, d, hidden)
    w_v = w[qkv.q_size + qkv.kv_size:].view(kv_heads, d, hidden)
    pair = (w_k[:, : d // 2].square().sum(-1) + w_k[:, d // 2:].square().sum(-1)).sqrt()
    torch.testing.assert_close(k_bound, pair.amax(1) * hidden**0.5)
    torch.testing.assert_close(v_bound, w_v.norm(dim=-1).amax(1) * hidden**0.5)
    # The worst input: x_hat along a V row (norm sqrt(hidden)) reaches the bound and no further.
    head, row = divmod(int(w_v.norm(dim=-1).flatten().argmax()), d)
    x_hat = w_v[head, row] / w_v[head, row].norm() * hidden**0.5
    assert abs(float(w_v[head, row] @ x_hat) - float(v_bound[head])) < 1e-3 * float(v_bound[head])
    x = torch.randn(64, hidden)
    x_hat = x / x.square().mean(-1, keepdim=True).sqrt()
    v = (x_hat @ w_v.flatten(0, 1).T).view(64, kv_heads, d)
    assert bool((v.abs().amax(dim=(0, 2)) <= v_bound).all())


def test_tensor_parallel_ranks_compute_their_heads_scales():
    # tiny-llama-8h4kv: 4 KV heads; TP=2 gives each rank 2 of them, TP=8 replicates each on 2 ranks.
    whole = [kv_cache.kv_scales(layer) for layer in _tiny_model(0, 1).layers]
    for tp in (2, 8):
        for rank in range(tp):
            heads = slice(rank * 4 // tp, rank * 4 // tp + max(1, 4 // tp))
            for layer, (k_scale, v_scale) in zip(_tiny_model(rank, tp).layers, whole):
                got_k, got_v = kv_cache.kv_scales(layer)
                assert torch.equal(got_k, k_scale[heads]) and torch.equal(got_v, v_scale[heads]), (tp, rank)
