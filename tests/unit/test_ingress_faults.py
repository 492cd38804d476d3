"""The ingress (OpenAIServer) over fake replicas: the ledger (one ending per accepted
request), migration when a replica stream dies, admission (429 before any replica),
/openapi.json, /debug/invariants and hostile bodies. No Ray actors, no model."""

from __future__ import annotations


import asyncio
import json

import httpx
import pytest

from fleetlm.cluster import migration
from fleetlm.cluster.messages import ChoiceDelta, GenerateChunk, ModelInfo, ReplicaError, ReplicaHealth
from fleetlm.cluster.server import OpenAIServer, create_app
from fleetlm.cluster.serve_config import ModelDeploymentConfig, ServeAppConfig

from ray import exceptions as ray_exc
KEY = "k1"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(migration, "BACKOFF_S", (0.0,))


class Tok:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [1, 2, 3]


class Stream:
    def __init__(self, script, delay=0.0):
        self.script, self.delay, self.cancelled = list(script), delay, False

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(self.delay)
        if not self.script:
            raise StopAsyncIteration
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


def words(ws, start=0, finish="length"):
    """One chunk per word, token ids start.., the last with finish_reason."""
    return [GenerateChunk(choices=[ChoiceDelta(0, w, [start + i], None, finish if i == len(ws) - 1 else None)],
                          num_prompt_tokens=3, finished=finish is not None and i == len(ws) - 1)
            for i, w in enumerate(ws)]


class Backend:
    def __init__(self, name="m", scripts=None, delay=0.0, max_num_seqs=4, default=None):
        self.name, self.delay, self.max_num_seqs = name, delay, max_num_seqs
        self.scripts = scripts or {}
        self.default = default or (lambda: words(["a", "b", "c"]))
        self.requests = []

    async def info(self):
        return ModelInfo(self.name, 64, 4, 50, Tok(), self.max_num_seqs)

    def cached_info(self):
        return ModelInfo(self.name, 64, 4, 50, Tok(), self.max_num_seqs)

    def generate(self, req):
        self.requests.append(req)
        script = self.scripts.get(len(self.requests) - 1) or self.default()
        return Stream(script, self.delay)

    async def health(self):
        return [ReplicaHealth("r1", True)]

    async def metrics(self):
        return []

    async def invariants(self):
        return [{"replica": "r1", "ok": True, "idle": True, "violations": [], "num_running": 0}]


def client(backend, **model_kw):
    config = ServeAppConfig(models=(ModelDeploymentConfig(model=backend.name, **model_kw),), api_key=KEY)
    server = OpenAIServer(config, {backend.name: backend}, replica="i0")
    return server, httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)), base_url="http://t")


def run(coro):
    return asyncio.run(coro)


def sse(text):
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_ledger_counts_one_ending_per_accepted_request():
    async def go():
        server, c = client(Backend())
        assert (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}, headers=AUTH)).status_code == 200
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}, headers=AUTH)
        assert r.text.endswith("data: [DONE]\n\n")
        assert (await c.post("/v1/completions", json={"prompt": "x", "n": 0}, headers=AUTH)).status_code == 400
        assert (await c.post("/v1/completions", json={"prompt": "x"})).status_code == 401
        led = server._ledgers["m"].snapshot()
        assert led == {"accepted": 2, "finished": {"length": 2}, "inflight": 0, "migrated": 0, "balanced": True}
        text = (await c.get("/metrics")).text
        assert 'fleetlm_requests_accepted_total{model="m",replica="i0"} 2.0' in text
        assert 'fleetlm_requests_finished_total{model="m",reason="length",replica="i0"} 2.0' in text
    run(go())


def test_error_after_acceptance_and_client_gone_end_once():
    async def go():
        b = Backend(scripts={0: [GenerateChunk(error=ReplicaError("invalid_request", "bad seed", "seed"))],
                             1: words(["a"] * 50, finish="length")}, delay=0.01)
        server, c = client(b)
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
        task = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 60},
                                            headers=AUTH))
        while not server._jobs:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        task.cancel()  # the client goes away mid-stream
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        led = server._ledgers["m"].snapshot()
        assert led["finished"] == {"invalid_request_error": 1, "abort": 1} and led["balanced"], led
    run(go())


def test_replica_death_mid_stream_is_migrated_and_invisible_to_the_client():
    async def go():
        died = ray_exc.ActorDiedError()
        b = Backend(scripts={0: words(["a", "b"], finish=None)[:2] + [died],
                             1: words(["c", "d"], start=2)})
        server, c = client(b)
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True}, headers=AUTH)
        events = sse(r.text)
        assert not [e for e in events if "error" in e]
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == "abcd"
        cont = b.requests[1]
        assert cont.resume_token_ids == (0, 1) and cont.resume_text_len == 2 and cont.attempt == 1
        assert cont.request_id == b.requests[0].request_id + ".m1"
        led = server._ledgers["m"].snapshot()
        assert led["migrated"] == 1 and led["finished"] == {"length": 1}
    run(go())


def test_no_replica_left_is_a_clean_error_event_then_done():
    async def go():
        died = ray_exc.ActorDiedError()
        b = Backend(scripts={0: [GenerateChunk(choices=[ChoiceDelta(0, "a", [0])]), died]},
                    default=lambda: [died])
        server, c = client(b)
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True}, headers=AUTH)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert sse(r.text)[-1]["error"]["code"] == "unavailable"
        assert len(b.requests) == migration.MAX_ATTEMPTS
        assert [q.resume_token_ids for q in b.requests] == [()] + [(0,)] * (migration.MAX_ATTEMPTS - 1)
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4}, headers=AUTH)
        assert r.status_code == 503  # non-streaming: nothing sent yet, a plain error body
        assert server._ledgers["m"].snapshot()["finished"] == {"unavailable": 2}
    run(go())


def test_admission_429_before_any_replica_then_admits_again():
    async def go():
        b = Backend(delay=0.05, max_num_seqs=1)
        server, c = client(b, max_waiting_requests=0)
        first = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3},
                                             headers=AUTH))
        while not server._jobs:
            await asyncio.sleep(0.005)
        r = await c.post("/v1/completions", json={"prompt": "y", "max_tokens": 3}, headers=AUTH)
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        assert len(b.requests) == 1  # refused before any replica saw it
        assert (await first).status_code == 200
        assert (await c.post("/v1/completions", json={"prompt": "z", "max_tokens": 3},
                             headers=AUTH)).status_code == 200
        assert server._admission["m"].snapshot()["inflight"] == 0
        assert server._ledgers["m"].snapshot()["accepted"] == 2  # the 429 was never accepted
        # More sequences than the model could ever seat: 400, not 429.
        r = await c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    run(go())


def test_openapi_and_debug_invariants_need_the_key():
    async def go():
        server, c = client(Backend())
        assert (await c.get("/openapi.json")).status_code == 401
        assert (await c.get("/debug/invariants")).status_code == 401
        doc = (await c.get("/openapi.json", headers=AUTH)).json()
        assert {"/v1/completions", "/debug/invariants", "/openapi.json"} <= set(doc["paths"])
        ids = doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["anyOf"][2]
        assert ids["items"]["maximum"] == 49
        d = (await c.get("/debug/invariants", headers=AUTH)).json()
        assert d["ok"] and d["models"]["m"]["replicas"][0]["replica"] == "r1"
        assert d["ledger"]["m"]["balanced"]
    run(go())


@pytest.mark.parametrize("body, headers, status", [
    (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415),
    (b'{"prompt": "x", "max_tokens": 1}', {"Content-Type": "application/json; charset=utf-8"}, 200),
    (b'{"prompt": "x", "max_tokens": 1}', {}, 200),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", {}, 400),
    (b'{"prompt": "x", "logit_bias": {"\\u0661": 1}}', {}, 400),
])
def test_hostile_bodies(body, headers, status):
    async def go():
        _, c = client(Backend())
        r = await c.post("/v1/completions", content=body, headers={**AUTH, **headers})
        assert r.status_code == status, r.text
    run(go())


def test_every_route_but_health_ping_and_metrics_needs_the_key():
    """Walk the app's own route table, so a route added later is covered too."""
    from starlette.routing import Route

    async def go():
        server, c = client(Backend())
        routes = [(m, r.path) for r in create_app(server).routes if isinstance(r, Route)
                  for m in sorted(r.methods - {"HEAD"})]
        assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                ("GET", "/openapi.json"), ("GET", "/debug/invariants"), ("GET", "/version"),
                ("GET", "/ping")} <= set(routes)
        # `fleetlm serve --help` names the guarded and the open routes: exactly the app's.
        from fleetlm.cluster.cli import GUARDED_ROUTES, OPEN_ROUTES

        assert {p for _, p in routes} == set(GUARDED_ROUTES) | set(OPEN_ROUTES)
        body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = await c.request(method, path, headers=headers, json=body)
                if path in OPEN_ROUTES:
                    assert r.status_code == 200, (method, path, r.text)
                else:
                    assert r.status_code == 401, (method, path, headers, r.text)
                    assert r.json()["error"]["code"] == "invalid_api_key"
            # The right key: completions and chat only check fields their own kind has.
            ok = {**body}
            ok.pop("messages" if path == "/v1/completions" else "prompt")
            r = await c.request(method, path, headers=AUTH, json=ok)
            assert r.status_code == 200, (method, path, r.text)
    run(go())


def test_http_path_never_deserializes_untrusted_bytes_unsafely():
    """The modules that touch request bytes parse JSON only: no pickle, marshal, eval or unsafe YAML."""
    import ast
    import inspect

    from fleetlm.cluster import (admission, backend, chat, completions, deltas, errors, generation, http_plumbing,
                                 ledger, messages, migration, openapi, protocol, server)

    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
    banned_calls = {"eval", "exec", "__import__"}
    for mod in (server, generation, completions, chat, protocol, http_plumbing, backend, messages, deltas, errors,
                openapi, admission, ledger, migration):
        tree = ast.parse(inspect.getsource(mod))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = {a.name.split(".")[0] for a in node.names} | {(getattr(node, "module", "") or "").split(".")[0]}
                assert not names & banned_modules, (mod.__name__, names)
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                assert name not in banned_calls, (mod.__name__, ast.unparse(node)[:80])
                if name == "compile" and isinstance(fn, ast.Name):  # the builtin (re.compile is fine)
                    raise AssertionError(f"{mod.__name__}: {ast.unparse(node)[:80]}")
                if name == "load" and isinstance(fn, ast.Attribute) and ast.unparse(fn.value) == "yaml":
                    raise AssertionError(f"{mod.__name__}: yaml.load (use safe_load)")


class ColdBackend(Backend):
    """A model whose replicas the test sets; info() takes ``info_s`` (a replica's first answer)."""

    def __init__(self, replicas, info_s=0.0):
        super().__init__()
        self.replicas, self.info_s = replicas, info_s
        self.info_calls = 0
        self.tok = CountingTok()

    async def info(self):
        self.info_calls += 1
        await asyncio.sleep(self.info_s)
        return ModelInfo(self.name, 64, 4, 50, self.tok, self.max_num_seqs)

    async def health(self):
        return list(self.replicas)


class CountingTok(Tok):
    def __init__(self):
        self.calls = []

    def encode(self, text, add_special_tokens=False):
        self.calls.append("encode")
        return super().encode(text)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        self.calls.append("template")
        return super().apply_chat_template(messages)


def test_health_is_ready_only_once_the_ingress_is_warm_for_the_model():
    """What the first request would pay (info and tokenizer from a replica, a first encode, the chat
    template) is paid before /health says 200; /ready says which models are warm."""
    from fleetlm.cluster import server as server_mod

    async def go():
        backend = ColdBackend([ReplicaHealth("r1", True)], info_s=0.5)
        server, c = client(backend)
        server_mod.WARM_WAIT_S, wait = 0.05, server_mod.WARM_WAIT_S
        try:
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["warming"] == ["m"], r.text
            r = await c.get("/ready")
            assert r.status_code == 503 and r.json()["models"]["m"]["warm"] is False
            await asyncio.sleep(0.6)
            assert (await c.get("/health")).status_code == 200
        finally:
            server_mod.WARM_WAIT_S = wait
        r = await c.get("/ready")
        assert r.status_code == 200 and r.json()["models"]["m"] == {
            "warm": True, "replicas": 1, "healthy_replicas": 1, "cold_start": False}
        assert backend.info_calls == 1 and {"encode", "template"} <= set(backend.tok.calls)
        # An unhealthy replica is not ready, warm ingress or not.
        backend.replicas = [ReplicaHealth("r1", False, "stuck")]
        assert (await c.get("/health")).status_code == 503
    run(go())


def test_a_model_scaled_to_zero_keeps_health_200_and_is_not_warmed_by_probes():
    """Scale to zero: the load balancer must keep the endpoint (the first request cold-starts a
    replica and waits), /ready says the model is not warm, and no probe starts a replica."""
    async def go():
        backend = ColdBackend([])
        from fleetlm.cluster.serve_config import AutoscalingConfig

        server, c = client(backend, autoscaling=AutoscalingConfig(min_replicas=0, max_replicas=1))
        r = await c.get("/health")
        assert r.status_code == 200 and r.json()["models"]["m"] == []
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json()["models"]["m"] == {
            "warm": False, "replicas": 0, "healthy_replicas": 0, "cold_start": True}
        assert backend.info_calls == 0
        # A fixed replica count that has none running is unhealthy.
        _, c2 = client(ColdBackend([]))
        r = await c2.get("/health")
        assert r.status_code == 503 and r.json()["models"]["m"][0]["message"] == "no replicas"
    run(go())
