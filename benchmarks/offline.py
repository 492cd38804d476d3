"""Offline workloads over an ``LLM``'s engine: throughput (MFU), latency (MBU), shared prefixes.

Prompts are random token ids (seeded); requests use ``ignore_eos`` so every
request produces exactly the tokens asked for.

- MFU (throughput): model FLOPs of the tokens the engine had to compute,
  divided by wall time and by the matmul ceiling times the number of
  devices (``model_shape.ModelShape.request_flops``). Prefix-cache hits are
  not computed, so they are not counted; recomputation after preemption is
  not useful work, so it is not counted either.
- MBU (latency): bytes a decode step must read, divided by step time and by
  the copy bandwidth. Weights count as ``num_params * dtype bytes`` (all of
  them, embedding included), plus the K/V the batch's contexts hold at the
  mean context length of the run.
- Time limits: a run that hits its deadline aborts what is left and says
  ``complete: false``; rates are then over the tokens actually produced.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleetlm.benchmarks.model_shape import ModelShape
from fleetlm.benchmarks.records import BenchError


def random_lengths(n: int, length: int, range_ratio: float, rng) -> list[int]:
    """``n`` lengths uniform in ``[length * (1 - r), length * (1 + r)]`` (at least 1)."""
    if range_ratio <= 0:
        return [length] * n
    lo, hi = max(1, round(length * (1 - range_ratio))), max(1, round(length * (1 + range_ratio)))
    return [int(x) for x in rng.integers(lo, hi + 1, size=n)]


def random_token_ids(length: int, vocab_size: int, rng) -> list[int]:
    # Stay clear of the lowest ids (often special tokens) when the vocabulary allows it.
    low = 10 if vocab_size > 1000 else 0
    return [int(x) for x in rng.integers(low, vocab_size, size=length)]


def seeded_rng(seed: int):
    import numpy as np

    return np.random.default_rng(seed)


@dataclass
class BatchRun:
    """What one batch of requests did: outputs, wall time, per-step timings."""

    outputs: dict[str, Any]  # request id -> last RequestOutput seen
    request_ids: list[str]
    elapsed_s: float
    complete: bool
    step_durations: list[float]
    step_end_times: list[float]  # seconds since start
    step_num_outputs: list[int]
    first_token_time: dict[str, float]  # request id -> seconds since start

    def num_generated(self, rid: str) -> int:
        out = self.outputs.get(rid)
        return len(out.outputs[0].token_ids) if out is not None else 0

    @property
    def num_finished(self) -> int:
        """Requests that ran to their end (not aborted at the deadline)."""
        return sum(1 for rid in self.request_ids
                   if rid in self.outputs and self.outputs[rid].finished
                   and self.outputs[rid].outputs[0].finish_reason not in ("abort", "error"))

    @property
    def output_tokens(self) -> int:
        return sum(self.num_generated(rid) for rid in self.request_ids)


def run_batch(engine, prompts: Sequence[list[int]], params: Sequence[Any], *, deadline: float | None = None,
              tag: str = "bench") -> BatchRun:
    """Add every prompt, step the engine until all finish or ``deadline`` (``time.perf_counter()``
    time) passes; then abort what is left. Times each step."""
    if engine.has_unfinished_requests():
        raise RuntimeError("the engine has unfinished requests; a benchmark needs it idle")
    run_id = uuid.uuid4().hex[:8]
    ids = [f"{tag}-{run_id}-{i}" for i in range(len(prompts))]
    t0 = time.perf_counter()
    for rid, prompt, p in zip(ids, prompts, params):
        engine.add_request(rid, prompt, p)
    outputs: dict[str, Any] = {}
    first_token: dict[str, float] = {}
    durations: list[float] = []
    ends: list[float] = []
    counts: list[int] = []
    remaining = set(ids)
    complete = True
    try:
        while remaining:
            ts = time.perf_counter()
            outs = engine.step()
            te = time.perf_counter()
            durations.append(te - ts)
            ends.append(te - t0)
            counts.append(len(outs))
            for out in outs:
                rid = out.request_id
                outputs[rid] = out
                if rid not in first_token and out.outputs and out.outputs[0].token_ids:
                    first_token[rid] = te - t0
                if out.finished:
                    remaining.discard(rid)
            if remaining and deadline is not None and te > deadline:
                complete = False
                break
            if remaining and not outs and not engine.has_unfinished_requests():
                raise RuntimeError("engine went idle with unfinished requests")
    finally:  # at the deadline, or on an error: leave the engine idle for the next run
        for rid in list(remaining):
            out = engine.abort_request(rid)
            if out is not None:
                outputs[rid] = out
    elapsed = time.perf_counter() - t0
    return BatchRun(outputs, ids, elapsed, complete, durations, ends, counts, first_token)


def _greedy_params(max_tokens: int, temperature: float = 0.0):
    from fleetlm import SamplingParams

    return SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)


def _warmup(engine, vocab: int, num_prompts: int, input_len: int, output_len: int, seed: int,
            deadline: float | None) -> float:
    """Run a small batch of the same shape first (Triton compiles, autotuning); returns seconds."""
    rng = seeded_rng(seed + 7919)
    prompts = [random_token_ids(input_len, vocab, rng) for _ in range(num_prompts)]
    t0 = time.perf_counter()
    run_batch(engine, prompts, [_greedy_params(output_len)] * num_prompts, deadline=deadline, tag="warmup")
    return time.perf_counter() - t0


def _engine_info(llm) -> tuple[Any, ModelShape, int, str, int]:
    """(model config, shape, dtype bytes, device, world size) of an ``LLM``."""
    import torch

    mc = llm.engine.model_config
    elem = torch.empty((), dtype=getattr(torch, mc.dtype)).element_size()
    par = llm.engine.config.parallel
    return mc, ModelShape.from_hf_config(mc.hf_config), elem, par.device, par.world_size


def percentiles(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    import numpy as np

    a = np.asarray(values, dtype=float) * scale
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


def run_throughput(llm, *, num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   seed: int = 0, temperature: float = 0.0, time_limit: float | None = None,
                   ceilings: dict[str, Any] | None = None, warmup: bool = True) -> dict[str, Any]:
    """Offline throughput of ``num_prompts`` random prompts, all submitted at once."""
    mc, shape, _, _, world = _engine_info(llm)
    engine = llm.engine
    rng = seeded_rng(seed)
    in_lens = random_lengths(num_prompts, input_len, range_ratio, rng)
    out_lens = random_lengths(num_prompts, output_len, range_ratio, rng)
    prompts = [random_token_ids(n, mc.vocab_size, rng) for n in in_lens]
    params = [_greedy_params(o, temperature) for o in out_lens]
    start = time.perf_counter()
    deadline = start + time_limit if time_limit else None
    warmup_s = (_warmup(engine, mc.vocab_size, min(num_prompts, 16), input_len, min(output_len, 8), seed, deadline)
                if warmup else 0.0)
    run = run_batch(engine, prompts, params, deadline=deadline, tag="throughput")
    out_tokens = run.output_tokens
    # Prompt tokens of requests whose prefill finished (they produced a token).
    prompt_tokens = sum(len(p) for rid, p in zip(run.request_ids, prompts) if run.num_generated(rid) > 0)
    flops = 0
    cached = 0
    for rid, prompt in zip(run.request_ids, prompts):
        out = run.outputs.get(rid)
        if out is None:
            continue
        cached += out.num_cached_tokens
        flops += shape.request_flops(len(prompt), out.num_cached_tokens, run.num_generated(rid))
    t = run.elapsed_s
    figures: dict[str, Any] = {
        "complete": run.complete,
        "elapsed_s": t,
        "warmup_s": warmup_s,
        "num_requests": num_prompts,
        "num_finished": run.num_finished,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "prefix_cache_hit_tokens": cached,
        "num_steps": len(run.step_durations),
        "requests_per_s": run.num_finished / t,
        "output_tokens_per_s": out_tokens / t,
        "total_tokens_per_s": (prompt_tokens + out_tokens) / t,
        "model_tflops_per_s": flops / t / 1e12,
        "num_params": shape.num_params,
        "mfu": None,
    }
    if ceilings and ceilings.get("matmul_tflops"):
        figures["matmul_tflops"] = ceilings["matmul_tflops"]
        figures["mfu"] = flops / t / 1e12 / (ceilings["matmul_tflops"] * world)
    return figures


def run_latency(llm, *, batch_size: int, input_len: int, output_len: int, num_iters: int = 1, seed: int = 0,
                time_limit: float | None = None, ceilings: dict[str, Any] | None = None,
                warmup: bool = True) -> dict[str, Any]:
    """Time per decode step of a fixed batch (all prompts the same length), and MBU.

    Decode steps are the steps after every request has its first token; the
    step before that (or steps, with chunked prefill) is the prefill, whose
    end is the time to first token.
    """
    if output_len < 2:
        raise BenchError("latency needs --output-len >= 2 (at least one decode step)")
    mc, shape, elem, _, world = _engine_info(llm)
    engine = llm.engine
    start = time.perf_counter()
    deadline = start + time_limit if time_limit else None
    warmup_s = (_warmup(engine, mc.vocab_size, batch_size, input_len, min(output_len, 16), seed, deadline)
                if warmup else 0.0)
    rng = seeded_rng(seed)
    iters: list[dict[str, Any]] = []
    complete = True
    for _ in range(num_iters):
        if deadline is not None and time.perf_counter() > deadline and iters:
            complete = False
            break
        prompts = [random_token_ids(input_len, mc.vocab_size, rng) for _ in range(batch_size)]
        run = run_batch(engine, prompts, [_greedy_params(output_len)] * batch_size, deadline=deadline, tag="latency")
        complete = complete and run.complete
        if len(run.first_token_time) < batch_size:
            break
        prefill_end = max(run.first_token_time.values())
        decode = [d for d, end in zip(run.step_durations, run.step_end_times) if end > prefill_end + 1e-9]
        if not decode:
            break
        iters.append({"ttft_s": prefill_end, "decode": decode, "elapsed_s": run.elapsed_s,
                      "output_tokens": run.output_tokens})
    if not iters:
        return {"complete": False, "warmup_s": warmup_s, "error": "no decode step finished within the time limit"}
    steps = [d for it in iters for d in it["decode"]]
    mean_step = sum(steps) / len(steps)
    steps_sorted = sorted(steps)
    mean_context = input_len + output_len / 2
    weight_bytes = shape.num_params * elem
    kv_elem = 1 if engine.config.cache.cache_dtype == "fp8_e4m3" else elem  # kv_cache_dtype="fp8": 1 byte
    kv_bytes = batch_size * mean_context * shape.kv_bytes_per_token(kv_elem)
    figures: dict[str, Any] = {
        "complete": complete,
        "warmup_s": warmup_s,
        "num_iters": len(iters),
        "num_decode_steps": len(steps),
        "ttft_ms": 1e3 * sorted(it["ttft_s"] for it in iters)[len(iters) // 2],
        "decode_step_ms": {
            "mean": 1e3 * mean_step,
            "p50": 1e3 * steps_sorted[len(steps) // 2],
            "p90": 1e3 * steps_sorted[min(len(steps) - 1, int(0.9 * len(steps)))],
            "min": 1e3 * steps_sorted[0],
        },
        "decode_tokens_per_s": batch_size / mean_step,
        "e2e_s": sorted(it["elapsed_s"] for it in iters)[len(iters) // 2],
        "output_tokens_per_s": sum(it["output_tokens"] for it in iters) / sum(it["elapsed_s"] for it in iters),
        "weight_bytes_per_step": weight_bytes,
        "kv_bytes_per_step": kv_bytes,
        "achieved_gbps": (weight_bytes + kv_bytes) / mean_step / 1e9,
        "num_params": shape.num_params,
        "mbu": None,
    }
    if ceilings and ceilings.get("copy_gbps"):
        figures["copy_gbps"] = ceilings["copy_gbps"]
        figures["mbu"] = figures["achieved_gbps"] / (ceilings["copy_gbps"] * world)
        figures["roofline_tokens_per_s"] = batch_size * ceilings["copy_gbps"] * world * 1e9 / (weight_bytes + kv_bytes)
    return figures


def resolve_prefix_shape(input_len: int | None, prefix_len: int | None, shared_fraction: float) -> tuple[int, int]:
    """(prompt length, shared prefix length) from whichever of the two lengths was given."""
    if not 0.0 <= shared_fraction < 1.0:
        raise BenchError(f"--shared-fraction must be in [0, 1), got {shared_fraction}")
    if shared_fraction == 0.0:
        if prefix_len:
            raise BenchError("--prefix-len needs --shared-fraction > 0")
        return (input_len or 2222), 0
    if input_len is not None and prefix_len is not None:
        raise BenchError("give --input-len or --prefix-len with --shared-fraction, not both")
    if input_len is not None:
        return input_len, round(shared_fraction * input_len)
    prefix_len = 2000 if prefix_len is None else prefix_len
    return round(prefix_len / shared_fraction), prefix_len


def prefix_prompts(num_prompts: int, input_len: int, prefix_len: int, vocab_size: int, seed: int
                   ) -> tuple[list[int], list[list[int]]]:
    """A shared prefix of ``prefix_len`` random tokens and ``num_prompts`` prompts of
    ``input_len`` tokens that start with it (the rest random, unique per prompt)."""
    if not 0 <= prefix_len < input_len:
        raise BenchError(f"the shared prefix ({prefix_len}) must be shorter than the prompt ({input_len})")
    prefix = random_token_ids(prefix_len, vocab_size, seeded_rng(seed))
    # The unique parts come from another stream, so an unshared workload of the
    # same seed never starts with the shared workload's prefix.
    rng = seeded_rng(seed + 1_000_003)
    return prefix, [prefix + random_token_ids(input_len - prefix_len, vocab_size, rng) for _ in range(num_prompts)]


def run_prefix(llm, *, num_prompts: int, input_len: int, prefix_len: int, output_len: int, seed: int = 0,
               time_limit: float | None = None, warmup: bool = True) -> dict[str, Any]:
    """One engine (caching on or off) over the shared-prefix workload.

    Before the timed batch, one request of the shared prefix (plus one token)
    runs untimed, with caching on and off alike: the prefix stands for a
    system prompt the server has already seen, so caching on starts from the
    steady state rather than from a race between requests of one batch.
    """
    mc, _, _, _, _ = _engine_info(llm)
    engine = llm.engine
    start = time.perf_counter()
    deadline = start + time_limit if time_limit else None
    # Full-length prompts: a shorter warm-up leaves the long prefill's kernel
    # variants to compile inside the first timed run (seen: 35% off one run).
    warmup_s = _warmup(engine, mc.vocab_size, min(num_prompts, 4), input_len, 4, seed, deadline) if warmup else 0.0
    prefix, prompts = prefix_prompts(num_prompts, input_len, prefix_len, mc.vocab_size, seed)
    if prefix_len:
        run_batch(engine, [prefix + [prompts[0][prefix_len]]], [_greedy_params(1)], deadline=deadline, tag="prime")
    before = engine.stats()
    run = run_batch(engine, prompts, [_greedy_params(output_len)] * num_prompts, deadline=deadline, tag="prefix")
    after = engine.stats()
    queried = after.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens
    hits = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
    return {
        "enable_prefix_caching": llm.engine.config.cache.enable_prefix_caching,
        "complete": run.complete,
        "elapsed_s": run.elapsed_s,
        "warmup_s": warmup_s,
        "num_requests": num_prompts,
        "num_finished": run.num_finished,
        "requests_per_s": run.num_finished / run.elapsed_s,
        "output_tokens": run.output_tokens,
        "prompt_tokens": num_prompts * input_len,
        "prefix_cache_queried_tokens": queried,
        "prefix_cache_hit_tokens": hits,
        "prefix_cache_hit_rate": hits / queried if queried else 0.0,
    }


def prefix_comparison(on: dict[str, Any], off: dict[str, Any]) -> dict[str, Any]:
    """Speedup of caching on over off (requests/s; > 1 means caching helps)."""
    speedup = on["requests_per_s"] / off["requests_per_s"] if off.get("requests_per_s") else None
    return {
        "speedup": speedup,
        "loss_with_caching": (1 - speedup) if speedup is not None else None,
        "complete": bool(on.get("complete") and off.get("complete")),
    }


__all__ = ["BatchRun", "percentiles", "prefix_comparison", "prefix_prompts", "random_lengths", "random_token_ids",
           "resolve_prefix_shape", "seeded_rng", "run_batch", "run_latency", "run_prefix", "run_throughput"]
