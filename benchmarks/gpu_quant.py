"""Weights kept quantized on one GPU: AWQ / GPTQ g128 int4 and GGUF Q4_K against bf16, 8B shape.

    python benchmarks/gpu_quant.py --out $OUT [--model llama-3.1-8b] [--skip-engine]

One process tree, under 8 minutes, every part time-bounded; a failing part
is recorded and the rest still runs.

1. Kernels (this process): the four Llama-3.1-8B projections (qkv 4096->6144,
   o 4096->4096, gate_up 4096->28672, down 14336->4096) at M = 1, 16, 64 and
   512 rows: cuBLAS/GEMV bf16 against ``wq_linear`` on int4 g128 (AWQ and
   GPTQ share this layout after loading) and on Q4_K blocks; each checked
   against the float32 reference first; time per projection set with the
   roofline (weight bytes / measured copy bandwidth) beside it.
2. Engine (one child process per format, ``load_format="dummy"`` with a
   quantization_config written next to the 8B config: the float dummy
   weights are quantized as they load): batch-1 decode tok/s (128 tokens),
   batch 16 and batch 64 decode tok/s, offline 512 prompts x 512 in / 128
   out tok/s; ratios to bf16 against the issue's targets (int4 >= 3x at
   batch 1, >= 2x at 16, >= 1x at 64; Q4_K >= 2.5x at batch 1).

Writes ``quant-<date>.json`` (card, date, commit, config, figures, rooflines)
into ``--out`` (default $OUT) and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from fleetlm.benchmarks.records import git_commit

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {
    "bf16": None,
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "gguf-q4k": {"quant_method": "gguf", "default_type": "Q4_K"},
}
TARGETS = {("awq", 1): 3.0, ("gptq", 1): 3.0, ("gguf-q4k", 1): 2.5, ("awq", 16): 2.0, ("gptq", 16): 2.0,
           ("awq", 64): 1.0, ("gptq", 64): 1.0}
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}

CHILD = r"""
import json, random, sys, time
import torch
from fleetlm import LLM, SamplingParams
a = json.loads(sys.argv[1])
res = {}
t0 = time.perf_counter()
llm = LLM(model=a["model"], load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=512,
          gpu_memory_utilization=0.9)
res["build_s"] = time.perf_counter() - t0
rng = random.Random(0)
def prompts(n, length):
    return [[rng.randrange(100, 32000) for _ in range(length)] for _ in range(n)]
def decode_rate(batch, out=128, inp=128):
    p = prompts(batch, inp)
    llm.generate(p, SamplingParams(max_tokens=1, ignore_eos=True))  # same shapes once: compiled, cached
    torch.cuda.synchronize(); t = time.perf_counter()
    llm.generate(p, SamplingParams(max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize(); prefill = time.perf_counter() - t
    t = time.perf_counter()
    o = llm.generate(p, SamplingParams(max_tokens=out, ignore_eos=True))
    torch.cuda.synchronize(); total = time.perf_counter() - t
    toks = sum(len(x.outputs[0].token_ids) for x in o)
    return (toks - batch) / max(1e-9, total - prefill)
for b in (1, 16, 64):
    try:
        res[f"decode_b{b}_tok_s"] = decode_rate(b)
    except Exception as e:
        res[f"decode_b{b}_error"] = repr(e)[:300]
try:
    p = prompts(512, 512)
    torch.cuda.synchronize(); t = time.perf_counter()
    o = llm.generate(p, SamplingParams(max_tokens=128, ignore_eos=True))
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    res["offline_512x512_128_out_tok_s"] = sum(len(x.outputs[0].token_ids) for x in o) / dt
    res["offline_512x512_128_total_tok_s"] = (512 * 512 + sum(len(x.outputs[0].token_ids) for x in o)) / dt
except Exception as e:
    res["offline_error"] = repr(e)[:300]
print("RESULT " + json.dumps(res), flush=True)
"""


def _card() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"card": None}
    return {"card": torch.cuda.get_device_name(), "torch": torch.__version__}



def _copy_bandwidth(torch) -> float:
    """Measured device copy bandwidth, bytes/s (read + write of 1 GiB)."""
    a = torch.empty(1 << 29, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 2 * 10 / (time.perf_counter() - t)


def kernels(deadline: float) -> dict:
    import torch

    from fleetlm.kernels import gemv
    from fleetlm.kernels.wq_linear import QuantWeight, wq_linear, wq_linear_ref
    from fleetlm.parallel.formats.gguf_blocks import decode, encode
    from fleetlm.parallel.formats.packing import pack, quantize_groups

    bw = _copy_bandwidth(torch)
    out: dict = {"copy_bandwidth_GBps": bw / 1e9, "rows": {}}
    weights = {}
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        q, s, z = quantize_groups(w, 4, 128, sym=False)
        int4 = QuantWeight(pack(q, 4, 1), s, 4, 128, z.to(torch.uint8))
        q4k = decode(encode(w, "Q4_K"), "Q4_K")
        weights[name] = (w, int4, q4k)
        del q, s, z
    # Correctness on the real shapes first (one row and 64 rows), against the float32 reference.
    for name, (w, int4, q4k) in weights.items():
        for m in (1, 64):
            x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
            for label, qw in (("int4", int4), ("q4k", q4k)):
                ref = wq_linear_ref(x, qw).float()
                err = (wq_linear(x, qw).float() - ref).abs().max().item() / max(1e-6, ref.abs().max().item())
                out.setdefault("max_rel_err", {})[f"{name}/{label}/m{m}"] = err
    torch.cuda.synchronize()

    def bench(fn, iters=20) -> float:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
        g.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / iters

    for m in (1, 16, 64, 512):
        if time.monotonic() > deadline:
            out["rows"][m] = "skipped: time"
            continue
        row = {}
        for label in ("bf16", "int4", "q4k"):
            total, nbytes = 0.0, 0
            for name, (w, int4, q4k) in weights.items():
                x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
                if label == "bf16":
                    total += bench(lambda: gemv.linear(x, w))
                    nbytes += w.numel() * 2
                else:
                    qw = int4 if label == "int4" else q4k
                    total += bench(lambda: wq_linear(x, qw))
                    nbytes += sum(t.numel() * t.element_size() for t in (qw.qweight, qw.scales, qw.zeros, qw.mins,
                                                                         qw.super_scales, qw.super_mins)
                                  if t is not None)
            row[label] = {"us": total * 1e6, "weight_MB": nbytes / 1e6, "roofline_us": nbytes / bw * 1e6,
                          "tflops": 2 * m * sum(k * n for k, n in SHAPES.values()) / total / 1e12}
        for label in ("int4", "q4k"):
            row[label]["speedup_vs_bf16"] = row["bf16"]["us"] / row[label]["us"]
        out["rows"][m] = row
    return out


def engine(fmt: str, model: str, limit_s: float) -> dict:
    cfg = json.loads((ROOT / "configs" / "models" / f"{model}.json").read_text())
    if FORMATS[fmt] is not None:
        cfg["quantization_config"] = FORMATS[fmt]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg))
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"model": str(path)})], cwd=ROOT,
                                  capture_output=True, text=True, timeout=limit_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {limit_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"rc {proc.returncode}: {proc.stderr[-1500:]}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--budget-s", type=float, default=470.0)
    ns = ap.parse_args(argv)
    start = time.monotonic()
    record: dict = {"bench": "gpu_quant", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(),
                    "model": ns.model, "formats": FORMATS, "targets": {f"{f}/b{b}": v for (f, b), v in TARGETS.items()}}
    try:
        record.update(_card())
        record["kernels"] = kernels(start + 120)
    except Exception:  # noqa: BLE001
        record["kernels"] = {"error": traceback.format_exc()[-2000:]}
    record["engine"] = {}
    if not ns.skip_engine:
        for i, fmt in enumerate(FORMATS):
            left = ns.budget_s - (time.monotonic() - start)
            if left < 60:
                record["engine"][fmt] = {"error": "skipped: time budget spent"}
                continue
            record["engine"][fmt] = engine(fmt, ns.model, min(left - 10, left / (len(FORMATS) - i) + 30))
        base = record["engine"].get("bf16", {})
        for fmt, res in record["engine"].items():
            for key in [k for k in res if k.endswith("tok_s")]:
                if base.get(key):
                    res[key.replace("tok_s", "vs_bf16")] = res[key] / base[key]
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"quant-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}  card={record.get('card')}  commit={record['commit']}")
    print("kernels (us for the 4 projections of one layer; roofline = weight bytes / copy bandwidth):")
    for m, row in record.get("kernels", {}).get("rows", {}).items():
        if isinstance(row, dict):
            print(f"  M={m:>4}: " + "  ".join(f"{k} {v['us']:.0f} (roof {v['roofline_us']:.0f})"
                                           + (f" x{v['speedup_vs_bf16']:.2f}" if "speedup_vs_bf16" in v else "")
                                           for k, v in row.items()))
    print("engine (tok/s; ratio to bf16; target):")
    for fmt, res in record["engine"].items():
        cells = []
        for b in (1, 16, 64):
            v, r = res.get(f"decode_b{b}_tok_s"), res.get(f"decode_b{b}_vs_bf16")
            t = TARGETS.get((fmt, b))
            cells.append(f"b{b} {v:.0f}" + (f" x{r:.2f}" if r else "") + (f" (>= {t})" if t else "")
                         if v else f"b{b} -")
        off = res.get("offline_512x512_128_out_tok_s")
        cells.append(f"offline {off:.0f}" if off else "offline -")
        print(f"  {fmt:>9}: " + "  ".join(cells) + (f"  ERROR {res['error'][:120]}" if "error" in res else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
