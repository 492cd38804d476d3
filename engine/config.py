"""Frozen engine configuration, built once at the edge (``EngineArgs``) and passed down.

``ModelConfig`` says what to run, ``CacheConfig`` how the KV cache is laid out
and sized, ``ParallelConfig`` how the model is split over devices, and
``SchedulerConfig`` the per-step budgets. Nothing below the edge reads
environment variables or kwargs dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# vLLM's kv_cache_dtype values FleetLM accepts: "auto" stores K/V in the model's
# dtype; "fp8" is "fp8_e4m3" (E4M3 with scales, workers/kv_cache.py).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(value: Any) -> str:
    """``kv_cache_dtype`` as the engine stores it: "auto" or "fp8_e4m3"; anything else is an error."""
    if value not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {value!r}")
    return "fp8_e4m3" if value == "fp8" else value


@dataclass(frozen=True)
class ModelConfig:
    model: str  # what the user asked for (name, path, hub id)
    served_name: str
    kind: str  # "hf" | "gguf" | "dummy"
    path: str | None
    hf_config: dict[str, Any] = field(repr=False)
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_model_len: int
    seed: int = 0
    tokenizer: str | None = None  # tokenizer source other than the model's (local dir or hub id)
    chat_template: str | None = field(default=None, repr=False)  # overrides the tokenizer's
    # Weight format of the linear layers: None (dense) or a registered quantization
    # name (parallel/formats), resolved against config.json's quantization_config.
    quantization: str | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.hf_config.get(key, default)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.hf_config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.hf_config.get("head_dim") or self.hidden_size // self.num_heads)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.hf_config.get("eos_token_id")
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    # KV budget on CPU, where "free memory" says little about what we may take.
    cpu_kv_cache_bytes: int = 2 << 30
    enable_prefix_caching: bool = True
    # Force the number of blocks (tests use this to make preemption happen).
    num_blocks: int | None = None
    # "auto": K/V in the model's dtype; "fp8_e4m3": one byte per element with scales.
    cache_dtype: str = "auto"


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    device: str = "cpu"  # "cpu" | "cuda", resolved from "auto" at the edge
    # "uni": the one worker in the engine's process; "ray": one Ray actor per device.
    distributed_executor_backend: str = "uni"
    disable_custom_all_reduce: bool = False  # True: TP collectives through the process group only

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int = 2048
    # A single long prompt may take at most this many tokens of one step, so
    # decodes sharing the step are not starved (chunked prefill).
    long_prefill_token_threshold: int = 0  # 0 = no cap beyond the step budget


# Verify steps of k proposals at the batch sizes speculation runs at take k + 1
# decode-graph rows per request; past this the graphs cost more than they win.
MAX_SPECULATIVE_TOKENS = 15


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, validated by ``engine/spec_config.py`` (vLLM's keys)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 0  # ngram only
    prompt_lookup_min: int = 0
    model: str | None = None  # draft_model only: what the user named
    # Speculate only in steps whose running batch holds at most this many
    # requests: past it a verify step costs more than it wins (compute bound).
    disable_by_batch_size: int = 32
    # None: a request proposes while the tokens a verify yields it beat the
    # measured cost of a speculating step over a plain one; a number: while its
    # acceptance rate (accepted / proposed, a moving average) reaches it (0:
    # always). A paused request tries again every probe_interval steps.
    min_acceptance_rate: float | None = None
    probe_interval: int = 16
    # The draft's resolved ModelConfig (built by EngineArgs; None for ngram).
    draft: ModelConfig | None = field(default=None, repr=False, compare=False)

    @property
    def uses_draft_model(self) -> bool:
        return self.method == "draft_model"

    @property
    def num_verify_tokens(self) -> int:
        """Query tokens of a full verify step of one request: the newest token plus k proposals."""
        return 1 + self.num_speculative_tokens


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA limits (``enable_lora``); see ``engine/lora.py``."""

    max_loras: int = 1  # device slots: the distinct adapters one step may use
    max_lora_rank: int = 16  # largest adapter rank; sizes every slot
    max_cpu_loras: int = 1  # adapters each worker keeps in host memory (>= max_loras)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    parallel: ParallelConfig
    scheduler: SchedulerConfig
    use_cuda_graphs: bool = True
    # Schedule and launch step N+1 while step N runs (one pipeline stage only).
    async_scheduling: bool = False
    max_n: int = 64
    max_logprobs: int = 20
    # Before the engine is handed out, take every serving path once
    # (engine/warmup.py) so no request pays for a kernel's compilation.
    warmup: bool = False
    # Where Triton's compiled kernels persist across starts (workers/compile_cache.py); None: Triton's default.
    compile_cache_dir: str | None = None
    lora: LoRAConfig | None = None  # None: LoRA off (enable_lora=False)
    # Speculative decoding (engine/spec_config.py); None: one token per request per step.
    speculative: SpeculativeConfig | None = None
