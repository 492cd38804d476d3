"""Prefix-aware router vs Ray Serve's default router on a multi-tenant shared-prefix workload.

Two replicas (one GPU each) of one model behind the FleetLM Serve app. The
workload: ``tenants`` tenants, each with its own system prompt of
``prefix_len`` random token ids, and ``questions`` requests per tenant that
add ``question_len`` tokens of their own and generate ``max_tokens`` tokens;
all requests in one random order, ``concurrency`` in flight, streamed through
``/v1/completions``. Each replica's KV cache is set (``num_kv_blocks``) so
that one replica holds about half of all tenants' prefixes: a router that
keeps a tenant on one replica hits its cache; one that spreads tenants over
both makes every replica cycle through all of them.

The same workload runs against a fresh deployment (cold caches) with
``router: prefix_aware`` and with ``router: default``. Reported per router:
requests/s, output tokens/s, client-side TTFT p50/p90/p99, E2E p50, and the
prefix cache hit rate from the replicas' own counters (``/metrics``).

On the GPU machine (2 GPUs)::

    python benchmarks/gpu_router.py --out $OUT

A CPU smoke run of the same code (embedded model, tiny workload)::

    python benchmarks/gpu_router.py --cpu-smoke --out /tmp/router-smoke
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

from fleetlm.benchmarks.records import git_commit

APP = "fleetlm"
METRICS = ("fleetlm_prefix_cache_queried_tokens_total", "fleetlm_prefix_cache_hit_tokens_total")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_totals(url: str) -> dict[str, float]:
    """Sum over replicas of each counter in METRICS, plus finished requests per replica ("per_replica")."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict = dict.fromkeys(METRICS, 0.0)
    totals["per_replica"] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name in METRICS:
                totals[s.name] += s.value
            elif s.name == "fleetlm_request_success_total":
                rep = s.labels.get("replica", "?")
                totals["per_replica"][rep] = totals["per_replica"].get(rep, 0.0) + s.value
    return totals


def workload(ns) -> list[tuple[int, list[int]]]:
    """(tenant, prompt token ids) in one random order; the same for every router."""
    rng = random.Random(ns.seed)
    prefixes = [[rng.randrange(100, ns.vocab_size) for _ in range(ns.prefix_len)] for _ in range(ns.tenants)]
    jobs = [(t, prefixes[t] + [rng.randrange(100, ns.vocab_size) for _ in range(ns.question_len)])
            for t in range(ns.tenants) for _ in range(ns.questions)]
    rng.shuffle(jobs)
    return jobs


async def one(session, url: str, ns, prompt: list[int]) -> dict:
    from fleetlm.benchmarks.sse_client import stream_completion

    body = {"model": ns.served_model, "prompt": prompt, "max_tokens": ns.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    r = await stream_completion(session, url, body, timeout_s=ns.request_timeout)
    if r.failure is not None:
        detail = r.body or (r.errors[0] if r.errors else "")
        return {"error": f"{r.failure}: {str(detail)[:200]}"}
    return {"ttft": r.ttft_s, "e2e": r.e2e_s, "tokens": r.completion_tokens or 0}


async def run_workload(url: str, ns, jobs) -> tuple[list[dict], float]:
    from fleetlm.benchmarks.sse_client import session

    sem = asyncio.Semaphore(ns.concurrency)
    async with session(ns.concurrency + 8) as http:
        async def bounded(prompt):
            async with sem:
                return await one(http, url, ns, prompt)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for _, p in jobs))
        return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def app_args(ns, router: str) -> dict:
    model = {"model": ns.model, "name": ns.served_model, "num_replicas": 2, "max_model_len": ns.max_model_len,
             "num_kv_blocks": ns.num_kv_blocks, "max_waiting_requests": None}
    if ns.cpu_smoke:
        model.update(device="cpu", max_num_seqs=4)
    else:
        model.update(device="cuda", load_format="dummy", dtype="bfloat16")
    return {"router": router, "max_queued_requests": 4 * ns.concurrency, "models": [model]}


def deploy(url: str, args: dict, timeout_s: float) -> float:
    from ray import serve

    from fleetlm.cluster.app import build_app

    t0 = time.monotonic()
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    while time.monotonic() - t0 < timeout_s:
        try:
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the app did not become healthy in {timeout_s:.0f} s: {serve.status()}")


def measure(url: str, ns, router: str, jobs) -> dict:
    from ray import serve

    deploy_s = deploy(url, app_args(ns, router), ns.deploy_timeout)
    # Compile/warm both replicas on prompts no tenant shares (same for both routers).
    warm = [[random.Random(i).randrange(100, ns.vocab_size) for _ in range(64)] for i in range(8)]
    asyncio.run(run_workload(url, argparse.Namespace(**{**vars(ns), "concurrency": 8}), [(None, w) for w in warm]))
    before = metric_totals(url)
    results, wall = asyncio.run(run_workload(url, ns, jobs))
    after = metric_totals(url)
    serve.delete(APP)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    queried = after[METRICS[0]] - before[METRICS[0]]
    hits = after[METRICS[1]] - before[METRICS[1]]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    out_tokens = sum(r["tokens"] for r in ok)
    return {
        "router": router,
        "deploy_s": round(deploy_s, 1),
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": out_tokens / wall,
        "ttft_p50_s": pct(ttfts, 50),
        "ttft_p90_s": pct(ttfts, 90),
        "ttft_p99_s": pct(ttfts, 99),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "e2e_p50_s": pct([r["e2e"] for r in ok], 50),
        "prefix_cache_queried_tokens": queried,
        "prefix_cache_hit_tokens": hits,
        "prefix_cache_hit_rate": hits / queried if queried else 0.0,
        # balance: requests each replica finished during the run
        "requests_per_replica": sorted(after["per_replica"].get(r, 0.0) - before["per_replica"].get(r, 0.0)
                                       for r in after["per_replica"]),
    }


def card() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the JSON record")
    p.add_argument("--cpu-smoke", action="store_true", help="embedded model on CPU, tiny workload")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--tenants", type=int, default=48)
    p.add_argument("--prefix-len", type=int, default=4096)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--question-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="per replica (default: room for --kv-fraction of all tenants' prefixes)")
    p.add_argument("--kv-fraction", type=float, default=0.55,
                   help="each replica's KV holds this fraction of all tenants' prefixes (plus the running requests)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--vocab-size", type=int, default=128000)
    p.add_argument("--routers", default="prefix_aware,default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=240.0)
    p.add_argument("--deploy-timeout", type=float, default=300.0)
    ns = p.parse_args(argv)
    if ns.cpu_smoke:
        ns.model, ns.tenants, ns.prefix_len, ns.questions = "smollm2-135m-instruct", 4, 96, 3
        ns.question_len, ns.max_tokens, ns.concurrency, ns.max_model_len, ns.vocab_size = 8, 4, 4, 512, 49000
    if ns.num_kv_blocks is None:
        block = 16
        prefix_blocks = ns.tenants * -(-ns.prefix_len // block)
        running = ns.concurrency * -(-(ns.question_len + ns.max_tokens + block) // block)
        ns.num_kv_blocks = int(ns.kv_fraction * prefix_blocks) + running
    ns.served_model = "bench-model"

    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             **({"num_cpus": 8} if ns.cpu_smoke else {}))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    jobs = workload(ns)
    runs = {}
    try:
        for router in [r.strip() for r in ns.routers.split(",") if r.strip()]:
            runs[router] = measure(url, ns, router, jobs)
            print(json.dumps(runs[router]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    record = {
        "benchmark": "router",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "card": card(),
        "config": {k: v for k, v in vars(ns).items() if k not in ("out",)},
        "runs": runs,
    }
    a, d = runs.get("prefix_aware"), runs.get("default")
    if a and d:
        record["throughput_ratio"] = a["requests_per_s"] / d["requests_per_s"] if d["requests_per_s"] else None
        record["ttft_p50_ratio_default_over_aware"] = (d["ttft_p50_s"] / a["ttft_p50_s"]) if a["ttft_p50_s"] else None
        record["ttft_p90_ratio_default_over_aware"] = (d["ttft_p90_s"] / a["ttft_p90_s"]) if a["ttft_p90_s"] else None
    name = f"router-{'cpu-smoke' if ns.cpu_smoke else 'gpu'}-{datetime.date.today().isoformat()}.json"
    (out_dir / name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{'router':<14}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'p90':>8}{'hit rate':>10}{'errors':>8}")
    for r in runs.values():
        print(f"{r['router']:<14}{r['requests_per_s']:>8.2f}{r['output_tokens_per_s']:>11.0f}"
              f"{(r['ttft_p50_s'] or 0):>10.3f}{(r['ttft_p90_s'] or 0):>8.3f}"
              f"{100 * r['prefix_cache_hit_rate']:>9.1f}%{r['errors']:>8}")
    print(f"record: {out_dir / name}")
    return 0 if all(r["errors"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
