"""Bad requests against a real `fleetlm serve`: each gets its 4xx and an OpenAI error body,
and the server keeps serving. One server for the module, started from a Serve config
file (`--config`) with small limits and an API key from FLEETLM_API_KEY."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from serve_harness import running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "smollm2-135m-instruct"
# The README's command; `python -m` where the console script is not on PATH.
FLEETLM = ["fleetlm"] if shutil.which("fleetlm") else [sys.executable, "-m", "fleetlm.cluster.cli"]
KEY = "test-key-123"
MAX_MODEL_LEN = 256
VOCAB = 49152
ARGS = f"""\
      models:
        - model: {MODEL}
          device: cpu
          max_model_len: {MAX_MODEL_LEN}
          max_num_seqs: 2
          num_replicas: 1
      max_queued_requests: 1
      max_n: 4
      max_logprobs: 5
      max_stop_sequences: 4
      max_stop_length: 20
      max_request_body_bytes: 65536
"""


@pytest.fixture(scope="module")
def base():
    with running_server(ARGS, api_key=KEY) as server:
        yield server.url


AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Hi"}]
ANY = object()


def _chunked(data: bytes):
    for i in range(0, len(data), 8192):
        yield data[i:i + 8192]


# (id, method, path, httpx kwargs, status, param). Headers default to the valid key.
BAD_REQUESTS = [
    ("malformed-json", "POST", "/v1/completions", {"content": b'{"prompt": "x",'}, 400, None),
    ("invalid-utf8", "POST", "/v1/completions", {"content": b'{"prompt": "\xc3\x28"}'}, 400, None),
    ("empty-body", "POST", "/v1/completions", {"content": b""}, 400, None),
    ("array-body", "POST", "/v1/completions", {"json": [1, 2]}, 400, None),
    ("deep-nesting", "POST", "/v1/completions", {"content": b"[" * 20000 + b"]" * 20000}, 400, None),
    ("lone-surrogate", "POST", "/v1/completions", {"content": rb'{"prompt": "x\udc00y"}'}, 400, None),
    ("nan-literal", "POST", "/v1/completions", {"content": b'{"prompt": "x", "temperature": NaN}'}, 400, "temperature"),
    ("prompt-wrong-type", "POST", "/v1/completions", {"json": {"prompt": 42}}, 400, "prompt"),
    ("prompt-missing", "POST", "/v1/completions", {"json": {"max_tokens": 2}}, 400, "prompt"),
    ("max-tokens-string", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": "5"}}, 400, "max_tokens"),
    ("max-tokens-negative", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": -1}}, 400, "max_tokens"),
    ("max-tokens-zero", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 0}}, 400, "max_tokens"),
    ("max-tokens-huge", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 10**9}}, 400, "max_tokens"),
    ("max-tokens-bignum", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokens": 2**70}}, 400, "max_tokens"),
    ("max-completion-tokens-huge", "POST", "/v1/chat/completions",
     {"json": {"messages": CHAT, "max_completion_tokens": MAX_MODEL_LEN}}, 400, "max_completion_tokens"),
    ("n-zero", "POST", "/v1/completions", {"json": {"prompt": "x", "n": 0}}, 400, "n"),
    ("n-over-limit", "POST", "/v1/completions", {"json": {"prompt": "x", "n": 5}}, 400, "n"),
    ("temperature-negative", "POST", "/v1/completions", {"json": {"prompt": "x", "temperature": -1}}, 400, "temperature"),
    ("top-p-zero", "POST", "/v1/completions", {"json": {"prompt": "x", "top_p": 0}}, 400, "top_p"),
    ("top-p-over-one", "POST", "/v1/completions", {"json": {"prompt": "x", "top_p": 1.5}}, 400, "top_p"),
    ("presence-penalty-range", "POST", "/v1/completions", {"json": {"prompt": "x", "presence_penalty": 5}}, 400,
     "presence_penalty"),
    ("logprobs-over-limit", "POST", "/v1/completions", {"json": {"prompt": "x", "logprobs": 6}}, 400, "logprobs"),
    ("top-logprobs-over-limit", "POST", "/v1/chat/completions",
     {"json": {"messages": CHAT, "logprobs": True, "top_logprobs": 6}}, 400, "top_logprobs"),
    ("stop-list-too-long", "POST", "/v1/completions", {"json": {"prompt": "x", "stop": list("abcde")}}, 400, "stop"),
    ("stop-too-long", "POST", "/v1/completions", {"json": {"prompt": "x", "stop": "s" * 21}}, 400, "stop"),
    ("stop-token-id-outside-vocab", "POST", "/v1/completions",
     {"json": {"prompt": "x", "stop_token_ids": [VOCAB + 7]}}, 400, "stop_token_ids"),
    ("prompt-over-max-model-len", "POST", "/v1/completions",
     {"json": {"prompt": [1] * (MAX_MODEL_LEN + 1), "max_tokens": 1}}, 400, "prompt"),
    ("messages-over-max-model-len", "POST", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": "word " * 400}]}}, 400, "messages"),
    ("token-id-outside-vocab", "POST", "/v1/completions", {"json": {"prompt": [1, VOCAB + 1]}}, 400, "prompt"),
    ("empty-messages", "POST", "/v1/chat/completions", {"json": {"messages": []}}, 400, "messages"),
    ("messages-missing", "POST", "/v1/chat/completions", {"json": {"model": MODEL}}, 400, "messages"),
    ("unknown-role", "POST", "/v1/chat/completions",
     {"json": {"messages": [{"role": "wizard", "content": "hi"}]}}, 400, "messages[0].role"),
    ("content-wrong-type", "POST", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": 7}]}}, 400, "messages[0].content"),
    ("suffix", "POST", "/v1/completions", {"json": {"prompt": "x", "suffix": "y"}}, 400, "suffix"),
    ("unknown-field", "POST", "/v1/completions", {"json": {"prompt": "x", "max_tokenz": 3}}, 400, "max_tokenz"),
    ("stream-options-without-stream", "POST", "/v1/chat/completions",
     {"json": {"messages": CHAT, "stream_options": {"include_usage": True}}}, 400, "stream_options"),
    ("logit-bias-bad-key", "POST", "/v1/completions", {"json": {"prompt": "x", "logit_bias": {"a": 1}}}, 400,
     "logit_bias"),
    ("unknown-model", "POST", "/v1/completions", {"json": {"model": "gpt-17", "prompt": "x"}}, 404, "model"),
    ("missing-api-key", "POST", "/v1/completions", {"json": {"prompt": "x"}, "headers": {}}, 401, None),
    ("wrong-api-key", "POST", "/v1/chat/completions",
     {"json": {"messages": CHAT}, "headers": {"Authorization": "Bearer test-key-124"}}, 401, None),
    ("models-without-key", "GET", "/v1/models", {"headers": {}}, 401, None),
    ("oversize-body", "POST", "/v1/completions", {"json": {"prompt": "x" * 70000}}, 413, None),
    ("oversize-body-chunked", "POST", "/v1/completions",
     {"chunked": json.dumps({"prompt": "y" * 70000}).encode()}, 413, None),
    ("wrong-method", "GET", "/v1/completions", {}, 405, None),
    ("unknown-path", "POST", "/v1/embeddings", {"json": {"input": "x"}}, 404, None),
]


def _ok(http: httpx.Client, base: str) -> None:
    r = http.post(base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_table_has_at_least_30_cases():
    assert len(BAD_REQUESTS) >= 30


@pytest.mark.parametrize("name, method, path, kwargs, status, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(base, name, method, path, kwargs, status, param):
    kwargs = dict(kwargs)
    headers = kwargs.pop("headers", AUTH)
    if "chunked" in kwargs:  # no Content-Length: the size is only known by reading
        kwargs["content"] = _chunked(kwargs.pop("chunked"))
    with httpx.Client(timeout=60) as http:
        r = http.request(method, base + path, headers=headers, **kwargs)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert isinstance(err["message"], str) and err["message"]
        assert err["param"] == param, err
        if status == 401:
            assert err["code"] == "invalid_api_key"
        _ok(http, base)


def test_limits_at_the_limit_succeed(base):
    with httpx.Client(timeout=60, headers=AUTH) as http:
        cases = [
            ("/v1/completions", {"prompt": [1] * (MAX_MODEL_LEN - 1), "max_tokens": 1}),
            ("/v1/completions", {"prompt": "x", "n": 4, "max_tokens": 1}),
            ("/v1/completions", {"prompt": "x", "logprobs": 5, "max_tokens": 1}),
            ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 5, "max_tokens": 1}),
            ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "s" * 20], "max_tokens": 1}),
            ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 5, "max_tokens": 1}),
        ]
        for path, body in cases:
            r = http.post(base + path, json=body)
            assert r.status_code == 200, (body, r.text)
        # echo with logprobs scores the prompt: a one-token prompt's token comes first, unscored.
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["tokens"][0] == "x" and lp["token_logprobs"][0] is None and len(lp["tokens"]) == 2


def test_open_endpoints_need_no_key(base):
    assert httpx.get(base + "/health").status_code == 200
    r = httpx.get(base + "/metrics")
    assert r.status_code == 200 and "fleetlm_request_errors_total" in r.text
    assert httpx.get(base + "/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL


def test_queue_full_is_429_with_retry_after(base):
    """max_num_seqs=2, max_queued_requests=1: of 8 simultaneous long requests some must wait, the rest get 429."""
    body = {"prompt": "Count slowly:", "max_tokens": 48, "ignore_eos": True}

    def post(_):
        return httpx.post(base + "/v1/completions", json=body, headers=AUTH, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= 2
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
    with httpx.Client(timeout=60) as http:
        _ok(http, base)


def test_config_unknown_key_is_an_error_naming_it(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("models:\n  - model: smollm2-135m-instruct\n    tensor_paralel_size: 2\n")
    r = subprocess.run([*FLEETLM, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 2
    assert "tensor_paralel_size" in r.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
