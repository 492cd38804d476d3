"""One GPU, TP = 1: the Ray worker path against the engine's own process (issue 18's check).

    python benchmarks/gpu_ray_path.py --out $OUT [--model llama-3.1-8b] [--rounds 2]

Each run is a fresh process (one 8B model on the GPU at a time), alternating
in-process ("uni") and Ray ("ray": one ``WorkerActor``, steps through the
shared-memory ring, CUDA graphs captured in the worker, asynchronous
scheduling), in the order uni, ray, ray, uni, ... Per run:

- batch-1 decode, 128 prompt tokens, 512 output tokens: tok/s after the
  first token, and its MBU against the copy bandwidth measured in that run;
- offline throughput, 512 requests of 512 in / 128 out: req/s;
- on the Ray path, the host's time per step spent sending steps
  (``launch``: encode + ring write) and waiting for results.

Medians per backend and the ray/uni ratios are printed last and written to
``--out`` as JSON (card, date, commit). Every child has a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fleetlm.benchmarks.records import git_commit

CHILD = r"""
import json, random, statistics, sys, time
import torch
a = json.loads(sys.argv[1])
if a["backend"] == "ray":
    import ray
    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
from fleetlm import LLM, SamplingParams

def copy_bw():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
    for _ in range(3): y.copy_(x)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): y.copy_(x)
    torch.cuda.synchronize(); return 2 * 10 * x.numel() / (time.perf_counter() - t)

bw = copy_bw()
llm = LLM(model=a["model"], load_format="dummy", dtype="bfloat16", max_model_len=4096, max_num_seqs=256,
          distributed_executor_backend=a["backend"])
e = llm.engine
timing = {"launch_s": 0.0, "launches": 0, "result_s": 0.0}
if a["backend"] == "ray":
    group = e.workers
    launch, result = group.launch, group._result
    def timed_launch(out):
        t = time.perf_counter(); p = launch(out); timing["launch_s"] += time.perf_counter() - t
        timing["launches"] += 1; return p
    def timed_result(i):
        t = time.perf_counter(); r = result(i); timing["result_s"] += time.perf_counter() - t; return r
    group.launch, group._result = timed_launch, timed_result
rng = random.Random(0)
def prompt(n): return [rng.randrange(100, 30000) for _ in range(n)]
greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
llm.generate([prompt(128)], greedy)
def decode():
    t = time.perf_counter(); llm.generate([prompt(128)], greedy); ttft = time.perf_counter() - t
    t = time.perf_counter()
    out = llm.generate([prompt(128)], SamplingParams(temperature=0.0, max_tokens=512, ignore_eos=True))
    total = time.perf_counter() - t
    return 511 / (total - ttft)
decode()
for k in timing: timing[k] = 0.0 if k != "launches" else 0
tok_s = statistics.median(decode() for _ in range(2))
decode_timing = dict(timing)
prompts = [prompt(512) for _ in range(512)]
t = time.perf_counter()
llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True))
req_s = 512 / (time.perf_counter() - t)
weight_bytes = 16.06e9 if a["model"] == "llama-3.1-8b" else None
res = {"backend": a["backend"], "copy_GBps": bw / 1e9, "decode_tok_s": tok_s, "offline_req_s": req_s,
       "mbu": (tok_s * weight_bytes / bw) if weight_bytes else None,
       "startup_seconds": e.startup_seconds, "steps_ahead": e.num_steps_ahead, "steps": e.num_steps}
if a["backend"] == "ray":
    n = max(1, decode_timing["launches"])
    res["decode_host_us_per_step"] = {"launch": 1e6 * decode_timing["launch_s"] / n,
                                      "wait_for_result": 1e6 * decode_timing["result_s"] / n}
print("RESULT " + json.dumps(res))
llm.engine.shutdown()
"""


def run_child(model: str, backend: str, timeout_s: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"model": model, "backend": backend})],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "error": f"timed out after {timeout_s:g} s"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"backend": backend, "error": f"rc={proc.returncode}", "stderr": proc.stderr[-3000:]}
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child-timeout", type=float, default=150.0)
    ap.add_argument("--budget", type=float, default=540.0, help="stop starting runs after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ns = ap.parse_args()
    order = []
    for r in range(ns.rounds):
        order += ["uni", "ray"] if r % 2 == 0 else ["ray", "uni"]
    t0, runs = time.monotonic(), []
    for backend in order:
        if time.monotonic() - t0 > ns.budget:
            break
        runs.append(run_child(ns.model, backend, ns.child_timeout))
        print(json.dumps(runs[-1])[:400], flush=True)
    summary = {}
    for b in ("uni", "ray"):
        ok = [r for r in runs if r.get("backend") == b and "error" not in r]
        if ok:
            summary[b] = {k: statistics.median(r[k] for r in ok) for k in ("decode_tok_s", "offline_req_s", "copy_GBps")}
    if "uni" in summary and "ray" in summary:
        summary["ray_over_uni"] = {k: summary["ray"][k] / summary["uni"][k] for k in ("decode_tok_s", "offline_req_s")}
    import torch

    record = {"what": "ray worker path vs in-process, TP=1", "card": torch.cuda.get_device_name(0),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(), "model": ns.model,
              "runs": runs, "summary": summary}
    out = Path(ns.out) / f"ray-path-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"\n{'backend':8} {'decode tok/s':>13} {'offline req/s':>14}")
    for b in ("uni", "ray"):
        if b in summary:
            print(f"{b:8} {summary[b]['decode_tok_s']:13.1f} {summary[b]['offline_req_s']:14.2f}")
    if "ray_over_uni" in summary:
        print(f"{'ray/uni':8} {summary['ray_over_uni']['decode_tok_s']:13.3f} {summary['ray_over_uni']['offline_req_s']:14.3f}")
    print(f"record: {out}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
