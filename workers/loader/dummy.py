"""Dummy weights: deterministic random tensors in a real model's shapes.

For benchmarks of big shapes without the checkpoint. Determinism is what
makes tensor parallelism work: every rank must see the same full tensor and
cut its own shard from it. So values depend only on (seed, tensor name, row
chunk), never on which slice was asked for or in what order: rows are drawn in
fixed chunks of `_ROWS_PER_CHUNK`, each from its own generator seeded by a hash
of (seed, name, chunk index), and a slice generates only the chunks it covers.
Values are drawn in float32 on the target device, then cast; they differ
between device types (CPU and CUDA generators differ), never between ranks.

Scale: a 2-D weight [out, in] is N(0, 1/in), so every projection (and the
logits) keeps roughly unit variance; norms are 1.0 and biases 0.0. The
residual stream then grows only like sqrt(num_layers), which stays finite in
bfloat16 and float16 over 80 layers.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch

from fleetlm.workers.loader.lazy import LazyTensor

_ROWS_PER_CHUNK = 1024
_LLAMA_FAMILY = ("llama", "mistral")


def dummy_tensor_shapes(hf_config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """HF parameter names and shapes of a Llama-family model, in state-dict
    order. lm_head is absent when tie_word_embeddings (as in HF checkpoints)."""
    model_type = hf_config.get("model_type")
    if model_type not in _LLAMA_FAMILY:
        raise ValueError(f"dummy weights support model_type in {_LLAMA_FAMILY}, got {model_type!r}")
    hidden = hf_config["hidden_size"]
    inter = hf_config["intermediate_size"]
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads", heads)
    head_dim = hf_config.get("head_dim") or hidden // heads
    vocab = hf_config["vocab_size"]
    attn_bias = hf_config.get("attention_bias", False)
    mlp_bias = hf_config.get("mlp_bias", False)

    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(hf_config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.append((f"{p}.input_layernorm.weight", (hidden,)))
        for proj, out_dim, in_dim in (
            ("q_proj", heads * head_dim, hidden),
            ("k_proj", kv_heads * head_dim, hidden),
            ("v_proj", kv_heads * head_dim, hidden),
            ("o_proj", hidden, heads * head_dim),
        ):
            shapes.append((f"{p}.self_attn.{proj}.weight", (out_dim, in_dim)))
            if attn_bias:
                shapes.append((f"{p}.self_attn.{proj}.bias", (out_dim,)))
        shapes.append((f"{p}.post_attention_layernorm.weight", (hidden,)))
        for proj, out_dim, in_dim in (("gate_proj", inter, hidden), ("up_proj", inter, hidden), ("down_proj", hidden, inter)):
            shapes.append((f"{p}.mlp.{proj}.weight", (out_dim, in_dim)))
            if mlp_bias:
                shapes.append((f"{p}.mlp.{proj}.bias", (out_dim,)))
    shapes.append(("model.norm.weight", (hidden,)))
    if not hf_config.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def iter_dummy_weights(
    hf_config: dict[str, Any], *, device: torch.device, dtype: torch.dtype, seed: int
) -> Iterator[tuple[str, LazyTensor]]:
    for name, shape in dummy_tensor_shapes(hf_config):
        yield name, LazyTensor(shape, dtype, device, _DummyReader(name, shape, seed, device, dtype))


class _DummyReader:
    def __init__(self, name: str, shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype):
        self.name = name
        self.shape = shape
        self.seed = seed
        self.device = device
        self.dtype = dtype

    def __call__(self, rows: slice, cols: slice | None) -> torch.Tensor:
        if len(self.shape) == 1:
            fill = 1.0 if self.name.endswith("norm.weight") else 0.0
            return torch.full((rows.stop - rows.start,), fill, device=self.device, dtype=self.dtype)
        col_slice = cols if cols is not None else slice(0, self.shape[1])
        out = torch.empty(
            (rows.stop - rows.start, col_slice.stop - col_slice.start), device=self.device, dtype=self.dtype
        )
        std = self.shape[1] ** -0.5
        for chunk in range(rows.start // _ROWS_PER_CHUNK, -(-rows.stop // _ROWS_PER_CHUNK)):
            lo = chunk * _ROWS_PER_CHUNK
            values = self._chunk(chunk, min(_ROWS_PER_CHUNK, self.shape[0] - lo), std)
            first, last = max(rows.start, lo), min(rows.stop, lo + values.shape[0])
            out[first - rows.start : last - rows.start] = values[first - lo : last - lo, col_slice]
        return out

    def _chunk(self, chunk: int, num_rows: int, std: float) -> torch.Tensor:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(_chunk_seed(self.seed, self.name, chunk))
        values = torch.randn(
            (num_rows, self.shape[1]), generator=generator, device=self.device, dtype=torch.float32
        )
        return values.mul_(std)


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
