"""Hostile input against a real `fleetlm serve`: a schemathesis campaign over the server's
OpenAPI document, then a regression corpus of inputs that crashed other servers.

The server must answer every case with a status below 500 within a timeout, and keep
serving: a canary completion must succeed after every ``CANARY_EVERY`` cases and at
the end, and once the campaign is over the app must be idle and clean
(``/debug/invariants``: nothing running or waiting, every KV block back in the pool,
the ledger balanced: accepted == finished).

Schemathesis runs its three phases on every operation of the document: *examples*,
*coverage* (deterministic boundary and type-violation cases: each bound +-1, wrong
types, missing required fields, unexpected methods) and *fuzzing* (Hypothesis
generation in positive and negative modes, ``FUZZ_EXAMPLES`` draws per operation).
In CI the counts are kept small (about 3 minutes on 2 CPU cores);
``benchmarks/fuzz_campaign.py`` runs this same file with 1,000+ cases per generation
endpoint and a canary after every case, and commits the numbers
(``FLEETLM_FUZZ_EXAMPLES``, ``FLEETLM_FUZZ_CANARY_EVERY``, ``FLEETLM_FUZZ_REPORT``
are how it sets them; tests are the edge, they may read the environment).
"""

from __future__ import annotations


import collections
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import schemathesis
import hypothesis
import requests

from serve_harness import MODEL, running_server  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

KEY = "fuzz-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 128
VOCAB = 49152
BODY_LIMIT = 65536
# Small limits keep every valid generated request cheap on CPU (at most
# max_n x max_tokens_limit tokens per prompt) while every limit still has a
# boundary for the coverage phase to probe. Admission at the ingress matches
# the replica's own queue (4 seats + 16 waiting): a batch the replica could
# not take whole is refused before it starts, so no half-started batch leaves
# work behind that would make the next request wait.
ARGS = f"""\
      models:
        - model: {MODEL}
          device: cpu
          max_model_len: {MAX_MODEL_LEN}
          max_num_seqs: 4
          num_replicas: 1
          max_waiting_requests: 16
      max_queued_requests: 16
      max_n: 2
      max_logprobs: 2
      max_stop_sequences: 2
      max_stop_length: 8
      max_tokens_limit: 2
      max_request_body_bytes: {BODY_LIMIT}
"""

FUZZ_EXAMPLES = int(os.environ.get("FLEETLM_FUZZ_EXAMPLES", "25"))
CANARY_EVERY = int(os.environ.get("FLEETLM_FUZZ_CANARY_EVERY", "10"))
REPORT_PATH = os.environ.get("FLEETLM_FUZZ_REPORT")
# Record a failing case and go on (the campaign counts them all; the summary test fails).
KEEP_GOING = os.environ.get("FLEETLM_FUZZ_KEEP_GOING") == "1"
# Fewest cases the campaign must have sent to each generation endpoint.
MIN_CASES = int(os.environ.get("FLEETLM_FUZZ_MIN_CASES", "300"))
# No case may take longer than this: a valid request here generates at most 256 x 2 x 2 tokens.
REQUEST_TIMEOUT_S = 30.0
GENERATION_OPS = ("POST /v1/completions", "POST /v1/chat/completions")


@pytest.fixture(scope="module")
def server():
    with running_server(ARGS, api_key=KEY) as s:
        yield s


# --- bookkeeping ---------------------------------------------------------------


@dataclass
class Ledger:
    """What the campaign sent and got back, per operation; written out as the report."""

    cases: collections.Counter = field(default_factory=collections.Counter)
    statuses: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    phases: dict[str, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    seconds: collections.Counter = field(default_factory=collections.Counter)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    hangs: list[dict[str, Any]] = field(default_factory=list)
    negative_accepted: list[dict[str, Any]] = field(default_factory=list)
    bad_responses: list[str] = field(default_factory=list)  # KEEP_GOING: failed checks
    canaries: int = 0
    canary_failures: list[str] = field(default_factory=list)
    since_canary: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, Any]:
        return {
            "cases_per_operation": dict(self.cases),
            "total_cases": sum(self.cases.values()),
            "status_codes": {op: dict(sorted(c.items())) for op, c in self.statuses.items()},
            "phases_modes": {op: dict(sorted(c.items())) for op, c in self.phases.items()},
            "seconds_per_operation": {op: round(s, 2) for op, s in self.seconds.items()},
            "server_errors_5xx": len(self.server_errors),
            "server_error_samples": self.server_errors[:20],
            "hangs": len(self.hangs),
            "hang_samples": self.hangs[:20],
            "negative_cases_accepted_2xx": len(self.negative_accepted),
            "negative_accepted_samples": self.negative_accepted[:20],
            "failed_checks": len(self.bad_responses),
            "failed_check_samples": self.bad_responses[:20],
            "canary_requests": self.canaries,
            "canary_every_n_cases": CANARY_EVERY,
            "canary_failures": self.canary_failures[:20],
            "fuzzing_examples_per_operation": FUZZ_EXAMPLES,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "wall_seconds": round(time.monotonic() - self.started, 1),
        }


@pytest.fixture(scope="module")
def ledger():
    return Ledger()


def _canary(base: str, ledger: Ledger) -> None:
    """A plain completion must still work; a failure is recorded, then raised."""
    ledger.canaries += 1
    ledger.since_canary = 0
    try:
        r = httpx.post(base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 1},
                       headers=AUTH, timeout=REQUEST_TIMEOUT_S)
        ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
        detail = f"{r.status_code} {r.text[:200]}"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        ok, detail = False, repr(e)
    if not ok:
        ledger.canary_failures.append(detail)
    assert ok, f"canary failed after a fuzz case: {detail}"


def _describe(case: Any) -> dict[str, Any]:
    body = case.body if not isinstance(case.body, (bytes, bytearray)) else case.body[:500].decode("latin-1")
    text = json.dumps(body, default=repr)[:1000] if body is not None else None
    return {"operation": case.operation.label, "method": case.method, "phase": str(case.meta.phase.name),
            "mode": str(case.meta.generation.mode), "headers": {k: v[:80] for k, v in (case.headers or {}).items()},
            "query": case.query, "body": text}


def _header(r: Any, name: str) -> str:
    """A response header from httpx (str) or schemathesis (list of str) responses."""
    for k, v in r.headers.items():
        if k.lower() == name:
            return v[0] if isinstance(v, list) else v
    return ""


def _check_response(r: Any) -> None:
    """Shape of an answer below 500: an OpenAI error body for 4xx, a full answer for 200."""
    ctype = _header(r, "content-type")
    if 400 <= r.status_code < 500:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text[:500]
        if r.status_code == 429:
            assert int(_header(r, "retry-after")) >= 1
    elif r.status_code == 200 and ctype.startswith("text/event-stream"):
        events = [line[len("data: "):] for line in r.text.split("\n") if line.startswith("data: ")]
        assert not getattr(r, "stream_cut_short", False)
        assert events and events[-1] == "[DONE]", r.text[-500:]
        for e in events[:-1]:
            json.loads(e)
    elif r.status_code == 200 and ctype.startswith("application/json"):
        r.json()


# --- the campaign ----------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(server, ledger):
    """The server's own document (``/openapi.json``, behind the API key)."""
    assert httpx.get(server.url + "/openapi.json", timeout=30).status_code == 401
    _canary(server.url, ledger)  # a first request: the ingress then knows the vocabulary
    doc = httpx.get(server.url + "/openapi.json", headers=AUTH, timeout=30).json()
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["n"]["anyOf"][0]["maximum"] == 2 and props["max_tokens"]["anyOf"][0]["maximum"] == 2
    assert props["prompt"]["anyOf"][2]["items"]["maximum"] == VOCAB - 1
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.update(base_url=server.url, request_timeout=REQUEST_TIMEOUT_S)
    schema.config.max_stream_events = 1_000_000  # read every stream to its end
    # Valid key on every case (auth failures are test_serve_errors.py's); every mode.
    schema.config.generation.update(max_examples=FUZZ_EXAMPLES, database="none", with_security_parameters=False,
                                    unique_inputs=True)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck), print_blob=False)
def test_schemathesis_campaign(case, server, ledger):
    op = case.operation.label
    ledger.cases[op] += 1
    ledger.phases[op][f"{case.meta.phase.name}/{case.meta.generation.mode}"] += 1
    t0 = time.monotonic()
    try:
        # The valid key unless the case itself is about the Authorization header.
        headers = {} if "authorization" in {k.lower() for k in (case.headers or {})} else AUTH
        r = case.call(headers=headers, timeout=REQUEST_TIMEOUT_S)
    except requests.exceptions.Timeout:
        ledger.hangs.append(_describe(case))
        if KEEP_GOING:
            return
        raise AssertionError(f"no answer within {REQUEST_TIMEOUT_S} s: {_describe(case)}") from None
    finally:
        ledger.seconds[op] += time.monotonic() - t0
    ledger.statuses[op][r.status_code] += 1
    if r.status_code >= 500:
        ledger.server_errors.append({**_describe(case), "status": r.status_code, "response": r.text[:300]})
    elif 200 <= r.status_code < 300 and case.meta.generation.mode == "negative" and op in GENERATION_OPS:
        ledger.negative_accepted.append({**_describe(case), "status": r.status_code})
    try:
        assert r.status_code < 500, f"{r.status_code} {r.text[:300]} for {_describe(case)}"
        _check_response(r)
        ledger.since_canary += 1
        if ledger.since_canary >= CANARY_EVERY:
            _canary(server.url, ledger)
    except AssertionError as e:
        if not KEEP_GOING:
            raise
        ledger.bad_responses.append(f"{e}"[:500])


def _wait_idle(base: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """``/debug/invariants`` once the app is idle and clean (or the last report after the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        d = httpx.get(base + "/debug/invariants", headers=AUTH, timeout=30).json()
        if d["ok"] or time.monotonic() > deadline:
            return d
        time.sleep(0.2)


def test_campaign_summary(server, ledger):
    """After the campaign: enough cases, none 5xx or hung, canary fine, engine idle."""
    try:
        _canary(server.url, ledger)
    except AssertionError:
        pass  # recorded in ledger.canary_failures, asserted below after the report is written
    idle = _wait_idle(server.url)
    summary = ledger.summary()
    summary["invariants_after"] = idle
    print(json.dumps(summary, indent=1)[:6000], file=sys.stderr)
    if REPORT_PATH:
        with open(REPORT_PATH, "w") as f:
            json.dump(summary, f, indent=2)
    for op in GENERATION_OPS:
        assert ledger.cases[op] >= MIN_CASES, (op, ledger.cases[op])
    assert not ledger.server_errors, ledger.server_errors[:5]
    assert not ledger.hangs, ledger.hangs[:5]
    assert not ledger.canary_failures
    assert not ledger.bad_responses, ledger.bad_responses[:5]
    assert idle["ok"], idle


# --- the regression corpus ----------------------------------------------------------

CHAT = [{"role": "user", "content": "Hi"}]


def _nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


# (id, path, httpx kwargs, status, param or None (any)). Each case is followed by a
# normal request. Sources: crash reports against vLLM, SGLang, TGI, llama.cpp and
# Ollama (OOV logit_bias, tiny temperature, float top_k, min_tokens > max_tokens,
# surrogates, huge n, deep JSON, huge integer literals...).
CORPUS = [
    ("empty-prompt", "/v1/completions", {"json": {"prompt": ""}}, 400, "prompt"),
    ("empty-prompt-list", "/v1/completions", {"json": {"prompt": []}}, 400, "prompt"),
    ("empty-token-list-in-batch", "/v1/completions", {"json": {"prompt": [[1, 2], []]}}, 400, "prompt"),
    ("empty-string-in-batch", "/v1/completions", {"json": {"prompt": ["a", ""]}}, 400, "prompt"),
    ("whitespace-prompt", "/v1/completions", {"json": {"prompt": " ", "max_tokens": 1}}, 200, None),
    ("nul-char-prompt", "/v1/completions", {"json": {"prompt": "\u0000", "max_tokens": 1}}, 200, None),
    ("empty-chat-content", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": ""}], "max_tokens": 1}}, 200, None),
    ("empty-content-parts", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": []}], "max_tokens": 1}}, 200, None),
    ("max-tokens-0-echo-logprobs", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 0, "echo": True, "logprobs": 1}}, 400, "max_tokens"),
    ("echo-logprobs", "/v1/completions",  # the prompt scored too (issue 13's follow-up: no longer refused)
     {"json": {"prompt": "x", "max_tokens": 1, "echo": True, "logprobs": 1}}, 200, None),
    ("echo-token-ids", "/v1/completions",
     {"json": {"prompt": [1, 2, 3], "max_tokens": 1, "echo": True}}, 200, None),
    ("logprobs-0", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 1, "logprobs": 0}}, 200, None),
    ("top-logprobs-0-without-logprobs", "/v1/chat/completions",
     {"json": {"messages": CHAT, "max_tokens": 1, "top_logprobs": 0}}, 200, None),
    ("logit-bias-oov", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 1, "logit_bias": {str(VOCAB): 5}}}, 400, "logit_bias"),
    ("logit-bias-huge-id", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 1, "logit_bias": {"9" * 40: 5}}}, 400, "logit_bias"),
    ("logit-bias-negative-id", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 1, "logit_bias": {"-1": 5}}}, 400, "logit_bias"),
    ("logit-bias-superscript-digit", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 1, "logit_bias": {"\u00b2": 5}}}, 400, "logit_bias"),
    ("logit-bias-out-of-range", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 1, "logit_bias": {"1": 101}}}, 400, "logit_bias"),
    ("logit-bias-ban-many", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 2, "logit_bias": {str(i): -100 for i in range(1500)}}}, 200, None),
    ("top-k-tiny-float", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 1, "top_k": 1e-9}}, 400, "top_k"),
    ("top-k-integral-float", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 1, "top_k": 2.0}}, 400, "top_k"),
    ("top-k-huge", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 1, "top_k": 2**62}}, 200, None),
    ("temperature-1e-5", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 2, "temperature": 1e-5}}, 200, None),
    ("temperature-denormal", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 2, "temperature": 5e-324}}, 200, None),
    ("top-p-denormal", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 2, "top_p": 5e-324}}, 200, None),
    ("min-p-1", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 2, "min_p": 1.0}}, 200, None),
    ("repetition-penalty-denormal", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 2, "repetition_penalty": 5e-324}}, 200, None),
    ("min-tokens-over-max-tokens", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 1, "min_tokens": 2}}, 400, "min_tokens"),
    ("min-tokens-over-default-chat", "/v1/chat/completions",
     {"json": {"messages": CHAT, "min_tokens": 100}}, 400, "min_tokens"),
    ("min-tokens-equal-max-ignore-eos", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 2, "min_tokens": 2}}, 200, None),
    ("prompt-one-token-over-context", "/v1/completions",
     {"json": {"prompt": [1] * MAX_MODEL_LEN, "max_tokens": 1}}, 400, "prompt"),
    ("prompt-at-context", "/v1/completions", {"json": {"prompt": [1] * (MAX_MODEL_LEN - 1), "max_tokens": 1}}, 200, None),
    ("prompt-plus-max-tokens-one-over", "/v1/completions",
     {"json": {"prompt": [1] * (MAX_MODEL_LEN - 1), "max_tokens": 2}}, 400, "max_tokens"),
    ("chat-over-context", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "word " * 200}]}}, 400, "messages"),
    ("huge-n", "/v1/completions", {"json": {"prompt": "x", "n": 10**9}}, 400, "n"),
    ("huge-n-bignum", "/v1/completions", {"json": {"prompt": "x", "n": 2**70}}, 400, "n"),
    ("huge-best-of", "/v1/completions", {"json": {"prompt": "x", "best_of": 10**6}}, 400, "best_of"),
    ("seed-max", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 1, "seed": 2**64 - 1}}, 200, None),
    ("seed-min", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 1, "seed": -(2**63)}}, 200, None),
    ("seed-overflow", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 1, "seed": 2**64}}, 400, "seed"),
    ("deep-json-array", "/v1/completions", {"content": b"[" * 20000 + b"]" * 20000}, 400, None),
    ("deep-json-in-field", "/v1/completions",
     {"content": ('{"prompt":"x","metadata":' + _nested(5000) + "}").encode()}, 400, None),
    ("nested-json-accepted-field", "/v1/completions",
     {"content": ('{"prompt":"x","max_tokens":1,"metadata":' + _nested(800) + "}").encode()}, 200, None),
    ("deep-json-in-messages", "/v1/chat/completions",
     {"content": ('{"messages":[{"role":"user","content":' + _nested(3000, '"x"') + "}]}").encode()}, 400, None),
    ("huge-integer-literal", "/v1/completions",
     {"content": b'{"prompt":"x","max_tokens":' + b"9" * 5000 + b"}"}, 400, None),
    ("float-overflow-literal", "/v1/completions",
     {"content": b'{"prompt":"x","temperature":1e400}'}, 400, "temperature"),
    ("nan-literal", "/v1/completions", {"content": b'{"prompt":"x","top_p":NaN}'}, 400, "top_p"),
    ("10mb-string", "/v1/completions", {"json": {"prompt": "x" * (10 << 20)}}, 413, None),
    ("10mb-string-chunked", "/v1/completions", {"chunked": json.dumps({"prompt": "y" * (10 << 20)}).encode()}, 413,
     None),
    ("invalid-utf8", "/v1/completions", {"content": b'{"prompt": "\xc3\x28"}'}, 400, None),
    ("overlong-utf8", "/v1/completions", {"content": b'{"prompt": "\xc0\xaf"}'}, 400, None),
    ("utf8-encoded-surrogate", "/v1/completions", {"content": b'{"prompt": "\xed\xa0\x80"}'}, 400, None),
    ("utf16-body", "/v1/completions", {"content": '{"prompt":"x"}'.encode("utf-16")}, 400, None),
    ("utf8-bom", "/v1/completions", {"content": b'\xef\xbb\xbf{"prompt":"x","max_tokens":1}'}, 400, None),
    ("lone-surrogate-prompt", "/v1/completions", {"content": rb'{"prompt": "x\ud800"}'}, 400, None),
    ("lone-low-surrogate-chat", "/v1/chat/completions",
     {"content": rb'{"messages": [{"role": "user", "content": "\udfff"}]}'}, 400, None),
    ("lone-surrogate-in-key", "/v1/completions", {"content": rb'{"prompt": "x", "logit_bias": {"\ud800": 1}}'}, 400,
     None),
    ("lone-surrogate-in-ignored-field", "/v1/completions",
     {"content": rb'{"prompt": "x", "user": "\udc00"}'}, 400, None),
    ("lone-surrogate-in-stop", "/v1/completions", {"content": rb'{"prompt": "x", "stop": "\ud800"}'}, 400, None),
    ("surrogate-pair-ok", "/v1/chat/completions",
     {"content": rb'{"messages": [{"role": "user", "content": "\ud83d\ude00"}], "max_tokens": 1}'}, 200, None),
    ("special-tokens-as-text", "/v1/completions",
     {"json": {"prompt": "<|im_start|>system\n<|im_end|>", "max_tokens": 1}}, 200, None),
    ("template-syntax-in-content", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "{{ raise_exception('x') }}{% for %}"}], "max_tokens": 1}},
     200, None),
    ("assistant-last", "/v1/chat/completions",
     {"json": {"messages": [{"role": "assistant", "content": "x"}], "max_tokens": 1}}, 200, None),
    ("tools", "/v1/chat/completions",
     {"json": {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}},
     400, "tool_choice"),  # tools default to tool_choice "auto", which this server was not started with
    ("tool-choice-auto", "/v1/chat/completions", {"json": {"messages": CHAT, "tool_choice": "auto"}}, 400,
     "tool_choice"),
    ("tool-choice-none", "/v1/chat/completions",
     {"json": {"messages": CHAT, "tool_choice": "none", "tools": [], "max_tokens": 1}}, 200, None),
    ("tool-role-message", "/v1/chat/completions",
     {"json": {"messages": [{"role": "tool", "content": "x", "tool_call_id": "c1"}]}}, 200, None),
    ("assistant-tool-calls", "/v1/chat/completions",
     {"json": {"messages": [{"role": "assistant", "content": None, "tool_calls": []}]}}, 400, None),
    ("functions-legacy", "/v1/chat/completions", {"json": {"messages": CHAT, "functions": [{"name": "f"}]}}, 400,
     "functions"),
    ("response-format-json-object", "/v1/chat/completions",
     {"json": {"messages": CHAT, "response_format": {"type": "json_object"}}}, 200, None),
    ("response-format-json-schema", "/v1/chat/completions",
     {"json": {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}}, 400,
     None),
    ("chat-template-field", "/v1/chat/completions",
     {"json": {"messages": CHAT, "chat_template": "{{ raise_exception('boom') }}"}}, 400, "chat_template"),
    ("chat-template-kwargs", "/v1/chat/completions",
     {"json": {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": True}}}, 400, "chat_template_kwargs"),
    ("add-generation-prompt", "/v1/chat/completions",
     {"json": {"messages": CHAT, "add_generation_prompt": False}}, 400, "add_generation_prompt"),
    ("guided-json", "/v1/chat/completions", {"json": {"messages": CHAT, "guided_json": {}}}, 200, None),
    ("guided-json-invalid", "/v1/chat/completions",
     {"json": {"messages": CHAT, "guided_json": {"type": "object", "required": "a"}}}, 400, "guided_json"),
    ("image-content-part", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}},
     400, "messages[0].content"),
    ("stop-empty-string", "/v1/completions", {"json": {"prompt": "x", "stop": [""]}}, 400, "stop"),
    ("stop-token-ids-negative", "/v1/completions", {"json": {"prompt": "x", "stop_token_ids": [-1]}}, 400,
     "stop_token_ids"),
    ("stream-n2-usage", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 2, "n": 2, "stream": True, "stream_options": {"include_usage": True}}},
     200, None),
    ("batch-larger-than-the-model", "/v1/completions", {"json": {"prompt": ["a"] * 21, "max_tokens": 1}}, 400,
     "prompt"),
    ("batch-at-the-model-size", "/v1/completions", {"json": {"prompt": ["a"] * 20, "max_tokens": 1}}, 200, None),
    ("batch-of-prompts", "/v1/completions", {"json": {"prompt": [[1, 2], [3], "ab"], "max_tokens": 1}}, 400,
     "prompt"),
    ("body-null", "/v1/completions", {"content": b"null"}, 400, None),
    ("content-type-text", "/v1/completions",
     {"content": b'{"prompt":"x"}', "headers": {"Content-Type": "text/plain"}}, 415, None),
    ("content-type-form", "/v1/chat/completions",
     {"content": b"messages=hi", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415, None),
    ("content-type-json-charset", "/v1/completions",
     {"content": b'{"prompt":"x","max_tokens":1}', "headers": {"Content-Type": "application/json; charset=utf-8"}},
     200, None),
    ("max-tokens-over-limit-shadowed", "/v1/chat/completions",
     {"json": {"messages": CHAT, "max_tokens": 5, "max_completion_tokens": 1}}, 400, "max_tokens"),
    ("logit-bias-non-ascii-digits", "/v1/completions",
     {"json": {"prompt": "x", "max_tokens": 1, "logit_bias": {"\u0661\u0662": 5}}}, 400, "logit_bias"),
    ("body-string", "/v1/chat/completions", {"content": b'"hello"'}, 400, None),
    ("duplicate-keys", "/v1/completions", {"content": b'{"prompt":"x","max_tokens":1,"max_tokens":2}'}, 200, None),
]


def _chunked(data: bytes):
    for i in range(0, len(data), 1 << 16):
        yield data[i:i + (1 << 16)]


def test_corpus_is_broad():
    assert len(CORPUS) >= 60
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("name, path, kwargs, status, param", CORPUS, ids=[c[0] for c in CORPUS])
def test_regression_corpus(server, ledger, name, path, kwargs, status, param):
    kwargs = dict(kwargs)
    if "chunked" in kwargs:  # no Content-Length: the size is only known by reading
        kwargs["content"] = _chunked(kwargs.pop("chunked"))
    headers = {**AUTH, "Content-Type": "application/json", **kwargs.pop("headers", {})}
    r = httpx.post(server.url + path, headers=headers, timeout=REQUEST_TIMEOUT_S, **kwargs)
    assert r.status_code == status, r.text[:500]
    _check_response(r)
    if status >= 400 and param is not None:
        assert r.json()["error"]["param"] == param, r.json()
    _canary(server.url, ledger)


def test_idle_after_corpus(server):
    d = _wait_idle(server.url)
    assert d["ok"], d
    led = d["ledger"][MODEL]
    assert led["accepted"] == sum(led["finished"].values()) > 0, led


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
