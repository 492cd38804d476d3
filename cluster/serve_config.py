"""The Serve application's `args`: one frozen config, one parser, one allow-list.

`fleetlm.cluster.app:build_app(args)` receives the `args` mapping of a Ray Serve
config file (`configs/serve/*.yaml`, KubeRay's `serveConfigV2`) or the CLI's
flags. `parse_app_args` turns it into a `ServeAppConfig` and rejects any key
that is not a field of these dataclasses, so a typo in an operator's YAML
(`tensor_paralel_size: 2`) fails at deploy time instead of silently serving
one GPU. The dataclass fields ARE the allow-list: there is no second list to
keep in sync.

Plain Python on purpose (no torch, no ray): the config tests and the CLI parse
configs in microseconds, and the values are checked before any replica starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

EMBEDDED_MODEL = "smollm2-135m-instruct"

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # engine/config.py's, kept equal by a test
TOOL_CALL_PARSERS = ("hermes", "llama3_json")  # cluster/tool_parsers.py (a test keeps the two equal)
ROUTERS = ("prefix_aware", "default")


# --- value checks -------------------------------------------------------------
# Each returns the (possibly normalized) value or raises ValueError naming the
# key by its dotted path, e.g. "models[1].autoscaling.max_replicas".


def _int(value: Any, where: str, minimum: int) -> int:
    # bool is an int subclass; `num_replicas: true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value}")
    return value


def _opt_int(value: Any, where: str, minimum: int) -> int | None:
    return None if value is None else _int(value, where, minimum)


def _float(value: Any, where: str, *, low: float, high: float | None = None,
           low_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    value = float(value)
    too_low = value < low if low_inclusive else value <= low
    if too_low or (high is not None and value > high):
        bounds = f"{'[' if low_inclusive else '('}{low}, {'inf)' if high is None else f'{high}]'}"
        raise ValueError(f"{where} must be in {bounds}, got {value}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    return value


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{where} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    return value


def _lora_modules(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """vLLM's ``--lora-modules``: each ``"name=path"`` or ``{"name": ..., "path": ...}`` -> (name, path)."""
    if isinstance(value, (str, Mapping)) or not isinstance(value, (list, tuple)):
        value = [value] if value else []
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, str) and "=" in entry:
            name, _, path = entry.partition("=")
        elif isinstance(entry, Mapping) and set(entry) <= {"name", "path", "base_model_name"}:
            name, path = entry.get("name"), entry.get("path")
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            name, path = entry
        else:
            raise ValueError(f"{where}[{i}] must be NAME=PATH or a mapping of name and path, got {entry!r}")
        if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path.strip():
            raise ValueError(f"{where}[{i}]: an adapter needs a non-empty name and path, got {entry!r}")
        out.append((name.strip(), path.strip()))
    names = [n for n, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: adapter name(s) given twice: {', '.join(dupes)}")
    return tuple(out)


def _set(obj: Any, name: str, value: Any) -> None:
    # Frozen dataclasses normalize their own fields once, in __post_init__.
    object.__setattr__(obj, name, value)


def allowed_keys(cls: type) -> frozenset[str]:
    """The keys a mapping for dataclass `cls` may hold: its field names."""
    return frozenset(f.name for f in dataclasses.fields(cls))


def _check_keys(given: Any, cls: type, where: str) -> Mapping[str, Any]:
    if not isinstance(given, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(given).__name__}")
    allowed = allowed_keys(cls)
    unknown = sorted(str(k) for k in given if k not in allowed)
    if unknown:
        raise ValueError(
            f"unknown key(s) in {where}: {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    return given


# --- configs ------------------------------------------------------------------


@dataclass(frozen=True)
class AutoscalingConfig:
    """Replica autoscaling of one model; the names are Ray Serve's own.

    `target_ongoing_requests` is per replica. An LLM replica batches many
    requests at once, so the default is far above Ray Serve's (2), which would
    add a replica for every second concurrent request.
    """

    max_replicas: int
    min_replicas: int = 1
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    # How long the load is averaged over before a decision, and (None: as
    # downscale_delay_s) how long a deployment must idle before its last replica goes.
    look_back_period_s: float = 30.0
    downscale_to_zero_delay_s: float | None = None

    def __post_init__(self) -> None:
        w = "autoscaling"
        # min_replicas 0 is Ray Serve's scale-to-zero: allowed.
        _int(self.min_replicas, f"{w}.min_replicas", 0)
        _int(self.max_replicas, f"{w}.max_replicas", max(1, self.min_replicas))
        _set(self, "target_ongoing_requests", _float(
            self.target_ongoing_requests, f"{w}.target_ongoing_requests",
            low=0.0, low_inclusive=False))
        _set(self, "upscale_delay_s", _float(self.upscale_delay_s, f"{w}.upscale_delay_s", low=0.0))
        _set(self, "downscale_delay_s", _float(self.downscale_delay_s, f"{w}.downscale_delay_s", low=0.0))
        _set(self, "look_back_period_s", _float(self.look_back_period_s, f"{w}.look_back_period_s",
                                                low=0.0, low_inclusive=False))
        if self.downscale_to_zero_delay_s is not None:
            _set(self, "downscale_to_zero_delay_s", _float(
                self.downscale_to_zero_delay_s, f"{w}.downscale_to_zero_delay_s", low=0.0))

    def to_serve(self) -> dict[str, Any]:
        """The `autoscaling_config` dict for a Ray Serve deployment (unset options left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ModelDeploymentConfig:
    """One served model: engine settings plus how many replicas serve it.

    `name` (the OpenAI `model` field clients send) defaults to `model`.
    Either `num_replicas` or `autoscaling` decides the replica count, never
    both; with neither, one replica.
    """

    name: str | None = None
    model: str = EMBEDDED_MODEL
    tokenizer: str | None = None  # None: the model's own
    chat_template: str | None = None  # a file, or the template itself; None: the model's own
    trust_remote_code: bool = False  # refused when true: FleetLM runs only its own model code
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # vLLM's name: None: the replica's own process for one device, Ray worker
    # actors for more; "ray" runs one device as a worker actor too.
    distributed_executor_backend: str | None = None
    disable_custom_all_reduce: bool = False  # vLLM's name: TP collectives through the process group only
    max_model_len: int | None = None          # None: the model's own limit
    max_num_seqs: int | None = None           # None: the engine's default
    max_num_batched_tokens: int | None = None  # None: the engine's default
    long_prefill_token_threshold: int = 0  # 0: a prefill may take a whole step
    block_size: int = 16
    cpu_kv_cache_bytes: int | None = None  # KV budget on CPU; None: the engine's default
    num_kv_blocks: int | None = None  # a fixed KV pool size (blocks per replica), instead of sizing from memory
    kv_cache_dtype: str | None = None  # auto | fp8 | fp8_e4m3; None: the engine's default (auto)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    # Launch step N+1 while step N runs (engine/llm_engine.py); None: the
    # engine decides (on for one in-process CUDA worker).
    async_scheduling: bool | None = None
    # Take every serving path once before the replica is ready (engine/warmup.py); None: on GPU.
    warmup: bool | None = None
    compile_cache_dir: str | None = None  # compiled kernels kept across starts; None: ~/.cache/fleetlm on GPU
    load_format: str = "auto"
    quantization: str | None = None  # vLLM's names (fp8, int8, ...); None: the checkpoint's own (the engine checks)
    # Speculative decoding: vLLM's mapping (engine/spec_config.py); None: off.
    speculative_config: dict | None = None
    num_replicas: int | None = None
    autoscaling: AutoscalingConfig | None = None
    # Admission at the ingress (cluster/admission.py): sequences allowed to wait
    # for a seat beyond the replicas' running batches, and prompt tokens allowed
    # to wait for their prefill; past either, 429. None: that bound is off.
    max_waiting_requests: int | None = 256
    max_waiting_tokens: int | None = None
    # Streaming (cluster/replica.py): a replica sends about stream_chunks_per_s
    # chunks a second over all its open streams, i.e. one stream's chunks are at
    # least open_streams / stream_chunks_per_s apart (at most stream_max_interval_s;
    # a lone stream gets every token). Each chunk costs two Ray hops; on one
    # H100 at 128 streams, 2,000 a second backed up ~2 s behind the engine.
    stream_chunks_per_s: float = 500.0
    stream_max_interval_s: float = 0.25
    # Tool calling (vLLM's names): how the model writes tool calls, and whether
    # tool_choice "auto" (the model decides) is served; "required" and a named
    # function are enforced with a grammar and need neither.
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool | None = None  # None: off
    # Multi-LoRA (vLLM's names): adapters chosen per request by their name as
    # `model`; lora_modules ("name=path" or {name, path}) are read by every
    # replica at start, more come through POST /v1/load_lora_adapter.
    # None: the engine's defaults (LoRA off; 1 slot; rank 16; max_loras in host memory).
    enable_lora: bool | None = None
    max_loras: int | None = None
    max_lora_rank: int | None = None
    max_cpu_loras: int | None = None
    lora_modules: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self) -> None:
        _str(self.model, "model")
        w = f"model {self.model!r}"
        _set(self, "name", self.model if self.name is None else _str(self.name, f"{w}: name"))
        if self.tokenizer is not None:
            _str(self.tokenizer, f"{w}: tokenizer")
        if self.chat_template is not None:
            _str(self.chat_template, f"{w}: chat_template")
        if _bool(self.trust_remote_code, f"{w}: trust_remote_code"):
            # EngineArgs refuses it too; said here so `fleetlm serve` fails before Ray starts.
            raise ValueError(f"{w}: trust_remote_code is not supported (FleetLM runs only its own model code, "
                             "never code shipped with a checkpoint)")
        _choice(self.device, f"{w}: device", DEVICES)
        _int(self.seed, f"{w}: seed", 0)
        _choice(self.dtype, f"{w}: dtype", DTYPES)
        _int(self.tensor_parallel_size, f"{w}: tensor_parallel_size", 1)
        _int(self.pipeline_parallel_size, f"{w}: pipeline_parallel_size", 1)
        if self.distributed_executor_backend is not None:
            _choice(self.distributed_executor_backend, f"{w}: distributed_executor_backend", ("mp", "uni", "ray"))
        _opt_int(self.max_model_len, f"{w}: max_model_len", 1)
        _opt_int(self.max_num_seqs, f"{w}: max_num_seqs", 1)
        _opt_int(self.max_num_batched_tokens, f"{w}: max_num_batched_tokens", 1)
        _int(self.long_prefill_token_threshold, f"{w}: long_prefill_token_threshold", 0)
        _int(self.block_size, f"{w}: block_size", 1)
        _opt_int(self.cpu_kv_cache_bytes, f"{w}: cpu_kv_cache_bytes", 1)
        _opt_int(self.num_kv_blocks, f"{w}: num_kv_blocks", 1)
        if self.kv_cache_dtype is not None:
            _choice(self.kv_cache_dtype, f"{w}: kv_cache_dtype", KV_CACHE_DTYPES)
        _set(self, "gpu_memory_utilization", _float(
            self.gpu_memory_utilization, f"{w}: gpu_memory_utilization",
            low=0.0, high=1.0, low_inclusive=False))
        _bool(self.enable_prefix_caching, f"{w}: enable_prefix_caching")
        _bool(self.enforce_eager, f"{w}: enforce_eager")
        _bool(self.disable_custom_all_reduce, f"{w}: disable_custom_all_reduce")
        if self.async_scheduling is not None:
            _bool(self.async_scheduling, f"{w}: async_scheduling")
        if self.warmup is not None:
            _bool(self.warmup, f"{w}: warmup")
        if self.compile_cache_dir is not None:
            _str(self.compile_cache_dir, f"{w}: compile_cache_dir")
        if self.speculative_config is not None:
            # Its keys and values are the engine's to check (EngineArgs); here only its shape.
            if not isinstance(self.speculative_config, Mapping) or not all(
                    isinstance(k, str) for k in self.speculative_config):
                raise ValueError(f"{w}: speculative_config must be a mapping of vLLM's speculative config keys")
            _set(self, "speculative_config", dict(self.speculative_config))
        _opt_int(self.max_waiting_requests, f"{w}: max_waiting_requests", 0)
        _opt_int(self.max_waiting_tokens, f"{w}: max_waiting_tokens", 1)
        _set(self, "stream_chunks_per_s", _float(self.stream_chunks_per_s, f"{w}: stream_chunks_per_s",
                                                 low=0.0, low_inclusive=False))
        _set(self, "stream_max_interval_s", _float(self.stream_max_interval_s, f"{w}: stream_max_interval_s",
                                                   low=0.0))
        _choice(self.load_format, f"{w}: load_format", LOAD_FORMATS)
        if self.tool_call_parser is not None:
            _choice(self.tool_call_parser, f"{w}: tool_call_parser", TOOL_CALL_PARSERS)
        if self.enable_auto_tool_choice is not None and _bool(
                self.enable_auto_tool_choice, f"{w}: enable_auto_tool_choice") and self.tool_call_parser is None:
            raise ValueError(f"{w}: enable_auto_tool_choice needs a tool_call_parser "
                             f"({', '.join(TOOL_CALL_PARSERS)})")
        if self.quantization is not None:
            _str(self.quantization, f"{w}: quantization")
        if self.enable_lora is not None:
            _bool(self.enable_lora, f"{w}: enable_lora")
        _opt_int(self.max_loras, f"{w}: max_loras", 1)
        _opt_int(self.max_lora_rank, f"{w}: max_lora_rank", 1)
        _opt_int(self.max_cpu_loras, f"{w}: max_cpu_loras", self.max_loras or 1)
        if self.lora_modules is not None:
            _set(self, "lora_modules", _lora_modules(self.lora_modules, f"{w}: lora_modules"))
            if self.lora_modules and not self.enable_lora:
                raise ValueError(f"{w}: lora_modules needs enable_lora: true")
        if self.autoscaling is not None:
            if not isinstance(self.autoscaling, AutoscalingConfig):
                raise ValueError(f"{w}: autoscaling must be an AutoscalingConfig")
            if self.num_replicas is not None:
                raise ValueError(f"{w}: give num_replicas or autoscaling, not both")
        else:
            _set(self, "num_replicas", 1 if self.num_replicas is None
                 else _int(self.num_replicas, f"{w}: num_replicas", 1))

    @property
    def world_size(self) -> int:
        """Devices (Ray worker actors) one replica of this model needs."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def uses_worker_actors(self) -> bool:
        """Whether the replica's engine runs its devices as Ray worker actors (else in its own process)."""
        return self.world_size > 1 or self.distributed_executor_backend == "ray"

    def engine_kwargs(self) -> dict[str, Any]:
        """The engine's settings (EngineArgs / LLM keyword names, as in
        DESIGN.md); None values are left out so the engine's defaults apply."""
        replica_keys = ("name", "num_replicas", "autoscaling", "max_waiting_requests", "max_waiting_tokens",
                        "stream_chunks_per_s", "stream_max_interval_s", "tool_call_parser", "enable_auto_tool_choice",
                        "lora_modules")
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in replica_keys and v is not None}


@dataclass(frozen=True)
class ServeAppConfig:
    """The whole application: served models plus the ingress's request limits.

    `max_tokens_limit` None means each model's own `max_model_len` bounds
    `max_tokens`.
    """

    models: tuple[ModelDeploymentConfig, ...] = (ModelDeploymentConfig(),)
    api_key: str | None = None
    max_request_body_bytes: int = 1 << 20
    max_queued_requests: int = 256
    max_n: int = 16
    max_logprobs: int = 20
    max_stop_sequences: int = 16
    max_stop_length: int = 256
    max_tokens_limit: int | None = None
    router: str = "prefix_aware"

    def __post_init__(self) -> None:
        models = tuple(self.models)
        if not models:
            raise ValueError("models must list at least one model")
        for i, m in enumerate(models):
            if not isinstance(m, ModelDeploymentConfig):
                raise ValueError(f"models[{i}] must be a ModelDeploymentConfig")
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model name(s): {', '.join(dupes)}")
        _set(self, "models", models)
        if self.api_key is not None:
            _str(self.api_key, "api_key")
        _int(self.max_request_body_bytes, "max_request_body_bytes", 1)
        _int(self.max_queued_requests, "max_queued_requests", 1)
        _int(self.max_n, "max_n", 1)
        _int(self.max_logprobs, "max_logprobs", 0)
        _int(self.max_stop_sequences, "max_stop_sequences", 0)
        _int(self.max_stop_length, "max_stop_length", 1)
        _opt_int(self.max_tokens_limit, "max_tokens_limit", 1)
        _choice(self.router, "router", ROUTERS)

    def model(self, name: str) -> ModelDeploymentConfig:
        """The model served under `name`; KeyError if none."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)


# --- parsing ------------------------------------------------------------------


def parse_model_args(entry: Any, where: str = "models[0]") -> ModelDeploymentConfig:
    """One `models:` entry (a mapping) -> ModelDeploymentConfig."""
    entry = dict(_check_keys(entry, ModelDeploymentConfig, where))
    autoscaling = entry.get("autoscaling")
    if autoscaling is not None:
        autoscaling = dict(_check_keys(autoscaling, AutoscalingConfig, f"{where}.autoscaling"))
        if "max_replicas" not in autoscaling:
            raise ValueError(f"{where}.autoscaling needs max_replicas")
    try:
        if autoscaling is not None:
            entry["autoscaling"] = AutoscalingConfig(**autoscaling)
        return ModelDeploymentConfig(**entry)
    except ValueError as e:
        # Say which entry of the operator's list is wrong.
        raise ValueError(f"{where}: {e}") from None


def parse_app_args(args: Mapping[str, Any] | None) -> ServeAppConfig:
    """A Serve config's `args` -> ServeAppConfig.

    Raises ValueError naming any unknown key (top level, in a model entry or
    in its `autoscaling`) or any invalid value. Missing keys take the
    dataclass defaults; empty or None args serve the embedded model.
    """
    args = dict(_check_keys(args or {}, ServeAppConfig, "args"))
    if "models" in args:
        models = args["models"]
        if not isinstance(models, (list, tuple)):
            raise ValueError(f"models must be a list of mappings, got {type(models).__name__}")
        args["models"] = tuple(
            parse_model_args(entry, f"models[{i}]") for i, entry in enumerate(models)
        )
    return ServeAppConfig(**args)


__all__ = [
    "AutoscalingConfig",
    "DEVICES",
    "DTYPES",
    "EMBEDDED_MODEL",
    "KV_CACHE_DTYPES",
    "LOAD_FORMATS",
    "ModelDeploymentConfig",
    "ROUTERS",
    "ServeAppConfig",
    "allowed_keys",
    "parse_app_args",
    "parse_model_args",
]
