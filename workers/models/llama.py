"""The Llama family (Llama 2/3/3.1, SmolLM2, Mistral; Qwen2 via q/k/v bias).

Reads like single-device PyTorch: parallelism comes from ``fleetlm.parallel``
layers, kernels from the ``ops`` namespace chosen once per device, and each
linear layer's weight format from ``methods(layer_name)``
(``parallel/formats``): the model never touches a projection's tensors. A pipeline
stage builds only its own layer range: the first stage embeds, the last one
normalizes and owns the LM head; between stages travel (hidden, residual).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fleetlm.engine.config import ModelConfig
from fleetlm.parallel.context import ParallelContext
from fleetlm.parallel.formats import DenseMethod, linear_methods
from fleetlm.parallel.layers import (
    LinearBase,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from fleetlm.workers.attention import AttentionMetadata, PagedAttention
from fleetlm.workers.models.rope import cos_sin_cache


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, ops, dtype, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device), requires_grad=False)
        self.eps, self.ops = eps, ops

    def forward(self, x, residual=None, quant=None):
        """``quant``: the next layer's ``input_quant`` (quantized in this kernel), or None."""
        if quant is not None:
            if residual is None:
                return self.ops.rms_norm_quant(x, self.weight, self.eps, quant.dtype, quant.scale)
            return self.ops.fused_add_rms_norm_quant(x, residual, self.weight, self.eps, quant.dtype, quant.scale)
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, ops, dtype, device, methods, prefix: str) -> None:
        super().__init__()
        # Qwen2 has q/k/v biases without saying so in its config.
        qwen2 = "Qwen2ForCausalLM" in (cfg.get("architectures") or [])
        bias = bool(cfg.get("attention_bias", False) or cfg.get("qkv_bias", False) or qwen2)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, bias, ctx,
                                          dtype, device, methods(f"{prefix}.qkv_proj"))
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, False, ctx, dtype, device,
                                        methods(f"{prefix}.o_proj"))
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, ops)
        self.ops = ops

    def forward(self, positions, x, meta, kv_cache, cos_sin):
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        t = x.shape[0]
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rotary_embedding(positions, q, k, cos_sin)
        out = self.attn(q, k, v, meta, kv_cache)
        return self.o_proj(out.reshape(t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, ops, dtype, device, methods, prefix: str) -> None:
        super().__init__()
        inter = int(cfg.get("intermediate_size"))
        bias = bool(cfg.get("mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], bias, ctx, dtype, device,
                                                       methods(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias, ctx, dtype, device,
                                           methods(f"{prefix}.down_proj"))
        self.ops = ops

    def forward(self, x):
        quant = self.down_proj.input_quant(x)  # same rows as x
        return self.down_proj(self.gate_up_proj.silu_mul(x, self.ops.silu_and_mul, quant))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx, ops, dtype, device, methods, prefix: str) -> None:
        super().__init__()
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, ops, dtype, device)
        self.self_attn = LlamaAttention(cfg, ctx, ops, dtype, device, methods, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, ops, dtype, device)
        self.mlp = LlamaMLP(cfg, ctx, ops, dtype, device, methods, f"{prefix}.mlp")

    def forward(self, positions, x, residual, meta, kv_cache, cos_sin):
        # Quantized layers get their input quantized by the norm before them, in its kernel.
        quant = self.self_attn.qkv_proj.input_quant(x)
        if residual is None:
            residual, x = x, self.input_layernorm(x, quant=quant)
        else:
            x, residual = self.input_layernorm(x, residual, quant)
        x = self.self_attn(positions, x, meta, kv_cache, cos_sin)
        x, residual = self.post_attention_layernorm(x, residual, self.mlp.gate_up_proj.input_quant(x))
        return self.mlp(x), residual


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Contiguous layer range of a pipeline stage; earlier stages take the remainder."""
    if num_layers < pp_size:
        raise ValueError(f"num_hidden_layers ({num_layers}) is fewer than pipeline_parallel_size ({pp_size})")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, ops, dtype: torch.dtype, device, methods=None) -> None:
        super().__init__()
        self.cfg, self.ctx = cfg, ctx
        methods = methods or linear_methods(ops, cfg.quantization or "dense", cfg.get("quantization_config"))
        self.layer_range = stage_layers(cfg.num_layers, ctx.pp_size, ctx.pp_rank)
        self.tie_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx, dtype, device)
            if ctx.is_first_stage or (ctx.is_last_stage and self.tie_embeddings)
            else None
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, ctx, ops, dtype, device, methods, f"model.layers.{i}")
                                    for i in self.layer_range)
        if ctx.is_last_stage:
            eps = float(cfg.get("rms_norm_eps", 1e-6))
            self.norm = RMSNorm(cfg.hidden_size, eps, ops, dtype, device)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx, dtype, device, DenseMethod(ops))
        max_pos = max(cfg.max_model_len, int(cfg.get("max_position_embeddings", cfg.max_model_len)))
        self.register_buffer(
            "cos_sin",
            cos_sin_cache(cfg.head_dim, max_pos, float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling"), device),
            persistent=False,
        )

    @property
    def num_local_layers(self) -> int:
        return len(self.layer_range)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches, hidden=None, residual=None):
        """First stage: from ``input_ids``; later stages: from (hidden, residual) of the previous one.

        Returns the final-normed hidden states on the last stage, else (hidden, residual).
        """
        if self.ctx.is_first_stage:
            hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, meta, kv, self.cos_sin)
        if not self.ctx.is_last_stage:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # -- weights ---------------------------------------------------------------
    _LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

    def load_weights(self, weights) -> set[str]:
        """Load from (HF name, LazyTensor) pairs, each layer reading only its shard."""
        loaded: set[str] = set()
        first = self.layer_range.start
        for name, lazy in weights:
            m = self._LAYER.match(name)
            if m:
                idx = int(m.group(1))
                if idx not in self.layer_range:
                    continue
                self._load_layer(self.layers[idx - first], m.group(2), name, lazy)
            elif name == "model.embed_tokens.weight":
                if self.embed_tokens is not None:
                    self.embed_tokens.load(name, lazy)
                if self.ctx.is_last_stage and self.tie_embeddings:
                    self.lm_head.load(name, lazy)
            elif name == "lm_head.weight":
                if self.ctx.is_last_stage and not self.tie_embeddings:
                    self.lm_head.load(name, lazy)
            elif name == "model.norm.weight":
                if self.ctx.is_last_stage:
                    self.norm.weight.data.copy_(lazy.load())
            else:
                continue  # rotary inv_freq buffers and the like
            loaded.add(name)
        for module in self.modules():
            if isinstance(module, LinearBase):
                module.method.process_weights_after_loading(module)
        return loaded

    @staticmethod
    def _load_layer(layer: LlamaDecoderLayer, rest: str, name: str, lazy) -> None:
        module, _, param = rest.rpartition(".")
        attn, mlp = layer.self_attn, layer.mlp
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            attn.qkv_proj.load_shard(module[-6], name, lazy)
        elif module == "self_attn.o_proj":
            attn.o_proj.load(name, lazy)
        elif module in ("mlp.gate_proj", "mlp.up_proj"):
            mlp.gate_up_proj.load_shard(0 if module == "mlp.gate_proj" else 1, name, lazy)
        elif module == "mlp.down_proj":
            mlp.down_proj.load(name, lazy)
        elif module in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, module).weight.data.copy_(lazy.load())
        else:
            raise ValueError(f"unexpected weight {name}")
