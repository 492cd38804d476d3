"""``/dashboard``: a live page of the serving cluster, served by the ingress itself.

Plain HTML and JavaScript (``dashboard_static/``) with uPlot, a 50 KB
charting library vendored from npm (``dashboard_static/VENDORED.md``): no
build step, nothing fetched from elsewhere. The page polls
``/dashboard/data`` every few seconds and draws, per model: replicas, queue
depth, KV usage, TTFT and TPOT percentiles, tokens/s and the prefix-cache hit
rate over the last minutes, and Ray Serve's replica counts per deployment
with the scaling decisions (a change of the wanted replica count).

Where the numbers come from: :class:`DashboardHistory` samples, every
``period_s`` in the ingress process, the same metric families ``/metrics``
renders (every replica's, through the model backends) and ``serve.status()``
(replica states per deployment, read in a worker thread: it blocks on the
controller). Counters are kept as per-model running totals that survive a
replica's restart (a series that went down restarted from zero, as
Prometheus's ``rate`` assumes); percentiles come from the histogram buckets
gained over the last ``window_s``, interpolated as Prometheus's
``histogram_quantile`` does.

Access: the API key applies as on every other route, as ``Authorization:
Bearer KEY`` or as HTTP Basic with the key as password (any user name), so
a browser can open the page: a 401 here carries a Basic challenge.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request  # module level: FastAPI resolves the routes' annotations here

logger = logging.getLogger("fleetlm.dashboard")

STATIC_DIR = Path(__file__).with_name("dashboard_static")
# name -> media type; nothing else under /dashboard/static/ is served.
STATIC_FILES: Mapping[str, str] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
DASHBOARD_ROUTES = ("/dashboard", "/dashboard/data", *(f"/dashboard/static/{n}" for n in STATIC_FILES))
PERCENTILES = (0.5, 0.9, 0.99)
REALM = "FleetLM dashboard"


# --- the numbers -----------------------------------------------------------------------


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile`` over cumulative ``(le, count)`` buckets.

    Linear interpolation inside the bucket that holds the rank; the lowest
    bucket starts at 0; a rank in the ``+Inf`` bucket answers the largest
    finite bound. None when the histogram is empty.
    """
    bs = sorted(buckets)
    if not bs or bs[-1][1] <= 0:
        return None
    rank = q * bs[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in bs:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


class MonotonicTotals:
    """Per-key running totals of counters summed over series that may restart from zero.

    ``add(key, series, value)`` takes each series' raw cumulative value; a value
    below the series' last one means the series restarted (a new replica), so
    all of it is new. The total under ``key`` only grows.
    """

    def __init__(self) -> None:
        self._last: dict[Any, float] = {}
        self.totals: dict[Any, float] = {}

    def add(self, key: Any, series: Any, value: float) -> None:
        last = self._last.get(series)
        gained = value if last is None or value < last else value - last
        self._last[series] = value
        self.totals[key] = self.totals.get(key, 0.0) + gained

    def get(self, key: Any) -> float:
        return self.totals.get(key, 0.0)


@dataclass
class Sample:
    """One moment: per model, gauges and running totals (counters and histogram buckets)."""

    t: float
    gauges: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> name -> value
    totals: dict[str, dict[Any, float]] = field(default_factory=dict)  # model -> key -> running total
    deployments: dict[str, dict[str, int]] = field(default_factory=dict)  # deployment -> state -> count


_COUNTERS = {
    "fleetlm_generation_tokens_total": "generation_tokens",
    "fleetlm_prompt_tokens_total": "prompt_tokens",
    "fleetlm_prefix_cache_hit_tokens_total": "hit_tokens",
    "fleetlm_prefix_cache_queried_tokens_total": "queried_tokens",
    "fleetlm_requests_finished_total": "finished",
}
_HISTOGRAMS = {
    "fleetlm_time_to_first_token_seconds_bucket": "ttft",
    "fleetlm_time_per_output_token_seconds_bucket": "tpot",
}
# Replica states that count toward the replicas a deployment wants (Serve's target).
_WANTED_STATES = ("RUNNING", "STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")


def wanted_replicas(states: Mapping[str, int]) -> int:
    return sum(int(states.get(s, 0)) for s in _WANTED_STATES)


class DashboardHistory:
    """The last ``horizon_s`` of samples and the series the page draws."""

    def __init__(self, period_s: float = 5.0, horizon_s: float = 900.0, window_s: float = 30.0) -> None:
        self.period_s = period_s
        self.window_s = window_s
        self.samples: deque[Sample] = deque(maxlen=max(2, int(horizon_s / period_s) + 1))
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self._totals = MonotonicTotals()

    def record(self, t: float, families: Iterable[Any], deployments: Mapping[str, Mapping[str, int]] | None) -> Sample:
        """Add a sample from merged metric families (``prometheus_client`` Metric objects)
        and ``serve.status()``'s replica states per deployment (None: not known now)."""
        gauges: dict[str, dict[str, float]] = {}
        models: set[str] = set()
        replicas: dict[str, set[str]] = {}
        for fam in families:
            for s in fam.samples:
                model = s.labels.get("model", "")
                if not model:
                    continue
                replica = s.labels.get("replica", "")
                g = gauges.setdefault(model, {})
                if s.name == "fleetlm_num_requests_running":
                    # Every engine reports it: the replicas the model has now.
                    models.add(model)
                    replicas.setdefault(model, set()).add(replica)
                    g["running"] = g.get("running", 0.0) + s.value
                elif s.name == "fleetlm_num_requests_waiting":
                    g["waiting"] = g.get("waiting", 0.0) + s.value
                elif s.name == "fleetlm_kv_cache_usage_ratio":
                    g["kv_usage_max"] = max(g.get("kv_usage_max", 0.0), s.value)
                elif s.name in _COUNTERS:
                    self._totals.add((model, _COUNTERS[s.name]), (s.name, model, replica, s.labels.get("reason")),
                                     s.value)
                    models.add(model)
                elif s.name in _HISTOGRAMS:
                    le = float(s.labels["le"])
                    self._totals.add((model, _HISTOGRAMS[s.name], le), (s.name, model, replica, le), s.value)
        for model, reps in replicas.items():
            gauges[model]["replicas"] = float(len(reps))
        totals = {m: {k[1:] if len(k) > 2 else k[1]: v for k, v in self._totals.totals.items() if k[0] == m}
                  for m in models}
        sample = Sample(t, {m: gauges.get(m, {}) for m in models}, totals,
                        {d: dict(s) for d, s in (deployments or {}).items()})
        if deployments is not None and self.samples:
            self._note_scaling(t, self.samples[-1].deployments, sample.deployments)
        self.samples.append(sample)
        return sample

    def _note_scaling(self, t: float, before: Mapping[str, Mapping[str, int]],
                      after: Mapping[str, Mapping[str, int]]) -> None:
        for dep, states in after.items():
            old = before.get(dep)
            if old is None:
                continue
            a, b = wanted_replicas(old), wanted_replicas(states)
            if a != b:
                self.events.append({"t": t, "deployment": dep, "from": a, "to": b,
                                    "kind": "scale up" if b > a else "scale down"})

    # -- what the page draws ----------------------------------------------------------
    def series(self) -> dict[str, Any]:
        samples = list(self.samples)
        models = sorted({m for s in samples for m in s.gauges})
        out: dict[str, Any] = {"period_s": self.period_s, "window_s": self.window_s, "models": {},
                               "deployments": {}, "events": list(self.events)}
        for m in models:
            rows: dict[str, list[float | None]] = {k: [] for k in (
                "t", "replicas", "running", "waiting", "kv_usage", "tokens_per_s", "prompt_tokens_per_s",
                "requests_per_s", "hit_rate", *(f"ttft_p{round(q * 100)}" for q in PERCENTILES),
                *(f"tpot_p{round(q * 100)}" for q in PERCENTILES))}
            for i, s in enumerate(samples):
                if m not in s.gauges:
                    continue
                base = _window_start(samples, i, self.window_s)
                g = s.gauges[m]
                rows["t"].append(round(s.t, 3))
                rows["replicas"].append(g.get("replicas", 0.0))
                rows["running"].append(g.get("running", 0.0))
                rows["waiting"].append(g.get("waiting", 0.0))
                rows["kv_usage"].append(g.get("kv_usage_max"))
                rows["tokens_per_s"].append(_rate(s, base, m, "generation_tokens"))
                rows["prompt_tokens_per_s"].append(_rate(s, base, m, "prompt_tokens"))
                rows["requests_per_s"].append(_rate(s, base, m, "finished"))
                hits, queried = _gain(s, base, m, "hit_tokens"), _gain(s, base, m, "queried_tokens")
                rows["hit_rate"].append(hits / queried if hits is not None and queried else None)
                for name in ("ttft", "tpot"):
                    buckets = _bucket_gain(s, base, m, name)
                    for q in PERCENTILES:
                        v = histogram_quantile(q, buckets) if buckets else None
                        rows[f"{name}_p{round(q * 100)}"].append(v)
            out["models"][m] = rows
        deps = sorted({d for s in samples for d in s.deployments})
        for d in deps:
            t, running, wanted = [], [], []
            for s in samples:
                if d in s.deployments:
                    t.append(round(s.t, 3))
                    running.append(s.deployments[d].get("RUNNING", 0))
                    wanted.append(wanted_replicas(s.deployments[d]))
            out["deployments"][d] = {"t": t, "running": running, "wanted": wanted}
        return out


def _window_start(samples: list[Sample], i: int, window_s: float) -> Sample | None:
    """The latest sample at least ``window_s`` before sample i (else the oldest before it)."""
    if i == 0:
        return None
    t = samples[i].t - window_s
    for j in range(i - 1, -1, -1):
        if samples[j].t <= t:
            return samples[j]
    return samples[0]


def _gain(s: Sample, base: Sample | None, model: str, key: Any) -> float | None:
    if base is None:
        return None
    return s.totals.get(model, {}).get(key, 0.0) - base.totals.get(model, {}).get(key, 0.0)


def _rate(s: Sample, base: Sample | None, model: str, key: str) -> float | None:
    g = _gain(s, base, model, key)
    return None if g is None or s.t <= base.t else g / (s.t - base.t)


def _bucket_gain(s: Sample, base: Sample | None, model: str, name: str) -> list[tuple[float, float]]:
    if base is None:
        return []
    now, then = s.totals.get(model, {}), base.totals.get(model, {})
    return [(k[1], v - then.get(k, 0.0)) for k, v in now.items() if isinstance(k, tuple) and k[0] == name]


# --- sampling in the ingress -----------------------------------------------------------


def serve_replica_states() -> dict[str, dict[str, int]] | None:
    """Replica counts by state of every deployment of every Serve app (blocks on the controller);
    None outside a Ray cluster (never start one from here)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return None

    out: dict[str, dict[str, int]] = {}
    for app_name, app in serve.status().applications.items():
        for name, d in app.deployments.items():
            out[name] = {str(getattr(k, "value", k)): int(v) for k, v in d.replica_states.items()}
    return out


class DashboardSampler:
    """Samples into a :class:`DashboardHistory` every ``period_s`` on the ingress's event loop."""

    def __init__(self, families: Callable[[], Awaitable[list[Any]]], history: DashboardHistory | None = None,
                 replica_states: Callable[[], dict[str, dict[str, int]] | None] | None = serve_replica_states) -> None:
        self.history = history or DashboardHistory()
        self._families = families
        self._replica_states = replica_states
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start sampling (idempotent); called at the app's startup and on every dashboard request."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def sample_now(self) -> None:
        fams = await self._families()
        states = None
        if self._replica_states is not None:
            try:
                states = await asyncio.wait_for(asyncio.to_thread(self._replica_states), self.history.period_s)
            except Exception as e:  # noqa: BLE001 - the controller busy or gone: no scaling data this time
                logger.debug("serve.status() failed: %r", e)
        self.history.record(time.time(), fams, states)

    async def _run(self) -> None:
        while True:
            try:
                await self.sample_now()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed scrape leaves a gap, never stops the loop
                logger.warning("dashboard sample failed: %r", e)
            await asyncio.sleep(self.history.period_s)


# --- HTTP ------------------------------------------------------------------------------


def authorized(headers: Mapping[str, str], api_key: str | None) -> bool:
    """The API key as a bearer token, or as the password of HTTP Basic (any user name)."""
    if not api_key:
        return True
    scheme, _, value = headers.get("authorization", "").partition(" ")
    value = value.strip()
    given = b""
    if scheme.lower() == "bearer":
        given = value.encode("latin-1", errors="replace")
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value, validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            given = b""
    return hmac.compare_digest(given, api_key.encode())


async def server_families(server: Any) -> list[Any]:
    """The merged metric families ``/metrics`` renders: every replica's, then the ingress's own."""
    from fleetlm.cluster.metrics import merge_families

    return merge_families(await server.metric_groups())


def add_dashboard_routes(app: Any, server: Any) -> DashboardSampler:
    """Add :data:`DASHBOARD_ROUTES` to the ingress's FastAPI
    app; ``server`` is its ``OpenAIServer`` (config, and the metric families of every replica)."""
    from fastapi.responses import FileResponse, JSONResponse, Response

    from fleetlm.cluster import errors
    from fleetlm.cluster.http_plumbing import error_response

    sampler = DashboardSampler(lambda: server_families(server))
    api_key = server.config.api_key
    page = (STATIC_DIR / "dashboard.html").read_bytes()

    def denied(request: Request) -> Response | None:
        sampler.start()
        if authorized(request.headers, api_key):
            return None
        resp = error_response(errors.unauthorized(
            "Missing API key." if "authorization" not in request.headers else "Invalid API key."))
        resp.headers["WWW-Authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
        return resp

    @app.get("/dashboard")
    async def dashboard(request: Request) -> Response:
        return denied(request) or Response(page, media_type="text/html; charset=utf-8",
                                           headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/data")
    async def dashboard_data(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        if not sampler.history.samples or time.time() - sampler.history.samples[-1].t > sampler.history.period_s:
            await sampler.sample_now()
        return JSONResponse({"now": time.time(), **sampler.history.series()},
                            headers={"Cache-Control": "no-store"})

    def static_route(name: str, media: str) -> Callable[[Request], Awaitable[Response]]:
        async def static_file(request: Request) -> Response:
            return denied(request) or FileResponse(STATIC_DIR / name, media_type=media,
                                                   headers={"Cache-Control": "max-age=3600"})
        return static_file

    # One route per file (no path parameter): nothing else is reachable under /dashboard/static/.
    for name, media in STATIC_FILES.items():
        app.add_api_route(f"/dashboard/static/{name}", static_route(name, media), methods=["GET"])

    app.router.on_startup.append(sampler.start)
    return sampler


__all__ = [
    "DASHBOARD_ROUTES",
    "DashboardHistory",
    "DashboardSampler",
    "MonotonicTotals",
    "add_dashboard_routes",
    "authorized",
    "histogram_quantile",
    "wanted_replicas",
]
