"""``fleetlm bench``: throughput, latency, serve and prefix benchmarks, each writing a JSON record.

    fleetlm bench throughput --model llama-3.1-8b --load-format dummy --num-prompts 1000 --input-len 256 --output-len 256
    fleetlm bench latency    --model llama-3.1-8b --load-format dummy --batch-size 1 --input-len 128 --output-len 512
    fleetlm bench prefix     --model llama-3.1-8b --load-format dummy --prefix-len 2000 --shared-fraction 0.9
    fleetlm bench serve      --base-url http://127.0.0.1:8000 --max-concurrency 1,8,32,128 --input-len 512 --output-len 128

Every record is ``{benchmark, card, num_devices, versions, commit, date,
config, figures}``, written to ``<name>-<UTC time>.json`` in the current
directory (or ``--results-dir``, or exactly ``--output``), never into the
installed package. Prompts are random token ids (seeded), requests use
``ignore_eos`` so every request produces exactly the tokens asked for.

What the figures mean:

- Ceilings are measured in the same process, before the engine takes the
  device's memory: ``matmul_tflops`` (a square ``n^3`` matmul in the model's
  dtype, 8192 on GPU, 1024 on CPU; ``2 n^3`` FLOPs each) and ``copy_gbps``
  (a device-to-device copy of 1 GiB on GPU / 64 MiB on CPU, counting the
  bytes read plus the bytes written).
- MFU (throughput): model FLOPs of the tokens the engine had to compute,
  divided by wall time and by the matmul ceiling times the number of
  devices. A token computed at position ``p`` costs ``2 * linear_params +
  4 * layers * heads * head_dim * (p + 1)`` (the projections and MLP, then
  ``QK^T`` and ``PV`` over its causal context); every generated token also
  costs ``2 * vocab * hidden`` for its logits. Prefix-cache hits are not
  computed, so they are not counted; recomputation after preemption is not
  useful work, so it is not counted either.
- MBU (latency): bytes a decode step must read, divided by step time and by
  the copy bandwidth. Weights count as ``num_params * dtype bytes`` (all of
  them, embedding included: the convention of the performance issue's
  "16.06 GB per step" for Llama-3.1-8B), plus the K/V the batch's contexts
  hold at the mean context length of the run.
- Time limits: a run that hits ``--time-limit`` aborts what is left and says
  ``complete: false``; rates are then over the tokens actually produced.

The functions below (``measure_ceilings``, ``run_throughput``,
``run_latency``, ``run_prefix``, ``run_serve``, ``make_record``,
``write_record``) are what ``benchmarks/gpu_suite.py`` calls; ``main`` is
the CLI (``fleetlm.cluster.cli`` dispatches ``fleetlm bench ...`` here).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]  # the fleetlm package root (== the repository root)


class BenchError(Exception):
    """A mistake in the benchmark's arguments: printed, exit status 2."""


# --- the model's arithmetic ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts, FLOPs and bytes of a Llama-family model, from its HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelShape:
        heads = int(hf["num_attention_heads"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
        )

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_linear_params(self) -> int:
        """Weights (and biases) of one layer's matmuls: q, k, v, o, gate, up, down."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * d, self.num_kv_heads * d
        params = h * q + 2 * h * kv + q * h + 3 * h * i
        if self.attention_bias:
            params += q + 2 * kv + h
        if self.mlp_bias:
            params += 2 * i + h
        return params

    @property
    def linear_params(self) -> int:
        """Params every computed token multiplies (all layers' matmuls, not the logits)."""
        return self.num_layers * self.layer_linear_params

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Embedding + layers (matmuls and two norms each) + final norm + lm_head unless tied."""
        per_layer = self.layer_linear_params + 2 * self.hidden_size
        return self.embedding_params + self.num_layers * per_layer + self.hidden_size + self.lm_head_params

    def kv_bytes_per_token(self, elem_size: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_size

    def request_flops(self, prompt_len: int, num_cached: int, num_generated: int) -> int:
        """Model FLOPs to produce ``num_generated`` tokens after ``prompt_len`` with ``num_cached`` prefix hits.

        The engine runs positions ``num_cached .. prompt_len + num_generated - 2``
        (the last generated token is sampled, never fed back) and computes
        logits once per generated token.
        """
        if num_generated <= 0:
            return 0
        first, last = num_cached, prompt_len + num_generated - 2
        computed = max(0, last - first + 1)
        # sum over positions p in [first, last] of the causal context (p + 1)
        context = (last + 1) * (last + 2) // 2 - first * (first + 1) // 2 if computed else 0
        attn = 4 * self.num_layers * self.num_heads * self.head_dim
        return 2 * self.linear_params * computed + attn * context + 2 * self.vocab_size * self.hidden_size * num_generated


def count_params(hf_config: dict[str, Any]) -> int:
    """Number of parameters of a Llama-family config (embedding + layers + lm_head unless tied)."""
    return ModelShape.from_hf_config(hf_config).num_params


# --- environment and records -------------------------------------------------------------


def device_card(device: str) -> tuple[str, int]:
    """(what the device is, how many of them this process can see)."""
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)", torch.cuda.device_count()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} cores)", 1


def versions() -> dict[str, str | None]:
    import importlib.metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("fleetlm", "torch", "triton", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit(root: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD`` of the source tree, or "unknown" (no git, or a copied tree)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def make_record(
    benchmark: str, config: dict[str, Any], figures: dict[str, Any], *, device: str, commit: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    card, num_devices = device_card(device)
    v = versions()
    return {
        "benchmark": benchmark,
        "card": card,
        "num_devices": num_devices,
        "torch": v.get("torch"),
        "triton": v.get("triton"),
        "versions": v,
        "commit": commit or git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "figures": figures,
        **extra,
    }


def default_results_dir() -> Path:
    """The current directory: records never go into the installed package's tree."""
    return Path.cwd()


def write_record(record: dict[str, Any], output: str | Path | None = None, results_dir: str | Path | None = None,
                 name: str | None = None) -> Path:
    """Write ``record`` as JSON to ``output``, or to ``<results_dir>/<name>-<UTC time>.json``."""
    if output is not None:
        path = Path(output)
    else:
        directory = Path(results_dir) if results_dir is not None else default_results_dir()
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = name or record["benchmark"]
        path = directory / f"{base}-{stamp}.json"
        n = 1
        while path.exists():
            n += 1
            path = directory / f"{base}-{stamp}-{n}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    return str(o)


# --- ceilings --------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _time_repeated(fn: Callable[[], object], device: str, min_seconds: float, max_iters: int = 1000) -> tuple[float, int]:
    """(seconds per call, calls timed): warm up, then repeat for about ``min_seconds``."""
    for _ in range(2):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(3, min_seconds / once)))
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters, iters


def measure_matmul_flops(device: str, dtype: str = "bfloat16", n: int | None = None, min_seconds: float = 1.0) -> dict[str, Any]:
    """FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (2 n^3 FLOPs per call)."""
    import torch

    n = n or (8192 if device == "cuda" else 1024)
    dt = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dt, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dt)
    seconds, iters = _time_repeated(lambda: torch.matmul(a, b, out=c), device, min_seconds)
    return {"matmul_size": n, "matmul_dtype": dtype, "matmul_iters": iters, "matmul_tflops": 2 * n**3 / seconds / 1e12}


def measure_copy_bandwidth(device: str, nbytes: int | None = None, min_seconds: float = 1.0) -> dict[str, Any]:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    import torch

    nbytes = nbytes or ((1 << 30) if device == "cuda" else (64 << 20))
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds, iters = _time_repeated(lambda: dst.copy_(src), device, min_seconds)
    return {"copy_bytes": nbytes, "copy_iters": iters, "copy_gbps": 2 * nbytes / seconds / 1e9}


def measure_ceilings(device: str, dtype: str = "bfloat16", matmul_size: int | None = None,
                     copy_bytes: int | None = None, min_seconds: float = 1.0) -> dict[str, Any]:
    """Matmul TFLOP/s and copy GB/s of this device, measured now (then the memory is given back)."""
    out = {"device": device}
    out.update(measure_copy_bandwidth(device, copy_bytes, min_seconds))
    out.update(measure_matmul_flops(device, dtype, matmul_size, min_seconds))
    _free_device_memory(device)
    return out


def _free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# --- workloads ----------------------------------------------------------------------------------


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


def _rng(seed: int):
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
    rng = _rng(seed + 7919)
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


def _pcts(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
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
    rng = _rng(seed)
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
    rng = _rng(seed)
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
    kv_bytes = batch_size * mean_context * shape.kv_bytes_per_token(elem)
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
    prefix = random_token_ids(prefix_len, vocab_size, _rng(seed))
    # The unique parts come from another stream, so an unshared workload of the
    # same seed never starts with the shared workload's prefix.
    rng = _rng(seed + 1_000_003)
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


# --- serve: an HTTP client ---------------------------------------------------------------------


@dataclass
class _RequestResult:
    start: float
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    completion_tokens: int | None = None
    end: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None


async def _stream_completion(session, url: str, payload: dict[str, Any], headers: dict[str, str],
                             timeout_s: float) -> _RequestResult:
    import aiohttp

    res = _RequestResult(start=time.perf_counter())
    try:
        async with session.post(url, json=payload, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                await resp.read()
                res.error = f"http_{resp.status}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = "stream_error"
                    return res
                if obj.get("usage"):
                    res.completion_tokens = obj["usage"].get("completion_tokens")
                if obj.get("choices"):
                    res.chunk_times.append(time.perf_counter())
            res.end = time.perf_counter()
            if not res.chunk_times:
                res.error = "empty_stream"
    except asyncio.TimeoutError:
        res.error = "timeout"
    except aiohttp.ClientError as e:
        res.error = type(e).__name__
    except json.JSONDecodeError:
        res.error = "bad_json"
    return res


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
    import aiohttp

    url = f"{base_url.rstrip('/')}/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = _rng(seed)
    prompts = [random_token_ids(input_len, vocab_size, rng) for _ in range(num_prompts)]

    def payload(prompt: list[int]) -> dict[str, Any]:
        return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(warmup_requests):
            warm = random_token_ids(input_len, vocab_size, rng)
            r = await _stream_completion(session, url, {**payload(warm), "max_tokens": min(output_len, 4)}, headers,
                                         request_timeout_s)
            if r.error is not None:
                raise BenchError(f"warm-up request failed: {r.error} (is {url} serving {model!r}?)")
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        t0 = time.perf_counter()
        stop_at = t0 + duration_s

        async def one(prompt: list[int]) -> _RequestResult | None:
            if sem is None:
                return await _stream_completion(session, url, payload(prompt), headers, request_timeout_s)
            async with sem:
                if time.perf_counter() > stop_at:
                    return None  # never sent
                return await _stream_completion(session, url, payload(prompt), headers, request_timeout_s)

        tasks = []
        for prompt in prompts:
            if time.perf_counter() > stop_at:
                break
            tasks.append(asyncio.create_task(one(prompt)))
            if math.isfinite(request_rate) and request_rate > 0:
                await asyncio.sleep(float(rng.exponential(1.0 / request_rate)))
        done, pending = await asyncio.wait(tasks, timeout=max(1.0, stop_at + request_timeout_s - time.perf_counter())) \
            if tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        results = [t.result() for t in tasks if t in done]
    sent = [r for r in results if r is not None]
    ok = [r for r in sent if r.ok]
    errors: dict[str, int] = {}
    for r in sent:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    if pending:
        errors["cancelled"] = len(pending)
    end = max((r.end for r in ok), default=time.perf_counter())
    elapsed = max(end - t0, 1e-9)
    ttft, tpot, itl, e2e = [], [], [], []
    out_tokens = 0
    usage_missing = 0
    for r in ok:
        n = r.completion_tokens
        if n is None:
            usage_missing += 1
            n = len(r.chunk_times)
        out_tokens += n
        first = r.chunk_times[0] - r.start
        ttft.append(first)
        e2e.append(r.end - r.start)
        if n > 1:
            tpot.append((r.end - r.start - first) / (n - 1))
        itl.extend(b - a for a, b in zip(r.chunk_times, r.chunk_times[1:]))
    chunks = sum(len(r.chunk_times) for r in ok)
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
        "ttft_ms": _pcts(ttft, 1e3),
        "tpot_ms": _pcts(tpot, 1e3),
        "itl_ms": _pcts(itl, 1e3),
        "e2e_ms": _pcts(e2e, 1e3),
    }


# --- the CLI ---------------------------------------------------------------------------------------

# Engine flags: argparse dest -> EngineArgs field (only flags the user gave are passed on).
ENGINE_FLAGS = (
    "model", "load_format", "dtype", "device", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
    "gpu_memory_utilization", "tensor_parallel_size", "pipeline_parallel_size", "enforce_eager",
    "enable_prefix_caching", "num_kv_blocks", "block_size", "quantization",
)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m-instruct")
    g.add_argument("--load-format", choices=("auto", "safetensors", "gguf", "dummy"))
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    g.add_argument("--quantization", help="weight format: fp8, int8 (quantized at load), or a checkpoint's own")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--gpu-memory-utilization", type=float)
    g.add_argument("--tensor-parallel-size", type=int)
    g.add_argument("--pipeline-parallel-size", type=int)
    g.add_argument("--enforce-eager", action="store_true", default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--num-kv-blocks", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineArgs field (VALUE parsed as JSON when it can be)")


def _add_common_args(p: argparse.ArgumentParser, ceilings: bool = True) -> None:
    g = p.add_argument_group("record")
    g.add_argument("--output", help="write the JSON record here (default: <name>-<UTC time>.json in --results-dir)")
    g.add_argument("--results-dir", help="directory for the record when --output is not given (default: the current directory)")
    g.add_argument("--commit", help="commit to record (default: git rev-parse HEAD, else 'unknown')")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--time-limit", type=float, default=600.0,
                   help="seconds; at the limit the run aborts what is left and reports complete=false")
    if ceilings:
        g.add_argument("--no-ceilings", action="store_true", help="skip measuring matmul/copy ceilings (no MFU/MBU)")
        g.add_argument("--matmul-size", type=int, help="ceiling matmul size n (default 8192 on GPU, 1024 on CPU)")
        g.add_argument("--ceiling-seconds", type=float, default=1.0, help="time each ceiling measurement about this long")
        g.add_argument("--no-warmup", action="store_true")


def engine_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    kw = {name: getattr(ns, name) for name in ENGINE_FLAGS if getattr(ns, name, None) is not None}
    for item in ns.engine_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--engine-arg wants KEY=VALUE, got {item!r}")
        try:
            kw[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            kw[key.replace("-", "_")] = value
    return kw


def _resolved_device_dtype(kw: dict[str, Any]) -> tuple[str, str]:
    from fleetlm.engine.args import EngineArgs

    try:
        device = EngineArgs.from_kwargs(**kw).resolve_device()
    except TypeError as e:
        raise BenchError(str(e)) from None
    dtype = kw.get("dtype") or "auto"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


def _default_make_llm(**kw):
    from fleetlm import LLM

    return LLM(**kw)


def _release(llm, device: str) -> None:
    llm.engine.shutdown()
    del llm
    _free_device_memory(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlm bench", description="Benchmark FleetLM; each run writes a JSON record.")
    sub = parser.add_subparsers(dest="subcommand", required=True)

    t = sub.add_parser("throughput", help="offline throughput (requests/s, tokens/s, MFU)")
    _add_engine_args(t)
    t.add_argument("--num-prompts", type=int, default=1000)
    t.add_argument("--input-len", type=int, default=256)
    t.add_argument("--output-len", type=int, default=256)
    t.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]")
    t.add_argument("--temperature", type=float, default=0.0)
    _add_common_args(t)

    lat = sub.add_parser("latency", help="decode step time of a fixed batch, tokens/s, MBU")
    _add_engine_args(lat)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=512)
    lat.add_argument("--num-iters", type=int, default=3)
    _add_common_args(lat)

    pre = sub.add_parser("prefix", help="shared-prefix workload with prefix caching on and off")
    _add_engine_args(pre)
    pre.add_argument("--num-prompts", type=int, default=64)
    pre.add_argument("--shared-fraction", type=float, default=0.9, help="fraction of each prompt that is the shared prefix")
    pre.add_argument("--prefix-len", type=int, help="shared prefix tokens (default 2000; prompt = prefix / fraction)")
    pre.add_argument("--input-len", type=int, help="prompt tokens (instead of --prefix-len)")
    pre.add_argument("--output-len", type=int, default=16)
    pre.add_argument("--modes", default="on,off", help="which caching modes to run, in order (on, off or both)")
    pre.add_argument("--repeats", type=int, default=1,
                     help="run the modes this many times, alternating (on, off, on, off, ...); report each mode's median")
    _add_common_args(pre, ceilings=False)
    pre.add_argument("--no-warmup", action="store_true")

    s = sub.add_parser("serve", help="load a running OpenAI-compatible endpoint (streaming)")
    s.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server, as http://host:port or (as OpenAI clients take it) http://host:port/v1")
    s.add_argument("--served-model", help="`model` to send (default: the first of GET /v1/models)")
    s.add_argument("--api-key")
    s.add_argument("--num-prompts", type=int, default=200, help="per concurrency level")
    s.add_argument("--input-len", type=int, default=512)
    s.add_argument("--output-len", type=int, default=128)
    s.add_argument("--vocab-size", type=int, default=32000, help="random prompt ids are drawn below this")
    s.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: all at once)")
    s.add_argument("--max-concurrency", default=None, help="limit on requests in flight; a comma list runs a sweep")
    s.add_argument("--duration", type=float, default=120.0, help="no request starts after this many seconds")
    s.add_argument("--request-timeout", type=float, default=300.0)
    s.add_argument("--warmup-requests", type=int, default=1)
    _add_common_args(s, ceilings=False)
    return parser


def _positive(ns: argparse.Namespace, *names: str) -> None:
    for name in names:
        v = getattr(ns, name)
        if v is not None and v < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _ceilings_for(ns: argparse.Namespace, device: str, dtype: str) -> dict[str, Any] | None:
    if ns.no_ceilings:
        return None
    return measure_ceilings(device, dtype, matmul_size=ns.matmul_size, min_seconds=ns.ceiling_seconds)


def _finish(ns: argparse.Namespace, name: str, config: dict[str, Any], figures: dict[str, Any], device: str,
            summary: str) -> int:
    record = make_record(name, config, figures, device=device, commit=ns.commit)
    path = write_record(record, ns.output, ns.results_dir)
    print(f"{name}: {summary}")
    print(f"record: {path}")
    return 0


def cmd_throughput(ns, make_llm) -> int:
    _positive(ns, "num_prompts", "input_len", "output_len")
    kw = engine_kwargs(ns)
    device, dtype = _resolved_device_dtype(kw)
    ceilings = _ceilings_for(ns, device, dtype)
    llm = (make_llm or _default_make_llm)(**kw)
    figures = run_throughput(llm, num_prompts=ns.num_prompts, input_len=ns.input_len, output_len=ns.output_len,
                             range_ratio=ns.range_ratio, seed=ns.seed, temperature=ns.temperature,
                             time_limit=ns.time_limit, ceilings=ceilings, warmup=not ns.no_warmup)
    if make_llm is None:
        _release(llm, device)
    config = {"engine": kw, "num_prompts": ns.num_prompts, "input_len": ns.input_len, "output_len": ns.output_len,
              "range_ratio": ns.range_ratio, "temperature": ns.temperature, "seed": ns.seed,
              "time_limit_s": ns.time_limit, "ceilings": ceilings}
    mfu = figures["mfu"]
    summary = (f"{figures['requests_per_s']:.2f} req/s, {figures['output_tokens_per_s']:.1f} output tok/s, "
               f"{figures['total_tokens_per_s']:.1f} total tok/s"
               + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")
               + ("" if figures["complete"] else " (time limit hit)"))
    return _finish(ns, "throughput", config, figures, device, summary)


def cmd_latency(ns, make_llm) -> int:
    _positive(ns, "batch_size", "input_len", "output_len", "num_iters")
    kw = engine_kwargs(ns)
    device, dtype = _resolved_device_dtype(kw)
    ceilings = _ceilings_for(ns, device, dtype)
    llm = (make_llm or _default_make_llm)(**kw)
    figures = run_latency(llm, batch_size=ns.batch_size, input_len=ns.input_len, output_len=ns.output_len,
                          num_iters=ns.num_iters, seed=ns.seed, time_limit=ns.time_limit, ceilings=ceilings,
                          warmup=not ns.no_warmup)
    if make_llm is None:
        _release(llm, device)
    config = {"engine": kw, "batch_size": ns.batch_size, "input_len": ns.input_len, "output_len": ns.output_len,
              "num_iters": ns.num_iters, "seed": ns.seed, "time_limit_s": ns.time_limit, "ceilings": ceilings}
    if "error" in figures:
        summary = figures["error"]
    else:
        mbu = figures["mbu"]
        summary = (f"{figures['decode_tokens_per_s']:.1f} decode tok/s, {figures['decode_step_ms']['mean']:.2f} ms/step, "
                   f"TTFT {figures['ttft_ms']:.1f} ms" + (f", MBU {100 * mbu:.1f}%" if mbu is not None else ""))
    return _finish(ns, "latency", config, figures, device, summary)


def cmd_prefix(ns, make_llm) -> int:
    _positive(ns, "num_prompts", "output_len", "repeats")
    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes) or len(set(modes)) != len(modes):
        raise BenchError(f"--modes takes on, off or on,off; got {ns.modes!r}")
    input_len, prefix_len = resolve_prefix_shape(ns.input_len, ns.prefix_len, ns.shared_fraction)
    kw = engine_kwargs(ns)
    if "enable_prefix_caching" in kw:
        raise BenchError("prefix runs caching on and off itself (see --modes); drop --[no-]enable-prefix-caching")
    device, _ = _resolved_device_dtype(kw)
    # A small difference between modes (the cost of caching with nothing to
    # share) is below the noise of one run: alternate the modes and take medians.
    trials: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(ns.repeats):
        for mode in modes:
            llm = (make_llm or _default_make_llm)(**kw, enable_prefix_caching=mode == "on")
            trials[mode].append(run_prefix(llm, num_prompts=ns.num_prompts, input_len=input_len, prefix_len=prefix_len,
                                           output_len=ns.output_len, seed=ns.seed, time_limit=ns.time_limit,
                                           warmup=not ns.no_warmup))
            if make_llm is None:
                _release(llm, device)
    runs = {m: dict(sorted(t, key=lambda r: r["requests_per_s"])[(len(t) - 1) // 2]) for m, t in trials.items()}
    if ns.repeats > 1:
        for m, t in trials.items():
            runs[m]["requests_per_s_all"] = [r["requests_per_s"] for r in t]
    figures: dict[str, Any] = dict(runs)
    if "on" in runs and "off" in runs:
        figures.update(prefix_comparison(runs["on"], runs["off"]))
    config = {"engine": kw, "num_prompts": ns.num_prompts, "input_len": input_len, "prefix_len": prefix_len,
              "shared_fraction": ns.shared_fraction, "output_len": ns.output_len, "modes": modes, "seed": ns.seed,
              "repeats": ns.repeats, "time_limit_s": ns.time_limit}
    parts = [f"caching {m}: {r['requests_per_s']:.2f} req/s, hit rate {100 * r['prefix_cache_hit_rate']:.0f}%"
             for m, r in runs.items()]
    if figures.get("speedup") is not None:
        parts.append(f"speedup {figures['speedup']:.2f}x")
    return _finish(ns, "prefix", config, figures, device, "; ".join(parts))


def cmd_serve(ns, make_llm) -> int:
    _positive(ns, "num_prompts", "input_len", "output_len", "vocab_size")
    levels: list[int | None] = [None]
    if ns.max_concurrency:
        try:
            levels = [int(x) for x in ns.max_concurrency.split(",") if x.strip()]
        except ValueError:
            raise BenchError(f"--max-concurrency takes integers (a comma list for a sweep), got {ns.max_concurrency!r}") from None
        if not levels or min(levels) < 1:
            raise BenchError("--max-concurrency values must be >= 1")
    if ns.output and len(levels) > 1:
        raise BenchError("--output names one file; a concurrency sweep writes one record per level (use --results-dir)")
    if not (ns.request_rate > 0):
        raise BenchError("--request-rate must be > 0 (inf: all at once)")
    ns.base_url = server_root(ns.base_url)
    model = ns.served_model or asyncio.run(fetch_model_name(ns.base_url, ns.api_key))
    for level in levels:
        figures = asyncio.run(run_serve(
            base_url=ns.base_url, model=model, num_prompts=ns.num_prompts, input_len=ns.input_len,
            output_len=ns.output_len, vocab_size=ns.vocab_size, request_rate=ns.request_rate, max_concurrency=level,
            duration_s=min(ns.duration, ns.time_limit), request_timeout_s=ns.request_timeout, api_key=ns.api_key,
            seed=ns.seed, warmup_requests=ns.warmup_requests,
        ))
        config = {"base_url": ns.base_url, "model": model, "num_prompts": ns.num_prompts, "input_len": ns.input_len,
                  "output_len": ns.output_len, "request_rate": ns.request_rate, "max_concurrency": level,
                  "duration_s": ns.duration, "request_timeout_s": ns.request_timeout, "seed": ns.seed,
                  "note": "card and versions describe the client machine"}
        name = "serve" if level is None else f"serve-c{level}"
        summary = (f"{figures['completed']}/{figures['num_prompts']} ok, {figures['errors']} errors, "
                   f"{figures['requests_per_s']:.2f} req/s, {figures['output_tokens_per_s']:.1f} output tok/s, "
                   f"TTFT p50 {_fmt(figures['ttft_ms']['p50'])} ms, TPOT p50 {_fmt(figures['tpot_ms']['p50'])} ms")
        record = make_record(name, config, figures, device="cpu", commit=ns.commit)
        path = write_record(record, ns.output, ns.results_dir, name=name)
        print(f"{name}: {summary}")
        print(f"record: {path}")
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


COMMANDS: dict[str, Callable[..., int]] = {
    "throughput": cmd_throughput,
    "latency": cmd_latency,
    "prefix": cmd_prefix,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None, *, make_llm: Callable[..., Any] | None = None) -> int:
    """Entry point of ``fleetlm bench``. ``make_llm(**engine_kwargs)`` builds the engine
    (default ``fleetlm.LLM``); an injected one is not shut down afterwards."""
    ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return COMMANDS[ns.subcommand](ns, make_llm)
    except BenchError as e:
        print(f"fleetlm bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
