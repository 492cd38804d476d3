"""The ingress's HTTP server: :class:`OpenAIServer` over ``ModelBackend`` objects (no Ray in here).

It owns what outlives one request: the models' backends, per-model metrics,
ledgers and admission, the open jobs and the draining flag. The generation
routes are two :class:`~fleetlm.cluster.generation.Endpoint` objects
(``completions.py``, ``chat.py``); the rest are small:

- ``/v1/models`` (with ``max_model_len`` once a replica has answered; LoRA
  adapters with their base model as ``parent``), ``/version``;
- with LoRA on for some model, ``/v1/load_lora_adapter`` and
  ``/v1/unload_lora_adapter`` (``lora_adapters.py``);
- ``/health`` and ``/ping``: 200 when every model can serve now: its
  replicas all healthy and the ingress warm for it (:meth:`OpenAIServer.warm`),
  or none running while autoscaling may start one (scale to zero: the first
  request waits for the cold start); 503 while draining;
- ``/ready``: which models are warm (a healthy replica and a warm ingress),
  200 only when all are;
- ``/metrics``: every replica's families and the ingress's own;
- ``/openapi.json`` (this deployment's OpenAPI document, limits included)
  and ``/debug/invariants`` (every replica's idle invariants, the ledgers).

Every route needs the API key but ``/health``, ``/ping``, ``/ready`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fleetlm.cluster import errors
from fleetlm.cluster.admission import Admission, AdmissionLimits
from fleetlm.cluster.backend import CONTROL_TIMEOUT_S, ModelBackend
from fleetlm.cluster.chat import ChatEndpoint, warm_chat_template
from fleetlm.cluster.completions import CompletionsEndpoint, warm_encoding
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.http_plumbing import authenticate, error_response, install_error_handlers, read_json
from fleetlm.cluster.ledger import Ledger
from fleetlm.cluster.lora_adapters import (
    LORA_PATHS,
    AdapterRegistry,
    adapter_card,
    load_lora_adapter,
    unload_lora_adapter,
)
from fleetlm.cluster.messages import ModelInfo
from fleetlm.cluster.metrics import CONTENT_TYPE_LATEST, ServeMetrics, render
from fleetlm.cluster.migration import MigratingJob
from fleetlm.cluster.protocol import model_card, now
from fleetlm.cluster.serve_config import ServeAppConfig

# How often the ingress re-counts a model's live replicas (its admission seats).
REPLICA_COUNT_PERIOD_S = 2.0
# How long a health probe waits for the ingress's warm-up of a model before it says "not yet".
WARM_WAIT_S = 2.0


class OpenAIServer:
    """The OpenAI HTTP API over ``ModelBackend`` objects."""

    def __init__(self, config: ServeAppConfig, backends: dict[str, ModelBackend], replica: str = "ingress") -> None:
        self.config = config
        self.backends = backends
        self.replica = replica
        self.draining = False
        self.inflight = 0
        self._jobs: set[MigratingJob] = set()
        self._metrics: dict[str, ServeMetrics] = {}
        self._ledgers: dict[str, Ledger] = {}
        self._admission: dict[str, Admission] = {}
        self._replica_count_due: dict[str, float] = {}
        self._created = now()
        self._api_key = config.api_key.encode() if config.api_key else None
        self._warming: dict[str, asyncio.Task] = {}
        self.warm_models: set[str] = set()
        self.completions = CompletionsEndpoint(self)
        self.chat = ChatEndpoint(self)
        lora = [m for m in config.models if m.enable_lora and m.name in backends]
        self.lora_models = tuple(m.name for m in lora)
        self.adapters = AdapterRegistry(tuple(backends), {m.name: m.lora_modules or () for m in lora})

    # -- lifecycle (called by the CLI through the ingress deployment) -----------
    def start_draining(self) -> int:
        self.draining = True
        return self.inflight

    def abort_inflight(self) -> int:
        jobs = list(self._jobs)
        for job in jobs:
            job.abort(errors.draining())
        return len(jobs)

    # -- what the endpoints share --------------------------------------------------
    def enter(self) -> None:
        self.inflight += 1

    def exit(self) -> None:
        self.inflight -= 1

    def track(self, job: MigratingJob) -> None:
        self._jobs.add(job)

    def untrack(self, job: MigratingJob) -> None:
        job.close()
        self._jobs.discard(job)

    def check_accepting(self) -> None:
        if self.draining:
            raise errors.draining()

    def authenticate(self, request: Request) -> None:
        authenticate(request, self._api_key)

    async def read_json(self, request: Request) -> Any:
        return await read_json(request, self.config.max_request_body_bytes)

    def backend(self, model: str | None) -> ModelBackend:
        if model is None:
            if len(self.backends) == 1:
                return next(iter(self.backends.values()))
            raise errors.bad_request("The model parameter is required.", "model")
        b = self.backends.get(model)
        if b is None:
            raise errors.model_not_found(model)
        return b

    def resolve(self, model: str | None) -> tuple[ModelBackend, Any]:
        """The backend serving ``model`` and the LoRA adapter it names (None: a base model)."""
        if model is not None and model not in self.backends:
            adapter = self.adapters.get(model)
            if adapter is not None:
                return self.backends[adapter.base], adapter.request
        return self.backend(model), None

    def _metrics_for(self, model: str) -> ServeMetrics:
        m = self._metrics.get(model)
        if m is None:
            m = self._metrics[model] = ServeMetrics(model, self.replica)
        return m

    def count_error(self, model: str, err: OpenAIError) -> None:
        self._metrics_for(model).request_error(err.reason)

    def ledger_for(self, model: str) -> Ledger:
        led = self._ledgers.get(model)
        if led is None:
            led = self._ledgers[model] = Ledger(self._metrics_for(model))
        return led

    def admission_for(self, backend: ModelBackend, info: ModelInfo) -> Admission | None:
        """The model's admission control (None when its limits are off); seats re-counted periodically."""
        a = self._admission.get(backend.name)
        if a is None:
            try:
                m = self.config.model(backend.name)
            except KeyError:  # a backend without a config entry (tests): no admission control
                return None
            limits = AdmissionLimits(m.max_waiting_requests, m.max_waiting_tokens)
            if not limits.enabled:
                return None
            start = m.num_replicas if m.autoscaling is None else max(1, m.autoscaling.min_replicas)
            most = m.num_replicas if m.autoscaling is None else m.autoscaling.max_replicas
            a = self._admission[backend.name] = Admission(limits, info.max_num_seqs, start, most)
        loop = asyncio.get_running_loop()
        if loop.time() >= self._replica_count_due.get(backend.name, 0.0):
            self._replica_count_due[backend.name] = loop.time() + REPLICA_COUNT_PERIOD_S
            asyncio.ensure_future(self._count_replicas(backend, a))
        return a

    @staticmethod
    async def _count_replicas(backend: ModelBackend, a: Admission) -> None:
        """Seats follow the live replicas (one dead: fewer admitted; none yet: assume one is coming)."""
        try:
            healthy = sum(1 for h in await backend.health() if h.healthy)
        except Exception:  # noqa: BLE001 - keep the last count
            return
        a.set_replicas(max(1, healthy))

    # -- warm before ready ------------------------------------------------------------
    async def warm(self, backend: ModelBackend) -> None:
        """Pay here, before a probe says ready, what the model's first request would pay:
        its info and tokenizer fetched from a replica (unpickling the tokenizer imports
        transformers: seconds), a first encode and decode, the chat template compiled."""
        info = await backend.info()
        await asyncio.to_thread(_warm_tokenizer, info.tokenizer)
        self.warm_models.add(backend.name)

    async def _warmed(self, backend: ModelBackend, wait_s: float) -> bool:
        """Whether the ingress is warm for the model, starting its warm-up if it is not (and
        waiting up to ``wait_s`` for it). Only called while the model has a replica: a warm-up
        at zero replicas would start one."""
        if backend.name in self.warm_models:
            return True
        task = self._warming.get(backend.name)
        if task is None or task.done():  # a failed one (no replica answered yet) is tried again
            task = self._warming[backend.name] = asyncio.ensure_future(self.warm(backend))
        await asyncio.wait({task}, timeout=wait_s)
        return backend.name in self.warm_models

    def _can_cold_start(self, name: str) -> bool:
        try:
            auto = self.config.model(name).autoscaling
        except KeyError:
            return False
        return auto is not None and auto.min_replicas == 0

    async def _replica_health(self) -> list[Any]:
        return await asyncio.gather(*(b.health() for b in self.backends.values()), return_exceptions=True)

    # -- other endpoints -------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        self.authenticate(request)
        infos = await asyncio.gather(*(self._info_soon(b) for b in self.backends.values()))
        data = [model_card(name, self._created, info.max_model_len if info else None)
                for name, info in zip(self.backends, infos)]
        data += [adapter_card(a, self._created) for a in list(self.adapters.adapters.values())]
        return JSONResponse({"object": "list", "data": data})

    @staticmethod
    async def _info_soon(backend: ModelBackend) -> ModelInfo | None:
        """The model's info if a replica gives it within ``CONTROL_TIMEOUT_S`` (a model scaled
        to zero, or still starting, is listed without ``max_model_len``)."""
        try:
            return await asyncio.wait_for(backend.info(), CONTROL_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            return backend.cached_info()

    async def version(self, request: Request) -> Response:
        self.authenticate(request)
        from fleetlm import __version__

        return JSONResponse({"version": __version__})

    async def health(self) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        results = await self._replica_health()
        report: dict[str, Any] = {}
        warming: list[str] = []
        ok = True
        for (name, backend), r in zip(self.backends.items(), results):
            if not isinstance(r, BaseException) and not r and self._can_cold_start(name):
                report[name] = []  # scaled to zero: the first request starts a replica and waits for it
                continue
            if isinstance(r, BaseException) or not r:
                ok = False
                report[name] = [{"healthy": False, "message": repr(r) if isinstance(r, BaseException) else "no replicas"}]
                continue
            report[name] = [{"replica": h.replica, "healthy": h.healthy, "message": h.message} for h in r]
            if not all(h.healthy for h in r):
                ok = False
            elif not await self._warmed(backend, WARM_WAIT_S):
                ok = False
                warming.append(name)
        body: dict[str, Any] = {"status": "ok" if ok else "unhealthy", "models": report}
        if warming:
            body["warming"] = warming  # replicas up, the ingress not warm for them yet
        return JSONResponse(body, status_code=200 if ok else 503)

    async def ready(self) -> Response:
        """Which models are warm: a healthy replica and the ingress warm for it (200 only if all are)."""
        results = await self._replica_health()
        models: dict[str, Any] = {}
        for (name, backend), r in zip(self.backends.items(), results):
            reps = [] if isinstance(r, BaseException) else r
            healthy = sum(1 for h in reps if h.healthy)
            warm = healthy > 0 and await self._warmed(backend, 0.0)
            models[name] = {"warm": warm, "replicas": len(reps), "healthy_replicas": healthy,
                            "cold_start": self._can_cold_start(name)}
        ok = not self.draining and all(m["warm"] for m in models.values())
        return JSONResponse({"status": "ready" if ok else "not_ready", "models": models},
                            status_code=200 if ok else 503)

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI document of this deployment (cluster/openapi.py), limits included."""
        from fleetlm.cluster.openapi import openapi_document

        self.authenticate(request)
        vocab = {info.vocab_size for b in self.backends.values() if (info := b.cached_info()) is not None}
        return JSONResponse(openapi_document(
            self.config, vocab_size=vocab.pop() if len(vocab) == 1 and len(self.backends) == 1 else None,
            extra_paths={**READY_PATH, **DEBUG_PATHS, **(LORA_PATHS if self.lora_models else {})}))

    async def debug_invariants(self, request: Request) -> Response:
        """Per model: every replica's engine invariants, the ingress ledger and admission.

        ``ok`` is true when the whole app is idle and clean: every replica idle
        with its invariants holding, every ledger balanced (accepted ==
        finished, nothing in flight).
        """
        self.authenticate(request)
        results = await asyncio.gather(*(b.invariants() for b in self.backends.values()), return_exceptions=True)
        models: dict[str, Any] = {}
        ledgers: dict[str, Any] = {}
        ok = True
        for name, r in zip(self.backends, results):
            reps = [{"replica": "?", "ok": False, "idle": False, "violations": [repr(r)]}] \
                if isinstance(r, BaseException) else r
            a = self._admission.get(name)
            models[name] = {"replicas": reps, "admission": a.snapshot() if a is not None else None}
            led = self.ledger_for(name).snapshot()
            ledgers[name] = led
            ok = ok and bool(reps) and all(x.get("ok") for x in reps) and led["balanced"]
        return JSONResponse({"ok": ok, "ingress": self.replica, "inflight_http": self.inflight,
                             "models": models, "ledger": ledgers})

    async def metric_groups(self) -> list[Any]:
        """Every replica's metric families, then the ingress's own: what ``/metrics`` renders."""
        results = await asyncio.gather(*(b.metrics() for b in self.backends.values()), return_exceptions=True)
        groups = [fams for r in results if isinstance(r, list) for fams in r]
        groups.extend(m.collect() for m in self._metrics.values())
        return groups

    async def metrics(self) -> Response:
        return Response(render(await self.metric_groups()), media_type=CONTENT_TYPE_LATEST)


_ERROR_SCHEMA = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_OBJECT = {"content": {"application/json": {"schema": {"type": "object"}}}}
READY_PATH: dict[str, Any] = {
    "/ready": {"get": {
        "summary": "Which models are warm: a healthy replica and a warm ingress (no API key)",
        "security": [],
        "responses": {"200": {"description": "Every model is warm.", **_OBJECT},
                      "503": {"description": "Draining, or some model is not warm (its entry says why).",
                              **_OBJECT}},
    }},
}
DEBUG_PATHS: dict[str, Any] = {
    "/debug/invariants": {"get": {
        "summary": "Idle invariants of every replica's engine, the ingress ledger and admission",
        "responses": {"200": {"description": "The report; ok is true when idle and clean.",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "401": {"description": "Missing or invalid API key.", **_ERROR_SCHEMA}},
    }},
    "/openapi.json": {"get": {
        "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.1.",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "401": {"description": "Missing or invalid API key.", **_ERROR_SCHEMA}},
    }},
}


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app of one ingress replica, routes bound to ``server``."""
    app = FastAPI(title="FleetLM", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions.handle(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.chat.handle(request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await server.models(request)

    @app.get("/health")
    async def health() -> Response:
        return await server.health()

    @app.get("/ping")
    async def ping() -> Response:
        # vLLM's (and SageMaker's) liveness route: the same answer as /health.
        return await server.health()

    @app.get("/ready")
    async def ready() -> Response:
        return await server.ready()

    @app.get("/version")
    async def version(request: Request) -> Response:
        return await server.version(request)

    @app.get("/metrics")
    async def metrics() -> Response:
        return await server.metrics()

    @app.get("/openapi.json")
    async def openapi(request: Request) -> Response:
        return await server.openapi(request)

    @app.get("/debug/invariants")
    async def debug_invariants(request: Request) -> Response:
        return await server.debug_invariants(request)

    if server.lora_models:  # loading adapters from server paths is on only where LoRA is

        @app.post("/v1/load_lora_adapter")
        async def load_lora(request: Request) -> Response:
            return await load_lora_adapter(server, request)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora(request: Request) -> Response:
            return await unload_lora_adapter(server, request)

    from fleetlm.cluster.dashboard import add_dashboard_routes

    add_dashboard_routes(app, server)  # /dashboard: the live page (cluster/dashboard.py)
    install_error_handlers(app)
    return app


def _warm_tokenizer(tokenizer: Any) -> None:
    warm_encoding(tokenizer)
    warm_chat_template(tokenizer)


__all__ = ["DEBUG_PATHS", "READY_PATH", "OpenAIServer", "create_app", "error_response"]
