"""Load against a running OpenAI endpoint (``fleetlm bench serve``): TTFT, TPOT, ITL and throughput.

Requests are streamed completions of random token-id prompts with
``ignore_eos`` (every request produces exactly ``output_len`` tokens),
sent at a Poisson rate (or all at once) under a concurrency limit, through
the one SSE client (``sse_client``).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from fleetlm.benchmarks import sse_client
from fleetlm.benchmarks.offline import percentiles, random_token_ids, seeded_rng
from fleetlm.benchmarks.records import BenchError


def server_root(base_url: str) -> str:
    """The server's root URL, whether given as ``http://host:8000`` or, as OpenAI clients
    take it, ``http://host:8000/v1``."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


async def fetch_model_name(base_url: str, api_key: str | None) -> str:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url.rstrip('/')}/v1/models", headers=headers,
                               timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                raise BenchError(f"GET /v1/models answered {resp.status}; pass --served-model")
            data = await resp.json()
    models = data.get("data") or []
    if not models:
        raise BenchError("the server lists no models")
    return models[0]["id"]


async def run_serve(*, base_url: str, model: str, num_prompts: int, input_len: int, output_len: int,
                    vocab_size: int, request_rate: float = math.inf, max_concurrency: int | None = None,
                    duration_s: float = 60.0, request_timeout_s: float = 300.0, api_key: str | None = None,
                    seed: int = 0, warmup_requests: int = 1) -> dict[str, Any]:
    """Stream ``num_prompts`` completions (token-id prompts, ``ignore_eos``) at a Poisson
    ``request_rate`` (inf: all at once) under ``max_concurrency``. No request starts
    after ``duration_s``; requests still running ``request_timeout_s`` after that are
    cancelled (counted as errors)."""
    base = base_url.rstrip("/")
    url = f"{base}/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = seeded_rng(seed)
    prompts = [random_token_ids(input_len, vocab_size, rng) for _ in range(num_prompts)]

    def payload(prompt: list[int]) -> dict[str, Any]:
        return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}

    async with sse_client.session() as session:
        for i in range(warmup_requests):
            warm = random_token_ids(input_len, vocab_size, rng)
            r = await sse_client.stream_completion(session, base, {**payload(warm), "max_tokens": min(output_len, 4)},
                                                   headers, timeout_s=request_timeout_s)
            if r.failure is not None:
                raise BenchError(f"warm-up request failed: {r.failure} (is {url} serving {model!r}?)")
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        t0 = time.monotonic()
        stop_at = t0 + duration_s

        async def one(prompt: list[int]) -> sse_client.StreamResult | None:
            if sem is None:
                return await sse_client.stream_completion(session, base, payload(prompt), headers,
                                                          timeout_s=request_timeout_s)
            async with sem:
                if time.monotonic() > stop_at:
                    return None  # never sent
                return await sse_client.stream_completion(session, base, payload(prompt), headers,
                                                          timeout_s=request_timeout_s)

        tasks = []
        for prompt in prompts:
            if time.monotonic() > stop_at:
                break
            tasks.append(asyncio.create_task(one(prompt)))
            if math.isfinite(request_rate) and request_rate > 0:
                await asyncio.sleep(float(rng.exponential(1.0 / request_rate)))
        done, pending = await asyncio.wait(tasks, timeout=max(1.0, stop_at + request_timeout_s - time.monotonic())) \
            if tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        results = [t.result() for t in tasks if t in done]
    sent = [r for r in results if r is not None]
    ok = [r for r in sent if r.failure is None]
    errors: dict[str, int] = {}
    for r in sent:
        if r.failure is not None:
            errors[r.failure] = errors.get(r.failure, 0) + 1
    if pending:
        errors["cancelled"] = len(pending)
    end = max((r.t_end for r in ok), default=time.monotonic())
    elapsed = max(end - t0, 1e-9)
    ttft, tpot, itl, e2e = [], [], [], []
    out_tokens = 0
    usage_missing = 0
    for r in ok:
        n = r.completion_tokens
        if n is None:
            usage_missing += 1
            n = len(r.times)
        out_tokens += n
        first = r.ttft_s
        ttft.append(first)
        e2e.append(r.e2e_s)
        if n > 1:
            tpot.append((r.e2e_s - first) / (n - 1))
        itl.extend(b - a for a, b in zip(r.times, r.times[1:]))
    chunks = sum(len(r.times) for r in ok)
    return {
        "num_prompts": num_prompts,
        "num_sent": len(sent) + len(pending),
        "completed": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "complete": len(ok) == num_prompts,
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + len(ok) * input_len) / elapsed,
        "tokens_per_chunk": out_tokens / chunks if chunks else None,
        "usage_missing": usage_missing,
        "ttft_ms": percentiles(ttft, 1e3),
        "tpot_ms": percentiles(tpot, 1e3),
        "itl_ms": percentiles(itl, 1e3),
        "e2e_ms": percentiles(e2e, 1e3),
    }


__all__ = ["fetch_model_name", "run_serve", "server_root"]
