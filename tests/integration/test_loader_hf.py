"""The loader against Hugging Face transformers on the real embedded model.

transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`) is the
reference: our dequantized weights, un-permuted q/k rows, translated config
and converted tokenizer must equal it exactly. Then an HF safetensors
directory written from that model must round-trip through the HF path.
Takes ~40 s on a laptop CPU (transformers' GGUF load is ~20 s of it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fleetlm.workers.loader import EMBEDDED_DEFAULT, iter_weights, load_tokenizer, resolve_model

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world!",
    "  leading spaces, trailing spaces  ",
    "Ünïcödé: 你好，世界 — émojis 🙂🚀 and tabs\tand\nnewlines\n\n",
    "def f(x):\n    return x ** 2  # code\n",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n<|endoftext|>",
    "1234567890 3.14159 -42 1e-5",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
]


@pytest.fixture(scope="module")
def embedded():
    return resolve_model(EMBEDDED_DEFAULT)


@pytest.fixture(scope="module")
def hf_model(embedded):
    from transformers import AutoModelForCausalLM

    path = Path(embedded.path)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_state(hf_model):
    return hf_model.state_dict()


@pytest.fixture(scope="module")
def hf_tokenizer(embedded):
    from transformers import AutoTokenizer

    path = Path(embedded.path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def our_weights(embedded):
    return {name: lazy.load() for name, lazy in iter_weights(embedded, dtype=torch.float32)}


def test_gguf_weights_equal_transformers(hf_state, our_weights):
    # Tied head: transformers' state dict has lm_head.weight as the embedding itself.
    assert hf_state["lm_head.weight"].data_ptr() == hf_state["model.embed_tokens.weight"].data_ptr()
    assert sorted(our_weights) == sorted(set(hf_state) - {"lm_head.weight"})
    for name, ours in our_weights.items():
        assert ours.dtype == torch.float32
        assert torch.equal(ours, hf_state[name]), name


def test_config_matches_transformers(embedded, hf_model):
    ours, theirs = embedded.hf_config, hf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
                "attention_bias", "mlp_bias"):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert np.float32(ours["rms_norm_eps"]) == np.float32(theirs.rms_norm_eps)
    assert ours["rope_scaling"] is None and theirs.rope_parameters["rope_type"] == "default"
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["model_type"] == theirs.model_type


def test_tensor_parallel_row_and_column_shards(embedded, hf_state):
    """3 ranks: 3 of 9 query heads and 1 of 3 KV heads each, as a TP rank reads them."""
    lazy = dict(iter_weights(embedded))
    for name, rows in (("model.layers.7.self_attn.q_proj.weight", 192), ("model.layers.7.self_attn.k_proj.weight", 64),
                       ("model.embed_tokens.weight", 49152 // 3), ("model.layers.7.mlp.up_proj.weight", 512)):
        shards = [lazy[name].load(rows=slice(r * rows, (r + 1) * rows)) for r in range(3)]
        assert torch.equal(torch.cat(shards), hf_state[name]), name
    for name, cols in (("model.layers.7.self_attn.o_proj.weight", 192), ("model.layers.7.mlp.down_proj.weight", 512)):
        shards = [lazy[name].load(cols=slice(c * cols, (c + 1) * cols)) for c in range(3)]
        assert torch.equal(torch.cat(shards, dim=1), hf_state[name]), name


def assert_same_tokenizer(ours, theirs):
    assert len(ours) == len(theirs) == 49152
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "unk_token_id", "all_special_tokens", "chat_template"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    everything = list(range(len(theirs)))
    assert ours.convert_ids_to_tokens(everything) == theirs.convert_ids_to_tokens(everything)
    assert ours.decode(everything) == theirs.decode(everything)
    assert ours.decode(everything, skip_special_tokens=True) == theirs.decode(everything, skip_special_tokens=True)
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids, text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
        ids = theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids) == text
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(messages, **kwargs) == theirs.apply_chat_template(messages, **kwargs)


def test_gguf_tokenizer_equals_transformers_and_is_cached(embedded, hf_tokenizer, tmp_path):
    start = time.perf_counter()
    cold = load_tokenizer(embedded, cache_dir=tmp_path)
    cold_s = time.perf_counter() - start
    assert len(list(tmp_path.iterdir())) == 1
    start = time.perf_counter()
    warm = load_tokenizer(embedded, cache_dir=tmp_path)
    warm_s = time.perf_counter() - start
    assert warm_s < cold_s / 4, (warm_s, cold_s)
    for tokenizer in (cold, warm):
        assert_same_tokenizer(tokenizer, hf_tokenizer)
    # What HF's SmolLM2-135M-Instruct tokenizer has: ChatML specials, no BOS added.
    assert (warm.bos_token, warm.eos_token, warm.pad_token, warm.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert warm("Hello world!").input_ids == [19556, 905, 17]
    assert warm.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_hf_safetensors_dir_round_trips(hf_model, hf_state, hf_tokenizer, tmp_path):
    """A directory as `save_pretrained` lays it out (transformers refuses to
    save a GGUF-loaded model, so the files are written directly)."""
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in hf_state.items() if k != "lm_head.weight"}  # tied
    half = len(tensors) // 2
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, tmp_path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf_tokenizer.save_pretrained(tmp_path)

    source = resolve_model(str(tmp_path))
    assert (source.kind, source.path) == ("hf", str(tmp_path))
    assert source.hf_config["hidden_size"] == 576 and source.hf_config["tie_word_embeddings"] is True
    ours = {name: lazy.load() for name, lazy in iter_weights(source)}
    assert sorted(ours) == sorted(tensors)
    for name, tensor in ours.items():
        assert torch.equal(tensor, hf_state[name]), name
    assert_same_tokenizer(load_tokenizer(source), hf_tokenizer)
