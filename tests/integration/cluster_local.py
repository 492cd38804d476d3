"""An in-process local Ray cluster with Serve, for the cluster-layer tests.

The routing, autoscaling and multi-model tests drive ``build_app`` in the test
process itself (not through ``fleetlm serve``) so they can read
``serve.status()`` and redeploy between phases. The cluster gets its own
temp dir (its own Ray session, never another test's), fast Serve metric
pushes, and is shut down (every process it started with it) on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import httpx

MODEL = "smollm2-135m-instruct"
APP = "fleetlm"

# Serve reads these when its processes start; ray.init passes our environment on.
SERVE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Autoscaling metrics every 0.5 s instead of 10 s, so short delays mean something.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    # A loaded 2-core CI box answers queue-length probes slowly; 0.1 s makes them time out.
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_serve(num_cpus: int = 8, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """A fresh local Ray cluster with Serve's HTTP proxy; yields the base URL."""
    import ray
    from ray import serve

    env = {**SERVE_ENV, **(extra_env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    tmp = tempfile.mkdtemp(prefix="flr-", dir="/tmp")  # short: Ray's unix sockets live here
    port = free_port()
    try:
        # Logical CPUs: each replica asks for one; the real cores are shared.
        ray.init(address="local", num_cpus=num_cpus, _temp_dir=tmp, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            shutil.rmtree(tmp, ignore_errors=True)


def deploy(url: str, args: dict[str, Any], timeout_s: float = 300.0) -> None:
    """Deploy ``build_app(args)`` as the one app at ``/`` and wait until it answers /health."""
    from ray import serve

    from fleetlm.cluster.app import build_app

    from fleetlm.benchmarks.drill import wait_healthy

    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    wait_healthy(url, timeout_s, serve.status)


def undeploy() -> None:
    from ray import serve

    serve.delete(APP)


def replica_counts(deployment_prefix: str = "LLMReplica") -> dict[str, int]:
    """RUNNING replicas per deployment of the app whose name starts with the prefix (serve.status())."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return {}
    return {name: d.replica_states.get("RUNNING", 0)
            for name, d in app.deployments.items() if name.startswith(deployment_prefix)}


def metric_totals(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each named metric over every label set (all replicas) from the app's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    totals = dict.fromkeys(names, 0.0)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in totals:
                totals[s.name] += s.value
    return totals
