"""Cold start on one GPU: how fast a new replica is ready, and how fast its first request is.

    python benchmarks/gpu_startup.py --out $OUT [--model llama-3.1-8b] [--serve]

Offline scenarios, each in a fresh process (``load_format="dummy"``):

- ``no_warmup_cold``: warm-up off, an empty compile cache (the behaviour
  before warm-up existed: the first requests compile the kernels);
- ``warmup_cold``: warm-up on, an empty compile cache;
- ``warmup_warm``: warm-up on, the cache the previous start filled.

Each reports the start-up breakdown, the first request's TTFT (128 prompt
tokens, one output token) against the median of the next five, and the
first batch-1 decode (128 tokens) against a later one. With ``--serve``,
``fleetlm serve`` is timed from the command to ``/health`` 200, cold and
then warm cache, with the first chat completion's TTFT over HTTP.
Every child and every wait has a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHILD = r"""
import json, random, statistics, sys, time
t_import = time.perf_counter()
import torch
from fleetlm import LLM, SamplingParams
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
llm = LLM(model=a["model"], load_format="dummy", dtype="bfloat16", max_model_len=4096,
          warmup=a["warmup"], compile_cache_dir=a["cache"])
build_s = time.perf_counter() - t0
rng = random.Random(0)
def prompt(n):
    return [rng.randrange(100, 32000) for _ in range(n)]
def ttft():
    torch.cuda.synchronize(); t = time.perf_counter()
    llm.generate(prompt(128), SamplingParams(max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize(); return time.perf_counter() - t
def decode(n=128):
    first = ttft()
    t = time.perf_counter()
    out = llm.generate(prompt(128), SamplingParams(max_tokens=n, ignore_eos=True))
    torch.cuda.synchronize(); total = time.perf_counter() - t
    return (len(out[0].outputs[0].token_ids) - 1) / max(1e-9, total - first)
first_ttft = ttft()
steady_ttft = statistics.median(ttft() for _ in range(5))
first_decode = decode()
steady_decode = statistics.median(decode() for _ in range(3))
e = llm.engine
rep = e.warmup_report
print("RESULT " + json.dumps({
    "build_s": build_s, "startup_seconds": e.startup_seconds,
    "compile_cache": e.workers.compile_cache.to_dict() if e.workers.compile_cache else None,
    "warmup_phases": rep.phases if rep else None, "warmup_finished": rep.finished if rep else None,
    "first_ttft_s": first_ttft, "steady_ttft_s": steady_ttft, "ttft_ratio": first_ttft / steady_ttft,
    "first_decode_tok_s": first_decode, "steady_decode_tok_s": steady_decode,
    "decode_ratio": first_decode / steady_decode}))
"""


def offline(model: str, warmup: bool, cache: str, timeout_s: float) -> dict:
    args = json.dumps({"model": model, "warmup": warmup, "cache": cache})
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": f"rc={proc.returncode}", "stderr": proc.stderr[-3000:]}
    res = json.loads(line[len("RESULT "):])
    res["process_s"] = time.perf_counter() - t
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except Exception:  # noqa: BLE001 - not up yet
        return 0


def _chat(base: str, model: str) -> float:
    body = json.dumps({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "x " * 120}]})
    req = urllib.request.Request(base + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
    return time.perf_counter() - t


def serve(model: str, cache: str, limit_s: float) -> dict:
    port = _free_port()
    cmd = ["fleetlm", "serve", model, "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096",
           "--port", str(port), "--compile-cache-dir", cache]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"command": " ".join(cmd)}
    try:
        while time.perf_counter() - t0 < limit_s and proc.poll() is None:
            if _get(base + "/health") == 200:
                result["ready_s"] = time.perf_counter() - t0
                break
            time.sleep(0.5)
        if "ready_s" in result:
            first = _chat(base, model)
            steady = statistics.median(_chat(base, model) for _ in range(5))
            result.update(first_ttft_s=first, steady_ttft_s=steady, ttft_ratio=first / steady)
        else:
            result["error"] = "not ready in time" if proc.poll() is None else f"exited {proc.returncode}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=10)
        if "error" in result:
            result["stderr"] = (proc.stderr.read() if proc.stderr else "")[-3000:]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--serve", action="store_true")
    p.add_argument("--child-timeout", type=float, default=200.0)
    ns = p.parse_args(argv)
    import torch

    root = Path(tempfile.mkdtemp(prefix="fleetlm-cc-"))
    record: dict = {"benchmark": "startup", "card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                    "model": ns.model, "offline": {}, "serve": {}}
    for name, warmup, cache in (("no_warmup_cold", False, root / "a"), ("warmup_cold", True, root / "b"),
                                ("warmup_warm", True, root / "b")):
        record["offline"][name] = r = offline(ns.model, warmup, str(cache), ns.child_timeout)
        print(name, json.dumps({k: r.get(k) for k in ("build_s", "first_ttft_s", "steady_ttft_s", "ttft_ratio",
                                                      "decode_ratio", "startup_seconds", "error")}), flush=True)
    if ns.serve:
        for name in ("cold", "warm"):
            record["serve"][name] = r = serve(ns.model, str(root / "s"), ns.child_timeout)
            print("serve", name, json.dumps({k: r.get(k) for k in ("ready_s", "first_ttft_s", "steady_ttft_s",
                                                                  "error")}), flush=True)
    path = Path(ns.out) / f"startup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
