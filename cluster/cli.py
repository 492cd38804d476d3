"""``fleetlm``: the command line. ``fleetlm serve`` runs the OpenAI server; ``fleetlm bench`` benchmarks.

``fleetlm serve`` with no arguments serves the embedded model on
127.0.0.1:8000, on whatever device the machine has. It starts a local Ray
cluster (or joins one with ``--address`` / ``RAY_ADDRESS``), deploys the
Serve application of :func:`fleetlm.cluster.app.build_app`, and runs until
SIGTERM or Ctrl-C. Then it drains: new requests get 503, in-flight ones may
finish for ``--drain-timeout`` seconds (after that they end with an error
event), and Serve and Ray shut down (a local cluster is stopped entirely, so
no Ray process outlives the command). A second signal skips the wait.

Settings come from flags, or from ``--config`` (a Serve config file such as
``configs/serve/default.yaml``, or a bare mapping of the application's
``args``) with flags overriding it. Unknown keys are an error naming the key.
This is the edge: the only place that reads the environment
(``FLEETLM_API_KEY``, ``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fleetlm.cluster.serve_config import parse_app_args

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_DRAIN_TIMEOUT_S = 30.0
APP_IMPORT_PATH = "fleetlm.cluster.app:build_app"

# Keys of a Serve config file (ray.serve.schema.ServeDeploySchema) and of one
# of its applications that `fleetlm serve --config` understands.
SERVE_CONFIG_KEYS = frozenset({"proxy_location", "http_options", "grpc_options", "logging_config", "applications"})
SERVE_APP_KEYS = frozenset({"name", "route_prefix", "import_path", "args", "runtime_env", "deployments"})

# Per-model flags: argparse dest -> model entry key.
MODEL_FLAGS = {
    "model": "model",
    "served_model_name": "name",
    "device": "device",
    "dtype": "dtype",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "max_model_len": "max_model_len",
    "max_num_seqs": "max_num_seqs",
    "load_format": "load_format",
}


class CLIError(Exception):
    """A mistake in the command line or config: printed, exit status 2."""


# --- parsing -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlm", description="FleetLM: LLM serving on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve models over the OpenAI HTTP API",
                       description="Serve models over the OpenAI HTTP API on Ray Serve.")
    s.add_argument("--model", help="model name, local HF directory or .gguf file "
                   "(default: the embedded smollm2-135m-instruct)")
    s.add_argument("--served-model-name", help="name clients send as `model` (default: --model)")
    s.add_argument("--host", help=f"HTTP host (default {DEFAULT_HOST})")
    s.add_argument("--port", type=int, help=f"HTTP port (default {DEFAULT_PORT})")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"))
    s.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    s.add_argument("--load-format", choices=("auto", "safetensors", "gguf", "dummy"))
    s.add_argument("--tensor-parallel-size", type=int)
    s.add_argument("--pipeline-parallel-size", type=int)
    s.add_argument("--num-replicas", type=int, help="fixed number of replicas per model")
    s.add_argument("--min-replicas", type=int, help="autoscaling lower bound (with --max-replicas)")
    s.add_argument("--max-replicas", type=int, help="autoscaling upper bound")
    s.add_argument("--api-key", help="require `Authorization: Bearer <key>` on /v1 (or FLEETLM_API_KEY)")
    s.add_argument("--max-model-len", type=int)
    s.add_argument("--max-num-seqs", type=int)
    s.add_argument("--max-queued-requests", type=int,
                   help="per replica: requests waiting beyond this get 429 with Retry-After")
    s.add_argument("--config", help="Serve config YAML (configs/serve/*.yaml) or a YAML mapping of app args")
    s.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else start a local one)")
    s.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    s.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help=f"seconds in-flight requests may take to finish on shutdown (default {DEFAULT_DRAIN_TIMEOUT_S:g})")
    sub.add_parser("bench", help="run benchmarks (fleetlm bench --help)", add_help=False)
    return parser


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


def app_args_from_cli(ns: argparse.Namespace, environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Merge --config and flags into (app args, http_options, proxy_location); flags win."""
    args, http, proxy = ({}, {}, None) if not ns.config else load_config_file(ns.config)
    model_overrides = {key: getattr(ns, dest) for dest, key in MODEL_FLAGS.items() if getattr(ns, dest) is not None}
    if ns.num_replicas is not None and (ns.min_replicas is not None or ns.max_replicas is not None):
        raise CLIError("give --num-replicas or --min-replicas/--max-replicas, not both")
    if ns.min_replicas is not None and ns.max_replicas is None:
        raise CLIError("--min-replicas needs --max-replicas")
    if ns.num_replicas is not None:
        model_overrides["num_replicas"] = ns.num_replicas
    if ns.max_replicas is not None:
        auto = {"max_replicas": ns.max_replicas}
        if ns.min_replicas is not None:
            auto["min_replicas"] = ns.min_replicas
        model_overrides["autoscaling"] = auto
    if model_overrides:
        models = args.get("models")
        if models is None:
            models = [{}]
        if not isinstance(models, list) or len(models) != 1 or not isinstance(models[0], Mapping):
            raise CLIError("model flags (--model, --device, ...) need a config with exactly one model")
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
    http = dict(http)
    if ns.host is not None or "host" not in http:
        http["host"] = ns.host or DEFAULT_HOST
    if ns.port is not None or "port" not in http:
        http["port"] = ns.port if ns.port is not None else DEFAULT_PORT
    return args, http, proxy


# --- running ---------------------------------------------------------------------------


class _Signals:
    """SIGTERM/SIGINT: the first asks for a drain, the second for an immediate stop."""

    class Interrupted(Exception):
        pass

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.force = threading.Event()
        self.ready = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            self.force.set()
            if not self.ready:
                raise self.Interrupted()
            return
        self.stop.set()
        if not self.ready:
            raise self.Interrupted()  # still starting: abandon startup, go straight to cleanup


def _log(msg: str) -> None:
    print(f"fleetlm: {msg}", file=sys.stderr, flush=True)


def _call_ingress(handle: Any, method: str) -> int:
    """Call ``method`` on every ingress replica; the sum of the int results."""
    results = handle.broadcast(method).results(timeout_s=5.0, return_exceptions=True)
    return sum(r for r in results if isinstance(r, int))


def drain(handle: Any, timeout_s: float, force: threading.Event) -> bool:
    """Stop admitting, let in-flight requests finish; True if all finished in time."""
    inflight = _call_ingress(handle, "start_draining")
    _log(f"draining: {inflight} request(s) in flight, up to {timeout_s:g} s")
    deadline = time.monotonic() + timeout_s
    while not force.is_set() and time.monotonic() < deadline:
        if _call_ingress(handle, "num_inflight") == 0:
            return True
        time.sleep(0.1)
    aborted = _call_ingress(handle, "abort_inflight")
    _log(f"drain timeout: ended {aborted} request(s) with an error")
    grace = time.monotonic() + 2.0
    while time.monotonic() < grace and _call_ingress(handle, "num_inflight") > 0:
        time.sleep(0.1)
    return False


def run_serve(ns: argparse.Namespace, environ: Mapping[str, str]) -> int:
    app_args, http, proxy = app_args_from_cli(ns, environ)
    try:
        config = parse_app_args(app_args)  # fail before Ray starts
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None

    import ray
    from ray import serve

    from fleetlm.cluster.app import APP_NAME, build_app

    signals = _Signals()
    signals.install()
    address = ns.address or environ.get("RAY_ADDRESS") or None
    owns_cluster = address is None
    started = False
    try:
        init_kw: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
        if owns_cluster:
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
        _log(f"deploying {names} ...")
        try:
            serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as e:  # a replica failed to start (bad model, no memory, ...)
            _log(f"error: {e} (the replica logs above say why)")
            return 1
        signals.ready = True
        _log(f"serving {names} on http://{http['host']}:{http['port']}/v1 (Ctrl-C to stop)")
        while not signals.stop.wait(0.5):
            pass
        drain(serve.get_app_handle(APP_NAME), ns.drain_timeout, signals.force)
        return 0
    except _Signals.Interrupted:
        _log("interrupted during startup")
        return 0
    finally:
        signals.ready = True  # from here on, signals only set flags
        _log("shutting down")
        if started:
            try:
                if owns_cluster:
                    serve.shutdown()
                else:
                    serve.delete(APP_NAME)
            except Exception as e:  # noqa: BLE001 - keep tearing down
                _log(f"serve shutdown: {e!r}")
        if ray.is_initialized():
            ray.shutdown()


def run_bench(argv: Sequence[str]) -> int:
    from fleetlm.cluster.bench import main as bench_main

    return int(bench_main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return run_bench(argv[1:])
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "serve":
            return run_serve(ns, os.environ)
    except CLIError as e:
        _log(f"error: {e}")
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
