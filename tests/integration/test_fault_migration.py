"""A replica dies mid-generation: its streams move to the other replica and finish as if nothing happened.

Two replicas of the embedded model (CPU). 16 greedy streaming completions run
undisturbed first (the reference). Then the same 16 run again, and once every stream
has produced a few tokens something dies:

- TP=1 replicas: the replica serving the most of them (``ray.kill`` of its actor: the
  process is gone, as when a GPU process dies);
- PP=2 replicas (two worker actors each): one worker actor (SIGKILL of its process).
  The replica's engine fails its requests at once and the replica ends its own process
  (Serve's health check would too, later): Serve tears the replica down (its other
  worker with it) and builds a new one.

Every client must still receive the complete output, token for token the reference's (the
per-token strings of ``logprobs``, the text, 32 tokens, ``finish_reason: length``),
with no error event. Afterwards the ledger balances (accepted == finished over all
reasons), Serve has replaced the dead replica (two RUNNING, no replica or worker actor
left behind), and every replica's engine is idle with all KV blocks back in the pool
(``/debug/invariants``).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from cluster_local import MODEL, deploy, local_serve, replica_counts

from fleetlm.benchmarks.drill import worker_actor_pids
from fleetlm.benchmarks.sse_client import StreamResult, session, stream_completion

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "fault-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NUM_STREAMS = 16
MAX_TOKENS = 32
KILL_AFTER_TOKENS = 4
ARGS = {
    "models": [{"model": MODEL, "device": "cpu", "max_model_len": 256, "max_num_seqs": 16, "num_replicas": 2}],
    "api_key": KEY,
    "max_logprobs": 1,
}
PROMPTS = [f"Story {i}: once upon a time, in a land of {w}," for i, w in enumerate(
    "rivers mountains deserts forests islands cities caves glaciers meadows canyons reefs "
    "volcanoes swamps valleys plains lakes".split())]


def request_body(prompt: str) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}}


async def run_all(base: str, on_progress=None) -> list[StreamResult]:
    """All PROMPTS streamed at once; ``on_progress(streams)`` runs while they arrive."""
    streams = [StreamResult() for _ in PROMPTS]
    async with session(64) as http:
        tasks = [asyncio.ensure_future(stream_completion(http, base, request_body(p), AUTH, into=s))
                 for p, s in zip(PROMPTS, streams)]
        if on_progress is not None:
            await on_progress(streams)
        await asyncio.gather(*tasks)
    for p, s in zip(PROMPTS, streams):
        assert s.status == 200, (p, s.body)
    return streams


def debug_invariants(base: str) -> dict:
    r = httpx.get(base + "/debug/invariants", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_idle(base: str, replicas: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        d = debug_invariants(base)
        reps = d["models"][MODEL]["replicas"]
        if d["ok"] and len(reps) == replicas or time.monotonic() > deadline:
            return d
        time.sleep(1.0)


def replica_actor_names() -> list[tuple[str, str]]:
    import ray

    return sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                  if "LLMReplica" in a["name"])


def run_fault_scenario(base: str, kill: str, world: int) -> dict:
    """Reference run, then the same run with one replica (``kill="replica"``) or one of its
    TP workers (``kill="worker"``) killed mid-stream; returns what happened."""
    import os
    import signal

    import ray

    reference = asyncio.run(run_all(base))
    for p, s in zip(PROMPTS, reference):
        assert s.done and not s.errors and s.finish_reason == "length", (p, s.errors)
        assert len(s.tokens) == MAX_TOKENS and s.usage["completion_tokens"] == MAX_TOKENS
    assert len(replica_actor_names()) == 2
    workers_before = worker_actor_pids()
    assert len(workers_before) == (2 * world if world > 1 else 0), workers_before

    killed: dict = {}

    async def kill_when_streaming(streams: list[StreamResult]) -> None:
        deadline = time.monotonic() + 120
        while min(len(s.tokens) for s in streams) < KILL_AFTER_TOKENS:
            assert time.monotonic() < deadline, [len(s.tokens) for s in streams]
            await asyncio.sleep(0.02)
        reps = (await asyncio.to_thread(debug_invariants, base))["models"][MODEL]["replicas"]
        killed["tokens_before"] = [len(s.tokens) for s in streams]
        killed["t"] = time.monotonic()
        if kill == "replica":
            # The replica running the most of these streams: its process is gone.
            victim = max(reps, key=lambda r: r["num_running"] + r["num_waiting"])
            killed["streams"] = victim["num_running"] + victim["num_waiting"]
            name, ns = next(a for a in replica_actor_names() if a[0].endswith(victim["replica"]))
            ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
        else:
            # One TP rank of some replica: its process is gone, the replica's engine fails.
            killed["streams"] = None
            os.kill(workers_before[0], signal.SIGKILL)

    disturbed = asyncio.run(run_all(base, kill_when_streaming))
    assert max(killed["tokens_before"]) < MAX_TOKENS, killed  # killed mid-generation
    for p, ref, got in zip(PROMPTS, reference, disturbed):
        assert got.done and not got.errors, (p, got.errors)
        assert got.tokens == ref.tokens, (p, got.tokens, ref.tokens)
        assert got.text == ref.text
        assert got.finish_reason == "length" and got.usage["completion_tokens"] == MAX_TOKENS
    resume_gaps = [max((b - a for a, b in zip(s.times, s.times[1:]) if b > killed["t"]), default=0.0)
                   for s in disturbed]

    # Serve replaces the dead replica; then every engine is idle and clean, the ledger balances.
    t_idle = time.monotonic()
    d = wait_idle(base, replicas=2, timeout_s=300)
    report = {"kill": kill, "world_size": world, "killed_replica_streams": killed["streams"],
              "tokens_before_kill": killed["tokens_before"], "ledger": d["ledger"][MODEL],
              "max_stream_gap_after_kill_s": round(max(resume_gaps), 3),
              "replaced_and_idle_after_s": round(time.monotonic() - t_idle, 1)}
    print(json.dumps(report))
    assert d["ok"], json.dumps(d, indent=1)
    ledger = d["ledger"][MODEL]
    assert ledger["accepted"] == sum(ledger["finished"].values()) == 2 * NUM_STREAMS, ledger
    assert ledger["finished"] == {"length": 2 * NUM_STREAMS}, ledger
    assert ledger["inflight"] == 0 and ledger["migrated"] >= 1, ledger
    for r in d["models"][MODEL]["replicas"]:
        assert r["idle"] and r["ok"] and r["num_free_blocks"] == r["num_blocks"], r
    assert replica_counts() == {f"LLMReplica-{MODEL}": 2}
    assert len(replica_actor_names()) == 2  # the dead one is gone
    workers_after = worker_actor_pids()  # the failed replica's surviving ranks went with it: no orphans
    assert len(workers_after) == len(workers_before), (workers_before, workers_after)
    if kill == "worker":
        assert workers_before[0] not in workers_after
    # The same numbers through Prometheus.
    text = httpx.get(base + "/metrics", timeout=30).text
    accepted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("fleetlm_requests_accepted_total{"))
    finished = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("fleetlm_requests_finished_total{"))
    assert accepted == finished == 2 * NUM_STREAMS
    return report


def test_replica_killed_mid_stream_streams_continue_identically():
    with local_serve(num_cpus=4) as base:
        deploy(base, ARGS, timeout_s=400)
        report = run_fault_scenario(base, "replica", world=1)
    assert report["killed_replica_streams"] >= 1


def test_pp2_worker_killed_mid_stream_replica_rebuilt_streams_continue():
    # PP, not TP: the embedded model's 9 attention heads split over no TP degree but 3 and 9.
    args = {**ARGS, "models": [{**ARGS["models"][0], "pipeline_parallel_size": 2}]}
    with local_serve(num_cpus=8) as base:
        deploy(base, args, timeout_s=400)
        run_fault_scenario(base, "worker", world=2)
