"""``fleetlm``: the command line. ``fleetlm serve`` runs the OpenAI server; ``fleetlm build`` fills the
compile cache ahead of time (``build.py``); ``fleetlm bench`` benchmarks.

``fleetlm serve`` with no arguments serves the embedded model on
127.0.0.1:8000, on whatever device the machine has. ``fleetlm serve MODEL``
serves another (vLLM's positional form). It starts a local Ray cluster (or
joins one with ``--address`` / ``RAY_ADDRESS``), deploys the Serve
application of :func:`fleetlm.cluster.app.build_app`, and runs until SIGTERM
or Ctrl-C. Then it drains: new requests get 503, in-flight ones may finish
for ``--drain-timeout`` seconds (after that they end with an error event),
and Serve and Ray shut down (a local cluster is stopped entirely, so no Ray
process outlives the command). A second signal skips the wait.

A local cluster runs under a small supervisor (``lifecycle.py``): the command's own process
stays in the caller's process group and forwards SIGTERM / SIGINT to the
serving process, which runs (with every Ray process it starts) in a session
of its own. So a signal to the whole process group (``kill -TERM -<pgid>``,
supervisord's ``stopasgroup``, a shell's job control) reaches the supervisor
alone and the drain runs with Ray still up; had Ray's GCS and raylet
received it too they would die at once and the drain would hang on a GCS
that is gone. The serving process dies with the supervisor (PR_SET_PDEATHSIG)
if the supervisor is killed outright. Its Ray ports listen on 127.0.0.1
only (``fleetlm.cluster.loopback``); only the HTTP port binds to ``--host``.

Settings come from flags, or from ``--config`` (a Serve config file such as
``configs/serve/default.yaml``, or a bare mapping of the application's
``args``) with flags overriding it. Every engine setting of a model entry
has a flag (``MODEL_FLAGS``; a unit test keeps the two in step). Unknown keys
are an error naming the key. This is the edge: the only place that reads
the environment (``FLEETLM_API_KEY``, ``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleetlm.cluster.lifecycle import SUPERVISED_ENV, Signals, drain, log, supervise
from fleetlm.cluster.serve_config import (
    EMBEDDED_MODEL,
    KV_CACHE_DTYPES,
    TOOL_CALL_PARSERS,
    ModelDeploymentConfig,
    parse_app_args,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_DRAIN_TIMEOUT_S = 30.0
APP_IMPORT_PATH = "fleetlm.cluster.app:build_app"

# Keys of a Serve config file (ray.serve.schema.ServeDeploySchema) and of one
# of its applications that `fleetlm serve --config` understands.
SERVE_CONFIG_KEYS = frozenset({"proxy_location", "http_options", "grpc_options", "logging_config", "applications"})
SERVE_APP_KEYS = frozenset({"name", "route_prefix", "import_path", "args", "runtime_env", "deployments"})

# Routes the API key guards: every one but the load balancer's and Prometheus'.
GUARDED_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/version", "/openapi.json",
                  "/debug/invariants", "/dashboard", "/dashboard/data", "/dashboard/static/dashboard.js",
                  "/dashboard/static/dashboard.css", "/dashboard/static/uPlot.iife.min.js",
                  "/dashboard/static/uPlot.min.css")
LORA_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")  # guarded too; only with --enable-lora
OPEN_ROUTES = ("/health", "/ping", "/metrics", "/ready")


@dataclass(frozen=True)
class ModelFlag:
    """One per-model flag ``--<dest>``, setting the model entry's ``key`` (default: ``dest``)."""

    dest: str
    kwargs: dict[str, Any]
    help: str
    key: str = ""

    @property
    def entry_key(self) -> str:
        return self.key or self.dest


# What a None default of a model entry field means (the engine resolves it).
ENGINE_DECIDES = {
    "max_model_len": "the model's max_position_embeddings, at most 32768",
    "max_num_seqs": "256 on GPU, 64 on CPU",
    "max_num_batched_tokens": "8192 on GPU, 2048 on CPU",
    "cpu_kv_cache_bytes": "2 GiB",
    "num_kv_blocks": "sized from --gpu-memory-utilization on GPU, --cpu-kv-cache-bytes on CPU",
    "kv_cache_dtype": "auto",
    "async_scheduling": "on for one in-process CUDA worker",
    "warmup": "on GPU",
    "compile_cache_dir": "~/.cache/fleetlm/compile on GPU",
    "tokenizer": "the model's own",
    "quantization": "the checkpoint's own (none: its dtype)",
    "chat_template": "the model's own",
    "max_waiting_tokens": "off",
    "max_cpu_loras": "max_loras",
    "enable_lora": "off",
    "max_loras": "1",
    "max_lora_rank": "16",
}

# vLLM's names where vLLM has the flag; the others are FleetLM's model entry keys.
MODEL_FLAGS: tuple[ModelFlag, ...] = (
    ModelFlag("model", {}, "model name, local HF directory, .gguf file or hub id (as the positional MODEL)"),
    ModelFlag("served_model_name", {}, "name clients send as `model` (default: the model)", key="name"),
    ModelFlag("tokenizer", {}, "tokenizer: a local HF directory or a hub id"),
    ModelFlag("chat_template", {}, "chat template: a file, or the Jinja template itself"),
    ModelFlag("trust_remote_code", {"action": "store_true", "default": None},
              "refused: FleetLM runs only its own model code (Llama, Mistral, Qwen2)"),
    ModelFlag("device", {"choices": ("auto", "cpu", "cuda")}, "device"),
    ModelFlag("dtype", {"choices": ("auto", "float32", "float16", "bfloat16")},
              "weights and activations (auto: float32 on CPU; on GPU float16 for a float16 checkpoint, else bfloat16)"),
    ModelFlag("load_format", {"choices": ("auto", "safetensors", "gguf", "dummy")},
              "weights: detected, or dummy (random weights of the config's shape, for benchmarks)"),
    ModelFlag("quantization", {}, "weight format: fp8 or int8 (W8A8) quantize a float checkpoint as it loads; "
              "a quantized checkpoint's own method is detected from its config.json"),
    ModelFlag("seed", {"type": int}, "seed of dummy weights and of the engine's random state"),
    ModelFlag("tensor_parallel_size", {"type": int}, "GPUs (Ray workers) per pipeline stage"),
    ModelFlag("pipeline_parallel_size", {"type": int}, "pipeline stages (may span nodes)"),
    ModelFlag("distributed_executor_backend", {"choices": ("mp", "uni", "ray")}, "where workers run: the "
              "replica's process (one device only) or Ray actors (default: the process for one device, Ray for more)"),
    ModelFlag("disable_custom_all_reduce", {"action": "store_true", "default": None},
              "tensor-parallel collectives through the process group only (on CPU: gloo, not shared memory)"),
    ModelFlag("max_model_len", {"type": int}, "prompt + output tokens of one sequence"),
    ModelFlag("max_num_seqs", {"type": int}, "sequences in one running batch"),
    ModelFlag("max_num_batched_tokens", {"type": int}, "tokens in one step (the chunked prefill budget)"),
    ModelFlag("long_prefill_token_threshold", {"type": int},
              "most tokens one prefill may take of a step (0: no cap beyond the step's)"),
    ModelFlag("block_size", {"type": int}, "tokens per KV cache block"),
    ModelFlag("gpu_memory_utilization", {"type": float}, "fraction of GPU memory for weights, activations and KV"),
    ModelFlag("cpu_kv_cache_bytes", {"type": int}, "KV cache bytes of one replica on CPU"),
    ModelFlag("num_kv_blocks", {"type": int}, "fixed KV cache size in blocks"),
    ModelFlag("kv_cache_dtype", {"choices": KV_CACHE_DTYPES},
              "KV cache storage: auto (the model's dtype) or fp8 = fp8_e4m3 (E4M3 with scales: twice the tokens)"),
    ModelFlag("enable_prefix_caching", {"action": argparse.BooleanOptionalAction, "default": None},
              "reuse the KV blocks of shared prompt prefixes"),
    ModelFlag("enforce_eager", {"action": "store_true", "default": None}, "no CUDA graphs"),
    ModelFlag("async_scheduling", {"action": argparse.BooleanOptionalAction, "default": None}, "overlap steps N, N+1"),
    ModelFlag("warmup", {"action": argparse.BooleanOptionalAction, "default": None},
              "take every serving path once (compiling its kernels) before the replica is ready"),
    ModelFlag("compile_cache_dir", {}, "where compiled kernels persist across starts (per version and device)"),
    ModelFlag("speculative_config", {"type": lambda text: _json_object(text, "--speculative-config")},
              'speculative decoding, vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": 4, '
              '"prompt_lookup_max": 4, "prompt_lookup_min": 2} or {"model": DRAFT, "num_speculative_tokens": 4}'),
    ModelFlag("max_waiting_requests", {"type": int}, "sequences allowed to wait beyond the running batches (then 429)"),
    ModelFlag("max_waiting_tokens", {"type": int}, "prompt tokens of the model allowed to wait (then 429)"),
    ModelFlag("stream_chunks_per_s", {"type": float}, "SSE chunks a replica sends a second over all its streams"),
    ModelFlag("stream_max_interval_s", {"type": float}, "most seconds between two chunks of one stream"),
    ModelFlag("tool_call_parser", {"choices": TOOL_CALL_PARSERS},
              "how the model writes tool calls (llama3_json: Llama 3.1+; hermes: Hermes, Qwen 2.5, and models "
              "whose template does not render tools)"),
    ModelFlag("enable_auto_tool_choice", {"action": "store_true", "default": None},
              "serve tool_choice 'auto' (needs --tool-call-parser)"),
    ModelFlag("enable_lora", {"action": "store_true", "default": None},
              "serve LoRA adapters, each request choosing one by sending its name as `model`"),
    ModelFlag("max_loras", {"type": int}, "adapters one step may use (device slots per replica)"),
    ModelFlag("max_lora_rank", {"type": int}, "largest adapter rank (it sizes every slot)"),
    ModelFlag("max_cpu_loras", {"type": int}, "adapters each worker keeps in host memory"),
    ModelFlag("lora_modules", {"nargs": "+", "metavar": "NAME=PATH"},
              "PEFT adapters every replica reads at start (more: POST /v1/load_lora_adapter)"),
)


def _json_object(text: str, flag: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{flag} must be a JSON object")
    if flag == "--speculative-config":
        from fleetlm.engine.spec_config import parse_speculative_config

        try:
            parse_speculative_config(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _flag_default(key: str) -> str:
    """A model entry's default for ``key`` as help text, read from the dataclass (not kept twice)."""
    value = {f.name: f.default for f in dataclasses.fields(ModelDeploymentConfig)}[key]
    if value is None:
        return ENGINE_DECIDES.get(key, "off")
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class CLIError(Exception):
    """A mistake in the command line or config: printed, exit status 2."""


# --- parsing -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlm", description="FleetLM: LLM serving on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve models over the OpenAI HTTP API",
                       description="Serve models over the OpenAI HTTP API on Ray Serve. Flags override --config.")
    s.add_argument("model_tag", nargs="?", metavar="MODEL", help=f"model to serve (default: {EMBEDDED_MODEL})")
    srv = s.add_argument_group("server")
    srv.add_argument("--host", help=f"HTTP host (default: {DEFAULT_HOST})")
    srv.add_argument("--port", type=int, help=f"HTTP port (default: {DEFAULT_PORT})")
    srv.add_argument("--api-key", help="require `Authorization: Bearer <key>` on " + ", ".join(GUARDED_ROUTES)
                     + " (with --enable-lora also " + ", ".join(LORA_ROUTES) + ")"
                     + " (" + ", ".join(OPEN_ROUTES) + " stay open for load balancers and Prometheus; "
                     "they carry no prompts or outputs) (default: FLEETLM_API_KEY, else no key)")
    srv.add_argument("--config", help="Serve config YAML (configs/serve/*.yaml) or a YAML mapping of app args")
    srv.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else start a local one "
                     "whose Ray ports listen on 127.0.0.1 only)")
    srv.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    srv.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                     help=f"seconds in-flight requests may take to finish on shutdown "
                          f"(default: {DEFAULT_DRAIN_TIMEOUT_S:g})")
    srv.add_argument("--max-queued-requests", type=int,
                     help="per replica, requests waiting beyond this get 429 with Retry-After (default: 256)")
    srv.add_argument("--max-logprobs", type=int, help="largest logprobs / top_logprobs a request may ask (default: 20)")
    rep = s.add_argument_group("replicas")
    rep.add_argument("--num-replicas", type=int, help="fixed number of replicas of the model (default: 1)")
    rep.add_argument("--min-replicas", type=int, help="autoscaling lower bound, with --max-replicas (default: 1)")
    rep.add_argument("--max-replicas", type=int, help="autoscaling upper bound (turns autoscaling on)")
    _add_model_flags(s.add_argument_group("model and engine (one model; several need --config)"))
    b = sub.add_parser("build", help="fill the compile cache ahead of time",
                       description="Start the model's engine once, as `fleetlm serve` with the same flags would, "
                                   "with the warm-up on: every kernel serving takes is compiled into the compile "
                                   "cache, so that a later start is warm.")
    b.add_argument("model_tag", nargs="?", metavar="MODEL", help=f"model to build (default: {EMBEDDED_MODEL})")
    _add_model_flags(b.add_argument_group("model and engine (the same flags as fleetlm serve)"))
    sub.add_parser("bench", help="run benchmarks (fleetlm bench --help)", add_help=False)
    return parser


def _add_model_flags(group: Any) -> None:
    for flag in MODEL_FLAGS:
        text = flag.help
        if flag.dest not in ("model", "served_model_name", "trust_remote_code", "lora_modules"):
            text += f" (default: {_flag_default(flag.entry_key)})"
        group.add_argument("--" + flag.dest.replace("_", "-"), dest=flag.dest, help=text, **flag.kwargs)


def load_config_file(path: str) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(app args, http_options, proxy_location) of a Serve config file or a bare args mapping."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise CLIError(f"--config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CLIError(f"--config: {path} is not valid YAML: {e}") from None
    if data is None:
        return {}, {}, None
    if not isinstance(data, Mapping):
        raise CLIError(f"--config: {path} must hold a mapping, got {type(data).__name__}")
    if "applications" not in data:
        return dict(data), {}, None  # bare app args: parse_app_args checks the keys
    unknown = sorted(str(k) for k in data if k not in SERVE_CONFIG_KEYS)
    if unknown:
        raise CLIError(f"--config: unknown key(s) in {path}: {', '.join(unknown)}")
    apps = data["applications"]
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], Mapping):
        raise CLIError(f"--config: {path} must list exactly one application")
    app = apps[0]
    unknown = sorted(str(k) for k in app if k not in SERVE_APP_KEYS)
    if unknown:
        raise CLIError(f"--config: unknown key(s) in applications[0]: {', '.join(unknown)}")
    if app.get("import_path", APP_IMPORT_PATH) != APP_IMPORT_PATH:
        raise CLIError(f"--config: applications[0].import_path must be {APP_IMPORT_PATH}")
    http = data.get("http_options") or {}
    if not isinstance(http, Mapping):
        raise CLIError("--config: http_options must be a mapping")
    return dict(app.get("args") or {}), dict(http), data.get("proxy_location")


def _model_entry(ns: argparse.Namespace) -> dict[str, Any]:
    """The model entry's keys that MODEL and the model flags set."""
    if ns.model_tag is not None and ns.model is not None and ns.model_tag != ns.model:
        raise CLIError(f"two models given: MODEL {ns.model_tag!r} and --model {ns.model!r}")
    overrides = {f.entry_key: getattr(ns, f.dest) for f in MODEL_FLAGS if getattr(ns, f.dest) is not None}
    if ns.model_tag is not None:
        overrides["model"] = ns.model_tag
    return overrides


def _model_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    overrides = _model_entry(ns)
    if ns.num_replicas is not None and (ns.min_replicas is not None or ns.max_replicas is not None):
        raise CLIError("give --num-replicas or --min-replicas/--max-replicas, not both")
    if ns.min_replicas is not None and ns.max_replicas is None:
        raise CLIError("--min-replicas needs --max-replicas")
    if ns.num_replicas is not None:
        overrides["num_replicas"] = ns.num_replicas
    if ns.max_replicas is not None:
        auto = {"max_replicas": ns.max_replicas}
        if ns.min_replicas is not None:
            auto["min_replicas"] = ns.min_replicas
        overrides["autoscaling"] = auto
    return overrides


def app_args_from_cli(ns: argparse.Namespace, environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Merge --config and flags into (app args, http_options, proxy_location); flags win."""
    args, http, proxy = ({}, {}, None) if not ns.config else load_config_file(ns.config)
    model_overrides = _model_overrides(ns)
    if model_overrides:
        models = args.get("models")
        if models is None:
            models = [{}]
        if not isinstance(models, list) or len(models) != 1 or not isinstance(models[0], Mapping):
            raise CLIError("model flags (MODEL, --device, ...) need a config with exactly one model")
        entry = dict(models[0])
        if "num_replicas" in model_overrides:
            entry.pop("autoscaling", None)
        if "autoscaling" in model_overrides:
            entry.pop("num_replicas", None)
            base = entry.get("autoscaling") if isinstance(entry.get("autoscaling"), Mapping) else {}
            model_overrides["autoscaling"] = {**base, **model_overrides["autoscaling"]}
        entry.update(model_overrides)
        args["models"] = [entry]
    api_key = ns.api_key if ns.api_key is not None else environ.get("FLEETLM_API_KEY") or None
    if api_key is not None:
        args["api_key"] = api_key
    if ns.max_queued_requests is not None:
        args["max_queued_requests"] = ns.max_queued_requests
    if ns.max_logprobs is not None:
        args["max_logprobs"] = ns.max_logprobs
    http = dict(http)
    if ns.host is not None or "host" not in http:
        http["host"] = ns.host or DEFAULT_HOST
    if ns.port is not None or "port" not in http:
        http["port"] = ns.port if ns.port is not None else DEFAULT_PORT
    return args, http, proxy


# --- running ---------------------------------------------------------------------------


def run_serve(ns: argparse.Namespace, environ: Mapping[str, str], argv: Sequence[str] = ()) -> int:
    app_args, http, proxy = app_args_from_cli(ns, environ)
    try:
        config = parse_app_args(app_args)  # fail before Ray starts
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    address = ns.address or environ.get("RAY_ADDRESS") or None
    owns_cluster = address is None
    if owns_cluster and environ.get(SUPERVISED_ENV) != "1":
        return supervise(argv, environ, int(http["port"]), ns.drain_timeout)

    import ray
    from ray import serve

    from fleetlm.cluster.app import APP_NAME, build_app

    signals = Signals()
    signals.install()
    started = False
    try:
        init_kw: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
        if owns_cluster:
            init_kw["address"] = "local"  # a new cluster, never one some `ray start` left running
            if ns.num_cpus is not None:
                init_kw["num_cpus"] = ns.num_cpus
        else:
            init_kw["address"] = address
        ray.init(**init_kw)
        signals.install()  # ray.init replaced our SIGTERM handler with its own (sys.exit)
        start_kw: dict[str, Any] = {"http_options": http}
        if proxy is not None:
            start_kw["proxy_location"] = proxy
        serve.start(**start_kw)
        started = True
        names = ", ".join(config.model_names)
        log(f"deploying {names} ...")
        try:
            serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as e:  # a replica failed to start (bad model, no memory, ...)
            log(f"error: {e} (the replica logs above say why)")
            return 1
        signals.ready = True
        log(f"serving {names} on http://{http['host']}:{http['port']}/v1 (Ctrl-C to stop)")
        while not signals.stop.wait(0.5):
            pass
        drain(serve.get_app_handle(APP_NAME), ns.drain_timeout, signals.force)
        return 0
    except Signals.Interrupted:
        log("interrupted during startup")
        return 0
    finally:
        signals.ready = True  # from here on, signals only set flags
        log("shutting down")
        if started:
            try:
                if owns_cluster:
                    serve.shutdown()
                else:
                    serve.delete(APP_NAME)
            except Exception as e:  # noqa: BLE001 - keep tearing down
                log(f"serve shutdown: {e!r}")
        if ray.is_initialized():
            ray.shutdown()


def run_build(ns: argparse.Namespace) -> int:
    from fleetlm.cluster.build import build, describe
    from fleetlm.cluster.serve_config import parse_model_args

    try:
        model = parse_model_args(_model_entry(ns))
        result = build(model)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    log(describe(result))
    return 0


def run_bench(argv: Sequence[str]) -> int:
    from fleetlm.benchmarks.cli import main as bench_main

    return int(bench_main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return run_bench(argv[1:])
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "serve":
            return run_serve(ns, os.environ, argv)
        if ns.command == "build":
            return run_build(ns)
    except CLIError as e:
        log(f"error: {e}")
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
