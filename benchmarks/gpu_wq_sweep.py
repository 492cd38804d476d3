"""Sweep the ``wq_linear`` launch configs on one GPU; write the config table the kernels read.

    python benchmarks/gpu_wq_sweep.py --out $OUT [--budget-s 220]

One GPU call of at most ~4 minutes, every phase bounded by time:

1. compile (at most 35% of the budget): every candidate launch is compiled (not run) by a pool of
   processes into Triton's on-disk cache (``wq_linear.compile_launch``), so
   the timed processes never wait for a compiler;
2. measure, one child process per weight kind (int4 g128 as AWQ/GPTQ hold it,
   and GGUF Q4_K) on the Llama-3.1-8B projections (qkv 4096->6144, o
   4096->4096, gate_up 4096->28672, down 14336->4096) at 1, 16, 64, 256 and
   1,024 rows: each candidate is first checked against the float32
   reference (x @ dequantize(W)^T; a candidate off by more than 2% of the
   output's largest value is dropped), then timed inside a CUDA graph
   that cycles over enough distinct copies of the weight (>= 160 MB) that
   the 50 MB L2 cannot serve them; bf16 cuBLAS and the bf16 GEMV are timed
   the same way as the baseline. A child that dies (a CUDA fault is
   sticky) loses only its own remaining candidates: results stream to a
   file line by line;
3. table: the fastest checked candidate per (kind, rows, shape) becomes an
   entry of ``wq_configs.json`` (rows 16 also fill buckets 2-8: the same
   16-row tile; 64 fills 32; 256 fills 128; 1,024 fills 512), written to
   ``--out``. The lead copies it to ``kernels/wq_configs.json`` and commits it.

Candidates (~110 launches per kind before split-K variants, chosen from the
SASS of each variant compiled for sm_90 -- instructions per 4-bit weight --
and from what must be tried on the hardware: memory-level parallelism):
GEMV tiles of 16-256 columns x 4-64 words, 1-4 warps, each with the default
K split and half and twice it; the skinny tl.dot with the weight as the MMA's
M side (64-256 columns, 16-row N side), post- and pre-scaled; tiled GEMMs
of 64-128 rows; and for 256+ rows the bf16-scratch + cuBLAS path.

Writes ``wq-sweep-<date>.json`` (card, date, commit, bandwidth, every
candidate's time and error, the best per shape with its roofline: weight
bytes / copy bandwidth) and ``wq_configs.json`` into ``--out`` (default
$OUT), and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
KINDS = ("int4", "q4k")
# measured rows -> the table buckets its winners fill
M_RUNS = {1: (1,), 16: (2, 4, 8, 16), 64: (32, 64), 256: (128, 256), 1024: (512, 1024)}
MIN_COPY_BYTES = 160 << 20  # distinct weight copies per timed graph: together well past the 50 MB L2
TOL = 2e-2  # max |y - ref| / max |ref| (bf16 output, bf16-rounded weights on pre-scaled tiles)


def _cfg(path, **kw) -> dict:
    return dict(path=path, **kw)


def candidates(kind: str, m: int) -> list[dict]:
    """Launch configs (WQConfig fields, split_k filled per shape later) tried for ``m`` rows of ``kind``."""
    out: list[dict] = []
    if m == 1:
        tiles = [(16, 32, 2), (16, 64, 2), (32, 16, 2), (32, 32, 4), (32, 64, 4), (64, 16, 4), (64, 32, 4),
                 (64, 8, 1), (64, 16, 1), (128, 8, 1), (128, 16, 1), (128, 16, 4), (128, 32, 4), (256, 4, 1),
                 (256, 8, 2), (512, 4, 2)]
        out += [_cfg("gemv", block_n=bn, block_kw=bkw, num_warps=w, num_stages=3) for bn, bkw, w in tiles]
        # the tensor-core path at one row, as a check on the GEMV
        out += [_cfg("mm", block_m=16, block_n=bn, block_kw=16, swap_ab=True, num_warps=4, num_stages=s)
                for bn, s in ((64, 3), (128, 3), (128, 4))]
        return out
    if m <= 16:
        for bn, bkw, w, s in ((64, 16, 4, 3), (64, 16, 4, 4), (64, 32, 4, 3), (128, 16, 4, 3), (128, 16, 4, 4),
                              (128, 32, 4, 3), (128, 16, 8, 3), (256, 16, 8, 3)):
            out.append(_cfg("mm", block_m=16, block_n=bn, block_kw=bkw, swap_ab=True, num_warps=w, num_stages=s))
        out.append(_cfg("mm", block_m=16, block_n=128, block_kw=16, swap_ab=True, post_scale=False, num_warps=4,
                        num_stages=3))
        if kind == "q4k":  # one 32-weight group per tile: post-scaled, exact
            out += [_cfg("mm", block_m=16, block_n=bn, block_kw=4, swap_ab=True, num_warps=4, num_stages=4)
                    for bn in (64, 128)]
        out += [_cfg("mm", block_m=16, block_n=bn, block_kw=16, num_warps=4, num_stages=3) for bn in (64, 128)]
        return out
    if m <= 64:
        for bm, bn, bkw, w, s, post in ((64, 64, 16, 4, 3, True), (64, 128, 16, 4, 3, True), (64, 128, 16, 4, 4, True),
                                        (64, 128, 32, 4, 3, True), (64, 128, 16, 4, 3, False),
                                        (64, 256, 16, 8, 3, True), (64, 128, 32, 4, 3, False)):
            out.append(_cfg("mm", block_m=bm, block_n=bn, block_kw=bkw, post_scale=post, num_warps=w, num_stages=s))
        out += [_cfg("mm", block_m=64, block_n=bn, block_kw=16, swap_ab=True, num_warps=4, num_stages=3)
                for bn in (64, 128)]
        return out
    for bm, bn, bkw, w, s, post in ((64, 128, 16, 4, 3, True), (64, 128, 16, 4, 3, False), (128, 128, 16, 8, 3, True),
                                    (128, 128, 16, 8, 3, False), (128, 128, 32, 8, 3, False),
                                    (128, 256, 16, 8, 3, False), (128, 128, 16, 4, 4, False),
                                    (128, 64, 16, 4, 3, False)):
        out.append(_cfg("mm", block_m=bm, block_n=bn, block_kw=bkw, post_scale=post, num_warps=w, num_stages=s))
    out += [_cfg("dequant", block_n=bn, block_kw=bkw, num_warps=4, num_stages=1) for bn, bkw in ((64, 16), (128, 8))]
    return out


def splits_for(cfg: dict, m: int, n: int, k: int, bits: int) -> list[int]:
    """K splits tried: the default of ``wq_configs`` for this tile and shape (~2 programs per SM), and for the
    GEMV also twice it (more loads in flight per SM at the cost of a second pass over fp32 partials)."""
    from fleetlm.kernels.wq_configs import _split

    if cfg["path"] == "dequant":
        return [1]
    kw = k // (32 // bits)
    tiles_m = 1 if cfg["path"] == "gemv" else -(-m // cfg.get("block_m", 16))
    n_eff = -(-n // cfg["block_n"]) * tiles_m * cfg["block_n"]
    base = _split(n_eff, cfg["block_n"], kw, cfg["block_kw"])
    steps = max(1, kw // cfg["block_kw"])
    tried = (base, base * 2) if cfg["path"] == "gemv" else (base,)
    return sorted({s for s in tried if 1 <= s <= steps})


KIND_NAMES = {"int4": ("w4g128", 4), "q4k": ("w4g32km", 4)}  # sweep kind -> (wq_configs kind, bits)


def _jobs() -> list[dict]:
    """Every candidate launch; per (kind, rows, shape) the default of ``wq_configs`` comes first, marked
    ``default`` (the record compares the defaults with the best candidate: what the table gains)."""
    from fleetlm.kernels.wq_configs import default_config

    jobs = []
    for kind in KINDS:
        qkind, bits = KIND_NAMES[kind]
        for m in M_RUNS:
            for shape, (n, k) in SHAPES.items():
                jobs.append(dict(kind=kind, m=m, shape=shape, n=n, k=k, default=True,
                                 cfg=default_config(qkind, m, n, k).to_dict()))
            for cfg in candidates(kind, m):
                for shape, (n, k) in SHAPES.items():
                    for split in splits_for(cfg, m, n, k, bits):
                        jobs.append(dict(kind=kind, m=m, shape=shape, n=n, k=k, cfg=dict(cfg, split_k=split)))
    return jobs


# -- weights ------------------------------------------------------------------------------------------------
def make_weight(kind: str, n: int, k: int, seed: int = 0):
    """A random bf16 [n, k] weight quantized as ``kind`` (int4 g128 with zeros, as AWQ/GPTQ load; or Q4_K)."""
    import torch

    from fleetlm.kernels.wq_linear import QuantWeight
    from fleetlm.parallel.formats.gguf_blocks import decode, encode
    from fleetlm.parallel.formats.packing import pack, quantize_groups

    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=gen) / k**0.5
    if kind == "int4":
        q, s, z = quantize_groups(w, 4, 128, sym=False)
        return QuantWeight(pack(q.t(), 4, 0), s.t().contiguous(), 4, 128, z.t().to(torch.uint8).contiguous())
    return decode(encode(w, "Q4_K"), "Q4_K")


def like_weight(kind: str):
    """A small weight of ``kind``'s format (dtypes and flags are what a compile needs)."""
    return make_weight(kind, 64, 256)


def _compile_init() -> None:
    import torch  # noqa: F401  (imported once per worker)

    import fleetlm.kernels.wq_linear  # noqa: F401


def _compile_task(jobs: list[dict]) -> list[tuple[int, str | None]]:
    import torch

    from fleetlm.kernels.wq_linear import WQConfig, compile_launch

    out = []
    likes: dict[str, object] = {}
    for job in jobs:
        try:
            like = likes.setdefault(job["kind"], like_weight(job["kind"]))
            compile_launch(like, WQConfig.from_dict(job["cfg"]), job["m"], job["n"], job["k"], torch.bfloat16)
            out.append((job["id"], None))
        except Exception as e:  # noqa: BLE001  (a config that does not compile is dropped, recorded)
            out.append((job["id"], f"{type(e).__name__}: {str(e)[:300]}"))
    return out


def compile_all(jobs: list[dict], deadline: float, workers: int) -> dict[int, str | None]:
    """Compile every job (grouped by config, so one worker sees a config's shapes); id -> error or None."""
    import multiprocessing as mp

    groups: dict[str, list[dict]] = {}
    for job in jobs:
        groups.setdefault(json.dumps([job["kind"], job["cfg"]["path"], job["m"],
                                      {k: v for k, v in job["cfg"].items() if k != "split_k"}]), []).append(job)
    results: dict[int, str | None] = {}
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_compile_init)
    # one row first (the batch-1 decode target), then more rows; within those the biggest groups first, so a
    # phase cut by its deadline loses the least important candidates and its tail is short
    order = sorted(groups.values(), key=lambda g: (g[0]["m"], -len(g)))
    futures = [pool.submit(_compile_task, g) for g in order]
    try:
        for fut in as_completed(futures, timeout=max(1.0, deadline - time.monotonic())):
            try:
                results.update(dict(fut.result()))
            except Exception as e:  # noqa: BLE001
                print(f"compile task failed: {e!r}"[:300], flush=True)
    except TimeoutError:
        print(f"compile phase out of time: {sum(not f.done() for f in futures)} groups left", flush=True)
    finally:
        # the workers, taken before shutdown: Python 3.12's shutdown(wait=False) sets _processes to None
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:  # unfinished compiles end with the phase
            proc.terminate()
    return results


# -- the measuring child ---------------------------------------------------------------------------------------
def _copy_bandwidth_Bps() -> float:
    from fleetlm.benchmarks.ceilings import measure_copy_bandwidth

    return measure_copy_bandwidth("cuda")["copy_gbps"] * 1e9


def _clone(qw):
    from fleetlm.kernels.wq_linear import QuantWeight

    fields = {f: getattr(qw, f) for f in qw.__dataclass_fields__ if f != "locks"}
    return QuantWeight(**{f: v.clone() if hasattr(v, "clone") else v for f, v in fields.items()})


def time_graph(calls, rounds: int) -> float:
    """Microseconds per call: ``rounds`` passes over ``calls`` (one per weight copy) captured in one CUDA graph."""
    import torch

    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(rounds):
            for c in calls:
                c()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / (rounds * len(calls)))
    del g
    return best


def child(kind: str, jobs_path: Path, out_path: Path, deadline: float) -> int:
    import torch
    import torch.nn.functional as F

    from fleetlm.kernels import gemv
    from fleetlm.kernels.wq_linear import WQConfig, dequantize, launch

    jobs = json.loads(jobs_path.read_text())
    out = out_path.open("a")

    def emit(rec: dict) -> None:
        out.write(json.dumps(rec) + "\n")
        out.flush()

    torch.manual_seed(0)
    emit({"kind": kind, "event": "start", "copy_bandwidth_Bps": _copy_bandwidth_Bps()})
    weights, xs, refs = {}, {}, {}
    for shape, (n, k) in SHAPES.items():
        qw = make_weight(kind, n, k, seed=list(SHAPES).index(shape))
        copies = max(2, math.ceil(MIN_COPY_BYTES / qw.nbytes()))
        weights[shape] = [qw] + [_clone(qw) for _ in range(copies - 1)]
        wf = dequantize(qw)  # float32 [n, k]
        for m in M_RUNS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xs[shape, m] = x
            refs[shape, m] = x.float() @ wf.t()
        emit({"kind": kind, "event": "weights", "shape": shape, "bytes": qw.nbytes(), "copies": copies})
        if kind == KINDS[0] and time.monotonic() < deadline:  # the bf16 baseline, once
            wb = (wf.to(torch.bfloat16),)
            wb = wb + tuple(wb[0].clone() for _ in range(max(1, math.ceil(MIN_COPY_BYTES / (n * k * 2)) - 1)))
            for m in M_RUNS:
                x = xs[shape, m]
                fn = gemv.linear if m == 1 else F.linear
                us = time_graph([lambda w=w: fn(x, w) for w in wb], rounds=max(1, 32 // len(wb)))
                emit({"kind": "bf16", "m": m, "shape": shape, "n": n, "k": k, "bytes": n * k * 2, "us": us,
                      "ok": True, "cfg": {"path": "gemv" if m == 1 else "cublas"}})
            del wb
        del wf
    for job in jobs:
        if time.monotonic() > deadline:
            emit({"kind": kind, "event": "deadline", "left": len(jobs)})
            break
        rec = {k: job[k] for k in ("kind", "m", "shape", "n", "k", "cfg", "id", "default") if k in job}
        try:
            cfg = WQConfig.from_dict(job["cfg"])
            x, ref = xs[job["shape"], job["m"]], refs[job["shape"], job["m"]]
            ws = weights[job["shape"]]
            y = launch(x, ws[0], None, cfg).float()
            err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
            rec.update(err=err, ok=bool(err <= TOL and torch.isfinite(y).all()), bytes=ws[0].nbytes())
            if rec["ok"]:
                rec["us"] = time_graph([lambda w=w: launch(x, w, None, cfg) for w in ws],
                                       rounds=max(1, 32 // len(ws)))
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            if "CUDA" in rec["error"] or "illegal" in rec["error"]:
                emit(rec)
                return 3  # a sticky device fault: the parent goes on without this kind
        emit(rec)
    emit({"kind": kind, "event": "done"})
    return 0


# -- the parent ------------------------------------------------------------------------------------------------
def best_entries(results: list[dict]) -> tuple[dict, list[dict]]:
    """(best per (kind, m, shape), table entries) from the measured lines."""
    from fleetlm.kernels.wq_configs import kind_of

    kind_name = {"int4": kind_of(4, 128, False, False, False), "q4k": kind_of(4, 32, True, True, False)}
    assert kind_name == {k: v[0] for k, v in KIND_NAMES.items()}
    best: dict[tuple[str, int, str], dict] = {}
    for r in results:
        if r.get("ok") and "us" in r and r["kind"] in kind_name:
            key = (r["kind"], r["m"], r["shape"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    entries = []
    for (kind, m, shape), r in sorted(best.items()):
        for bucket in M_RUNS[m]:
            entries.append({"kind": kind_name[kind], "m": bucket, "n": r["n"], "k": r["k"], "config": r["cfg"],
                            "us": round(r["us"], 2), "measured_rows": m})
    return best, entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=220.0)
    ap.add_argument("--compile-workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--jobs", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    ap.add_argument("--deadline-s", type=float, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.child:
        return child(ns.child, Path(ns.jobs), Path(ns.results), time.monotonic() + ns.deadline_s)

    from fleetlm.benchmarks.records import git_commit

    start = time.monotonic()
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    record: dict = {"bench": "gpu_wq_sweep", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(),
                    "shapes": SHAPES, "rows": list(M_RUNS), "tolerance": TOL, "phases": {}}
    jobs = _jobs()
    for i, job in enumerate(jobs):
        job["id"] = i
    record["candidates"] = len(jobs)
    print(f"{len(jobs)} candidate launches ({len(KINDS)} kinds x {len(SHAPES)} shapes x rows {list(M_RUNS)})",
          flush=True)

    # 1. compile, in parallel processes, at most ~35% of the budget
    t = time.monotonic()
    try:
        compiled = compile_all(jobs, start + 0.35 * ns.budget_s, ns.compile_workers)
    except Exception:  # noqa: BLE001
        compiled = {}
        record["phases"]["compile_error"] = traceback.format_exc()[-1500:]
    failed = {i: e for i, e in compiled.items() if e}
    record["phases"]["compile_s"] = round(time.monotonic() - t, 1)
    record["compile_failures"] = [dict(jobs[i], error=e) for i, e in list(failed.items())[:50]]
    print(f"compiled {len(compiled) - len(failed)}/{len(jobs)} in {record['phases']['compile_s']} s"
          f" ({len(failed)} failed)", flush=True)
    runnable = [j for j in jobs if compiled.get(j["id"], "not compiled") is None]

    # 2. measure, one child per kind, the remaining budget split between them
    results_path = out_dir / f"wq-sweep-{stamp}.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for i, kind in enumerate(KINDS):
        left = ns.budget_s - (time.monotonic() - start) - 8
        share = left / (len(KINDS) - i)
        if share < 15:
            record["phases"][f"{kind}_error"] = "skipped: time budget spent"
            continue
        kind_jobs = [j for j in runnable if j["kind"] == kind]
        # GEMV first (the batch-1 decode target), then 16, 64, 256, 1024 rows
        kind_jobs.sort(key=lambda j: (list(M_RUNS).index(j["m"]), j["shape"]))
        jobs_path = out_dir / f"wq-sweep-{stamp}-{kind}-jobs.json"
        jobs_path.write_text(json.dumps(kind_jobs))
        t = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, "--jobs",
                                   str(jobs_path), "--results", str(results_path), "--deadline-s", str(share - 12)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=share)
            record["phases"][f"{kind}_rc"] = proc.returncode
            if proc.returncode:
                record["phases"][f"{kind}_stderr"] = proc.stderr[-1500:]
        except subprocess.TimeoutExpired:
            record["phases"][f"{kind}_error"] = f"timed out after {share:.0f} s"
        record["phases"][f"{kind}_s"] = round(time.monotonic() - t, 1)
        jobs_path.unlink(missing_ok=True)

    # 3. table and record
    results = []
    if results_path.exists():
        results = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    bw = next((r["copy_bandwidth_Bps"] for r in results if r.get("event") == "start"), None)
    record["copy_bandwidth_GBps"] = bw / 1e9 if bw else None
    best, entries = best_entries(results)
    try:
        import torch

        record["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        record["card"] = None
    table = {"version": 1, "card": record["card"], "date": record["date"], "commit": record["commit"],
             "source": "benchmarks/gpu_wq_sweep.py", "entries": entries}
    (out_dir / "wq_configs.json").write_text(json.dumps(table, indent=1) + "\n")
    base = {(r["m"], r["shape"]): r for r in results if r.get("kind") == "bf16"}
    defaults = {(r["kind"], r["m"], r["shape"]): r for r in results if r.get("default") and "us" in r}
    summary = {}
    for (kind, m, shape), r in sorted(best.items()):
        b = base.get((m, shape))
        d = defaults.get((kind, m, shape))
        summary[f"{kind}/m{m}/{shape}"] = {
            "us": r["us"], "config": r["cfg"], "err": r.get("err"), "default_us": d["us"] if d else None,
            "roofline_us": r["bytes"] / bw * 1e6 if bw else None,
            "bf16_us": b["us"] if b else None, "bf16_roofline_us": b["bytes"] / bw * 1e6 if b and bw else None}
    record["best"] = summary
    record["results"] = [r for r in results if "event" not in r]
    record["events"] = [r for r in results if "event" in r]
    path = out_dir / f"wq-sweep-{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    results_path.unlink(missing_ok=True)
    print(f"\nwrote {path} and {out_dir / 'wq_configs.json'} ({len(entries)} entries)  card={record['card']}  "
          f"commit={record['commit']}  copy {record['copy_bandwidth_GBps'] or 0:.0f} GB/s  "
          f"{time.monotonic() - start:.0f} s")
    print("per layer (sum of the 4 projections), us: best config (roofline: weight bytes / copy bandwidth), bf16,"
          " and the defaults of kernels/wq_configs.py")
    for kind in KINDS:
        for m in M_RUNS:
            rows = [summary.get(f"{kind}/m{m}/{s}") for s in SHAPES]
            if not all(rows):
                print(f"  {kind:>4} M={m:>4}: incomplete ({sum(1 for r in rows if r)}/{len(SHAPES)} shapes)")
                continue
            us = sum(r["us"] for r in rows)
            roof = sum(r["roofline_us"] or 0 for r in rows)
            b16 = sum(r["bf16_us"] or 0 for r in rows)
            dflt = sum(r["default_us"] for r in rows) if all(r["default_us"] for r in rows) else None
            paths = ",".join(sorted({r["config"]["path"] for r in rows}))
            print(f"  {kind:>4} M={m:>4}: {us:7.1f} (roof {roof:5.1f})  bf16 {b16:7.1f}  x{b16 / us if us else 0:.2f}"
                  f"  defaults {f'{dflt:7.1f} x{b16 / dflt:.2f}' if dflt else '-'}  [{paths}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
