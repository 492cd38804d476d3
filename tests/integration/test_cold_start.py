"""Cold start through ``fleetlm serve`` (issue 19), on CPU with the embedded model.

- ``/health`` turns 200 only after the replica's warm-up: the moment it does,
  the replica already exports its start-up phases, warm-up included
  (``fleetlm_startup_seconds``), and ``/ready`` says the model is warm;
- the first request after ready is not slow: its time to first token (a chat
  request: the ingress renders the template, tokenizes, routes) is within a
  bounded ratio of the next ones' (generous on a shared CPU).
"""

from __future__ import annotations

import statistics
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_harness import MODEL, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ARGS = f"""\
      models:
        - model: {MODEL}
          device: cpu
          max_model_len: 512
          max_num_seqs: 4
          max_num_batched_tokens: 128
          num_replicas: 1
          warmup: true
"""
# Long enough that the chat template's shared system prompt is a small part of
# each prompt (later requests hit its blocks in the prefix cache, the first cannot).
QUESTION = ("Here is a list of rivers, mountains and cities that a traveller saw on a long journey "
            "through the north of the country in the spring, one after the other. ") * 3


def startup_phases(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=30).text
    return {s.labels["phase"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "fleetlm_startup_seconds" and s.labels.get("model") == MODEL}


def chat_ttft(http: httpx.Client, base: str, i: int) -> float:
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"Question {i}. {QUESTION} Which came first?"}]}
    t = time.perf_counter()
    with http.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - t
    raise AssertionError("no token arrived")


def test_ready_after_the_warmup_and_the_first_request_is_not_slow():
    with running_server(ARGS) as server:
        # /health has just said 200 for the first time.
        phases = startup_phases(server.url)
        assert phases.get("warmup", 0) > 0, phases
        assert {"process", "tokenizer", "workers", "load_weights", "kv_cache", "replica"} <= set(phases), phases
        ready = httpx.get(server.url + "/ready", timeout=30)
        assert ready.status_code == 200 and ready.json()["models"][MODEL]["warm"] is True, ready.text
        with httpx.Client() as http:
            ttfts = [chat_ttft(http, server.url, i) for i in range(6)]
        steady = statistics.median(ttfts[1:])
        print(f"first request after ready: TTFT {1e3 * ttfts[0]:.0f} ms, steady {1e3 * steady:.0f} ms "
              f"({ttfts[0] / steady:.2f}x); start-up {phases}")
        assert ttfts[0] <= 3 * steady, ttfts
