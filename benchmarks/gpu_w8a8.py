"""FP8 and INT8 W8A8 against bf16 on one GPU, in one process, table printed last.

    python benchmarks/gpu_w8a8.py --out $OUT                 # everything, ~8 min on one H200
    python benchmarks/gpu_w8a8.py --parts kernels,8b         # the 8B shape only
    python benchmarks/gpu_w8a8.py --parts 70b                # the 70B shape in FP8
    python benchmarks/gpu_w8a8.py --device cpu --smoke       # CPU self-test of every path (tiny model)

Parts (each bounded by time; one failing is recorded and the rest run):

========  ==================================================================================
ceilings  copy GB/s; bf16 matmul, FP8 ``_scaled_mm`` (row-wise) and INT8 ``_int_mm`` at 8192^3
kernels   per projection of Llama-3.1-8B and -70B, one decode row: the bf16 GEMV, the FP8 and
          INT8 GEMVs (a few launch configs, best kept) and ``_scaled_mm`` at one row, in TB/s of
          weight bytes (weights rotated past L2); each GEMV checked against its reference; the
          fused quantization kernels checked against theirs at full size
8b        Llama-3.1-8B shape, dummy weights, for bf16, fp8 and int8 in turn: load seconds, peak
          memory, batch-1 decode 128 in / 512 out (tok/s, and the roofline: bytes a step reads /
          copy GB/s), offline 1000 x 1024 / 128 and 512 x 512 / 128 (tok/s, MFU against the
          format's matmul ceiling); ratios to bf16
70b       Llama-3.1-70B shape in FP8 (quantized as it loads): load seconds and peak memory,
          batch-1 decode 128 / 512 (roofline ~60 tok/s on an H200), 256 x 512 / 128
========  ==================================================================================

Every figure goes into one JSON record (card, date, commit, config, figures,
the roofline next to each number) in ``--out`` (default: $OUT, else
benchmarks/results/), rewritten after every part so a killed run keeps
what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FORMATS = ("bf16", "fp8", "int8")
WORKLOADS = {  # full / smoke
    "latency": ({"batch_size": 1, "input_len": 128, "output_len": 512, "num_iters": 2},
                {"batch_size": 1, "input_len": 16, "output_len": 8, "num_iters": 1}),
    "offline_1024": ({"num_prompts": 1000, "input_len": 1024, "output_len": 128},
                     {"num_prompts": 4, "input_len": 32, "output_len": 4}),
    "offline_512": ({"num_prompts": 512, "input_len": 512, "output_len": 128},
                    {"num_prompts": 4, "input_len": 32, "output_len": 4}),
    "offline_256x512": ({"num_prompts": 256, "input_len": 512, "output_len": 128},
                        {"num_prompts": 4, "input_len": 32, "output_len": 4}),
}
# 8B (hidden 4096, intermediate 14336, 32 q / 8 kv heads of 128) and 70B (8192, 28672, 64 / 8) projections: (N, K).
SHAPES = {"8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
          "70b": {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}}
GEMV_CONFIGS = [{"BLOCK_N": 4, "BLOCK_K": 2048, "num_warps": 4}, {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 2},
                {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4}, {"BLOCK_N": 2, "BLOCK_K": 2048, "num_warps": 2},
                {"BLOCK_N": 8, "BLOCK_K": 2048, "num_warps": 8}, {"BLOCK_N": 4, "BLOCK_K": 4096, "num_warps": 4}]


class Run:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.deadline = time.time() + ns.budget
        out = Path(ns.out or os.environ.get("OUT") or REPO / "benchmarks" / "results")
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.path = out / f"gpu-w8a8-{stamp}.json"
        from types import SimpleNamespace

        from fleetlm.benchmarks import ceilings, offline, records

        bench = SimpleNamespace(device_card=records.device_card, git_commit=records.git_commit,
                                versions=records.versions, measure_ceilings=ceilings.measure_ceilings,
                                run_latency=offline.run_latency, run_throughput=offline.run_throughput)
        self.bench = bench
        card, _ = bench.device_card(ns.device)
        self.record: dict[str, Any] = {
            "benchmark": "gpu_w8a8", "card": card, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": ns.commit or bench.git_commit(), "versions": bench.versions(),
            "config": {k: v for k, v in vars(ns).items()}, "parts": {}, "table": [],
        }

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.record, indent=1, default=str))

    def part(self, name: str, fn, min_s: float = 10.0) -> Any:
        if self.left() < min_s:
            self.record["parts"][name] = {"skipped": f"out of time ({self.left():.0f} s left)"}
            self.save()
            return None
        print(f"[gpu_w8a8] {name}: {self.left():.0f} s left", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"[:2000]}
        if isinstance(result, dict):
            result.setdefault("part_seconds", time.perf_counter() - t0)
        self.record["parts"][name] = result
        self.save()
        return result

    def row(self, what: str, value: float | None, unit: str, roofline: float | None = None, ratio: str = "") -> None:
        self.record["table"].append({"what": what, "value": value, "unit": unit, "roofline": roofline,
                                     "ratio": ratio})


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, iters: int) -> float:
    """Seconds per call (CUDA events on GPU)."""
    import torch

    fn()
    _sync()
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def ceilings(run: Run) -> dict[str, Any]:
    import torch

    dev = run.ns.device
    out = dict(run.bench.measure_ceilings(dev, "bfloat16", matmul_size=None if dev == "cuda" else 512,
                                          min_seconds=0.5 if dev == "cuda" else 0.05))
    n = 8192 if dev == "cuda" else 256
    a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
    sa, sb = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)
    out_dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    t = _time(lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype), 20 if dev == "cuda" else 2)
    out["fp8_matmul_tflops"] = 2 * n ** 3 / t / 1e12
    ai = torch.randint(-100, 100, (n, n), device=dev, dtype=torch.int8)
    bi = torch.randint(-100, 100, (n, n), device=dev, dtype=torch.int8)
    t = _time(lambda: torch._int_mm(ai, bi.t()), 20 if dev == "cuda" else 2)
    out["int8_matmul_tops"] = 2 * n ** 3 / t / 1e12
    run.row("copy", out.get("copy_gbps"), "GB/s")
    run.row("bf16 matmul", out.get("matmul_tflops"), "TFLOP/s")
    run.row("fp8 _scaled_mm", out["fp8_matmul_tflops"], "TFLOP/s")
    run.row("int8 _int_mm", out["int8_matmul_tops"], "TOP/s")
    return out


def kernels(run: Run, copy_gbps: float | None) -> dict[str, Any]:
    import torch

    from fleetlm.kernels import gemv, qlinear, quant
    from fleetlm.parallel.formats.w8a8 import quantize_weight

    dev = run.ns.device
    results: dict[str, Any] = {"gemv": {}, "checks": {}}
    shapes = SHAPES if dev == "cuda" else {"tiny": {"a": (96, 256), "b": (64, 320)}}
    for model, projections in shapes.items():
        for proj, (n, k) in projections.items():
            if run.left() < 30:
                results["incomplete"] = True
                break
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            # Enough distinct weights that none stays in L2 (50 MB on an H100/H200) between uses.
            copies = max(2, min(16, -(-400_000_000 // (n * k))))
            w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
            row: dict[str, Any] = {"n": n, "k": k}
            it = iter(range(10 ** 9))
            if dev == "cuda":
                t = _time(lambda: gemv.linear(x, w16[next(it) % copies]), 50)
                row["bf16_gemv_tbps"] = 2 * n * k / t / 1e12
            for name, qd in (("fp8", torch.float8_e4m3fn), ("int8", torch.int8)):
                ws = [quantize_weight(w, qd) for w in w16]
                ref = qlinear.qgemv_ref(x, *ws[0])
                if dev == "cuda":
                    got = qlinear.qgemv(x, *ws[0])
                    row[f"{name}_gemv_max_rel_err"] = ((got.float() - ref.float()).abs().max()
                                                       / ref.float().abs().max()).item()
                    best = None
                    for cfg in GEMV_CONFIGS:
                        t = _time(lambda: qlinear.qgemv(x, *ws[next(it) % copies], config=cfg), 50)
                        tbps = (n * k + 4 * n) / t / 1e12
                        row.setdefault(f"{name}_gemv_configs", []).append({**cfg, "tbps": tbps})
                        if best is None or tbps > best[1]:
                            best = (cfg, tbps)
                    row[f"{name}_gemv_tbps_default"] = row[f"{name}_gemv_configs"][0]["tbps"]
                    row[f"{name}_gemv_tbps_best"], row[f"{name}_gemv_best_config"] = best[1], best[0]
                if qd == torch.float8_e4m3fn:
                    xq = quant.quantize_ref(x, qd)
                    out_dtype = torch.bfloat16
                    t = _time(lambda: torch._scaled_mm(xq.data, ws[next(it) % copies][0].t(), scale_a=xq.scale,
                                                       scale_b=ws[0][1].view(1, -1), out_dtype=out_dtype), 50)
                    row["fp8_scaled_mm_1row_tbps"] = (n * k + 4 * n) / t / 1e12
                del ws
            del w16
            results["gemv"][f"{model}.{proj}"] = row
            if dev == "cuda":
                run.row(f"GEMV {model}.{proj} bf16 / fp8 / int8 / _scaled_mm", row.get("fp8_gemv_tbps_default"),
                        "TB/s", copy_gbps and copy_gbps / 1e3,
                        f"bf16 {row['bf16_gemv_tbps']:.2f}, fp8 best {row['fp8_gemv_tbps_best']:.2f}, int8 "
                        f"{row['int8_gemv_tbps_default']:.2f}, _scaled_mm {row['fp8_scaled_mm_1row_tbps']:.2f}")
    # The fused quantization kernels at full size against their references (codes equal, share of).
    if dev == "cuda":
        for qd in (torch.float8_e4m3fn, torch.int8):
            x = torch.randn(256, 4096, device=dev, dtype=torch.bfloat16)
            r = torch.randn_like(x)
            w = torch.rand(4096, device=dev, dtype=torch.bfloat16) + 0.5
            y = torch.randn(256, 2 * 14336, device=dev, dtype=torch.bfloat16) * 3
            pairs = {"quantize": (quant.quantize(x, qd), quant.quantize_ref(x, qd)),
                     "fused_add_rms_norm_quant": (quant.fused_add_rms_norm_quant(x, r, w, 1e-5, qd)[0],
                                                  quant.fused_add_rms_norm_quant_ref(x, r, w, 1e-5, qd)[0]),
                     "silu_and_mul_quant": (quant.silu_and_mul_quant(y, qd), quant.silu_and_mul_quant_ref(y, qd))}
            for name, (a, b) in pairs.items():
                bits = (lambda t: t.view(torch.uint8)) if qd == torch.float8_e4m3fn else (lambda t: t)
                results["checks"][f"{name}.{qd}"] = {
                    "codes_equal": (bits(a.data) == bits(b.data)).float().mean().item(),
                    "scales_equal": (a.scale == b.scale).float().mean().item()}
            t = _time(lambda: quant.silu_and_mul_quant(y, qd), 20)
            results["checks"][f"silu_and_mul_quant.{qd}"]["gbps"] = (y.numel() * 2 + y.numel() // 2) / t / 1e9
    return results


def _model(llm):
    return llm.engine.workers.worker.runner.model


def decode_bytes(llm) -> int:
    """Bytes one decode step reads from the weights: every linear layer's tensors and the LM head (not the
    embedding table: one row per token)."""
    total = 0
    for name, p in _model(llm).named_parameters():
        if "embed_tokens" not in name:
            total += p.numel() * p.element_size()
    return total


def engine_runs(run: Run, model: str, formats, workloads, ceil: dict[str, Any], tag: str) -> dict[str, Any]:
    import torch

    from fleetlm import LLM

    dev, smoke = run.ns.device, run.ns.smoke
    results: dict[str, Any] = {}
    mm = {"bf16": ceil.get("matmul_tflops"), "fp8": ceil.get("fp8_matmul_tflops"), "int8": ceil.get("int8_matmul_tops")}
    copy = ceil.get("copy_gbps")
    for fmt in formats:
        if run.left() < 60 and not smoke:
            results[fmt] = {"skipped": "out of time"}
            continue
        r: dict[str, Any] = {}
        results[fmt] = r
        llm = None
        try:
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            kw = dict(model=model, load_format="dummy", device=dev, quantization=None if fmt == "bf16" else fmt,
                      gpu_memory_utilization=run.ns.gpu_memory_utilization)
            if dev == "cpu":
                kw.update(num_kv_blocks=64, max_model_len=256)
            llm = LLM(**kw)
            r["build_s"] = time.perf_counter() - t0
            r["startup_seconds"] = dict(llm.engine.startup_seconds)
            if dev == "cuda":
                r["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            r["decode_weight_bytes"] = decode_bytes(llm)
            print(f"[gpu_w8a8] {tag} {fmt}: built in {r['build_s']:.1f} s", flush=True)
            for wl in workloads:
                w = WORKLOADS[wl][1 if smoke else 0]
                limit = max(10.0, min(run.left() - 20, 150.0))
                if run.left() < 30 and not smoke:
                    r[wl] = {"skipped": "out of time"}
                    continue
                if wl == "latency":
                    f = run.bench.run_latency(llm, **w, time_limit=limit, ceilings=ceil)
                    if f.get("decode_step_ms") and copy:
                        step_bytes = r["decode_weight_bytes"] + f.get("kv_bytes_per_step", 0)
                        f["roofline_tokens_per_s"] = copy * 1e9 / step_bytes  # this format's bytes
                        f["mbu"] = step_bytes / (f["decode_step_ms"]["mean"] / 1e3) / (copy * 1e9)
                    value, roof, unit = f.get("decode_tokens_per_s"), f.get("roofline_tokens_per_s"), "tok/s"
                else:
                    f = run.bench.run_throughput(llm, **w, time_limit=limit, ceilings={"matmul_tflops": mm[fmt]})
                    value, roof, unit = f.get("output_tokens_per_s"), None, "out tok/s"
                    if mm[fmt] and f.get("model_tflops_per_s") is not None:
                        f["mfu"] = f["model_tflops_per_s"] / mm[fmt]
                        f["roofline_output_tokens_per_s"] = value / f["mfu"] if f["mfu"] else None
                        roof = f["roofline_output_tokens_per_s"]
                r[wl] = f
                base = results.get("bf16", {}).get(wl, {})
                base_v = base.get("decode_tokens_per_s" if wl == "latency" else "output_tokens_per_s")
                ratio = f"{value / base_v:.2f}x bf16" if value and base_v and fmt != "bf16" else ""
                run.row(f"{tag} {fmt} {wl} ({'complete' if f.get('complete') else 'INCOMPLETE'})", value, unit,
                        roof, ratio)
                run.save()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {e}"[:2000]
        if llm is not None:  # the next format needs the memory: drop every reference first
            llm.engine.shutdown()
            llm = None
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="ceilings,kernels,8b,70b")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run")
    p.add_argument("--out", help="directory of the JSON record (default: $OUT, else benchmarks/results)")
    p.add_argument("--commit")
    p.add_argument("--smoke", action="store_true", help="tiny model and workloads (CPU self-test)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    ns = p.parse_args(argv)
    parts = set(ns.parts.split(","))
    run = Run(ns)
    ceil = run.part("ceilings", lambda: ceilings(run)) or {}
    if "error" in ceil:
        ceil = {}
    if "kernels" in parts:
        run.part("kernels", lambda: kernels(run, ceil.get("copy_gbps")))
    model8, model70 = ("llama-3.1-8b", "llama-3.1-70b") if not ns.smoke else ("tiny-llama-8h4kv", "tiny-llama-8h4kv")
    if "8b" in parts:
        run.part("8b", lambda: engine_runs(run, model8, FORMATS, ("latency", "offline_1024", "offline_512"), ceil,
                                           "8b"), min_s=60 if not ns.smoke else 0)
    if "70b" in parts:
        run.part("70b", lambda: engine_runs(run, model70, ("fp8",), ("latency", "offline_256x512"), ceil, "70b"),
                 min_s=90 if not ns.smoke else 0)
    run.save()
    print(f"\n[gpu_w8a8] record: {run.path}\n")
    print(f"{'what':<62} {'value':>10} {'unit':<9} {'roofline':>10}  ratio")
    for row in run.record["table"]:
        v = "-" if row["value"] is None else f"{row['value']:.2f}"
        roof = "-" if row["roofline"] is None else f"{row['roofline']:.2f}"
        print(f"{row['what']:<62} {v:>10} {row['unit']:<9} {roof:>10}  {row['ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
