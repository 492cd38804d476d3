"""Two source trees of FleetLM, A/B on one GPU in one call: batch-1 decode and offline throughput.

    python benchmarks/ab_versions.py --tree before=/tmp/before --tree after=. --rounds 2 --out $OUT

Each tree is imported as ``fleetlm`` in its own child process (a folder
holding a ``fleetlm`` link to it goes first on PYTHONPATH), one model at a
time, in rounds that alternate the trees (A B A B), so drift of the card
between runs hits both alike; medians per tree are reported. A child loads
the model once (``dummy`` weights of ``--model``) and runs, through the
public ``LLM`` API only (so any two versions compare):

- latency: ``--batch-1`` decode of ``--latency-in`` random prompt tokens,
  ``--latency-out`` generated (``ignore_eos``), ``--latency-iters`` times;
  tokens/s of the best iteration's decode (its first token excluded);
- throughput: ``--num-prompts`` random prompts of ``--input-len`` tokens,
  ``--output-len`` each, all at once; requests/s and output tokens/s.

The parent measures the device-to-device copy bandwidth first (MBU = the
weights' bytes per decode step over it). Every child has a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r'''
import json, random, sys, time
import torch
from fleetlm import LLM, SamplingParams
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
llm = LLM(model=a["model"], load_format="dummy", dtype=a["dtype"], max_model_len=a["max_model_len"],
          max_num_seqs=a["max_num_seqs"], device=a["device"])
sync = torch.cuda.synchronize if a["device"] == "cuda" else (lambda: None)
init_s = time.perf_counter() - t0
rng = random.Random(0)
vocab = min(llm.get_tokenizer().vocab_size, 32000)
def prompts(n, length):
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]
lat = []
warm = prompts(1, a["latency_in"])
llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True))
for _ in range(a["latency_iters"]):
    # Fresh prompts each time (no prefix-cache hits): a 1-token run prices the
    # prefill, a latency_out run adds the decode steps.
    sync(); t = time.perf_counter()
    llm.generate(prompts(1, a["latency_in"]), SamplingParams(max_tokens=1, ignore_eos=True))
    sync(); first = time.perf_counter() - t
    t = time.perf_counter()
    out = llm.generate(prompts(1, a["latency_in"]), SamplingParams(max_tokens=a["latency_out"], ignore_eos=True))
    sync(); total = time.perf_counter() - t
    n = len(out[0].outputs[0].token_ids)
    lat.append((n - 1) / max(1e-9, total - first))
tp_prompts = prompts(a["num_prompts"], a["input_len"])
llm.generate(tp_prompts[:16], SamplingParams(max_tokens=4, ignore_eos=True))  # warm the batched shapes
sync(); t = time.perf_counter()
outs = llm.generate(tp_prompts, SamplingParams(max_tokens=a["output_len"], ignore_eos=True))
sync(); wall = time.perf_counter() - t
gen = sum(len(o.outputs[0].token_ids) for o in outs)
import fleetlm
print("RESULT " + json.dumps({"src": fleetlm.__file__, "init_s": init_s, "decode_tok_s": max(lat), "decode_tok_s_all": lat,
                              "throughput_req_s": len(outs) / wall, "throughput_out_tok_s": gen / wall,
                              "throughput_wall_s": wall, "output_tokens": gen}))
'''


def copy_gbps() -> float:
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    gbps = 2 * x.numel() * 20 / (time.perf_counter() - t) / 1e9
    del x, y
    torch.cuda.empty_cache()
    return gbps


def run_child(tree: Path, args: dict, timeout_s: float) -> dict:
    link_dir = Path(tempfile.mkdtemp(prefix="fleetlm-tree-"))
    (link_dir / "fleetlm").symlink_to(tree.resolve())
    env = dict(os.environ, PYTHONPATH=f"{link_dir}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], check=False, env=env, capture_output=True, text=True,
                          timeout=timeout_s, cwd=link_dir)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{tree}: rc={proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (two or more)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of this script")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--latency-in", type=int, default=128)
    p.add_argument("--latency-out", type=int, default=512)
    p.add_argument("--latency-iters", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--weight-gb", type=float, default=16.06, help="bytes a decode step reads, for MBU")
    p.add_argument("--child-timeout", type=float, default=240.0)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--label", default="ab")
    ns = p.parse_args(argv)
    trees = dict(t.split("=", 1) for t in ns.tree)
    args = {k: getattr(ns, k) for k in ("model", "dtype", "device", "max_model_len", "max_num_seqs", "latency_in",
                                        "latency_out", "latency_iters", "num_prompts", "input_len", "output_len")}
    bw = copy_gbps() if ns.device == "cuda" else float("nan")
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(ns.rounds):
        for name in (list(trees) if r % 2 == 0 else list(reversed(trees))):
            res = run_child(Path(trees[name]), args, ns.child_timeout)
            runs[name].append(res)
            print(f"round {r} {name}: decode {res['decode_tok_s']:.1f} tok/s, "
                  f"throughput {res['throughput_req_s']:.2f} req/s", flush=True)
    summary = {}
    for name, rs in runs.items():
        dec = statistics.median(x["decode_tok_s"] for x in rs)
        summary[name] = {"decode_tok_s_median": dec, "mbu": dec * ns.weight_gb / bw,
                         "throughput_req_s_median": statistics.median(x["throughput_req_s"] for x in rs),
                         "throughput_out_tok_s_median": statistics.median(x["throughput_out_tok_s"] for x in rs)}
    import torch

    card = torch.cuda.get_device_name() if ns.device == "cuda" else "cpu"
    record = {"benchmark": f"{ns.label}-ab", "card": card, "date": time.strftime("%Y-%m-%d"),
              "trees": trees, "commits": {n: _commit(Path(t)) for n, t in trees.items()}, "copy_gbps": bw,
              "config": args, "runs": runs, "summary": summary,
              "roofline_decode_tok_s": bw / ns.weight_gb}
    path = Path(ns.out) / f"{ns.label}-ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    names = list(trees)
    print(f"copy {bw:.0f} GB/s; decode roofline {bw / ns.weight_gb:.0f} tok/s")
    for name in names:
        s = summary[name]
        print(f"{name:>8}: decode {s['decode_tok_s_median']:.1f} tok/s (MBU {100 * s['mbu']:.1f}%), "
              f"offline {s['throughput_req_s_median']:.2f} req/s, {s['throughput_out_tok_s_median']:.0f} out tok/s")
    a, b = names[0], names[-1]
    print(f"{b}/{a}: decode {summary[b]['decode_tok_s_median'] / summary[a]['decode_tok_s_median']:.3f}, "
          f"offline {summary[b]['throughput_req_s_median'] / summary[a]['throughput_req_s_median']:.3f}")
    print(f"record: {path}")
    return 0


def _commit(tree: Path) -> str:
    stamp = tree / "COMMIT"
    if stamp.is_file():
        return stamp.read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
