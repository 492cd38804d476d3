"""Client-side drills against a running FleetLM app: the fault and soak benchmarks use these.

- :func:`local_app`: a fresh local Ray cluster (its own temp dir), Serve's HTTP
  proxy on 127.0.0.1, ``build_app(args)`` deployed; torn down on exit.
- :func:`run_streams`: many streaming completions at once through the one
  SSE client (``sse_client.stream_completion``), with a watcher beside them
  (to kill something mid-stream);
- :func:`debug_invariants`, :func:`wait_idle`, :func:`metric_ledger`: the
  app's own account of itself once traffic stops (``/debug/invariants``, the
  ``fleetlm_requests_{accepted,finished}_total`` counters of ``/metrics``).
- :func:`kill_busiest_replica` / :func:`kill_one_worker`: the two faults.

Every wait here is bounded in time. Nothing in here is used by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from fleetlm.benchmarks.sse_client import StreamResult, session, stream_completion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout_s: float, status: Callable[[], Any] | None = None) -> None:
    """Poll ``/health`` until 200; a TimeoutError after ``timeout_s`` (with ``status()`` in its message)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(base + "/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            detail = f": {status()}" if status is not None else ""
            raise TimeoutError(f"the app did not become healthy in {timeout_s:.0f} s{detail}")
        time.sleep(0.5)


@contextlib.contextmanager
def local_app(args: dict[str, Any], *, num_cpus: int | None = None, num_gpus: int | None = None,
              startup_timeout_s: float = 600.0, app_name: str = "fleetlm") -> Iterator[str]:
    """Start Ray + Serve here and deploy ``build_app(args)``; yields the base URL once /health is 200."""
    import shutil
    import tempfile

    import ray
    from ray import serve

    from fleetlm.cluster.app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.pop("RAY_ADDRESS", None)
    tmp = tempfile.mkdtemp(prefix="fld-", dir="/tmp")  # short: Ray's unix sockets live here
    port = free_port()
    init_kw: dict[str, Any] = {"_temp_dir": tmp, "include_dashboard": False, "logging_level": "WARNING",
                               "log_to_driver": False}
    if num_cpus is not None:
        init_kw["num_cpus"] = num_cpus
    if num_gpus is not None:
        init_kw["num_gpus"] = num_gpus
    try:
        ray.init(**init_kw)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=app_name, route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, startup_timeout_s)
        yield base
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def debug_invariants(base: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
    r = httpx.get(base + "/debug/invariants", headers=headers or {}, timeout=timeout_s)
    r.raise_for_status()
    return r.json()


def wait_idle(base: str, headers: dict[str, str] | None = None, *, model: str | None = None,
              replicas: int | None = None, timeout_s: float = 120.0, poll_s: float = 0.5) -> dict[str, Any]:
    """``/debug/invariants`` once ok (and, if given, with that many replicas), or the last one at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            d = debug_invariants(base, headers)
        except httpx.HTTPError as e:
            d = {"ok": False, "error": repr(e)}
        enough = True
        if replicas is not None and model is not None and d.get("models"):
            enough = len(d["models"].get(model, {}).get("replicas", [])) == replicas
        if d.get("ok") and enough or time.monotonic() > deadline:
            return d
        time.sleep(poll_s)


def metric_ledger(base: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """``fleetlm_requests_accepted_total`` and ``..._finished_total`` by reason, summed over label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=timeout_s).text
    accepted = 0.0
    finished: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "fleetlm_requests_accepted_total":
                accepted += s.value
            elif s.name == "fleetlm_requests_finished_total":
                reason = s.labels.get("reason", "?")
                finished[reason] = finished.get(reason, 0.0) + s.value
    return {"accepted": accepted, "finished": finished, "finished_total": sum(finished.values()),
            "balanced": accepted == sum(finished.values())}


def replica_actor_names() -> list[tuple[str, str]]:
    """(name, namespace) of every live LLMReplica actor (needs ``ray`` connected)."""
    import ray

    return sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                  if "LLMReplica" in a["name"])


def kill_busiest_replica(base: str, model: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """``ray.kill`` the replica actor running the most requests of ``model`` (its process is gone)."""
    import ray

    reps = debug_invariants(base, headers)["models"][model]["replicas"]
    victim = max(reps, key=lambda r: r.get("num_running", 0) + r.get("num_waiting", 0))
    name, ns = next(a for a in replica_actor_names() if a[0].endswith(victim["replica"]))
    ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
    return {"replica": victim["replica"], "running": victim.get("num_running", 0),
            "waiting": victim.get("num_waiting", 0)}


def worker_actor_pids(prefix: bytes = b"ray::WorkerActor") -> list[int]:
    """PIDs of the TP/PP worker actor processes on this machine."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(prefix):
                    pids.append(int(entry))
        except OSError:
            continue
    return sorted(pids)


def kill_one_worker(pid: int) -> dict[str, Any]:
    """SIGKILL one worker actor process (a GPU process gone)."""
    os.kill(pid, signal.SIGKILL)
    return {"worker_pid": pid}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of a small sample; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    k = max(0, min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


async def run_streams(base: str, bodies: list[dict[str, Any]], headers: dict[str, str] | None = None,
                      on_progress: Callable[[list[StreamResult]], Any] | None = None,
                      timeout_s: float = 300.0) -> list[StreamResult]:
    """Run the streams concurrently; ``await on_progress(live results)`` runs beside them (to kill something)."""
    live = [StreamResult() for _ in bodies]
    async with session(max(64, 2 * len(bodies))) as http:
        tasks = [asyncio.ensure_future(stream_completion(http, base, b, headers, timeout_s=timeout_s, into=live[i]))
                 for i, b in enumerate(bodies)]
        try:
            if on_progress is not None:
                await on_progress(live)
            await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)
        finally:
            for t in tasks:
                t.cancel()
    return live


__all__ = ["debug_invariants", "free_port", "kill_busiest_replica", "kill_one_worker", "local_app", "metric_ledger",
           "percentile", "replica_actor_names", "run_streams", "wait_healthy", "wait_idle", "worker_actor_pids"]
