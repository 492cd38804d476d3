"""Two models in one Serve application, each its own deployment, routed on ``model`` (CPU).

The embedded model and the ``tiny-llama-8h4kv`` shape with random weights
(``load_format: dummy``) served under its own name ``tiny-llama-dummy``:
each answers under its name (completions and chat), a request with several
prompts gets every answer, an unknown name gets a 404 with OpenAI's error
body, and ``/v1/models`` lists both.
"""

from __future__ import annotations

import httpx
import pytest

from cluster_local import MODEL, deploy, local_serve, replica_counts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DUMMY = "tiny-llama-dummy"
ARGS = {
    "models": [
        {"model": MODEL, "device": "cpu", "max_model_len": 512, "max_num_seqs": 4,
         "cpu_kv_cache_bytes": 32 << 20, "num_replicas": 1},
        {"name": DUMMY, "model": "tiny-llama-8h4kv", "load_format": "dummy", "device": "cpu",
         "max_model_len": 256, "max_num_seqs": 4, "cpu_kv_cache_bytes": 8 << 20, "num_replicas": 1},
    ],
}


def test_two_models_each_answer_under_their_own_name():
    with local_serve() as url:
        deploy(url, ARGS)
        assert replica_counts() == {f"LLMReplica-{MODEL}": 1, f"LLMReplica-{DUMMY}": 1}
        with httpx.Client(base_url=url, timeout=120) as c:
            for name in (MODEL, DUMMY):
                r = c.post("/v1/completions", json={"model": name, "prompt": "Hello there",
                                                    "max_tokens": 3, "temperature": 0})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["model"] == name
                assert body["choices"][0]["finish_reason"] in ("stop", "length")
                assert body["usage"]["completion_tokens"] >= 1
                r = c.post("/v1/chat/completions", json={
                    "model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
                assert r.status_code == 200, r.text
                assert r.json()["model"] == name

            # Several prompts in one request: sub-requests that share Serve's request id,
            # each routed (prefix-aware router) and answered.
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["Hello", "Goodbye", "Hi"],
                                                "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
            assert [ch["index"] for ch in r.json()["choices"]] == [0, 1, 2]

            r = c.post("/v1/completions", json={"model": "no-such-model", "prompt": "Hi", "max_tokens": 1})
            assert r.status_code == 404
            err = r.json()["error"]
            assert set(err) >= {"message", "type", "param", "code"}
            assert "no-such-model" in err["message"]

            r = c.get("/v1/models")
            assert r.status_code == 200
            listed = [m["id"] for m in r.json()["data"]]
            assert sorted(listed) == sorted([MODEL, DUMMY])
