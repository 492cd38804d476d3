"""Cache-aware scale-down: the replica holding a hot tenant's prefix survives, and so does its hit rate.

One model, autoscaled between 1 and 2 replicas, prefix-aware routing:

1. replica A runs alone; a "cold" tenant's request leaves a few prefix blocks in A's cache;
2. load (short prompts, nothing cached) makes Serve add replica B, the newest;
3. load gone, the hot tenant arrives (a long system prompt, several questions) while a long
   request of the cold tenant runs on A: the router sends the hot tenant's first request to
   the less loaded B, and the rest follow its prefix there;
4. Serve scales back to one replica. Ray's own choice would stop B (the newest replica on a
   node with no other); FleetLM's controller hook (cluster/scale_down.py) stops A instead,
   whose cache is small and, here, worth less;
5. the hot tenant's next request is served from cache: its prompt tokens hit as before.

The controller's log must show the swap ("stopping A instead of B"), so the test cannot
pass by Ray's luck.
"""

from __future__ import annotations

import concurrent.futures
import glob
import re
import threading
import time

import httpx
import openai
import pytest

from cluster_local import APP, MODEL, deploy, local_serve, replica_counts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HOT_SYSTEM = ("You are the assistant of Example Bank. Be exact and short. Accounts: checking, savings, "
              "business. Wire transfers take one day; card disputes take five. Branches open nine to five. ") * 4
COLD_SYSTEM = "You answer questions about the weather in one sentence."


def _per_replica(url: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == name and s.labels.get("model") == MODEL:
                out[s.labels["replica"]] = out.get(s.labels["replica"], 0.0) + s.value
    return out


def _chat(client: openai.OpenAI, system: str, question: str) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": question}])


def _wait(what: str, cond, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what} ({replica_counts()})"
        time.sleep(0.5)
    print(f"[scale-down] {what}", flush=True)


def test_scale_down_keeps_the_replica_with_the_hot_prefix():
    import ray

    t0 = time.monotonic()
    with local_serve(num_cpus=4) as url:
        deploy(url, {"models": [{"model": MODEL, "max_num_seqs": 8, "autoscaling": {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
            "upscale_delay_s": 1, "downscale_delay_s": 15, "look_back_period_s": 10}}]})
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        _wait("replica A running", lambda: replica_counts() == {f"LLMReplica-{MODEL}": 1}, 120)
        (a,) = _per_replica(url, "fleetlm_num_requests_running")
        _chat(client, COLD_SYSTEM, "Is it raining?")

        # Load over the target: Serve adds B. Prompts under one block and 3 new tokens: nothing cached.
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load) for _ in range(4)]
            _wait("replica B running", lambda: replica_counts() == {f"LLMReplica-{MODEL}": 2}, 300)
            _wait("B reports", lambda: len(_per_replica(url, "fleetlm_num_requests_running")) == 2, 60)
            stop.set()
            for f in futures:
                f.result(120)
        (b,) = set(_per_replica(url, "fleetlm_num_requests_running")) - {a}

        # The hot tenant: its first request goes to B, the less loaded replica while a long request
        # of the cold tenant runs on A (its prefix is there); the rest follow the hot prefix to B.
        time.sleep(3)  # the routers' counts of the load's requests settle
        hits_before = _per_replica(url, "fleetlm_prefix_cache_hit_tokens_total")
        started = threading.Event()

        def cold_long() -> None:
            for _ in client.chat.completions.create(
                    model=MODEL, max_tokens=48, stream=True, extra_body={"ignore_eos": True}, messages=[
                        {"role": "system", "content": COLD_SYSTEM}, {"role": "user", "content": "Tell me more."}]):
                started.set()

        cold = threading.Thread(target=cold_long, daemon=True)
        cold.start()
        assert started.wait(60)
        prompt_tokens = _chat(client, HOT_SYSTEM, "What is a wire transfer?").usage.prompt_tokens
        cold.join(120)
        for q in ("How long do disputes take?", "When are branches open?", "Which accounts exist?"):
            _chat(client, HOT_SYSTEM, q)
        hits = _per_replica(url, "fleetlm_prefix_cache_hit_tokens_total")
        gained = {r: hits.get(r, 0) - hits_before.get(r, 0) for r in (a, b)}
        # B: the hot prefix three times (the cold tenant's request also hit its prefix on A).
        assert gained[b] >= 3 * 0.8 * prompt_tokens and gained[a] < 0.5 * prompt_tokens, (gained, prompt_tokens)
        print(f"[scale-down] hot tenant on B ({b}); hit tokens gained {gained}", flush=True)

        # Load is gone: Serve goes back to one replica, and the one it keeps is B.
        time.sleep(3)  # B's routing summary (every 2 s) reaches the controller
        _wait("scaled down to one replica", lambda: replica_counts() == {f"LLMReplica-{MODEL}": 1}, 180)
        _wait("one replica reports", lambda: len(_per_replica(url, "fleetlm_num_requests_running")) == 1, 60)
        assert set(_per_replica(url, "fleetlm_num_requests_running")) == {b}, "the hot replica was stopped"

        # Ray would have stopped B: the controller logged the swap.
        session = ray._private.worker._global_node.get_session_dir_path()
        log = "".join(open(p, errors="replace").read() for p in glob.glob(f"{session}/logs/serve/controller_*.log"))
        swaps = re.findall(r"cache-aware scale-down of .*?: stopping \['([^']+)'\] instead of \['([^']+)'\]", log)
        assert swaps == [(a, b)], swaps

        # The hot tenant's hit rate stays: its next request finds its whole prefix cached.
        r = _chat(client, HOT_SYSTEM, "Can I open a business account?")
        cached = r.usage.prompt_tokens_details.cached_tokens
        assert cached >= 0.8 * r.usage.prompt_tokens, (cached, r.usage)
        print(f"[scale-down] after scale-down: {cached}/{r.usage.prompt_tokens} prompt tokens cached; "
              f"test {time.monotonic() - t0:.0f} s", flush=True)
