"""Queue-depth autoscaling on a real local Ray Serve (CPU).

One model with ``autoscaling: {min_replicas: 1, max_replicas: 3,
target_ongoing_requests: 16}`` and short delays, under FleetLM's engine-aware
policy (cluster/autoscaling.py). A burst of 12 concurrent clients raises
the RUNNING replica count (read from ``serve.status()``). Ray's own rule
alone would not: 12 ongoing requests are under one replica's target of 16.
The engine's waiting queue does (``max_num_seqs: 2``, so about 10 wait), so
the scale-up proves the replicas' ``record_autoscaling_stats`` reach the
custom policy. Then a trickle of one request at a time lets the count fall
back to one. Every request of both phases must succeed (200 and a finished
completion): replicas that scale down drain first, and none is routed to
while it stops. A new replica is fast from its first requests: their
prefill (first step to first token, from ``/debug/invariants``) is within 2x
of the old replica's latest ones under the same burst. With ``min_replicas:
0`` the deployment idles at zero replicas, ``/health`` stays 200 (the load
balancer keeps the endpoint), ``/ready`` says the model is not warm, and the
first request waits for a cold start instead of failing.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from cluster_local import APP, MODEL, deploy, local_serve, replica_counts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEPLOYMENT = f"LLMReplica-{MODEL}"
BURST_CLIENTS = 12
UP_TIMEOUT_S = 150
DOWN_TIMEOUT_S = 150
ARGS = {
    "max_queued_requests": 64,
    "models": [{
        "model": MODEL,
        "device": "cpu",
        "max_model_len": 512,
        "max_num_seqs": 2,
        "cpu_kv_cache_bytes": 64 * 30 * 3 * 64 * 2 * 4 * 16,  # 64 blocks
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 16,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "look_back_period_s": 3,
        },
    }],
}


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.failed: list[str] = []


async def one(client: httpx.AsyncClient, tally: Tally, i: int, max_tokens: int) -> None:
    body = {"model": MODEL, "prompt": f"Request {i}: list some numbers.", "max_tokens": max_tokens,
            "temperature": 0.0}
    try:
        r = await client.post("/v1/completions", json=body)
        if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"):
            tally.ok += 1
        else:
            tally.failed.append(f"{r.status_code}: {r.text[:200]}")
    except httpx.HTTPError as e:
        tally.failed.append(repr(e))


def replicas_report(url: str) -> dict[str, dict]:
    """Each replica's entry of /debug/invariants (its start-up phases and prefill times), by id."""
    reps = httpx.get(url + "/debug/invariants", timeout=30).json()["models"][MODEL]["replicas"]
    return {r["replica"]: r for r in reps}


async def burst_until_scaled(url: str, tally: Tally, old: set[str]) -> tuple[int, float]:
    """12 clients in a loop until more than one replica runs and a new one has served a few
    requests; (max replicas seen, seconds)."""
    start = time.monotonic()
    stop = asyncio.Event()
    seen = 1

    async def client_loop(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            i = 0
            while not stop.is_set():
                await one(client, tally, c * 10_000 + i, 24)
                i += 1

    async def watch() -> None:
        nonlocal seen
        while time.monotonic() - start < UP_TIMEOUT_S:
            n = (await asyncio.to_thread(replica_counts)).get(DEPLOYMENT, 0)
            seen = max(seen, n)
            if n >= 2:
                break
            await asyncio.sleep(1.0)
        scaled = time.monotonic()
        while seen >= 2 and time.monotonic() - scaled < 30:  # the new replica's first requests
            reps = await asyncio.to_thread(replicas_report, url)
            if any(len(r["prefill_s"]["first"]) >= 3 for rid, r in reps.items() if rid not in old):
                break
            await asyncio.sleep(1.0)
        stop.set()

    await asyncio.gather(watch(), *(client_loop(c) for c in range(BURST_CLIENTS)))
    return seen, time.monotonic() - start


async def trickle_until_one(url: str, tally: Tally) -> tuple[int, float]:
    """One request every ~2 s until a single replica runs; (replicas left, seconds)."""
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        i = 0
        while time.monotonic() - start < DOWN_TIMEOUT_S:
            await one(client, tally, 900_000 + i, 2)
            i += 1
            n = (await asyncio.to_thread(replica_counts)).get(DEPLOYMENT, 0)
            if n == 1:
                return n, time.monotonic() - start
            await asyncio.sleep(2.0)
    return (await asyncio.to_thread(replica_counts)).get(DEPLOYMENT, 0), time.monotonic() - start


@pytest.fixture(scope="module")
def url():
    with local_serve() as base:
        yield base


def test_burst_scales_up_and_idleness_scales_down_without_failures(url):
    deploy(url, ARGS)
    assert replica_counts() == {DEPLOYMENT: 1}
    old = set(replicas_report(url))
    tally = Tally()
    peak, up_s = asyncio.run(burst_until_scaled(url, tally, old))
    burst_ok = tally.ok
    print(f"burst: {burst_ok} requests ok, {peak} replicas after {up_s:.1f} s")
    assert peak >= 2, f"no scale-up within {UP_TIMEOUT_S} s: {replica_counts()}"
    # The new replica's first requests against the old replica's latest, in the same burst.
    reps = replicas_report(url)
    new_first = [s for rid, r in reps.items() if rid not in old for s in r["prefill_s"]["first"]]
    old_recent = [s for rid, r in reps.items() if rid in old for s in r["prefill_s"]["recent"]]
    assert new_first and old_recent, reps
    print(f"prefill: new replica's first {statistics.median(new_first):.3f} s, "
          f"old replica's latest {statistics.median(old_recent):.3f} s")
    assert statistics.median(new_first) <= 2 * statistics.median(old_recent), (new_first, old_recent)
    left, down_s = asyncio.run(trickle_until_one(url, tally))
    print(f"idle: {tally.ok - burst_ok} requests ok, {left} replica(s) after {down_s:.1f} s")
    assert left == 1, f"no scale-down within {DOWN_TIMEOUT_S} s: {replica_counts()}"
    assert tally.failed == []
    assert tally.ok > BURST_CLIENTS


def test_scale_to_zero_first_request_waits_for_a_replica(url):
    from ray import serve

    from fleetlm.cluster.app import build_app

    model = {**ARGS["models"][0], "max_model_len": 256,
             "autoscaling": {"min_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 2,
                             "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 3,
                             "downscale_to_zero_delay_s": 2}}
    serve.run(build_app({"models": [model]}), name=APP, route_prefix="/", blocking=False)
    deadline = time.monotonic() + 60
    while serve.status().applications[APP].status != "RUNNING":
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.5)
    assert replica_counts() == {DEPLOYMENT: 0}
    # Scaled to zero: the endpoint stays up for the load balancer, /ready says not warm, and
    # neither probe starts a replica.
    health = httpx.get(url + "/health", timeout=30)
    assert health.status_code == 200, health.text
    ready = httpx.get(url + "/ready", timeout=30)
    assert ready.status_code == 503 and ready.json()["models"][MODEL] == {
        "warm": False, "replicas": 0, "healthy_replicas": 0, "cold_start": True}, ready.text
    assert replica_counts() == {DEPLOYMENT: 0}
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)  # waits for the cold start
    print(f"first request from zero replicas: {r.status_code} after {time.monotonic() - start:.1f} s")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert replica_counts() == {DEPLOYMENT: 1}
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while replica_counts().get(DEPLOYMENT) != 0:
        assert time.monotonic() < deadline, f"not back to zero: {replica_counts()}"
        time.sleep(1.0)
