"""``fleetlm bench startup``: how fast a model starts and how fast its first request is, cold and warm cache.

Each start runs in a fresh process (nothing warm in memory): the engine is
built with the given settings and a compile-cache directory, then the first
request (``input_len`` prompt tokens, one output token) is timed against the
median of the next ones, and the first batch-1 decode against a later one.
Reported per start: the command-to-engine seconds, the engine's start-up
breakdown (``LLMEngine.startup_seconds``: tokenizer, workers, weights, KV
cache, CUDA graphs, warm-up), the compile cache it found (entries, whether a
finished warm-up of the same settings had filled it) and the weights' GB/s.

The scenarios: ``cold`` (an empty cache directory) then ``warm`` (the
directory the cold start filled), the second start of the same model and
settings on the same machine.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

RESULT = "STARTUP-RESULT "


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One start, in this (fresh) process: the breakdown and the first requests' latencies."""
    import random

    t_import = time.perf_counter()
    import torch

    from fleetlm import LLM, SamplingParams

    import_s = time.perf_counter() - t_import
    t0 = time.perf_counter()
    llm = LLM(**spec["engine"])
    build_s = time.perf_counter() - t0
    engine = llm.engine
    cuda = engine.config.parallel.device == "cuda"
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def prompt() -> list[int]:
        return [rng.randrange(min(100, vocab // 2), vocab) for _ in range(spec["input_len"])]

    def ttft() -> float:
        sync()
        t = time.perf_counter()
        llm.generate(prompt(), SamplingParams(max_tokens=1, ignore_eos=True))
        sync()
        return time.perf_counter() - t

    def decode() -> float:
        first = ttft()
        t = time.perf_counter()
        out = llm.generate(prompt(), SamplingParams(max_tokens=spec["output_len"], ignore_eos=True))
        sync()
        return (len(out[0].outputs[0].token_ids) - 1) / max(1e-9, time.perf_counter() - t - first)

    first_ttft = ttft()
    steady_ttft = statistics.median(ttft() for _ in range(spec["steady_requests"]))
    first_decode = decode()
    steady_decode = statistics.median(decode() for _ in range(max(1, spec["steady_requests"] // 2)))
    rep = engine.warmup_report
    out = {
        "import_s": import_s, "build_s": build_s, "startup_seconds": engine.startup_seconds,
        "startup_details": engine.startup_details,
        "warmup_phases": rep.phases if rep else None, "warmup_finished": rep.finished if rep else None,
        "first_ttft_s": first_ttft, "steady_ttft_s": steady_ttft, "ttft_ratio": first_ttft / steady_ttft,
        "first_decode_tok_s": first_decode, "steady_decode_tok_s": steady_decode,
        "decode_ratio": first_decode / steady_decode,
    }
    engine.shutdown()
    return out


def run_start(engine: dict[str, Any], *, input_len: int = 128, output_len: int = 128, steady_requests: int = 5,
              timeout_s: float = 300.0) -> dict[str, Any]:
    """One start in a child process (``child``); its result, or what went wrong, with the process's seconds."""
    spec = {"engine": engine, "input_len": input_len, "output_len": output_len, "steady_requests": steady_requests}
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "fleetlm.benchmarks.startup", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"error": f"no result within {timeout_s:.0f} s", "stderr": err[-3000:]}
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT)), None)
    if line is None:
        return {"error": f"rc={proc.returncode}", "stderr": proc.stderr[-3000:]}
    res = json.loads(line[len(RESULT):])
    res["process_s"] = time.perf_counter() - t
    return res


def run_startup(engine: dict[str, Any], *, compile_cache_dir: str | None = None, input_len: int = 128,
                output_len: int = 128, steady_requests: int = 5, timeout_s: float = 300.0) -> dict[str, Any]:
    """The ``cold`` and ``warm`` starts of one model and settings (see the module docstring).

    ``compile_cache_dir``: where the cache lives (it must not exist yet, so the first
    start is cold); default a fresh temporary directory, removed afterwards.
    """
    import shutil

    own = compile_cache_dir is None
    root = tempfile.mkdtemp(prefix="fleetlm-startup-") if own else compile_cache_dir
    if not own and os.path.exists(root) and os.listdir(root):
        raise ValueError(f"--compile-cache-dir {root} is not empty: the first start would not be cold")
    try:
        kw = {**engine, "compile_cache_dir": root}
        return {name: run_start(kw, input_len=input_len, output_len=output_len, steady_requests=steady_requests,
                                timeout_s=timeout_s)
                for name in ("cold", "warm")}
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def summary(runs: dict[str, Any]) -> str:
    parts = []
    for name, r in runs.items():
        if "error" in r:
            parts.append(f"{name}: {r['error']}")
            continue
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in r["startup_seconds"].items())
        parts.append(f"{name}: engine {r['build_s']:.1f} s ({phases}); first TTFT {1e3 * r['first_ttft_s']:.1f} ms "
                     f"= {r['ttft_ratio']:.2f}x steady")
    return "; ".join(parts)


if __name__ == "__main__":
    result = child(json.loads(sys.argv[1]))
    print(RESULT + json.dumps(result), flush=True)
