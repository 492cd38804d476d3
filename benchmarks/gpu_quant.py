"""Weights kept quantized on one GPU: AWQ / GPTQ g128 int4 and GGUF Q4_K against bf16, 8B shape.

    python benchmarks/gpu_quant.py --out $OUT [--configs $OUT/wq_configs.json] [--skip-engine] [--budget-s 230]

One process tree, about 4 minutes (``--budget-s``), every part time-bounded;
a failing part is recorded and the rest still runs. ``--configs`` takes a
table written by ``benchmarks/gpu_wq_sweep.py`` instead of the committed
``kernels/wq_configs.json`` (or the defaults when none is committed), for
the kernels here and in the engine children alike, so one GPU call can
sweep and then measure with the swept table.

1. Kernels (this process): the four Llama-3.1-8B projections (qkv 4096->6144,
   o 4096->4096, gate_up 4096->28672, down 14336->4096) at M = 1, 16, 64 and
   512 rows: cuBLAS/GEMV bf16 against ``wq_linear`` on int4 g128 (AWQ and
   GPTQ share this layout after loading) and on Q4_K blocks, each with the
   launch the committed config table (``kernels/wq_configs.json``) picks;
   those launches (and the engine's batch buckets) are compiled first in
   parallel processes; each is checked against the float32 reference, then
   timed in a CUDA graph over distinct weight copies (>= 160 MB, past the L2),
   with the roofline (weight bytes / measured copy bandwidth) beside it.
2. Engine (one child process per format, ``load_format="dummy"`` with a
   quantization_config written next to the 8B config: the float dummy
   weights are quantized as they load): batch-1 decode tok/s (128 tokens),
   batch 16 and batch 64 decode tok/s, offline 512 prompts x 512 in / 128
   out tok/s when the child's time allows it; ratios to bf16 against the
   issue's targets (int4 >= 3x at batch 1, >= 2x at 16, >= 1x at 64; Q4_K
   >= 2.5x at batch 1). Each child prints its figures as it gets them, so a
   child stopped at its time limit still reports what it measured.

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
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)
ROWS = (1, 16, 64, 512)

CHILD = r"""
import json, random, sys, time
import torch
from fleetlm import LLM, SamplingParams
a = json.loads(sys.argv[1])
t_end = time.monotonic() + a["limit_s"]
if a["configs"]:
    from fleetlm.kernels import wq_configs
    wq_configs.use_table(a["configs"])
res = {}
def report():
    print("RESULT " + json.dumps(res), flush=True)
t0 = time.perf_counter()
llm = LLM(model=a["model"], load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=512,
          gpu_memory_utilization=0.9)
res["build_s"] = time.perf_counter() - t0
report()
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
    report()
try:
    if t_end - time.monotonic() < 45:
        raise TimeoutError("skipped: under 45 s left in this child's budget")
    p = prompts(512, 512)
    torch.cuda.synchronize(); t = time.perf_counter()
    o = llm.generate(p, SamplingParams(max_tokens=128, ignore_eos=True))
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    res["offline_512x512_128_out_tok_s"] = sum(len(x.outputs[0].token_ids) for x in o) / dt
    res["offline_512x512_128_total_tok_s"] = (512 * 512 + sum(len(x.outputs[0].token_ids) for x in o)) / dt
except Exception as e:
    res["offline_error"] = repr(e)[:300]
report()
"""


def _card() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"card": None}
    return {"card": torch.cuda.get_device_name(), "torch": torch.__version__}



def kernels(deadline: float, configs: str | None) -> dict:
    import torch

    from fleetlm.benchmarks.ceilings import measure_copy_bandwidth
    from fleetlm.benchmarks.gpu_wq_sweep import MIN_COPY_BYTES, compile_all, make_weight, time_graph
    from fleetlm.kernels import gemv, wq_configs
    from fleetlm.kernels.wq_linear import dequantize, launch

    bw = measure_copy_bandwidth("cuda")["copy_gbps"] * 1e9
    out: dict = {"copy_bandwidth_GBps": bw / 1e9, "rows": {}}
    table_path = Path(configs) if configs else wq_configs.TABLE_PATH
    if table_path.exists():  # which sweep made the table these launches come from (use_table: main)
        table = json.loads(table_path.read_text())
        out["table"] = {k: table.get(k) for k in ("card", "date", "commit")} | {
            "path": str(table_path), "entries": len(table["entries"])}
    else:
        out["table"] = "none: the defaults of kernels/wq_configs.py"
    weights: dict = {}
    for i, (name, (k, n)) in enumerate(SHAPES.items()):
        for label in ("int4", "q4k"):
            qw = make_weight(label, n, k, seed=i)
            copies = max(2, -(-MIN_COPY_BYTES // qw.nbytes()))
            weights[name, label] = [qw] + [_clone(qw) for _ in range(copies - 1)]
        wf = dequantize(weights[name, "int4"][0]).to(torch.bfloat16)
        weights[name, "bf16"] = [wf] + [wf.clone() for _ in range(max(1, -(-MIN_COPY_BYTES // wf.nbytes)) - 1)]
    # Every launch the table picks for these shapes (and the engine's batch buckets), compiled in parallel first:
    # the timed loop and the engine children then find them in Triton's cache.
    jobs, chosen = [], {}
    for label, kind in (("int4", weights["o", "int4"][0].kind), ("q4k", weights["o", "q4k"][0].kind)):
        for m in sorted({*wq_configs.M_BUCKETS, *ROWS}):
            for name, (k, n) in SHAPES.items():
                cfg = wq_configs.lookup(kind, m, n, k)
                chosen[f"{label}/m{m}/{name}"] = cfg.to_dict()
                jobs.append(dict(id=len(jobs), kind=label, m=m, n=n, k=k, cfg=cfg.to_dict()))
    out["configs"] = chosen
    t = time.monotonic()
    errors = compile_all(jobs, min(deadline, time.monotonic() + 60), max(1, min(14, (os.cpu_count() or 2) - 2)))
    out["compile_s"] = round(time.monotonic() - t, 1)
    out["compile_errors"] = {str(jobs[i]["cfg"]): e for i, e in errors.items() if e}
    # Correctness on the real shapes first (one row and 64 rows), against the float32 reference.
    for name, (k, n) in SHAPES.items():
        for m in (1, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for label in ("int4", "q4k"):
                qw = weights[name, label][0]
                ref = (x.float() @ dequantize(qw).t())
                cfg = wq_configs.lookup(qw.kind, m, n, k)
                err = (launch(x, qw, None, cfg).float() - ref).abs().max().item() / max(1e-6, ref.abs().max().item())
                out.setdefault("max_rel_err", {})[f"{name}/{label}/m{m}"] = err
    torch.cuda.synchronize()
    for m in ROWS:
        if time.monotonic() > deadline:
            out["rows"][m] = "skipped: time"
            continue
        row = {}
        for label in ("bf16", "int4", "q4k"):
            total, nbytes = 0.0, 0
            for name, (k, n) in SHAPES.items():
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ws = weights[name, label]
                if label == "bf16":
                    fn = gemv.linear if m == 1 else torch.nn.functional.linear
                    total += time_graph([lambda w=w: fn(x, w) for w in ws], rounds=max(1, 32 // len(ws)))
                    nbytes += ws[0].numel() * 2
                else:
                    cfg = wq_configs.lookup(ws[0].kind, m, n, k)
                    total += time_graph([lambda w=w: launch(x, w, None, cfg) for w in ws], rounds=max(1, 32 // len(ws)))
                    nbytes += ws[0].nbytes()
            total *= 1e-6
            row[label] = {"us": total * 1e6, "weight_MB": nbytes / 1e6, "roofline_us": nbytes / bw * 1e6,
                          "tflops": 2 * m * sum(k * n for k, n in SHAPES.values()) / total / 1e12}
        for label in ("int4", "q4k"):
            row[label]["speedup_vs_bf16"] = row["bf16"]["us"] / row[label]["us"]
        out["rows"][m] = row
    return out


def _clone(qw):
    from fleetlm.kernels.wq_linear import QuantWeight

    fields = {f: getattr(qw, f) for f in qw.__dataclass_fields__ if f != "locks"}
    return QuantWeight(**{f: v.clone() if hasattr(v, "clone") else v for f, v in fields.items()})


def engine(fmt: str, model: str, limit_s: float, configs: str | None) -> dict:
    cfg = json.loads((ROOT / "configs" / "models" / f"{model}.json").read_text())
    if FORMATS[fmt] is not None:
        cfg["quantization_config"] = FORMATS[fmt]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg))
        arg = json.dumps({"model": str(path), "configs": configs, "limit_s": limit_s - 5})
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, arg], cwd=ROOT, capture_output=True, text=True,
                                  timeout=limit_s)
            stdout, err = proc.stdout, (f"rc {proc.returncode}: {proc.stderr[-1500:]}" if proc.returncode else None)
        except subprocess.TimeoutExpired as e:  # its output so far is bytes, whatever text= says
            stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = f"timed out after {limit_s:.0f} s"
    res: dict = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])  # the last report holds everything measured
    if err:
        res["error"] = err
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--budget-s", type=float, default=230.0)
    ap.add_argument("--configs", help="a wq config table (gpu_wq_sweep.py's wq_configs.json) to use instead of "
                                      "kernels/wq_configs.json")
    ns = ap.parse_args(argv)
    start = time.monotonic()
    if ns.configs:
        from fleetlm.kernels import wq_configs

        ns.configs = str(Path(ns.configs).resolve())  # the engine children run from the repository root
        wq_configs.use_table(ns.configs)
    record: dict = {"bench": "gpu_quant", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(),
                    "model": ns.model, "configs": ns.configs or "kernels/wq_configs.json (or the defaults)",
                    "formats": FORMATS, "targets": {f"{f}/b{b}": v for (f, b), v in TARGETS.items()}}
    try:
        record.update(_card())
        record["kernels"] = kernels(start + min(80.0, 0.35 * ns.budget_s), ns.configs)
    except Exception:  # noqa: BLE001
        record["kernels"] = {"error": traceback.format_exc()[-2000:]}
    try:  # the engine children size their KV cache from free memory: hand this process's cache back
        import torch

        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass
    record["engine"] = {}
    if not ns.skip_engine:
        for i, fmt in enumerate(FORMATS):
            left = ns.budget_s - (time.monotonic() - start)
            if left < 30:
                record["engine"][fmt] = {"error": "skipped: time budget spent"}
                continue
            record["engine"][fmt] = engine(fmt, ns.model, min(left - 5, left / (len(FORMATS) - i) + 15), ns.configs)
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
