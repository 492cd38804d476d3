"""The edge: user-facing engine arguments turned into frozen configs, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fleetlm.engine.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    resolve_kv_cache_dtype,
)
from fleetlm.engine.spec_config import parse_speculative_config

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_COMPILE_CACHE = Path.home() / ".cache" / "fleetlm" / "compile"
TRUST_REMOTE_CODE_REFUSED = (
    "trust_remote_code is not supported: FleetLM runs only its own implementations of the Llama, "
    "Mistral and Qwen2 architectures, never code shipped with a checkpoint"
)


def resolve_chat_template(value: str | None) -> str | None:
    """vLLM's ``--chat-template``: a path to a file, or the Jinja template itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a template string too long to be a path
        pass
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat_template {value!r:.80} is neither a file nor a Jinja template")


@dataclass
class EngineArgs:
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    tokenizer: str | None = None  # a local HF tokenizer directory or hub id; None: the model's own
    chat_template: str | None = None  # a file holding a Jinja chat template, or the template itself
    trust_remote_code: bool = False  # refused: only FleetLM's own model code runs
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # vLLM's name. None: the engine's own process for one device, Ray actors
    # for more; "ray" also runs a single device as a Ray actor; "mp"/"uni":
    # the engine's process (one device only).
    distributed_executor_backend: str | None = None
    # vLLM's name: TP collectives through the process group (gloo / NCCL) only. Off: CPU ranks
    # of one host use shared memory (parallel/shm_collectives.py).
    disable_custom_all_reduce: bool = False
    device: str = "auto"
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    load_format: str = "auto"
    # vLLM's `quantization`: None reads the checkpoint's quantization_config (or
    # runs dense); "fp8" / "int8" also quantize a float checkpoint as it loads.
    quantization: str | None = None
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None
    cpu_kv_cache_bytes: int = 2 << 30
    # "auto" (the model's dtype), "fp8" or "fp8_e4m3": K/V stored as E4M3 with scales, twice the tokens.
    kv_cache_dtype: str = "auto"
    long_prefill_token_threshold: int = 0
    enforce_eager: bool = False
    # None: on for CUDA workers of one pipeline stage, off otherwise; True
    # forces it (also on CPU, for tests); PP > 1 pipelines micro-batches instead.
    async_scheduling: bool | None = None
    max_n: int = 64
    max_logprobs: int = 20
    # None: on GPU (Triton compiles each kernel variant on first use), off on
    # CPU (plain torch: nothing to compile); True forces it (tests).
    warmup: bool | None = None
    # Compiled kernels kept across starts, under a key of versions and device;
    # None: ~/.cache/fleetlm/compile on GPU, none on CPU (nothing compiles there).
    compile_cache_dir: str | None = None
    # Multi-LoRA (engine/lora.py): adapters chosen per request; max_loras device
    # slots (distinct adapters per step), adapters up to max_lora_rank, and
    # max_cpu_loras adapters kept in host memory (None: max_loras).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # Speculative decoding (engine/spec_config.py): vLLM's mapping, e.g.
    # {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}.
    speculative_config: dict | None = None

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def resolve_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        return self.device

    def create_engine_config(self) -> EngineConfig:
        from fleetlm.parallel.formats import resolve_quantization
        from fleetlm.parallel.formats.registry import QUANTIZATIONS
        from fleetlm.workers.loader import resolve_model
        from fleetlm.parallel.formats.gguf import keeps_quantized
        from fleetlm.workers.loader.gguf_format import read_gguf_header
        from fleetlm.workers.loader.gguf_model import gguf_quantization_config

        for name in ("tensor_parallel_size", "pipeline_parallel_size", "block_size", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.trust_remote_code:
            raise ValueError(TRUST_REMOTE_CODE_REFUSED)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        device = self.resolve_device()
        cache_dtype = resolve_kv_cache_dtype(self.kv_cache_dtype)  # before any weights are found
        source = resolve_model(self.model, self.load_format)
        hf = source.hf_config
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float32" if device == "cpu" else ("float16" if hf.get("torch_dtype") == "float16" else "bfloat16")
        if dtype in ("half", "fp16"):
            dtype = "float16"
        if dtype in ("bf16",):
            dtype = "bfloat16"
        if dtype in ("float", "fp32"):
            dtype = "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        # A GGUF file's block types, as a checkpoint's quantization_config would say; unless an online
        # method (fp8, int8) is asked for: then the blocks are dequantized at load and quantized again.
        online = self.quantization in QUANTIZATIONS and QUANTIZATIONS[self.quantization].online
        if source.kind == "gguf" and not online:
            hf = {**hf, "quantization_config": gguf_quantization_config(read_gguf_header(source.path))}
        quantization = resolve_quantization(self.quantization, hf, repr(self.model))
        if quantization == "gguf" and self.quantization is None and (
                device == "cpu" or not keeps_quantized(hf["quantization_config"])):
            # GGUF on CPU (or with block types the kernels do not read): dequantized to float at load.
            quantization = None
        model_max = int(hf.get("max_position_embeddings") or 2048)
        max_len = self.max_model_len or min(model_max, 32768)
        if max_len > model_max and not hf.get("rope_scaling"):
            raise ValueError(f"max_model_len ({max_len}) exceeds the model's max_position_embeddings ({model_max})")
        model = ModelConfig(
            model=self.model,
            served_name=self.served_model_name or source.name,
            kind=source.kind,
            path=source.path,
            hf_config=hf,
            dtype=dtype,
            max_model_len=max_len,
            seed=self.seed,
            tokenizer=self.tokenizer,
            chat_template=resolve_chat_template(self.chat_template),
            quantization=quantization,
        )
        parallel = ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, device,
                                  executor_backend(self.distributed_executor_backend,
                                                   self.tensor_parallel_size * self.pipeline_parallel_size),
                                  bool(self.disable_custom_all_reduce))
        validate_parallel(model, parallel)
        if self.warmup not in (None, True, False):
            raise ValueError(f"warmup must be None, true or false, got {self.warmup!r}")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be None, true or false, got {self.async_scheduling!r}")
        if self.async_scheduling and parallel.pipeline_parallel_size > 1:
            raise ValueError(
                "async_scheduling needs one pipeline stage (pipeline_parallel_size = 1); with several, "
                "stages run micro-batches of different requests at once instead"
            )
        async_scheduling = device == "cuda" and parallel.pipeline_parallel_size == 1
        if self.async_scheduling is not None:
            async_scheduling = self.async_scheduling
        gpu = device == "cuda"
        max_tokens = self.max_num_batched_tokens or (8192 if gpu else 2048)
        sched = SchedulerConfig(
            max_num_batched_tokens=max_tokens,
            max_num_seqs=self.max_num_seqs or (256 if gpu else 64),
            max_model_len=max_len,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
        )
        cache = CacheConfig(
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            cpu_kv_cache_bytes=self.cpu_kv_cache_bytes,
            enable_prefix_caching=self.enable_prefix_caching,
            num_blocks=self.num_kv_blocks,
            cache_dtype=cache_dtype,
        )
        speculative = resolve_speculative(self.speculative_config, model, parallel, self.load_format)
        return EngineConfig(
            model=model,
            cache=cache,
            parallel=parallel,
            scheduler=sched,
            use_cuda_graphs=gpu and not self.enforce_eager,
            async_scheduling=async_scheduling,
            max_n=self.max_n,
            max_logprobs=self.max_logprobs,
            warmup=gpu if self.warmup is None else self.warmup,
            compile_cache_dir=self.compile_cache_dir or (str(DEFAULT_COMPILE_CACHE) if gpu else None),
            lora=self.create_lora_config(),
            speculative=speculative,
        )

    def create_lora_config(self) -> LoRAConfig | None:
        if self.enable_lora not in (True, False):
            raise ValueError(f"enable_lora must be true or false, got {self.enable_lora!r}")
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            v = getattr(self, name)
            if v is None and name == "max_cpu_loras":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.enable_lora:
            return None
        cpu = self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras
        if cpu < self.max_loras:
            raise ValueError(f"max_cpu_loras ({cpu}) must be >= max_loras ({self.max_loras})")
        return LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank, max_cpu_loras=cpu)


def resolve_speculative(value, target: ModelConfig, parallel: ParallelConfig, load_format: str) -> SpeculativeConfig | None:
    """The validated speculative config; a draft model is resolved here (its config only) and
    must share the target's vocabulary."""
    spec = parse_speculative_config(value)
    if spec is None or not spec.uses_draft_model:
        return spec
    from fleetlm.workers.loader import resolve_model

    # Dummy targets (benchmarks of big shapes) take dummy drafts: a config name or a config.json.
    source = resolve_model(spec.model, "dummy" if load_format == "dummy" else "auto")
    hf = source.hf_config
    if int(hf["vocab_size"]) != target.vocab_size:
        raise ValueError(f"speculative_config: the draft model {spec.model!r} has a vocabulary of {hf['vocab_size']} "
                         f"tokens, the target {target.model!r} of {target.vocab_size}; they must share one tokenizer")
    draft_max = int(hf.get("max_position_embeddings") or 2048)
    if draft_max < target.max_model_len and not hf.get("rope_scaling"):
        raise ValueError(f"speculative_config: the draft model's max_position_embeddings ({draft_max}) is below "
                         f"max_model_len ({target.max_model_len})")
    draft = ModelConfig(model=spec.model, served_name=source.name, kind=source.kind, path=source.path, hf_config=hf,
                        dtype=target.dtype, max_model_len=target.max_model_len, seed=target.seed)
    return dataclasses.replace(spec, draft=draft)


EXECUTOR_BACKENDS = ("mp", "uni", "ray")


def executor_backend(name: str | None, world_size: int) -> str:
    """vLLM's distributed_executor_backend, as FleetLM runs it: "uni" (this process) or "ray"."""
    if name is None:
        return "uni" if world_size == 1 else "ray"
    if name not in EXECUTOR_BACKENDS:
        raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)} "
                         f"(or None), got {name!r}")
    if name in ("mp", "uni") and world_size > 1:
        raise ValueError(f"distributed_executor_backend {name!r} runs one device in the engine's process; "
                         f"tensor_parallel_size x pipeline_parallel_size = {world_size} needs 'ray'")
    return "ray" if name == "ray" else "uni"


def validate_parallel(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Reject shapes that cannot be split, naming the numbers."""
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    if model.num_heads % tp:
        raise ValueError(f"num_attention_heads ({model.num_heads}) is not divisible by tensor_parallel_size ({tp})")
    kv = model.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(
            f"num_key_value_heads ({kv}) and tensor_parallel_size ({tp}) do not divide one another"
        )
    if model.num_layers < pp:
        raise ValueError(f"num_hidden_layers ({model.num_layers}) is fewer than pipeline_parallel_size ({pp})")
