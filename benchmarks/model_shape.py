"""Parameter counts, FLOPs and bytes of a Llama-family model, from its HF config (MFU and MBU rest on these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts, FLOPs and bytes of a Llama-family model, from its HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelShape:
        heads = int(hf["num_attention_heads"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
        )

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_linear_params(self) -> int:
        """Weights (and biases) of one layer's matmuls: q, k, v, o, gate, up, down."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * d, self.num_kv_heads * d
        params = h * q + 2 * h * kv + q * h + 3 * h * i
        if self.attention_bias:
            params += q + 2 * kv + h
        if self.mlp_bias:
            params += 2 * i + h
        return params

    @property
    def linear_params(self) -> int:
        """Params every computed token multiplies (all layers' matmuls, not the logits)."""
        return self.num_layers * self.layer_linear_params

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Embedding + layers (matmuls and two norms each) + final norm + lm_head unless tied."""
        per_layer = self.layer_linear_params + 2 * self.hidden_size
        return self.embedding_params + self.num_layers * per_layer + self.hidden_size + self.lm_head_params

    def kv_bytes_per_token(self, elem_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_size

    def request_flops(self, prompt_len: int, num_cached: int, num_generated: int) -> int:
        """Model FLOPs to produce ``num_generated`` tokens after ``prompt_len`` with ``num_cached`` prefix hits.

        The engine runs positions ``num_cached .. prompt_len + num_generated - 2``
        (the last generated token is sampled, never fed back) and computes
        logits once per generated token.
        """
        if num_generated <= 0:
            return 0
        first, last = num_cached, prompt_len + num_generated - 2
        computed = max(0, last - first + 1)
        # sum over positions p in [first, last] of the causal context (p + 1)
        context = (last + 1) * (last + 2) // 2 - first * (first + 1) // 2 if computed else 0
        attn = 4 * self.num_layers * self.num_heads * self.head_dim
        return 2 * self.linear_params * computed + attn * context + 2 * self.vocab_size * self.hidden_size * num_generated


def count_params(hf_config: dict[str, Any]) -> int:
    """Number of parameters of a Llama-family config (embedding + layers + lm_head unless tied)."""
    return ModelShape.from_hf_config(hf_config).num_params


__all__ = ["ModelShape", "count_params"]
