"""Soak: minutes of mixed traffic with clients that walk away; nothing leaks, nothing is lost.

    python benchmarks/soak.py                       # 10 minutes, result into benchmarks/results/
    python benchmarks/soak.py --duration-s 60 --out /tmp/soak

A local Ray cluster with Serve here (``fleetlm.benchmarks.drill.local_app``), the embedded model on
CPU (``--replicas`` replicas). ``--clients`` closed-loop clients send, until
``--duration-s`` is over, a mix drawn from a seeded generator: completions and chat,
streaming (90%) and not, 4 to 48 new tokens, sometimes ``n=2``, prompts of 1 to ~150
tokens sharing prefixes; 20% of the streaming requests are abandoned by their client
after 1 to 4 token events (the connection is closed mid-stream). Every request must end
as a complete answer, an abandoned stream, or a 429 (admission): never a 5xx, an error
event, or a timeout.

Memory: the resident set of every process of the cluster (the replicas, the ingress,
Serve's proxy and controller, Ray's own daemons) is sampled every ``--sample-s``; the
growth is the last sample (once idle) over the first one after ``--warmup-s``. At the end,
once idle: the ledger balances (``fleetlm_requests_accepted_total`` == sum of
``..._finished_total``; the abandoned streams are the ``abort`` reason), and every engine
is idle with all KV blocks free (``/debug/invariants``). Writes ``soak-<date>.json``;
exit status 0 only if every check passed (memory growth under ``--max-growth``).

Bounded: the traffic stops at ``--duration-s``, each request has a timeout, the wait for
idle is bounded. Not in CI (too long); its result is committed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fleetlm.benchmarks.records import git_commit

HERE = Path(__file__).resolve().parent
KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "smollm2-135m-instruct"
TOPICS = ("lighthouses", "glaciers", "bees", "trains", "volcanoes", "libraries", "tides", "comets")
PREAMBLE = ("You are a patient narrator. Keep to plain words, short sentences and a calm tone; "
            "answer in one paragraph. ")


def cluster_rss() -> dict[str, int]:
    """Resident bytes of this process's descendants (the local Ray cluster), by process title."""
    import psutil

    out: Counter[str] = Counter()
    for p in psutil.Process().children(recursive=True):
        try:
            name = p.cmdline()[0] if p.cmdline() else p.name()
            out[name.split(" ")[0][:40]] += p.memory_info().rss
        except (psutil.Error, IndexError):
            continue
    return dict(out)


def make_request(rng: random.Random) -> tuple[str, dict[str, Any], int | None]:
    """(path, body, leave after k token events or None) of one request of the mix."""
    topic = rng.choice(TOPICS)
    detail = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(0, 60)))
    stream = rng.random() < 0.9
    body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.randint(4, 48), "temperature": rng.choice([0, 0.7]),
                            "stream": stream}
    if rng.random() < 0.15:
        body["n"] = 2
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        path = "/v1/completions"
        body["prompt"] = f"{PREAMBLE}Tell me about {topic}. {detail}"
    else:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "system", "content": PREAMBLE},
                            {"role": "user", "content": f"Tell me about {topic}. {detail}"}]
    leave = rng.randint(1, 4) if stream and rng.random() < 0.2 else None
    return path, body, leave


async def one(http: Any, base: str, path: str, body: dict[str, Any], leave: int | None,
              timeout_s: float) -> str:
    """Run one request; its outcome: complete, abandoned, rejected_429, or a failure kind."""
    import aiohttp

    from fleetlm.benchmarks import sse_client

    if body["stream"]:
        r = await sse_client.stream_completion(http, base, body, AUTH, path=path, leave_after_events=leave,
                                               timeout_s=timeout_s)
        if r.timed_out:
            return "timeout"
        if r.status == 429:
            return "rejected_429"
        if r.status != 200:
            return f"http_{r.status}"
        if r.errors:
            return "error_event"
        if r.disconnected:
            return "abandoned"
        return "complete" if r.done and r.finish_reason is not None else "incomplete"
    try:
        async with http.post(base + path, json=body, headers=AUTH,
                             timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status == 429:
                return "rejected_429"
            if resp.status != 200:
                return f"http_{resp.status}"
            choices = (await resp.json())["choices"]
    except asyncio.TimeoutError:
        return "timeout"
    return "complete" if len(choices) == body.get("n", 1) and all(c["finish_reason"] for c in choices) \
        else "incomplete"


async def traffic(base: str, ns: argparse.Namespace, samples: list[dict[str, Any]]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    t0 = time.monotonic()
    stop = t0 + ns.duration_s

    async def client(k: int, http: Any) -> None:
        rng = random.Random(ns.seed * 1000 + k)
        while time.monotonic() < stop:
            path, body, leave = make_request(rng)
            outcome = await one(http, base, path, body, leave, ns.request_timeout_s)
            outcomes[outcome] += 1
            if outcome == "rejected_429":
                await asyncio.sleep(0.2)

    async def sampler() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(ns.sample_s)
            rss = await asyncio.to_thread(cluster_rss)
            samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_bytes": sum(rss.values()),
                            "requests": sum(outcomes.values())})

    from fleetlm.benchmarks import sse_client

    async with sse_client.session(4 * ns.clients) as http:
        await asyncio.gather(sampler(), *(client(k, http) for k in range(ns.clients)))
    return outcomes


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from fleetlm.benchmarks import drill

    args = {"models": [{"model": MODEL, "device": "cpu", "max_model_len": 512, "max_num_seqs": 8,
                        "num_replicas": ns.replicas, "max_waiting_requests": 8}], "api_key": KEY}
    rec: dict[str, Any] = {}
    t_begin = time.monotonic()
    with drill.local_app(args, num_cpus=2 + 2 * ns.replicas, startup_timeout_s=600) as base:
        rec["startup_s"] = round(time.monotonic() - t_begin, 1)
        samples: list[dict[str, Any]] = [{"t_s": 0.0, "rss_bytes": sum(cluster_rss().values()), "requests": 0}]
        t0 = time.monotonic()
        outcomes = asyncio.run(traffic(base, ns, samples))
        rec["traffic_s"] = round(time.monotonic() - t0, 1)
        inv = drill.wait_idle(base, AUTH, timeout_s=120)
        time.sleep(2.0)
        final_rss = cluster_rss()
        samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_bytes": sum(final_rss.values()),
                        "requests": sum(outcomes.values()), "idle": True})
        metrics = drill.metric_ledger(base)
    ledger = inv.get("ledger", {}).get(MODEL, {})
    after_warmup = [s for s in samples if s["t_s"] >= ns.warmup_s]
    base_rss = after_warmup[0]["rss_bytes"] if after_warmup else samples[0]["rss_bytes"]
    growth = (samples[-1]["rss_bytes"] - base_rss) / base_rss
    total = sum(outcomes.values())
    streaming_left = outcomes["abandoned"]
    failures = {k: v for k, v in outcomes.items() if k not in ("complete", "abandoned", "rejected_429")}
    rec.update({
        "requests": total, "outcomes": dict(outcomes),
        "abandoned_share": round(streaming_left / total, 3) if total else None,
        "requests_per_s": round(total / max(1e-9, rec["traffic_s"]), 2),
        "ledger": ledger, "metrics_ledger": metrics, "invariants_ok": bool(inv.get("ok")),
        "invariants": inv.get("models"),
        "rss_after_warmup_bytes": base_rss, "rss_final_idle_bytes": samples[-1]["rss_bytes"],
        "rss_growth": round(growth, 4), "rss_final_by_process": final_rss,
        "rss_samples": samples,
    })
    rec["checks"] = {
        "no_failures": not failures,
        "ledger_balanced": bool(ledger.get("balanced")) and metrics["balanced"]
        and metrics["accepted"] == ledger.get("accepted"),
        "aborts_counted": ledger.get("finished", {}).get("abort", 0) >= 1 and streaming_left >= 1,
        "invariants_hold": bool(inv.get("ok")),
        "memory_growth_under_limit": growth < ns.max_growth,
    }
    rec["passed"] = all(rec["checks"].values())
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--warmup-s", type=float, default=60.0, help="memory baseline: first sample after this")
    p.add_argument("--sample-s", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--max-growth", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(HERE / "results"))
    ns = p.parse_args(argv)
    record: dict[str, Any] = {
        "benchmark": "soak", "device": "cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {k: v for k, v in vars(ns).items() if k != "out"},
    }
    t0 = time.monotonic()
    try:
        record.update(run(ns))
    except Exception as e:  # noqa: BLE001 - a record of the failure is still a record
        record.update({"passed": False, "error": f"{type(e).__name__}: {e}"})
    record["wall_s"] = round(time.monotonic() - t0, 1)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    keys = ("passed", "requests", "outcomes", "abandoned_share", "requests_per_s", "ledger", "rss_growth",
            "checks", "error", "wall_s")
    print(json.dumps({k: record.get(k) for k in keys}, indent=1, default=str))
    if record.get("rss_samples"):
        print("rss MiB:", [round(s["rss_bytes"] / 2**20) for s in record["rss_samples"]])
    print(f"wrote {path}")
    return 0 if record.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
