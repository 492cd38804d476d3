"""Multi-LoRA on the cluster side, without Ray: the ingress's adapter names, /v1/models, the load and
unload routes (400/404 rules, API key), the adapter travelling in GenerateRequest, the router's
preference for replicas holding the adapter, and the config / CLI keys."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from fleetlm.cluster.lora_adapters import adapter_id
from fleetlm.cluster.messages import ChoiceDelta, GenerateChunk, ModelInfo, ReplicaHealth
from fleetlm.cluster.router import ReplicaStats, RouterConfig, RouterMemory, RoutingRequest, decide, routing_summary
from fleetlm.cluster.serve_config import ModelDeploymentConfig, ServeAppConfig, parse_app_args
from fleetlm.cluster.server import OpenAIServer, create_app
from fleetlm.engine.block_hash import block_hash_id, hash_prompt_blocks

KEY = "k1"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Tok:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


class Stream:
    def __init__(self):
        self.items = [GenerateChunk(choices=[ChoiceDelta(0, "ok", [5], None, "length")], num_prompt_tokens=3,
                                    finished=True)]

    def cancel(self):
        pass

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)


class Backend:
    """One model's replicas; ``add_results``: what each replica answers to add_lora."""

    def __init__(self, name="base", add_results=(None, None)):
        self.name, self.add_results = name, list(add_results)
        self.requests, self.added, self.removed = [], [], []

    async def info(self):
        return ModelInfo(self.name, 256, 4, 50, Tok(), 4)

    def cached_info(self):
        return None

    def generate(self, req):
        self.requests.append(req)
        return Stream()

    async def health(self):
        return [ReplicaHealth("r1", True)]

    async def metrics(self):
        return []

    async def add_lora(self, lora_request):
        self.added.append(lora_request)
        return list(self.add_results)

    async def remove_lora(self, lora_int_id):
        self.removed.append(lora_int_id)
        return [True for _ in self.add_results]


def make(backends, **model_kw):
    models = tuple(ModelDeploymentConfig(model=b.name, **model_kw) for b in backends)
    server = OpenAIServer(ServeAppConfig(models=models, api_key=KEY), {b.name: b for b in backends}, replica="i0")
    return server, httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)), base_url="http://t")


def run(coro):
    return asyncio.run(coro)


def test_a_config_adapter_is_listed_and_chosen_by_model():
    async def go():
        b = Backend()
        server, c = make([b], enable_lora=True, lora_modules=["sql=/adapters/sql"])
        cards = (await c.get("/v1/models", headers=AUTH)).json()["data"]
        assert [x["id"] for x in cards] == ["base", "sql"]
        assert cards[1]["parent"] == "base" and cards[1]["root"] == "/adapters/sql"
        r = await c.post("/v1/completions", json={"model": "sql", "prompt": "abcdefghij", "max_tokens": 1},
                         headers=AUTH)
        assert r.status_code == 200 and r.json()["model"] == "sql"
        req = b.requests[-1]
        lora = req.lora_request
        assert (lora.lora_name, lora.lora_path, lora.lora_int_id) == ("sql", "/adapters/sql",
                                                                      adapter_id("sql", "/adapters/sql"))
        # Routing hashes are the engine's: keyed by the adapter, unlike the base model's.
        ids = req.prompt_token_ids
        assert req.block_hash_ids == tuple(block_hash_id(h) for h in hash_prompt_blocks(ids, 4, lora.cache_key))
        r = await c.post("/v1/completions", json={"model": "base", "prompt": "abcdefghij", "max_tokens": 1},
                         headers=AUTH)
        assert b.requests[-1].lora_request is None and b.requests[-1].block_hash_ids != req.block_hash_ids
        assert r.json()["model"] == "base"
    run(go())


def test_load_and_unload_follow_vllms_rules():
    async def go():
        b = Backend()
        server, c = make([b], enable_lora=True)
        body = {"lora_name": "fin", "lora_path": "/adapters/fin"}
        assert (await c.post("/v1/load_lora_adapter", json=body)).status_code == 401
        r = await c.post("/v1/load_lora_adapter", json=body, headers=AUTH)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'fin' added successfully."
        assert b.added[-1].lora_int_id == adapter_id("fin", "/adapters/fin")
        assert "fin" in [x["id"] for x in (await c.get("/v1/models", headers=AUTH)).json()["data"]]
        r = await c.post("/v1/load_lora_adapter", json=body, headers=AUTH)  # already loaded
        assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "base", "lora_path": "/x"}, headers=AUTH)
        assert r.status_code == 400 and "name of a served model" in r.json()["error"]["message"]
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "x"}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
        # Unload: unknown is 404; known is gone for new requests (404 for the model), replicas told.
        r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}, headers=AUTH)
        assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]
        r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "fin"}, headers=AUTH)
        assert r.status_code == 200 and b.removed == [adapter_id("fin", "/adapters/fin")]
        r = await c.post("/v1/completions", json={"model": "fin", "prompt": "x"}, headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    run(go())


def test_a_replica_refusing_the_adapter_is_a_400_with_its_reason():
    async def go():
        reason = "adapter 'big' has rank 64, above max_lora_rank (16); start the engine with max_lora_rank >= 64"
        b = Backend(add_results=(None, reason))
        server, c = make([b], enable_lora=True)
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": "/a/big"}, headers=AUTH)
        assert r.status_code == 400 and reason in r.json()["error"]["message"]
        assert b.removed == [adapter_id("big", "/a/big")]  # the replica that read it forgets it
        assert server.adapters.get("big") is None
        b.add_results = [TimeoutError("no answer")]
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": "/a/big"}, headers=AUTH)
        assert r.status_code == 503
    run(go())


def test_lora_routes_exist_only_where_lora_is_on_and_need_a_base_when_ambiguous():
    async def go():
        _, c = make([Backend()])
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/a"}, headers=AUTH)
        assert r.status_code == 404
        a, b = Backend("m1"), Backend("m2")
        _, c = make([a, b], enable_lora=True)
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "base_model_name"
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x",
                                                        "base_model_name": "m2"}, headers=AUTH)
        assert r.status_code == 200 and b.added and not a.added
    run(go())


# -- routing ----------------------------------------------------------------------------


def test_router_prefers_the_replica_holding_the_adapter_then_the_prefix():
    now, cfg = time.time(), RouterConfig()
    mem = RouterMemory()
    prefix = (11, 12, 13)
    r1 = ReplicaStats("r1", 1, 0, block_hash_ids=frozenset(prefix), timestamp=now)  # has the prefix
    r2 = ReplicaStats("r2", 1, 0, timestamp=now, lora_known=frozenset({7}))  # read adapter 7
    r3 = ReplicaStats("r3", 2, 0, timestamp=now, lora_resident=frozenset({7}), lora_known=frozenset({7}))
    req = RoutingRequest(prefix, lora_id=7)
    assert decide(req, [r1, r2, r3], mem, now, cfg).replica_id == "r3"  # in a device slot
    assert decide(req, [r1, r2], mem, now, cfg).replica_id == "r2"  # in host memory
    assert decide(RoutingRequest(prefix), [r1, r2, r3], mem, now, cfg).replica_id == "r1"  # base: prefix rule
    assert decide(RoutingRequest(prefix, lora_id=9), [r1, r2, r3], mem, now, cfg).replica_id == "r1"
    busy = ReplicaStats("r3", 40, 10, timestamp=now, lora_resident=frozenset({7}))
    d = decide(req, [r1, busy], mem, now, cfg)
    assert d.replica_id == "r1" and d.reason == "imbalance"  # holding the adapter does not overload a replica


def test_routing_summary_carries_the_adapter_ids():
    from types import SimpleNamespace

    engine = SimpleNamespace(
        stats=lambda: SimpleNamespace(num_running=1, num_waiting=0, kv_cache_usage=0.1,
                                      lora_resident_ids=(7,), lora_known_ids=(7, 8)),
        cached_block_hash_ids=lambda: [1, 2])
    stats = ReplicaStats.from_summary("r", routing_summary(engine))
    assert stats.lora_resident == {7} and stats.lora_known == {7, 8} and stats.block_hash_ids == {1, 2}


# -- config and CLI ---------------------------------------------------------------------------


def test_lora_keys_of_a_model_entry():
    (m,) = parse_app_args({"models": [{"model": "m", "enable_lora": True, "max_loras": 4, "max_lora_rank": 32,
                                       "lora_modules": ["a=/p/a", {"name": "b", "path": "/p/b"}]}]}).models
    assert m.lora_modules == (("a", "/p/a"), ("b", "/p/b"))
    assert {k: v for k, v in m.engine_kwargs().items() if "lora" in k} == {
        "enable_lora": True, "max_loras": 4, "max_lora_rank": 32}  # lora_modules is the replica's
    for entry, match in [({"lora_modules": ["a=/x"]}, "needs enable_lora"),
                         ({"enable_lora": True, "lora_modules": ["nameonly"]}, "NAME=PATH"),
                         ({"enable_lora": True, "lora_modules": ["a=/x", "a=/y"]}, "given twice"),
                         ({"enable_lora": True, "max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras must be >= 4")]:
        with pytest.raises(ValueError, match=match):
            parse_app_args({"models": [{"model": "m", **entry}]})


def test_cli_flags_reach_the_model_entry():
    from fleetlm.cluster.cli import build_parser

    parser = build_parser()
    ns = parser.parse_args(["serve", "m", "--enable-lora", "--max-loras", "8", "--max-lora-rank", "16",
                            "--max-cpu-loras", "100", "--lora-modules", "a=/p/a", "b=/p/b"])
    assert (ns.enable_lora, ns.max_loras, ns.max_lora_rank, ns.max_cpu_loras) == (True, 8, 16, 100)
    assert ns.lora_modules == ["a=/p/a", "b=/p/b"]


def test_the_adapter_travels_with_a_migrated_request_into_the_engine():
    """A sequence moved to another replica continues with its adapter (and the replica passes it on)."""
    from types import SimpleNamespace

    from fleetlm.cluster.messages import GenerateRequest
    from fleetlm.cluster.migration import SequenceProgress, continuation
    from fleetlm.cluster.replica import LLMReplica
    from fleetlm.engine.lora import LoRARequest
    from fleetlm.engine.outputs import CompletionOutput, RequestOutput
    from fleetlm.engine.sampling_params import SamplingParams

    lora = LoRARequest("sql", 7, "/adapters/sql")
    req = GenerateRequest("cmpl-1-0", [9, 8], SamplingParams(max_tokens=4), lora_request=lora)
    moved = continuation(req, SequenceProgress(0, 0, token_ids=[4], text_len=1), 1, 1)
    assert moved.lora_request is lora and moved.resume_token_ids == (4,)

    class Engine:
        config = SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=2), cache=SimpleNamespace(block_size=4))
        model_config = SimpleNamespace(max_model_len=64, vocab_size=100)
        tokenizer = SimpleNamespace(decode=lambda ids, **kw: "x" * len(ids))
        calls = []

        def stats(self):
            return SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0)

        async def generate(self, prompt, params, request_id, prior_output_token_ids=None, coalesce_s=None,
                           lora_request=None):
            self.calls.append((request_id, prior_output_token_ids, lora_request))
            yield RequestOutput(request_id, None, list(prompt),
                                [CompletionOutput(0, "z", [42], finish_reason="length")], finished=True)

    engine = Engine()
    replica = LLMReplica(ModelDeploymentConfig(model="m"), max_queued_requests=4, engine=engine)

    async def go():
        return [c async for c in replica.generate(moved)]

    chunks = run(go())
    assert chunks[-1].finished and engine.calls == [("cmpl-1-0.m1", [4], lora)]


def test_openapi_documents_the_lora_routes_where_lora_is_on():
    async def go():
        _, c = make([Backend()], enable_lora=True)
        paths = (await c.get("/openapi.json", headers=AUTH)).json()["paths"]
        assert {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} <= set(paths)
        body = paths["/v1/load_lora_adapter"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["required"] == ["lora_name", "lora_path"]
        _, c = make([Backend()])
        assert "/v1/load_lora_adapter" not in (await c.get("/openapi.json", headers=AUTH)).json()["paths"]
    run(go())
