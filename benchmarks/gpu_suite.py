"""The whole GPU benchmark suite in one bounded run (one device call), table printed last.

    python benchmarks/gpu_suite.py                       # everything, ~8 min budget
    python benchmarks/gpu_suite.py --quick               # smaller workloads, same parts
    python benchmarks/gpu_suite.py --parts ceilings,latency --commit <sha>

On one GPU, Llama-3.1-8B shape, ``dummy`` bf16 weights (``--model`` to change):

============== ==================================================================
part           what
============== ==================================================================
ceilings       device-to-device copy GB/s; bf16 matmul 8192^3 TFLOP/s
parity         engine vs transformers greedy, 8 prompts x 32 tokens; margins at divergence
latency        batch-1 decode, 128 in / 512 out: tok/s, ms/step, MBU
throughput_512 256 x 512 in / 128 out (the engine)
hf_batch       the same workload through transformers ``generate_batch``
throughput_256 1000 x 256 in / 256 out: requests/s
throughput_1024 1000 x 1024 in / 128 out: requests/s, MFU
prefix         90% of each prompt a shared 2000-token prefix, caching on vs off;
               0% shared, on vs off
kernels        ``fleetlm.kernels.bench.bench_kernels()``
============== ==================================================================

How it stays bounded and safe on GPU memory: the work runs in child
processes, one model on the GPU at a time, each killed at its time limit
(its memory goes back with it): the transformers reference for parity
(``hf_baseline.py parity``), the engine with prefix caching on (ceilings,
parity, latency, the throughputs, prefix on), the engine with caching off
(prefix off), ``hf_baseline.py batch``, then the kernels. Every part has its
own budget (smaller of it and what is left of ``--budget``) and is skipped,
with a note, when too little is left; a run cut by its limit reports what it
finished (``complete: false``). Each part writes its JSON record as soon as it
ends, to ``--out`` (default ``$OUT`` if set, else ``benchmarks/results/``), so
a killed stage loses only its current part.

Everything does not fit in ~8 minutes on one H100 if the engine is slow;
split it into two device calls when needed:
``--parts ceilings,parity,latency,throughput_512,hf_batch,kernels`` and
``--parts ceilings,throughput_256,throughput_1024,prefix``.

On CPU the same code runs with a small model (``--device cpu --model
tiny-llama-8h4kv --smoke``), which is how the suite itself is tested.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

PARTS = ("ceilings", "parity", "latency", "throughput_512", "hf_batch", "throughput_256", "throughput_1024",
         "prefix", "kernels")
ENGINE_PARTS = ("ceilings", "parity", "latency", "throughput_512", "throughput_256", "throughput_1024", "prefix")

# Workloads per mode: full, --quick, --smoke (the CPU self-test: exercises every path in seconds).
WORKLOADS: dict[str, dict[str, dict[str, Any]]] = {
    "parity": {"full": {"num_prompts": 8, "max_tokens": 32}, "quick": {"num_prompts": 8, "max_tokens": 32},
               "smoke": {"num_prompts": 3, "max_tokens": 8}},
    "latency": {"full": {"batch_size": 1, "input_len": 128, "output_len": 512, "num_iters": 3},
                "quick": {"batch_size": 1, "input_len": 128, "output_len": 128, "num_iters": 1},
                "smoke": {"batch_size": 1, "input_len": 16, "output_len": 8, "num_iters": 1}},
    "throughput_512": {"full": {"num_prompts": 256, "input_len": 512, "output_len": 128},
                       "quick": {"num_prompts": 64, "input_len": 512, "output_len": 128},
                       "smoke": {"num_prompts": 4, "input_len": 32, "output_len": 4}},
    "hf_batch": {"full": {"num_requests": 256, "input_len": 512, "output_len": 128},
                 "quick": {"num_requests": 64, "input_len": 512, "output_len": 128},
                 "smoke": {"num_requests": 2, "input_len": 16, "output_len": 4}},
    "throughput_256": {"full": {"num_prompts": 1000, "input_len": 256, "output_len": 256},
                       "quick": {"num_prompts": 200, "input_len": 256, "output_len": 256},
                       "smoke": {"num_prompts": 4, "input_len": 16, "output_len": 4}},
    "throughput_1024": {"full": {"num_prompts": 1000, "input_len": 1024, "output_len": 128},
                        "quick": {"num_prompts": 200, "input_len": 1024, "output_len": 128},
                        "smoke": {"num_prompts": 4, "input_len": 64, "output_len": 4}},
    # prompt 2222 tokens: 2000 shared (90%) + 222 unique; the unshared run has the same length
    "prefix": {"full": {"num_prompts": 64, "prefix_len": 2000, "shared_fraction": 0.9, "output_len": 16},
               "quick": {"num_prompts": 16, "prefix_len": 2000, "shared_fraction": 0.9, "output_len": 16},
               "smoke": {"num_prompts": 4, "prefix_len": 72, "shared_fraction": 0.9, "output_len": 2}},
}
# Seconds per part: full, quick (--smoke uses quick's). The engine stages add ENGINE_BUILD_S for loading.
BUDGETS: dict[str, dict[str, float]] = {
    part: {"full": full, "quick": quick, "smoke": quick}
    for part, (full, quick) in {
        "ceilings": (20, 20), "parity": (45, 45), "latency": (60, 30), "throughput_512": (90, 40),
        "hf_batch": (150, 100), "throughput_256": (120, 40), "throughput_1024": (120, 40), "prefix": (100, 50),
        "kernels": (120, 60), "hf_parity": (180, 150),
    }.items()
}
MIN_PART_S = 10  # a part with less than this left is skipped
ENGINE_BUILD_S = 180
STAGE_GRACE_S = 20  # a worker stops its parts this long before its stage is killed

TARGETS = {
    "latency": ">= 160 tok/s, MBU >= 85%",
    "throughput_256": ">= 26 req/s (vLLM 24.3)",
    "hf_batch": "measured 519 out tok/s",
    "prefix_90": ">= 2.5x",
    "prefix_0": "loss <= 2%",
    "decode_attn": ">= 80% of copy",
    "prefill_attn": ">= 0.8x SDPA flash",
    "rms_norm": ">= 2500 GB/s",
}


def _now_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def _mode(ns: argparse.Namespace) -> str:
    return "smoke" if ns.smoke else "quick" if ns.quick else "full"


def _sel(ns: argparse.Namespace, table: dict[str, dict[str, Any]], key: str) -> Any:
    return table[key][_mode(ns)]


# --- workers (child processes) ------------------------------------------------------------


def _bench():
    """The benchmark library's functions in one namespace (imported in the child, after its setup)."""
    from types import SimpleNamespace

    from fleetlm.benchmarks import ceilings, offline, records

    return SimpleNamespace(**{name: getattr(mod, name) for mod in (ceilings, offline, records)
                              for name in mod.__all__})


def _write(ns: argparse.Namespace, part: str, config: dict[str, Any], figures: dict[str, Any], **extra: Any) -> None:
    bench = _bench()
    record = bench.make_record(part, config, figures, device=ns.device, commit=ns.commit,
                               suite_run=ns.run_id, part=part, **extra)
    path = bench.write_record(record, results_dir=ns.out)
    print(f"[suite] {part}: wrote {path}", flush=True)


def _time_left(ns: argparse.Namespace) -> float:
    return ns.deadline - time.time()


def _part_budget(ns: argparse.Namespace, budget_key: str) -> float | None:
    """Seconds this part may take, or None (skip) when too little is left."""
    budget = min(_sel(ns, BUDGETS, budget_key), _time_left(ns))
    return budget if budget >= MIN_PART_S else None


def _run_part(ns: argparse.Namespace, part: str, config: dict[str, Any], fn, budget_key: str | None = None) -> None:
    budget = _part_budget(ns, budget_key or part)
    if budget is None:
        _write(ns, part, config, {"skipped": f"out of time ({max(0.0, _time_left(ns)):.0f} s left)"})
        return
    print(f"[suite] {part}: starting, budget {budget:.0f} s", flush=True)
    t0 = time.perf_counter()
    try:
        figures = fn(budget)
    except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others
        traceback.print_exc()
        figures = {"error": f"{type(e).__name__}: {e}"[:2000]}
    figures.setdefault("part_seconds", time.perf_counter() - t0)
    _write(ns, part, {**config, "budget_s": budget}, figures)


def engine_worker(ns: argparse.Namespace) -> int:
    bench = _bench()
    parts = [p for p in ns.worker_parts.split(",") if p]
    ceilings = bench.measure_ceilings(ns.device, ns.dtype)
    if "ceilings" in parts:
        _write(ns, "ceilings", {"device": ns.device, "dtype": ns.dtype}, ceilings)
    from fleetlm import LLM

    engine_kw = {
        "model": ns.model, "load_format": ns.load_format, "dtype": ns.dtype, "device": ns.device,
        "max_num_seqs": ns.max_num_seqs, "max_model_len": ns.max_model_len,
        "enable_prefix_caching": ns.prefix_mode == "on", "enforce_eager": ns.enforce_eager,
    }
    if ns.max_num_batched_tokens:
        engine_kw["max_num_batched_tokens"] = ns.max_num_batched_tokens
    if ns.gpu_memory_utilization:
        engine_kw["gpu_memory_utilization"] = ns.gpu_memory_utilization
    t0 = time.perf_counter()
    llm = LLM(**engine_kw)
    build_s = time.perf_counter() - t0
    print(f"[suite] engine built in {build_s:.1f} s ({llm.engine.stats().num_total_blocks} KV blocks)", flush=True)
    base = {"engine": engine_kw, "engine_build_s": build_s, "num_kv_blocks": llm.engine.stats().num_total_blocks,
            "ceilings": ceilings}

    if "parity" in parts:
        _run_part(ns, "parity", {**base, **_sel(ns, WORKLOADS, "parity")}, lambda b: _engine_parity(ns, llm, b))
    if "latency" in parts:
        w = _sel(ns, WORKLOADS, "latency")
        _run_part(ns, "latency", {**base, **w},
                  lambda b: bench.run_latency(llm, **w, time_limit=b, ceilings=ceilings))
    for part in ("throughput_512", "throughput_256", "throughput_1024"):
        if part in parts:
            w = _sel(ns, WORKLOADS, part)
            _run_part(ns, part, {**base, **w},
                      lambda b, w=w: bench.run_throughput(llm, **w, time_limit=b, ceilings=ceilings))
    if "prefix" in parts:
        _run_part(ns, f"prefix_{ns.prefix_mode}", {**base, **_sel(ns, WORKLOADS, "prefix")},
                  lambda b: _prefix_both(ns, llm, b), budget_key="prefix")
    return 0


def _prefix_both(ns: argparse.Namespace, llm, budget: float) -> dict[str, Any]:
    """The 90%-shared and the 0%-shared workloads on one engine, half the budget each."""
    bench = _bench()
    w = _sel(ns, WORKLOADS, "prefix")
    input_len, prefix_len = bench.resolve_prefix_shape(None, w["prefix_len"], w["shared_fraction"])
    out = {}
    t_end = time.perf_counter() + budget
    for key, plen in (("shared_90", prefix_len), ("shared_0", 0)):
        left = t_end - time.perf_counter()
        limit = left / 2 if key == "shared_90" else left
        out[key] = bench.run_prefix(llm, num_prompts=w["num_prompts"], input_len=input_len, prefix_len=plen,
                                    output_len=w["output_len"], time_limit=max(1.0, limit))
    out["input_len"], out["prefix_len"] = input_len, prefix_len
    return out


def _engine_parity(ns: argparse.Namespace, llm, budget: float) -> dict[str, Any]:
    import hf_baseline

    from fleetlm import SamplingParams

    bench = _bench()
    ref_path = Path(ns.work) / "hf_parity.json"
    if not ref_path.is_file():
        return {"error": "no transformers reference (the hf_parity stage failed or was skipped; see its log)"}
    ref = json.loads(ref_path.read_text())
    reference = ref["reference"]
    prompts = [r["prompt"] for r in reference]
    max_tokens = ref["max_tokens"]
    deadline = time.perf_counter() + budget
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    run = bench.run_batch(llm.engine, prompts, [params] * len(prompts), deadline=deadline, tag="parity")
    tokens = [list(run.outputs[rid].outputs[0].token_ids) if rid in run.outputs else [] for rid in run.request_ids]
    result = hf_baseline.compare_greedy(reference, tokens)
    diverged = [i for i, e in enumerate(result["per_prompt"]) if e["diverged_at"] is not None]
    if diverged and time.perf_counter() < deadline:
        # Again with logprobs, for the engine's own margin at each divergence.
        lp_params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
        again = bench.run_batch(llm.engine, [prompts[i] for i in diverged], [lp_params] * len(diverged),
                                deadline=deadline, tag="parity-lp")
        lps: list[Any] = [None] * len(prompts)
        same = True
        for i, rid in zip(diverged, again.request_ids):
            out = again.outputs.get(rid)
            if out is not None:
                lps[i] = out.outputs[0].logprobs
                same = same and list(out.outputs[0].token_ids) == tokens[i]
        result = hf_baseline.compare_greedy(reference, tokens, lps)
        result["logprobs_run_same_tokens"] = same
    result["within_tolerance"] = all(
        e["diverged_at"] is None
        or (e.get("ref_gap_to_engine_token") is not None and e["ref_gap_to_engine_token"] <= hf_baseline.PARITY_GAP_TOL)
        for e in result["per_prompt"])
    result["gap_tolerance"] = hf_baseline.PARITY_GAP_TOL
    result["complete"] = run.complete
    result["reference_transformers"] = ref.get("transformers")
    return result


def kernels_worker(ns: argparse.Namespace) -> int:
    bench = _bench()
    config = {"mode": _mode(ns)}
    if ns.device != "cuda":
        _write(ns, "kernels", config, {"skipped": "kernel microbenchmarks need CUDA"})
        return 0
    try:
        from fleetlm.kernels.bench import bench_kernels
    except ImportError as e:
        _write(ns, "kernels", config, {"skipped": f"fleetlm.kernels.bench is not importable: {e}"})
        return 0
    copy = bench.measure_copy_bandwidth(ns.device)
    t0 = time.perf_counter()
    try:
        figures = bench_kernels(quick=ns.quick or ns.smoke)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        figures = {"error": f"{type(e).__name__}: {e}"[:2000]}
    figures["copy_gbps"] = copy["copy_gbps"]
    figures["part_seconds"] = time.perf_counter() - t0
    _write(ns, "kernels", config, figures)
    return 0


# --- the orchestrator ---------------------------------------------------------------------


def _stage(ns: argparse.Namespace, name: str, cmd: list[str], budget: float, min_s: float, notes: dict[str, str],
           covers: list[str]) -> bool:
    """Run one child process within ``budget`` (and what is left of the run); False if skipped or failed."""
    left = ns.deadline - time.time()
    timeout = min(budget, left)
    if timeout < min_s:
        for part in covers:
            notes.setdefault(part, f"skipped: {max(0.0, left):.0f} s left of --budget for stage {name}")
        print(f"[suite] stage {name}: skipped ({left:.0f} s left)", flush=True)
        return False
    print(f"[suite] stage {name}: up to {timeout:.0f} s: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    # Progress bars of weight loading would crowd the device tool's output tail, where the table goes.
    env = {**os.environ, "TQDM_DISABLE": "1"}
    try:
        proc = subprocess.run(cmd, timeout=timeout, cwd=str(REPO), env=env)
    except subprocess.TimeoutExpired:
        for part in covers:
            notes.setdefault(part, f"stage {name} killed at its {timeout:.0f} s limit")
        print(f"[suite] stage {name}: killed after {timeout:.0f} s", flush=True)
        return False
    took = time.perf_counter() - t0
    print(f"[suite] stage {name}: exit {proc.returncode} after {took:.0f} s", flush=True)
    if proc.returncode != 0:
        for part in covers:
            notes.setdefault(part, f"stage {name} exited with status {proc.returncode}")
        return False
    return True


def _worker_cmd(ns: argparse.Namespace, worker: str, deadline: float, **extra: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--run-id", ns.run_id,
           "--out", ns.out, "--work", ns.work, "--deadline", f"{deadline:.1f}", "--model", ns.model,
           "--load-format", ns.load_format, "--device", ns.device, "--dtype", ns.dtype,
           "--max-num-seqs", str(ns.max_num_seqs), "--max-model-len", str(ns.max_model_len)]
    if ns.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(ns.max_num_batched_tokens)]
    if ns.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(ns.gpu_memory_utilization)]
    if ns.enforce_eager:
        cmd.append("--enforce-eager")
    if ns.quick:
        cmd.append("--quick")
    if ns.smoke:
        cmd.append("--smoke")
    if ns.commit:
        cmd += ["--commit", ns.commit]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", value]
    return cmd


def _hf_cmd(ns: argparse.Namespace, sub: str, output: Path, **args: Any) -> list[str]:
    cmd = [sys.executable, str(HERE / "hf_baseline.py"), sub, "--model", ns.model, "--load-format", ns.load_format,
           "--device", ns.device, "--dtype", ns.dtype, "--output", str(output)]
    for key, value in args.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def orchestrate(ns: argparse.Namespace) -> int:
    t_start = time.time()
    ns.deadline = t_start + ns.budget
    ns.run_id = ns.run_id or f"{_now_stamp()}-{uuid.uuid4().hex[:6]}"
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    ns.work = str(Path(ns.out) / f"suite-work-{ns.run_id}")
    Path(ns.work).mkdir(parents=True, exist_ok=True)
    parts = list(PARTS) if ns.parts == "all" else [p.strip() for p in ns.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}", file=sys.stderr)
        return 2
    notes: dict[str, str] = {}
    print(f"[suite] run {ns.run_id}: parts {','.join(parts)}; budget {ns.budget:.0f} s; records in {ns.out}", flush=True)

    def stage_deadline(budget: float) -> float:
        return min(ns.deadline, time.time() + budget) - STAGE_GRACE_S

    if "parity" in parts:
        w = _sel(ns, WORKLOADS, "parity")
        _stage(ns, "hf_parity", _hf_cmd(ns, "parity", Path(ns.work) / "hf_parity.json", **w),
               _sel(ns, BUDGETS, "hf_parity"), 30, notes, ["parity"])
    engine_parts = [p for p in ENGINE_PARTS if p in parts]
    if engine_parts:
        budget = ENGINE_BUILD_S + sum(_sel(ns, BUDGETS, p) for p in engine_parts) + STAGE_GRACE_S
        _stage(ns, "engine", _worker_cmd(ns, "engine", stage_deadline(budget), worker_parts=",".join(engine_parts),
                                         prefix_mode="on"), budget, 60, notes, engine_parts)
    if "prefix" in parts:
        budget = ENGINE_BUILD_S + _sel(ns, BUDGETS, "prefix") + STAGE_GRACE_S
        _stage(ns, "engine_no_prefix_cache",
               _worker_cmd(ns, "engine", stage_deadline(budget), worker_parts="prefix", prefix_mode="off"),
               budget, 60, notes, ["prefix"])
    if "hf_batch" in parts:
        w = _sel(ns, WORKLOADS, "hf_batch")
        out = Path(ns.work) / "hf_batch.json"
        if _stage(ns, "hf_batch", _hf_cmd(ns, "batch", out, **w), _sel(ns, BUDGETS, "hf_batch"), 30, notes,
                  ["hf_batch"]) and out.is_file():
            hf = json.loads(out.read_text())
            _write_from_template(ns, "hf_batch", {k: v for k, v in hf.items() if k != "figures"}, hf["figures"],
                                 versions_extra={"transformers": hf.get("transformers")}, card=hf.get("card"))
    if "kernels" in parts:
        budget = _sel(ns, BUDGETS, "kernels") + STAGE_GRACE_S
        _stage(ns, "kernels", _worker_cmd(ns, "kernels", stage_deadline(budget)), budget, 30, notes, ["kernels"])

    records = _collect(ns)
    combined = _combine(ns, records)
    records.update(combined)
    rows = table_rows(parts, records, notes)
    summary = {"suite_run": ns.run_id, "parts": parts, "mode": _mode(ns), "budget_s": ns.budget,
               "elapsed_s": time.time() - t_start, "notes": notes, "rows": rows,
               "records": {k: v.get("_path") for k, v in records.items()}}
    path = Path(ns.out) / f"suite-{ns.run_id}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n[suite] summary: {path}")
    print_table(rows, records)
    return 0


def _collect(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """This run's records by part (the newest of each)."""
    found: dict[str, dict[str, Any]] = {}
    for p in sorted(Path(ns.out).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("suite_run") == ns.run_id and rec.get("part"):
            rec["_path"] = str(p)
            found[rec["part"]] = rec
    return found


def _template(records: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Environment fields (card, versions, commit) of any record of this run."""
    for rec in records.values():
        return {k: rec[k] for k in ("card", "num_devices", "torch", "triton", "versions", "commit") if k in rec}
    return None


def _write_from_template(ns: argparse.Namespace, part: str, config: dict[str, Any], figures: dict[str, Any],
                         versions_extra: dict[str, Any] | None = None, card: str | None = None) -> dict[str, Any]:
    """A record written by the orchestrator (which never touches the GPU itself): the
    environment comes from a worker's record of this run."""
    env = _template(_collect(ns)) or {"card": "unknown", "commit": ns.commit or "unknown"}
    if versions_extra:
        env["versions"] = {**env.get("versions", {}), **versions_extra}
    if card and (env.get("card") in (None, "unknown")):
        env["card"] = card
    record = {"benchmark": part, **env, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "config": config, "figures": figures, "suite_run": ns.run_id, "part": part}
    path = Path(ns.out) / f"{part}-{_now_stamp()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    record["_path"] = str(path)
    print(f"[suite] {part}: wrote {path}", flush=True)
    return record


def _combine(ns: argparse.Namespace, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Records that need two stages: prefix on vs off."""
    out = {}
    on, off = records.get("prefix_on"), records.get("prefix_off")
    if on and off and "shared_90" in on["figures"] and "shared_90" in off["figures"]:
        bench = _bench()
        figures = {}
        for key in ("shared_90", "shared_0"):
            figures[key] = {"on": on["figures"][key], "off": off["figures"][key],
                            **bench.prefix_comparison(on["figures"][key], off["figures"][key])}
        config = {k: v for k, v in on["config"].items() if k not in ("engine", "ceilings")}
        out["prefix"] = _write_from_template(ns, "prefix", config, figures)
    return out


# --- the table ------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, float)):
        return fmt.format(x)
    return str(x)


def _status(fig: dict[str, Any]) -> str:
    if "skipped" in fig:
        return f"skipped: {fig['skipped']}"
    if "error" in fig:
        return f"error: {fig['error'][:80]}"
    return "" if fig.get("complete", True) else "partial (time limit)"


def table_rows(parts: list[str], records: dict[str, dict[str, Any]], notes: dict[str, str]) -> list[list[str]]:
    """[part, figure, value, target/anchor, status] rows."""
    rows: list[list[str]] = []

    def fig(part: str) -> dict[str, Any] | None:
        rec = records.get(part)
        return rec["figures"] if rec else None

    def missing(part: str) -> None:
        rows.append([part, "-", "-", "", notes.get(part, "no record")])

    for part in parts:
        if part == "ceilings":
            f = fig("ceilings")
            if f is None:
                missing(part)
                continue
            rows.append([part, "copy GB/s (d2d, read+write)", _f(f.get("copy_gbps"), "{:.0f}"), "~3000", ""])
            rows.append([part, f"matmul TFLOP/s ({f.get('matmul_dtype')} {f.get('matmul_size')}^3)",
                         _f(f.get("matmul_tflops")), "700-790", ""])
        elif part == "parity":
            f = fig("parity")
            if f is None or "tokens_matched" not in f:
                rows.append([part, "greedy tokens vs transformers", "-", "", _status(f) if f else notes.get(part, "no record")])
                continue
            rows.append([part, "prompts identical", f"{f['prompts_identical']}/{f['num_prompts']}", "all", _status(f)])
            rows.append([part, "tokens matched", f"{f['tokens_matched']}/{f['tokens_total']}", "", ""])
            rows.append([part, "max ref margin at divergence", _f(f.get("max_ref_margin_at_divergence"), "{:.4f}"),
                         f"gap <= {f.get('gap_tolerance')}", "ok" if f.get("within_tolerance") else "OUT OF TOLERANCE"])
        elif part == "latency":
            f = fig("latency")
            if f is None or "decode_tokens_per_s" not in f:
                rows.append([part, "batch-1 decode tok/s", "-", TARGETS["latency"], _status(f) if f else notes.get(part, "no record")])
                continue
            rows.append([part, "decode tok/s", _f(f["decode_tokens_per_s"]), ">= 160", _status(f)])
            rows.append([part, "ms / decode step (mean)", _f(f["decode_step_ms"]["mean"], "{:.2f}"), "", ""])
            rows.append([part, "MBU (weights+KV / copy bw)", _f(_pct(f.get("mbu"))), ">= 85%", ""])
            rows.append([part, "TTFT ms", _f(f.get("ttft_ms")), "", ""])
        elif part in ("throughput_512", "throughput_256", "throughput_1024"):
            f = fig(part)
            if f is None or "requests_per_s" not in f:
                rows.append([part, "requests/s", "-", "", _status(f) if f else notes.get(part, "no record")])
                continue
            target = TARGETS["throughput_256"] if part == "throughput_256" else ""
            rows.append([part, "requests/s", _f(f["requests_per_s"], "{:.2f}"), target, _status(f)])
            rows.append([part, "output tok/s", _f(f["output_tokens_per_s"]), "", ""])
            rows.append([part, "total tok/s", _f(f["total_tokens_per_s"]), "", ""])
            if part == "throughput_1024" or f.get("mfu") is not None:
                rows.append([part, "MFU", _f(_pct(f.get("mfu"))), "", ""])
        elif part == "hf_batch":
            f = fig("hf_batch")
            if f is None or "output_tokens_per_s" not in f:
                rows.append([part, "transformers generate_batch out tok/s", "-", TARGETS["hf_batch"],
                             _status(f) if f else notes.get(part, "no record")])
                continue
            rows.append([part, "transformers generate_batch out tok/s", _f(f["output_tokens_per_s"]),
                         TARGETS["hf_batch"], _status(f)])
            if f.get("output_tokens_per_s_requests_span"):
                rows.append([part, "  (over the requests' span)", _f(f["output_tokens_per_s_requests_span"]), "", ""])
            mine = fig("throughput_512")
            if mine and mine.get("output_tokens_per_s"):
                rows.append([part, "fleetlm / transformers (out tok/s)",
                             _f(mine["output_tokens_per_s"] / f["output_tokens_per_s"], "{:.1f}x"), "", ""])
        elif part == "prefix":
            f = fig("prefix")
            if f is None:
                status = notes.get(part) or "; ".join(
                    f"{k}: {_status(fig(k)) or 'ok'}" for k in ("prefix_on", "prefix_off") if fig(k)) or "no record"
                rows.append([part, "speedup with caching (90% shared)", "-", TARGETS["prefix_90"], status])
                continue
            s90, s0 = f["shared_90"], f["shared_0"]
            cfg = records["prefix"].get("config", {})
            label = f"speedup, {100 * cfg.get('shared_fraction', 0.9):.0f}% shared ({cfg.get('prefix_len')}-token prefix)"
            rows.append([part, label, _f(s90.get("speedup"), "{:.2f}x"),
                         TARGETS["prefix_90"], "" if s90.get("complete") else "partial (time limit)"])
            rows.append([part, "  hit rate with caching on", _f(_pct(s90["on"].get("prefix_cache_hit_rate"))), "", ""])
            rows.append([part, "loss with caching, 0% shared", _f(_pct(s0.get("loss_with_caching"))),
                         TARGETS["prefix_0"], "" if s0.get("complete") else "partial (time limit)"])
        elif part == "kernels":
            f = fig("kernels")
            if f is None or "kernels" not in f:
                rows.append([part, "kernel microbenchmarks", "-", "", _status(f) if f else notes.get(part, "no record")])
                continue
            copy = f.get("copy_gbps")
            for name, k in f["kernels"].items():
                value, target = "-", ""
                if name.startswith("paged_decode") and k.get("triton_gbps"):
                    value = f"{k['triton_gbps']:.0f} GB/s" + (f" ({100 * k['triton_gbps'] / copy:.0f}% of copy)" if copy else "")
                    target = TARGETS["decode_attn"] if "64x" in name else ""
                elif "prefill" in name and k.get("triton_ms"):
                    sdpa = k.get("sdpa_dense_ms")
                    value = f"{k['triton_ms']:.3f} ms" + (f" ({sdpa / k['triton_ms']:.2f}x SDPA {k.get('sdpa_backend')})" if sdpa else "")
                    target = TARGETS["prefill_attn"] if sdpa else ""
                elif k.get("triton_gbps"):
                    value = f"{k['triton_gbps']:.0f} GB/s"
                    target = TARGETS["rms_norm"] if name == "fused_add_rms_norm" else ""
                rows.append([part, name, value, target, ""])
    return rows


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"


def print_table(rows: list[list[str]], records: dict[str, dict[str, Any]]) -> None:
    tmpl = _template(records) or {}
    print(f"card: {tmpl.get('card', '?')}  torch {tmpl.get('torch', '?')}  triton {tmpl.get('triton', '?')}  "
          f"commit {str(tmpl.get('commit', '?'))[:12]}")
    header = ["part", "figure", "value", "target / anchor", "status"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    widths[-1] = min(widths[-1], 60)
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c)[:w].ljust(w) for c, w in zip(r, widths)).rstrip())


# --- arguments -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FleetLM GPU benchmark suite (one bounded run; table printed last).")
    p.add_argument("--parts", default="all", help=f"comma list of {', '.join(PARTS)} (default all)")
    p.add_argument("--quick", action="store_true", help="smaller workloads and budgets")
    p.add_argument("--smoke", action="store_true", help="tiny workloads (CPU self-test of the suite's code paths)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    p.add_argument("--out", default=None, help="records directory (default $OUT, else benchmarks/results)")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD, else 'unknown')")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    # worker-only
    p.add_argument("--worker", choices=("engine", "kernels"), help=argparse.SUPPRESS)
    p.add_argument("--worker-parts", default="", help=argparse.SUPPRESS)
    p.add_argument("--prefix-mode", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    ns.dtype = ns.dtype or ("bfloat16" if ns.device == "cuda" else "float32")
    # This script is the edge: $OUT (the device tool's output folder) is read here only.
    ns.out = str(Path(ns.out or os.environ.get("OUT") or REPO / "benchmarks" / "results").resolve())
    if ns.worker is None:
        return orchestrate(ns)
    sys.path.insert(0, str(HERE))  # hf_baseline
    if ns.worker == "engine":
        return engine_worker(ns)
    return kernels_worker(ns)


if __name__ == "__main__":
    sys.exit(main())
