"""Prefix-aware routing vs Ray Serve's default router on a multi-tenant workload (CPU).

Three replicas of the embedded model, each with a KV budget of 56 blocks:
room for two tenants' system prompts (25 full blocks each) and the two
running requests' own tail blocks (2 each), hardly more. (A simulation of
this setup put the default router's hit rate at 28% +- 6% and the
prefix-aware one's at 81%; a ratio under 2 in about 1% of orders.)
Six tenants, each with its own ~410-token system prompt and 8 short
questions: 48 chat requests in one random order, 6 at a time, streamed. The
same workload runs against the app deployed with ``router: prefix_aware``
and again (fresh replicas, cold caches) with ``router: default`` (Serve's
power of two choices). The prefix cache hit rate comes from the replicas'
own counters (``/metrics``); the prefix-aware one must be at least twice
the default's. Mean TTFT (client side: request sent to first content
token) is printed and written to the test's tmp dir (``cpu-routing-<date>.json``;
the committed record under benchmarks/results/ was copied from such a run).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from cluster_local import MODEL, deploy, local_serve, metric_totals, undeploy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NUM_TENANTS = 6
QUESTIONS = [
    "What are your opening hours?",
    "How do I reset my password?",
    "Can I return an item after a month?",
    "Do you ship abroad?",
    "How do I cancel my plan?",
    "Who do I call for an urgent problem?",
    "Is there a student discount?",
    "Where is my invoice?",
]
CONCURRENCY = 6
MAX_TOKENS = 4
# smollm2-135m in float32: 30 layers x 3 KV heads x 64 x (K, V) x 4 bytes = 46080 B per
# token, 737280 B per 16-token block. Prompts are 414-418 tokens: 25 full blocks of
# system prompt shared by a tenant's requests, then 2 blocks of the request's own
# (with 4 new tokens). Two tenants on a replica need 2 * 25 + 2 * 2 = 54 blocks. More
# room only lets the default router keep a third tenant's prefix by luck.
BLOCK_BYTES = 30 * 3 * 64 * 2 * 4 * 16
KV_BLOCKS = 56
WORDS = ("account billing invoice refund shipping order delivery warranty support policy customer "
         "product service plan upgrade discount payment card address return exchange store hours "
         "holiday manager ticket priority response escalation contract renewal subscription license "
         "device battery screen network router password security privacy data report export import "
         "schedule appointment").split()


def system_prompt(tenant: int) -> str:
    rng = random.Random(1000 + tenant)
    body = " ".join(rng.choice(WORDS) for _ in range(380))
    return f"You are the assistant of company number {tenant}. Follow these notes: {body}."


def workload() -> list[tuple[int, str]]:
    jobs = [(t, q) for t in range(NUM_TENANTS) for q in QUESTIONS]
    random.Random(5).shuffle(jobs)
    return jobs


def app_args(router: str) -> dict:
    return {
        "router": router,
        "max_queued_requests": 64,
        "models": [{
            "model": MODEL,
            "device": "cpu",
            "max_model_len": 1024,
            "max_num_seqs": 2,
            "cpu_kv_cache_bytes": KV_BLOCKS * BLOCK_BYTES,
            "num_replicas": 3,
        }],
    }


async def one_request(client: httpx.AsyncClient, tenant: int, question: str) -> float:
    """Stream one chat completion; seconds from sending to the first content token."""
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system_prompt(tenant)},
                     {"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "stream": True,
    }
    start = time.perf_counter()
    ttft = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if ttft is None and any(c["delta"].get("content") or c.get("finish_reason")
                                    for c in chunk["choices"]):
                ttft = time.perf_counter() - start
    assert ttft is not None
    return ttft


async def run_workload(url: str) -> list[float]:
    sem = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def bounded(t: int, q: str) -> float:
            async with sem:
                return await one_request(client, t, q)

        return await asyncio.gather(*(bounded(t, q) for t, q in workload()))


def measure(url: str, router: str) -> dict:
    deploy(url, app_args(router))
    names = ("fleetlm_prefix_cache_queried_tokens_total", "fleetlm_prefix_cache_hit_tokens_total",
             "fleetlm_time_to_first_token_seconds_sum", "fleetlm_time_to_first_token_seconds_count")
    before = metric_totals(url, names)
    start = time.perf_counter()
    ttfts = asyncio.run(run_workload(url))
    wall = time.perf_counter() - start
    after = metric_totals(url, names)
    undeploy()
    d = {k: after[k] - before[k] for k in names}
    queried = d["fleetlm_prefix_cache_queried_tokens_total"]
    hits = d["fleetlm_prefix_cache_hit_tokens_total"]
    return {
        "router": router,
        "requests": len(ttfts),
        "prefix_cache_queried_tokens": queried,
        "prefix_cache_hit_tokens": hits,
        "prefix_cache_hit_rate": hits / queried if queried else 0.0,
        "mean_ttft_s": statistics.fmean(ttfts),
        "p50_ttft_s": statistics.median(ttfts),
        "server_mean_ttft_s": (d["fleetlm_time_to_first_token_seconds_sum"]
                               / max(1.0, d["fleetlm_time_to_first_token_seconds_count"])),
        "wall_s": wall,
    }


def _commit() -> str:
    """HEAD's short hash, with "-dirty" when the tree has uncommitted changes."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out
    except (OSError, subprocess.SubprocessError):
        return ""


def test_prefix_aware_router_doubles_the_prefix_cache_hit_rate(tmp_path):
    with local_serve() as url:
        aware = measure(url, "prefix_aware")
        default = measure(url, "default")
    report = {
        "benchmark": "cpu-routing",
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "workload": {"tenants": NUM_TENANTS, "questions_per_tenant": len(QUESTIONS),
                     "concurrency": CONCURRENCY, "max_tokens": MAX_TOKENS, "replicas": 3,
                     "kv_blocks_per_replica": KV_BLOCKS, "model": MODEL},
        "prefix_aware": aware,
        "default": default,
        "hit_rate_ratio": aware["prefix_cache_hit_rate"] / max(default["prefix_cache_hit_rate"], 1e-9),
    }
    print(json.dumps(report, indent=2))
    (tmp_path / f"cpu-routing-{report['date']}.json").write_text(json.dumps(report, indent=2) + "\n")
    assert aware["requests"] == default["requests"] == NUM_TENANTS * len(QUESTIONS)
    assert aware["prefix_cache_hit_rate"] >= 2 * default["prefix_cache_hit_rate"], report
