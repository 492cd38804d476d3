"""Structured output on one GPU: what issue 21 asks, checked and measured in one process.

    bash benchmarks/gpu_wheels.sh                  # here: the wheels the GPU machine lacks, into .whl/ (carried)
    pip install --no-index --no-deps .whl/*.whl    # there
    python benchmarks/gpu_structured.py --out $OUT

Llama-3.1-8B shape, ``dummy`` bf16 weights, CUDA graphs and async scheduling on
(the defaults), the mid-size schema ``benchmarks/schemas/order.json`` (nested
objects, an array of objects, enums, anyOf, a pattern, a format):

========== =====================================================================
part       what
========== =====================================================================
ceilings   device copy GB/s (the rooflines below use it)
kernel     the token-bitmask kernel vs its torch reference at 256 x vocab: exact,
           microseconds, bytes against the copy roofline
compile    the first guided request's extra TTFT (grammar compile, cold) and a
           cached one's; the warm-up's guided phase
batch1     one request, 512 in / 128 out, with and without the schema: decode
           tok/s, target >= 95%; the weight-read roofline
throughput 256 concurrent requests, 512 in / 128 out, each with the schema, vs
           none: output tok/s, target >= 90%; every constrained output's tokens
           walked by a fresh matcher (valid prefix), finished ones validated
           with jsonschema
mixed      128 requests, every other one constrained, vs all free: the free
           ones' mean TPOT, target within 3%
========== =====================================================================

Each part is bounded by what is left of ``--budget`` (default 450 s) and
records its failure without stopping the others. Rounds alternate the two
arms (free, guided, free, guided) and report medians. The engine's host time
spent building bitmasks is recorded beside each guided figure. On CPU the same
code runs small (``--smoke``: tiny-llama-8h4kv, float32), which is how the
script itself is tested.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCHEMA = json.loads((HERE / "schemas" / "order.json").read_text())
FULL = {"model": "llama-3.1-8b", "dtype": "bfloat16", "max_model_len": 1024, "max_num_seqs": 256,
        "prompt_len": 512, "output_len": 128, "concurrency": 256, "mixed": 128, "rounds": 2, "b1_rounds": 3,
        "mixed_rounds": 5}
SMOKE = {"model": "tiny-llama-8h4kv", "dtype": "float32", "max_model_len": 256, "max_num_seqs": 16,
         "prompt_len": 24, "output_len": 12, "concurrency": 8, "mixed": 8, "rounds": 1, "b1_rounds": 1,
         "mixed_rounds": 1}
TARGETS = {"batch1": 0.95, "throughput": 0.90, "mixed_tpot": 1.03}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


PARTS = ("ceilings", "kernel", "compile", "batch1", "throughput", "mixed")


def part(record: dict, name: str, budget: Budget, need_s: float):
    """Decorator-free runner: call fn, store its figures or its error under ``name``."""
    def run(fn, *args):
        if name not in record["selected"]:
            return None
        if budget.left() < need_s:
            record["parts"][name] = {"skipped": f"{budget.left():.0f} s left, needs ~{need_s:.0f} s"}
            return None
        t = time.monotonic()
        try:
            out = fn(*args)
            out["seconds"] = round(time.monotonic() - t, 2)
            record["parts"][name] = out
            return out
        except Exception as e:  # noqa: BLE001 - one part's failure must not hide the rest
            record["parts"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            return None
    return run


def copy_gbps(device) -> float:
    import torch

    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 10 / (time.perf_counter() - t) / 1e9  # read + write


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def kernel_part(device, vocab: int, rows: int, gbps: float) -> dict:
    import torch

    from fleetlm.kernels import select_ops
    from fleetlm.kernels.token_bitmask import apply_token_bitmask_ref

    ops = select_ops(device)
    gen = torch.Generator().manual_seed(0)
    words = -(-vocab // 32)
    logits = torch.randn(rows, vocab, generator=gen).to(device)
    # A JSON-like mask: ~2% of tokens allowed.
    allowed = torch.rand(rows, words * 32, generator=gen) < 0.02
    packed = (allowed.view(rows, words, 32).to(torch.int64) << torch.arange(32)).sum(-1)
    bitmask = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).to(device)
    idx = torch.arange(rows, dtype=torch.int64, device=device)
    ref = logits.clone()
    apply_token_bitmask_ref(ref, idx, bitmask)
    got = logits.clone()
    ops.apply_token_bitmask(got, idx, bitmask)
    exact = bool(torch.equal(got, ref))
    times = []
    for _ in range(20):
        x = logits.clone()
        sync(device)
        t = time.perf_counter()
        ops.apply_token_bitmask(x, idx, bitmask)
        sync(device)
        times.append(time.perf_counter() - t)
    us = 1e6 * statistics.median(times)
    moved = bitmask.numel() * 4 + int((~allowed[:, :vocab]).sum()) * 4
    return {"backend": ops.backend, "rows": rows, "vocab": vocab, "exact": exact, "us": round(us, 1),
            "bytes": moved, "roofline_us": round(moved / (gbps * 1e3), 1)}


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(300, vocab - 1) for _ in range(length)] for _ in range(n)]


class BitmaskTimer:
    """Host seconds the engine spends building bitmasks (wraps StructuredOutput.bitmask)."""

    def __init__(self, engine) -> None:
        self.so = engine._structured()
        self.real = self.so.bitmask
        self.seconds, self.calls, self.rows = 0.0, 0, 0
        self.so.bitmask = self

    def __call__(self, out, requests):
        t = time.perf_counter()
        g = self.real(out, requests)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        self.rows += 0 if g is None else g.bitmask.shape[0]
        return g

    def take(self) -> dict:
        d = {"bitmask_host_ms_per_step": round(1e3 * self.seconds / max(1, self.calls), 3),
             "bitmask_steps": self.calls, "bitmask_rows_per_step": round(self.rows / max(1, self.calls), 1)}
        self.seconds, self.calls, self.rows = 0.0, 0, 0
        return d


def guided_params(cfg, n=1, guided=True):
    from fleetlm import GuidedDecodingParams, SamplingParams

    g = GuidedDecodingParams(json=SCHEMA) if guided else None
    return SamplingParams(temperature=0.0, max_tokens=cfg["output_len"], ignore_eos=True, guided_decoding=g)


def run_batch(llm, ps, params):
    sync_dev = llm.engine.config.parallel.device
    sync(sync_dev)
    t = time.perf_counter()
    outs = llm.generate(ps, params)
    sync(sync_dev)
    return outs, time.perf_counter() - t


def check_outputs(llm, outs) -> dict:
    """Every constrained output must be a prefix the grammar accepts; finished ones must validate."""
    import xgrammar as xgr

    so = llm.engine._structured()
    compiled = so.prepare(guided_params({"output_len": 1})).result(timeout=60)
    bad, finished, validated = 0, 0, 0
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    for out in outs:
        for comp in out.outputs:
            m = xgr.GrammarMatcher(compiled)
            if not all(m.accept_token(t) for t in comp.token_ids):
                bad += 1
            if comp.finish_reason == "stop":
                finished += 1
                if jsonschema is not None:
                    jsonschema.validate(json.loads(comp.text), SCHEMA)
                    validated += 1
    return {"outputs": sum(len(o.outputs) for o in outs), "rejected_by_matcher": bad, "finished": finished,
            "validated_jsonschema": validated if jsonschema is not None else "jsonschema not installed"}


def weight_bytes(llm) -> int:
    model = llm.engine.workers.worker.runner.model
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def kv_bytes_per_token(llm) -> int:
    runner = llm.engine.workers.worker.runner
    return runner.kv_bytes_per_block() // runner.block_size


def batch1_part(llm, cfg, gbps, timer) -> dict:
    """Decode rate from each request's own timestamps (first token to last): prefill excluded."""
    vocab = llm.engine.model_config.vocab_size
    rates = {"free": [], "guided": []}
    host = {}
    for r in range(cfg["b1_rounds"]):
        for arm in ("free", "guided"):
            outs, _ = run_batch(llm, prompts(1, cfg["prompt_len"], vocab, seed=100 + 2 * r + (arm == "guided")),
                                guided_params(cfg, guided=arm == "guided"))
            m, n = outs[0].metrics, len(outs[0].outputs[0].token_ids)
            rates[arm].append((n - 1) / max(1e-9, m.finished_time - m.first_token_time))
            if arm == "guided":
                host = timer.take()
    free, guided = statistics.median(rates["free"]), statistics.median(rates["guided"])
    ctx = cfg["prompt_len"] + cfg["output_len"] // 2
    step_bytes = weight_bytes(llm) + ctx * kv_bytes_per_token(llm)
    return {"free_tok_s": round(free, 1), "guided_tok_s": round(guided, 1), "ratio": round(guided / free, 4),
            "target": TARGETS["batch1"], "pass": guided / free >= TARGETS["batch1"],
            "roofline_tok_s": round(gbps * 1e9 / step_bytes, 1), "rounds": rates, **host}


def throughput_part(llm, cfg, gbps, timer) -> dict:
    vocab = llm.engine.model_config.vocab_size
    n = cfg["concurrency"]
    res = {"free": [], "guided": []}
    tokens = {"free": [], "guided": []}
    host, check = {}, {}
    for r in range(cfg["rounds"]):
        for arm in ("free", "guided"):
            ps = prompts(n, cfg["prompt_len"], vocab, seed=200 + 2 * r + (arm == "guided"))
            outs, t = run_batch(llm, ps, guided_params(cfg, guided=arm == "guided"))
            out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            res[arm].append(out_tokens / t)
            tokens[arm].append(out_tokens)
            if arm == "guided":
                host = timer.take()
                check = check_outputs(llm, outs)
    free, guided = statistics.median(res["free"]), statistics.median(res["guided"])
    ctx = cfg["prompt_len"] + cfg["output_len"] // 2
    step_bytes = weight_bytes(llm) + n * ctx * kv_bytes_per_token(llm)
    prefill_tokens = n * cfg["prompt_len"]
    return {"requests": n, "free_out_tok_s": round(free, 1), "guided_out_tok_s": round(guided, 1),
            "ratio": round(guided / free, 4), "target": TARGETS["throughput"], "pass": guided / free >= TARGETS["throughput"],
            "out_tokens": tokens, "prefill_tokens_per_run": prefill_tokens,
            "decode_roofline_out_tok_s": round(n * gbps * 1e9 / step_bytes, 1), "rounds": res, "check": check, **host}


def mixed_part(llm, cfg, timer) -> dict:
    vocab = llm.engine.model_config.vocab_size
    n = cfg["mixed"]
    tpot = {"all_free": [], "mixed": []}
    # Arms alternate, five rounds each on the GPU: two all-free rounds once differed by 18%.
    for r in range(cfg["mixed_rounds"]):
        for arm in ("all_free", "mixed"):
            ps = prompts(n, cfg["prompt_len"], vocab, seed=300 + 2 * r + (arm == "mixed"))
            params = [guided_params(cfg, guided=arm == "mixed" and i % 2 == 1) for i in range(n)]
            outs, _ = run_batch(llm, ps, params)
            per = []
            for i, o in enumerate(outs):
                if i % 2 == 0:  # the free half, in both arms
                    m, k = o.metrics, len(o.outputs[0].token_ids)
                    per.append((m.finished_time - m.first_token_time) / max(1, k - 1))
            tpot[arm].append(statistics.fmean(per))
    host = timer.take()
    free, mixed = statistics.median(tpot["all_free"]), statistics.median(tpot["mixed"])
    return {"requests": n, "constrained": n // 2, "free_tpot_ms_all_free": round(1e3 * free, 3),
            "free_tpot_ms_mixed": round(1e3 * mixed, 3), "ratio": round(mixed / free, 4),
            "target": TARGETS["mixed_tpot"], "pass": mixed / free <= TARGETS["mixed_tpot"], "rounds": tpot, **host}


def compile_part(llm, cfg) -> dict:
    from fleetlm import GuidedDecodingParams, SamplingParams

    vocab = llm.engine.model_config.vocab_size
    # A schema no one compiled yet (a distinct title): the cold TTFT includes its compile.
    cold = dict(SCHEMA, title=f"Order-{time.time_ns()}")
    p = [prompts(1, cfg["prompt_len"], vocab, seed=7 + i) for i in range(3)]  # no prefix-cache hits
    one = lambda g: SamplingParams(temperature=0.0, max_tokens=1, guided_decoding=g)  # noqa: E731
    _, free_t = run_batch(llm, p[0], one(None))
    _, cold_t = run_batch(llm, p[1], one(GuidedDecodingParams(json=cold)))
    _, warm_t = run_batch(llm, p[2], one(GuidedDecodingParams(json=cold)))
    rep = llm.engine.warmup_report
    return {"ttft_free_s": round(free_t, 4), "ttft_guided_cold_s": round(cold_t, 4),
            "ttft_guided_cached_s": round(warm_t, 4), "compile_extra_s": round(cold_t - warm_t, 4),
            "warmup_guided_phase_s": rep.phases.get("guided") if rep else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    ap.add_argument("--budget", type=float, default=450.0)
    ap.add_argument("--smoke", action="store_true", help="tiny model on whatever device (the CPU self-test)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default all)")
    args = ap.parse_args()
    from fleetlm.benchmarks.records import git_commit

    selected = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(selected) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    budget = Budget(args.budget)
    cfg = SMOKE if args.smoke else FULL
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {
        "benchmark": "gpu_structured", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(REPO),
        "card": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "config": cfg, "parts": {},
        "selected": selected,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
    try:
        import xgrammar

        record["versions"]["xgrammar"] = getattr(xgrammar, "__version__", "?")
    except ImportError as e:
        record["versions"]["xgrammar"] = f"missing: {e}"
    gbps = part(record, "ceilings", budget, 5)(lambda: {"copy_gbps": round(copy_gbps(device), 1)})
    gbps = (gbps or {}).get("copy_gbps", 3000.0)
    part(record, "kernel", budget, 10)(kernel_part, device, 128256 if not args.smoke else 515,
                                       cfg["concurrency"], gbps)
    llm, timer = None, None
    try:
        if not set(selected) & {"compile", "batch1", "throughput", "mixed"}:
            raise LookupError("no selected part needs the engine")
        from fleetlm import LLM

        t = time.monotonic()
        llm = LLM(model=cfg["model"], load_format="dummy", dtype=cfg["dtype"], max_model_len=cfg["max_model_len"],
                  max_num_seqs=cfg["max_num_seqs"], device=device)
        eng = llm.engine
        record["engine"] = {"build_s": round(time.monotonic() - t, 1), "async_scheduling": eng.async_scheduling,
                            "cuda_graphs": eng.workers.worker.runner.graphs is not None,
                            "startup_seconds": {k: round(v, 2) for k, v in eng.startup_seconds.items()}}
        timer = BitmaskTimer(eng)
    except Exception as e:  # noqa: BLE001
        record["engine"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    if llm is not None:
        part(record, "compile", budget, 20)(compile_part, llm, cfg)
        part(record, "batch1", budget, 30)(batch1_part, llm, cfg, gbps, timer)
        part(record, "throughput", budget, 90)(throughput_part, llm, cfg, gbps, timer)
        part(record, "mixed", budget, 60)(mixed_part, llm, cfg, timer)
        record["idle_invariants_ok"] = llm.engine.idle_invariants()["ok"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out / f"structured-{'smoke' if args.smoke else 'gpu'}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    print_table(record, path)


def print_table(record: dict, path: Path) -> None:
    p = record["parts"]
    print(f"\ncard {record['card']}  commit {record['commit']}  engine {record.get('engine', {})}")
    rows = [
        ("copy GB/s", p.get("ceilings", {}).get("copy_gbps"), "", ""),
        ("bitmask kernel us (exact)", p.get("kernel", {}).get("us"), p.get("kernel", {}).get("roofline_us"),
         p.get("kernel", {}).get("exact")),
        ("compile extra TTFT s", p.get("compile", {}).get("compile_extra_s"), "", ""),
        ("batch1 guided/free", p.get("batch1", {}).get("ratio"), ">= 0.95", p.get("batch1", {}).get("pass")),
        ("batch1 free tok/s", p.get("batch1", {}).get("free_tok_s"), p.get("batch1", {}).get("roofline_tok_s"), ""),
        ("throughput guided/free", p.get("throughput", {}).get("ratio"), ">= 0.90", p.get("throughput", {}).get("pass")),
        ("throughput free out tok/s", p.get("throughput", {}).get("free_out_tok_s"),
         p.get("throughput", {}).get("decode_roofline_out_tok_s"), ""),
        ("matcher-rejected outputs", p.get("throughput", {}).get("check", {}).get("rejected_by_matcher"), "0", ""),
        ("mixed free TPOT ratio", p.get("mixed", {}).get("ratio"), "<= 1.03", p.get("mixed", {}).get("pass")),
    ]
    for name, val in p.items():
        if "error" in val or "skipped" in val:
            print(f"  {name}: {val.get('error') or val.get('skipped')}")
    print(f"{'figure':30s} {'value':>12s} {'roofline/target':>16s} {'ok':>6s}")
    for name, v, roof, ok in rows:
        print(f"{name:30s} {str(v):>12s} {str(roof):>16s} {str(ok):>6s}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
