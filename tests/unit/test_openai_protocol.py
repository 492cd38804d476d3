"""OpenAI request validation, limits, response shapes, replica deltas, and the HTTP
layer (``OpenAIServer``) over fake model backends: no Ray, no model, milliseconds."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from fleetlm.cluster import errors
from fleetlm.cluster.backend import map_exception
from fleetlm.cluster.chat import ChatCompletionRequest, chat_logprobs
from fleetlm.cluster.completions import CompletionRequest, completion_logprobs
from fleetlm.cluster.errors import OpenAIError
from fleetlm.cluster.messages import ChoiceDelta, GenerateChunk, ModelInfo, ReplicaError, ReplicaHealth, TokenLogprob
from fleetlm.cluster.migration import MigratingJob
from fleetlm.cluster.protocol import parse_request
from fleetlm.cluster.deltas import DeltaTracker
from fleetlm.cluster.server import OpenAIServer, create_app
from fleetlm.cluster.serve_config import ServeAppConfig
from fleetlm.engine.outputs import CompletionOutput, Logprob, RequestOutput
from fleetlm.engine.sampling_params import SamplingParams

CHAT = [{"role": "user", "content": "hi"}]


def _err(cls, body) -> OpenAIError:
    with pytest.raises(OpenAIError) as ei:
        parse_request(cls, body)
    assert ei.value.status_code == 400
    return ei.value


# --- request validation --------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "stop": {"a": 1}}, "stop"),
    ({"prompt": "x", "seed": "1"}, "seed"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "echo": 1}, "echo"),
    ({"prompt": "x", "max_token": 5}, "max_token"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "min_p": 1.5}, "min_p"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "x", "model": 3}, "model"),
])
def test_completion_request_rejects(body, param):
    assert _err(CompletionRequest, body).param == param


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),  # a tool message without tool_call_id
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [CHAT[0], {"role": "user"}]}, "messages[1].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": CHAT, "logprobs": 1}, "logprobs"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": CHAT, "temperature": float("nan")}, "temperature"),
])
def test_chat_request_rejects(body, param):
    assert _err(ChatCompletionRequest, body).param == param


def test_non_object_body_is_400_without_param():
    for body in ([1, 2], "x", 3, None):
        assert _err(CompletionRequest, body).param is None


def test_accepts_openai_shapes_and_nulls():
    r = parse_request(CompletionRequest, {"prompt": [[1, 2], [3]], "n": None, "stop": None, "max_tokens": None,
                                          "logit_bias": {"7": -100}, "suffix": None, "user": "u"})
    assert r.prompts() == [[1, 2], [3]]
    assert r.logit_bias == {7: -100.0}
    assert parse_request(CompletionRequest, {"prompt": [1, 2]}).prompts() == [[1, 2]]
    assert parse_request(CompletionRequest, {"prompt": ["a", "b"]}).prompts() == ["a", "b"]
    c = parse_request(ChatCompletionRequest, {
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
                     {"role": "user", "content": "hi", "name": "bob"}],
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "tool_choice": "none",
        "metadata": {"k": "v"}, "store": False})
    assert c.template_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert c.include_usage


# --- limits ---------------------------------------------------------------------

LIMITS = ServeAppConfig(max_n=4, max_logprobs=5, max_stop_sequences=2, max_stop_length=8)


@pytest.mark.parametrize("cls, ok, bad, param", [
    (CompletionRequest, {"prompt": "x", "n": 4}, {"prompt": "x", "n": 5}, "n"),
    (CompletionRequest, {"prompt": "x", "logprobs": 5}, {"prompt": "x", "logprobs": 6}, "logprobs"),
    (ChatCompletionRequest, {"messages": CHAT, "logprobs": True, "top_logprobs": 5},
     {"messages": CHAT, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    (CompletionRequest, {"prompt": "x", "stop": ["a", "b"]}, {"prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
    (CompletionRequest, {"prompt": "x", "stop": "a" * 8}, {"prompt": "x", "stop": "a" * 9}, "stop"),
    (CompletionRequest, {"prompt": ["a"] * 256, "n": 4}, {"prompt": ["a"] * 257}, "prompt"),
    (CompletionRequest, {"prompt": "x", "max_tokens": 3, "min_tokens": 3},
     {"prompt": "x", "max_tokens": 3, "min_tokens": 4}, "min_tokens"),
])
def test_limits_at_limit_and_one_over(cls, ok, bad, param):
    parse_request(cls, ok).check_limits(LIMITS)
    with pytest.raises(OpenAIError) as ei:
        parse_request(cls, bad).check_limits(LIMITS)
    assert (ei.value.status_code, ei.value.param) == (400, param)


def test_resolve_max_tokens():
    comp = parse_request(CompletionRequest, {"prompt": "x"})
    chat = parse_request(ChatCompletionRequest, {"messages": CHAT})
    assert comp.resolve_max_tokens(10, 100, None) == 16
    assert comp.resolve_max_tokens(90, 100, None) == 10
    assert chat.resolve_max_tokens(10, 100, None) == 90
    assert chat.resolve_max_tokens(10, 100, 32) == 32
    with pytest.raises(OpenAIError) as ei:
        chat.resolve_max_tokens(100, 100, None)
    assert ei.value.param == "messages"
    with pytest.raises(OpenAIError) as ei:
        comp.resolve_max_tokens(101, 100, None)
    assert ei.value.param == "prompt"
    explicit = parse_request(ChatCompletionRequest, {"messages": CHAT, "max_completion_tokens": 91})
    assert parse_request(ChatCompletionRequest, {"messages": CHAT, "max_completion_tokens": 90}).resolve_max_tokens(
        10, 100, None) == 90
    with pytest.raises(OpenAIError) as ei:
        explicit.resolve_max_tokens(10, 100, None)
    assert ei.value.param == "max_completion_tokens"
    with pytest.raises(OpenAIError) as ei:
        parse_request(CompletionRequest, {"prompt": "x", "max_tokens": 33}).resolve_max_tokens(1, 100, 32)
    assert ei.value.param == "max_tokens"


def test_sampling_kwargs_build_sampling_params():
    req = parse_request(ChatCompletionRequest, {
        "messages": CHAT, "n": 2, "temperature": 0.5, "top_p": 0.9, "stop": "x", "seed": 7,
        "presence_penalty": 0.1, "frequency_penalty": 0.2, "top_k": 0, "min_p": 0.05,
        "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True, "logprobs": True, "top_logprobs": 3})
    sp = SamplingParams(**req.sampling_kwargs(12))
    assert (sp.n, sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.seed) == (2, 12, 0.5, 0.9, 0, 0.05, 7)
    assert (sp.stop, sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (["x"], 0.1, 0.2, 1.1)
    assert (sp.min_tokens, sp.ignore_eos, sp.logprobs) == (2, True, 3)
    plain = SamplingParams(**parse_request(ChatCompletionRequest, {"messages": CHAT}).sampling_kwargs(5))
    assert (plain.temperature, plain.logprobs, plain.seed, plain.stop) == (1.0, None, None, [])
    no_top = parse_request(ChatCompletionRequest, {"messages": CHAT, "logprobs": True})
    assert no_top.sampling_kwargs(5)["logprobs"] == 0


def test_logprob_shapes():
    entries = [TokenLogprob(5, "He", -0.5, [(5, "He", -0.5), (6, "Hi", -1.5)]),
               TokenLogprob(7, "llo", -0.25, [(7, "llo", -0.25)])]
    assert completion_logprobs(entries, 3) == {
        "tokens": ["He", "llo"], "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"He": -0.5, "Hi": -1.5}, {"llo": -0.25}], "text_offset": [3, 5]}
    content = chat_logprobs(entries)["content"]
    assert content[0] == {"token": "He", "logprob": -0.5, "bytes": [72, 101], "top_logprobs": [
        {"token": "He", "logprob": -0.5, "bytes": [72, 101]}, {"token": "Hi", "logprob": -1.5, "bytes": [72, 105]}]}


def test_error_body_shape():
    e = errors.queue_full(3)
    assert (e.status_code, e.headers["Retry-After"]) == (429, "3")
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}
    assert errors.model_not_found("m").body()["error"]["param"] == "model"


# --- replica deltas --------------------------------------------------------------

def _out(texts, ids, finished=False, reasons=None, logprobs=None):
    return RequestOutput(
        request_id="r", prompt=None, prompt_token_ids=[1, 2, 3], finished=finished, num_cached_tokens=2,
        outputs=[CompletionOutput(i, t, list(x), logprobs=(logprobs[i] if logprobs else None),
                                  finish_reason=(reasons[i] if reasons else None))
                 for i, (t, x) in enumerate(zip(texts, ids))])


def test_delta_tracker_sends_only_new_text_tokens_and_logprobs():
    lp = lambda tid, r: {tid: Logprob(-0.1 * r, r, f"t{tid}")}  # noqa: E731
    tr = DeltaTracker(num_logprobs=1)
    c, n = tr.update(_out(["He", ""], [[10], []], logprobs=[[lp(10, 1)], []]))
    assert n == 1 and [(d.index, d.text, d.token_ids) for d in c.choices] == [(0, "He", [10])]
    assert c.choices[0].logprobs == [TokenLogprob(10, "t10", -0.1, [(10, "t10", -0.1)])]
    assert (c.num_prompt_tokens, c.num_cached_tokens) == (3, 2)
    c, n = tr.update(_out(["Hello", "A"], [[10, 11], [20]], logprobs=[[lp(10, 1), lp(11, 2)], [lp(20, 1)]]))
    assert n == 2
    assert [(d.index, d.text, d.token_ids) for d in c.choices] == [(0, "llo", [11]), (1, "A", [20])]
    assert c.choices[0].logprobs[0].top == []  # rank 2 is outside top-1
    c, n = tr.update(_out(["Hello", "A"], [[10, 11], [20]], finished=True, reasons=["stop", "length"],
                          logprobs=[[lp(10, 1), lp(11, 2)], [lp(20, 1)]]))
    assert n == 0 and [(d.index, d.text, d.finish_reason) for d in c.choices] == [(0, "", "stop"), (1, "", "length")]
    assert c.finished


# --- the HTTP layer over fake backends -------------------------------------------

class FakeTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(ch) % 100 for ch in text]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [1] + [t for m in messages for t in self.encode(m["content"])] + [2]


class FakeStream:
    def __init__(self, chunks, delay=0.0):
        self.chunks, self.delay, self.i, self.cancelled = list(chunks), delay, 0, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.i >= len(self.chunks):
            raise StopAsyncIteration
        await asyncio.sleep(self.delay)
        self.i += 1
        return self.chunks[self.i - 1]

    def cancel(self):
        self.cancelled = True


def _text_chunks(req, words=("Hel", "lo", "!")):
    n = req.params.n
    out = []
    for j, w in enumerate(words):
        last = j == len(words) - 1
        out.append(GenerateChunk(
            choices=[ChoiceDelta(i, w, [40 + j], [TokenLogprob(40 + j, w, -0.5, [(40 + j, w, -0.5)])]
                                 if req.params.logprobs is not None else None,
                                 "length" if last else None) for i in range(n)],
            num_prompt_tokens=len(req.prompt_token_ids), num_cached_tokens=1, finished=last))
    return out


class FakeBackend:
    def __init__(self, name="m", max_model_len=64, healthy=True, script=None, delay=0.0):
        self.name, self.max_model_len, self.healthy, self.script, self.delay = name, max_model_len, healthy, script, delay
        self.streams: list[FakeStream] = []
        self.requests = []

    async def info(self):
        return ModelInfo(self.name, self.max_model_len, 4, 100, FakeTokenizer())

    def cached_info(self):
        return None

    def generate(self, req):
        self.requests.append(req)
        s = FakeStream(self.script(req) if self.script else _text_chunks(req), self.delay)
        self.streams.append(s)
        return s

    async def health(self):
        return [ReplicaHealth("r1", True), ReplicaHealth("r2", self.healthy, "" if self.healthy else "stuck")]

    async def metrics(self):
        return []


def _client(backend=None, **cfg):
    backend = backend or FakeBackend()
    server = OpenAIServer(ServeAppConfig(**cfg), {backend.name: backend}, replica="i0")
    transport = httpx.ASGITransport(app=create_app(server))
    return server, backend, httpx.AsyncClient(transport=transport, base_url="http://t")


def _run(coro):
    return asyncio.run(coro)


def test_http_completion_and_chat_non_streaming():
    async def go():
        _, backend, c = _client()
        r = await c.post("/v1/completions", json={"model": "m", "prompt": ["ab", "c"], "n": 2, "logprobs": 1,
                                                  "max_tokens": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
        assert body["choices"][0]["text"] == "Hello!" and body["choices"][0]["finish_reason"] == "length"
        assert body["choices"][0]["logprobs"]["text_offset"] == [0, 3, 5]
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15,
                                 "prompt_tokens_details": {"cached_tokens": 2}}
        assert [r.prompt_token_ids for r in backend.requests] == [[97, 98], [99]]
        assert backend.requests[0].params.max_tokens == 3
        r = await c.post("/v1/chat/completions", json={"messages": CHAT, "logprobs": True, "top_logprobs": 1})
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
        assert len(body["choices"][0]["logprobs"]["content"]) == 3
        assert backend.requests[-1].params.max_tokens == 64 - 4  # chat default: the room left
        assert backend.requests[-1].block_hash_ids  # 4 prompt tokens = one full block of 4
        r = await c.post("/v1/completions", content=rb'{"prompt": "\ud83d\ude00", "echo": true}')
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("\U0001f600")
        r = await c.post("/v1/completions", json={"prompt": [3, 4], "echo": True})
        assert r.json()["choices"][0]["text"] == "DEHello!"
        assert (await c.get("/v1/models")).json()["data"][0]["id"] == "m"
    _run(go())


def _events(text):
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(e[len("data: "):]) for e in text.strip().split("\n\n")[:-1]]


def test_http_streaming_sse_and_usage():
    async def go():
        _, _, c = _client()
        r = await c.post("/v1/chat/completions", json={"messages": CHAT, "stream": True, "n": 2,
                                                       "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev = _events(r.text)
        assert [e["choices"][0]["delta"] for e in ev[:2]] == [{"role": "assistant", "content": ""}] * 2
        text = {0: "", 1: ""}
        for e in ev[2:-1]:
            assert e["object"] == "chat.completion.chunk" and e["usage"] is None
            text[e["choices"][0]["index"]] += e["choices"][0]["delta"].get("content", "")
        assert text == {0: "Hello!", 1: "Hello!"}
        assert ev[-1]["choices"] == [] and ev[-1]["usage"]["completion_tokens"] == 6
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True, "echo": True})
        ev = _events(r.text)
        assert "usage" not in ev[0]
        assert "".join(e["choices"][0]["text"] for e in ev) == "xHello!"
        assert ev[-1]["choices"][0]["finish_reason"] == "length"
    _run(go())


@pytest.mark.parametrize("make_request, status, param", [
    (lambda c: c.post("/v1/completions", content=b"{not json"), 400, None),
    (lambda c: c.post("/v1/completions", content=b'{"prompt": "\xff\xfe"}'), 400, None),
    (lambda c: c.post("/v1/completions", content=b""), 400, None),
    (lambda c: c.post("/v1/completions", content=rb'{"prompt": "a\ud800"}'), 400, None),
    (lambda c: c.post("/v1/completions", content=rb'{"model": "m\ud800", "prompt": "x"}'), 400, None),
    (lambda c: c.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model"),
    (lambda c: c.post("/v1/completions", json={"prompt": "x" * 64}), 400, "prompt"),
    (lambda c: c.post("/v1/completions", json={"prompt": [100]}), 400, "prompt"),
    (lambda c: c.post("/v1/completions", json={"prompt": "x", "max_tokens": 64}), 400, "max_tokens"),
    (lambda c: c.post("/v1/completions", content=b"x" * 2000), 413, None),
    (lambda c: c.post("/v1/completions", content=b"{}", headers={"content-length": "5000"}), 413, None),
    (lambda c: c.get("/v1/completions"), 405, None),
    (lambda c: c.get("/v2/nothing"), 404, None),
])
def test_http_errors_have_openai_bodies(make_request, status, param):
    async def go():
        _, _, c = _client(max_request_body_bytes=1000)
        r = await make_request(c)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
        ok = await c.post("/v1/completions", json={"prompt": "x"})
        assert ok.status_code == 200
    _run(go())


def test_http_auth():
    async def go():
        _, _, c = _client(api_key="sekret")
        assert (await c.post("/v1/completions", json={"prompt": "x"})).status_code == 401
        r = await c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (await c.get("/v1/models")).status_code == 401
        r = await c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
        # Probes and scrapers need no key.
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
    _run(go())


def test_http_health_and_draining():
    async def go():
        server, backend, c = _client()
        r = await c.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        backend.healthy = False
        r = await c.get("/health")
        assert r.status_code == 503 and r.json()["models"]["m"][1]["message"] == "stuck"
        backend.healthy = True
        server.start_draining()
        assert (await c.get("/health")).status_code == 503
        r = await c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert server.inflight == 0
    _run(go())


def test_http_echo_with_logprobs_scores_the_prompt_first():
    """echo + logprobs: the prompt's tokens and logprobs first (the first null), then the completion's,
    the same streamed as whole; the replica is asked for the prompt's logprobs."""
    def script(req):
        assert req.params.prompt_logprobs == req.params.logprobs == 1
        chunks = _text_chunks(req)
        ids = req.prompt_token_ids
        chunks[0].prompt_logprobs = [TokenLogprob(ids[0], "a", None)] + [
            TokenLogprob(t, "b", -1.0, [(t, "b", -1.0)]) for t in ids[1:]]
        return chunks

    async def go():
        _, backend, c = _client(FakeBackend(script=script))
        body = {"prompt": "ab", "echo": True, "logprobs": 1, "max_tokens": 3, "n": 2}
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        for ch in r.json()["choices"]:
            assert ch["text"] == "abHello!"
            assert ch["logprobs"] == {
                "tokens": ["a", "b", "Hel", "lo", "!"], "token_logprobs": [None, -1.0, -0.5, -0.5, -0.5],
                "top_logprobs": [None, {"b": -1.0}, {"Hel": -0.5}, {"lo": -0.5}, {"!": -0.5}],
                "text_offset": [0, 1, 2, 5, 7]}
        assert r.json()["usage"]["prompt_tokens"] == 2
        ev = _events((await c.post("/v1/completions", json={**body, "stream": True})).text)
        for k in (0, 1):
            mine = [e["choices"][0] for e in ev if e["choices"] and e["choices"][0]["index"] == k]
            assert mine[0]["text"] == "abHel" and mine[0]["logprobs"]["tokens"] == ["a", "b", "Hel"]
            merged = {key: [x for m in mine for x in m["logprobs"][key]] for key in mine[0]["logprobs"]}
            assert merged == r.json()["choices"][k]["logprobs"]
        # Without echo the prompt is not scored.
        await c.post("/v1/completions", json={"prompt": "ab", "logprobs": 1, "max_tokens": 3})
        assert backend.requests[-1].params.prompt_logprobs is None
    _run(go())


def test_replica_sends_the_prompts_logprobs_once():
    lp = lambda tid, r: {tid: Logprob(-0.1 * r, r, f"t{tid}")}  # noqa: E731
    tr = DeltaTracker(num_logprobs=0, num_prompt_logprobs=1, decode=lambda t: f"d{t}")
    out = _out(["He"], [[10]], logprobs=[[lp(10, 1)]])
    out.prompt_logprobs = [None, {2: Logprob(-0.5, 3, "t2"), 7: Logprob(-0.2, 1, "t7")}, lp(3, 1)]
    c, _ = tr.update(out)
    assert c.prompt_logprobs == [TokenLogprob(1, "d1", None), TokenLogprob(2, "t2", -0.5, [(7, "t7", -0.2)]),
                                 TokenLogprob(3, "t3", -0.1, [(3, "t3", -0.1)])]
    c, _ = tr.update(_out(["Hel"], [[10, 11]], logprobs=[[lp(10, 1), lp(11, 1)]]))
    assert c.prompt_logprobs is None
    # A one-token prompt: the engine scores nothing, the token still comes first.
    one = _out(["He"], [[10]], logprobs=[[lp(10, 1)]])
    one.prompt_token_ids = [5]
    c, _ = DeltaTracker(num_logprobs=0, num_prompt_logprobs=1, decode=lambda t: f"d{t}").update(one)
    assert c.prompt_logprobs == [TokenLogprob(5, "d5", None)]


def test_replica_errors_become_status_codes():
    def script(req):
        p = req.prompt_token_ids
        if p[0] == 1:
            return [GenerateChunk(error=ReplicaError("queue_full", "busy"))]
        if p[0] == 2:
            return [GenerateChunk(error=ReplicaError("invalid_request", "stop_token_ids must be < vocab"))]
        return [GenerateChunk(error=ReplicaError("unavailable", "engine died"))]

    async def go():
        _, _, c = _client(FakeBackend(script=script))
        r = await c.post("/v1/completions", json={"prompt": [1]})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        r = await c.post("/v1/completions", json={"prompt": [2], "stream": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"
        assert (await c.post("/v1/completions", json={"prompt": [3]})).status_code == 503
    _run(go())


def test_mid_stream_error_ends_with_error_event():
    def script(req):
        return _text_chunks(req)[:1] + [GenerateChunk(error=ReplicaError("unavailable", "engine died"))]

    async def go():
        _, _, c = _client(FakeBackend(script=script))
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": True})
        ev = _events(r.text)
        assert ev[0]["choices"][0]["text"] == "Hel"
        assert ev[-1]["error"]["code"] == "unavailable"
    _run(go())


async def _asgi_call(app, body: bytes, sent: list):
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("t", 80)}
    msgs = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if msgs:
            return msgs.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)


@pytest.mark.parametrize("stream", [True, False])
def test_cancelled_request_cancels_replica_streams(stream):
    """Ray Serve cancels the handler when the client goes away: every replica stream must be cancelled."""
    async def go():
        backend = FakeBackend(delay=0.05)
        server = OpenAIServer(ServeAppConfig(), {"m": backend})
        sent = []
        body = json.dumps({"prompt": ["a", "b"], "stream": stream}).encode()
        task = asyncio.ensure_future(_asgi_call(create_app(server), body, sent))
        await asyncio.sleep(0.08)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert len(backend.streams) == 2 and all(s.cancelled for s in backend.streams)
        assert server.inflight == 0 and not server._jobs
    _run(go())


def test_abort_inflight_ends_streams_with_error_event():
    async def go():
        backend = FakeBackend(delay=0.2)
        server, _, c = _client(backend)
        req = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "x", "stream": True}))
        while not server._jobs:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.25)
        assert server.abort_inflight() == 1
        r = await asyncio.wait_for(req, 5)
        ev = _events(r.text)
        assert ev[-1]["error"]["code"] == "draining"
        assert server.inflight == 0 and backend.streams[0].cancelled
    _run(go())


def test_job_merges_streams_and_close_cancels_unfinished():
    async def go():
        a = FakeStream([GenerateChunk(finished=True)])
        b = FakeStream([GenerateChunk(), GenerateChunk(finished=True)], delay=10)
        streams = iter([a, b])
        reqs = [SimpleNamespace(request_id=f"r-{i}", params=SamplingParams()) for i in range(2)]
        job = MigratingJob(lambda req: next(streams), reqs, 1, map_exception)
        i, chunk = await job.next()
        assert (i, chunk.finished) == (0, True)
        job.close()
        await asyncio.sleep(0)
        assert not a.cancelled and b.cancelled
    _run(go())


def test_metrics_endpoint_counts_ingress_errors():
    async def go():
        _, _, c = _client()
        await c.post("/v1/completions", json={"prompt": "x", "n": 0})
        text = (await c.get("/metrics")).text
        assert 'fleetlm_request_errors_total{model="",reason="invalid_request_error",replica="i0"} 1.0' in text
    _run(go())


# --- the replica over a fake engine ----------------------------------------------

class FakeEngine:
    """AsyncEngine's surface: generate yields cumulative outputs; abort is recorded."""

    def __init__(self, num_waiting=0, num_running=0, steps=3, delay=0.0, fail=None):
        self.num_waiting, self.num_running, self.steps, self.delay, self.fail = num_waiting, num_running, steps, delay, fail
        self.aborted: list[str] = []
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=2), cache=SimpleNamespace(block_size=4))
        self.model_config = SimpleNamespace(max_model_len=64, vocab_size=100)
        self.tokenizer = FakeTokenizer()

    def stats(self):
        return SimpleNamespace(num_running=self.num_running, num_waiting=self.num_waiting, kv_cache_usage=0.0,
                               prefix_cache_queried_tokens=0, prefix_cache_hit_tokens=0, num_preemptions=0)

    async def generate(self, prompt, params, request_id, coalesce_s=None):
        if self.fail is not None:
            raise self.fail
        for k in range(1, self.steps + 1):
            await asyncio.sleep(self.delay)
            done = k == self.steps
            yield _out(["ab"[:1] * k], [[7] * k], finished=done, reasons=["length"] if done else None)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def check_health(self):
        if self.fail is not None:
            raise RuntimeError("engine loop died")


def _replica(engine, max_queued=1):
    from fleetlm.cluster.replica import LLMReplica
    from fleetlm.cluster.serve_config import ModelDeploymentConfig

    return LLMReplica(ModelDeploymentConfig(), max_queued, engine=engine)


def _greq(rid="r1"):
    from fleetlm.cluster.messages import GenerateRequest

    return GenerateRequest(rid, [1, 2, 3], SamplingParams(max_tokens=3))


async def _drain_gen(agen):
    return [c async for c in agen]


def test_replica_streams_deltas_and_counts_metrics():
    rep = _replica(FakeEngine())
    chunks = _run(_drain_gen(rep.generate(_greq())))
    assert [c.choices[0].token_ids for c in chunks] == [[7], [7], [7]]
    assert chunks[-1].finished and chunks[-1].choices[0].finish_reason == "length"
    assert rep.engine.aborted == []
    text = "".join(str(s) for fam in rep.metrics_families() for s in fam.samples)
    assert "fleetlm_request_success_total" in text and "fleetlm_generation_tokens_total" in text
    assert rep.health().healthy and rep.model_info().max_model_len == 64


def test_replica_queue_full_and_invalid_request_are_in_band_errors():
    # 2 free seats take 2 of the 3 waiting at the next step: 1 is queued, the limit.
    rep = _replica(FakeEngine(num_waiting=3), max_queued=1)
    (chunk,) = _run(_drain_gen(rep.generate(_greq())))
    assert chunk.error.kind == "queue_full"
    rep = _replica(FakeEngine(fail=ValueError("stop_token_ids must be < 100")))
    (chunk,) = _run(_drain_gen(rep.generate(_greq())))
    assert (chunk.error.kind, chunk.error.message) == ("invalid_request", "stop_token_ids must be < 100")
    assert rep.engine.aborted == [] and rep._not_started == 0
    assert not rep.health().healthy


def test_replica_counts_a_burst_before_the_engine_sees_it():
    """Requests in flight without output count as queued beyond the free seats of the batch."""
    rep = _replica(FakeEngine(num_running=0), max_queued=1)
    rep._not_started = 2  # two just handed over, both fit in the 2 free seats
    assert rep.num_queued() == 0
    rep._not_started = 3
    assert rep.num_queued() == 1
    # Running requests still in their prefill have no output yet: not queued twice.
    rep = _replica(FakeEngine(num_running=2, num_waiting=1), max_queued=1)
    rep._not_started = 3  # 2 prefilling in the batch + 1 waiting
    assert rep.num_queued() == 1


def test_replica_cancelled_stream_aborts_engine_request():
    async def go():
        rep = _replica(FakeEngine(steps=100, delay=0.01))
        agen = rep.generate(_greq("gone"))
        task = asyncio.ensure_future(agen.__anext__())
        await task
        task = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0.005)
        task.cancel()  # what Ray Serve does when the ingress cancels the stream
        with pytest.raises(asyncio.CancelledError):
            await task
        assert rep.engine.aborted == ["gone"]
    _run(go())


# --- `fleetlm serve` flags and --config -> the app's args ----------------------------

def _cli(argv, environ=None):
    from fleetlm.cluster.cli import app_args_from_cli, build_parser

    return app_args_from_cli(build_parser().parse_args(["serve", *argv]), environ or {})


def test_cli_defaults_serve_the_embedded_model_on_localhost():
    from fleetlm.cluster.serve_config import parse_app_args

    args, http, proxy = _cli([])
    assert (args, http, proxy) == ({}, {"host": "127.0.0.1", "port": 8000}, None)
    assert parse_app_args(args).model_names == ("smollm2-135m-instruct",)


def test_cli_flags_and_env_key():
    args, http, _ = _cli(["--model", "m", "--device", "cpu", "--tensor-parallel-size", "2", "--min-replicas", "1",
                          "--max-replicas", "3", "--max-model-len", "512", "--max-queued-requests", "9",
                          "--host", "0.0.0.0", "--port", "9000"], {"FLEETLM_API_KEY": "k"})
    assert args == {"models": [{"model": "m", "device": "cpu", "tensor_parallel_size": 2, "max_model_len": 512,
                                "autoscaling": {"max_replicas": 3, "min_replicas": 1}}],
                    "api_key": "k", "max_queued_requests": 9}
    assert http == {"host": "0.0.0.0", "port": 9000}
    assert _cli(["--api-key", "flag"], {"FLEETLM_API_KEY": "env"})[0]["api_key"] == "flag"


def test_cli_config_file_and_overrides(tmp_path):
    from fleetlm.cluster.cli import CLIError

    cfg = tmp_path / "s.yaml"
    cfg.write_text("http_options: {host: 0.0.0.0, port: 8123}\napplications:\n  - name: fleetlm\n"
                   "    import_path: fleetlm.cluster.app:build_app\n    args:\n      models:\n"
                   "        - {model: m, autoscaling: {min_replicas: 1, max_replicas: 4}}\n      max_n: 2\n")
    args, http, _ = _cli(["--config", str(cfg), "--num-replicas", "2", "--port", "9"])
    assert args == {"models": [{"model": "m", "num_replicas": 2}], "max_n": 2}
    assert http == {"host": "0.0.0.0", "port": 9}
    bare = tmp_path / "bare.yaml"
    bare.write_text("max_n: 3\n")
    assert _cli(["--config", str(bare)])[0] == {"max_n": 3}
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: []\nhttp_optons: {}\n")
    with pytest.raises(CLIError, match="http_optons"):
        _cli(["--config", str(bad)])
    with pytest.raises(CLIError, match="not both"):
        _cli(["--num-replicas", "1", "--max-replicas", "2"])


def test_cli_unknown_config_key_exits_2_naming_it(tmp_path, capsys):
    from fleetlm.cluster.cli import main

    cfg = tmp_path / "typo.yaml"
    cfg.write_text("models:\n  - model: m\n    tensor_paralel_size: 2\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "tensor_paralel_size" in capsys.readouterr().err
