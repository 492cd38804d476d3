"""FP8 KV cache on one GPU: ``kv_cache_dtype="fp8"`` against ``"auto"``, in one bounded run (one device call).

    python benchmarks/gpu_kv_fp8.py --quick --out $OUT --commit <sha>   # Llama-3.1-8B shape, dummy bf16 weights, ~4 min
    python benchmarks/gpu_kv_fp8.py --out $OUT --commit <sha>           # the larger workloads, ~8 min
    python benchmarks/gpu_kv_fp8.py --device cpu --model tiny-llama-8h4kv --smoke   # the CPU self-test
    python benchmarks/gpu_kv_fp8.py --engine-arg quantization=fp8 ...   # any engine argument, for both engines

=========  ======================================================================================
part       what
=========  ======================================================================================
kernels    ceilings (device copy GB/s, bf16 matmul TFLOP/s); each FP8 kernel checked against its
           torch reference first (the store bit for bit, with the differing bytes if any; attention
           within bf16 tolerance), then timed: decode attention over a bf16 and an FP8 cache (GB/s
           of cache read, context tokens/s), prefill attention TFLOP/s, the KV store; tile/split
           sweeps of the FP8 decode kernel (is the default the best?) and FP8 prefill tiles
auto       the engine with kv_cache_dtype="auto": KV pool tokens; offline 512 x 512 in / 128 out;
           long context 96 x 8192 in / 128 out (--quick: 128 x 512 / 128 and 64 x 8192 / 128); each
           workload after an untimed run of a few requests of its shape, so no Triton compilation
           lands in the timed window (the first H100 run timed FP8's first compilations: its
           kernels, unlike bf16's, were not yet in the on-disk cache)
fp8        the same engine with kv_cache_dtype="fp8"
=========  ======================================================================================

Targets (issue 14): the pool holds 2x the tokens; long context >= 1.15x "auto"'s throughput.
Each figure sits beside its roofline: attention against the measured copy bandwidth; a throughput
run against a model of it (prefill at the measured matmul ceiling, then decode steps reading the
weights and every running context's K/V at the copy bandwidth, as many sequences at once as
max_num_seqs and the KV pool allow). FP8 halves the K/V bytes, so on a roofline a long-context
decode step reads about half as much and twice the sequences fit.

Every part runs in a child process killed at its time limit (its GPU memory goes back with it),
one model on the GPU at a time; a child writes each result as soon as it has it, so a part that
fails or runs out of time loses only what it had not finished. The combined JSON record (card,
date, commit, config, figures, rooflines) goes to ``--out`` (default ``$OUT``, else
``benchmarks/results``); the table is printed last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

WORKLOADS = {  # (num_prompts, input_len, output_len) per mode
    "offline_512": {"full": (512, 512, 128), "quick": (128, 512, 128), "smoke": (6, 24, 4)},
    # quick: 64 sequences of 8320 tokens exceed the bf16 pool of an 80 GB card (~51 fit) but not FP8's,
    # so the roofline ratio is 1.17 (24 x 8192 / 32, the first run's, fits both: 1.03, prefill-bound).
    "long_context": {"full": (96, 8192, 128), "quick": (64, 8192, 128), "smoke": (3, 200, 4)},
}
BUDGET_S = {  # seconds per child: full stays under 8 min, quick about 4
    "full": {"kernels": 100, "auto": 175, "fp8": 175},
    "quick": {"kernels": 70, "auto": 90, "fp8": 90},
    "smoke": {"kernels": 50, "auto": 88, "fp8": 88},
}
CHILD_GRACE_S = 15


def _mode(ns) -> str:
    return "smoke" if ns.smoke else "quick" if ns.quick else "full"


def _emit(path: Path, key: str, value: Any) -> None:
    """Append one result line (a child's progress survives its being killed)."""
    with path.open("a") as f:
        f.write(json.dumps({key: value}) + "\n")
    print(f"[kv-fp8] {key}: {json.dumps(value)[:400]}", flush=True)


def _guard(path: Path, key: str, fn) -> Any:
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - one measurement's failure must not cost the others
        traceback.print_exc()
        value = {"error": f"{type(e).__name__}: {e}"[:1500]}
    if isinstance(value, dict):
        value.setdefault("seconds", round(time.perf_counter() - t0, 2))
    _emit(path, key, value)
    return value


# --- kernels (child) ----------------------------------------------------------------------------


def _ceilings() -> dict[str, float]:
    import torch

    from fleetlm.kernels.bench import time_ms

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_ms = time_ms(lambda: b.copy_(a), iters=10)
    del a, b
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_ms = time_ms(lambda: m @ m, iters=10)
    del m
    torch.cuda.empty_cache()
    return {"copy_gbps": round(2 * n / copy_ms / 1e6, 1), "matmul_bf16_tflops": round(2 * 8192**3 / mm_ms / 1e9, 1)}


def _fp8_batch(batch):
    """The same paged batch with its cache stored as E4M3 (scale 1: the random cache is N(0, 1))."""
    import dataclasses

    import torch

    kv_heads = batch.k_cache.shape[2]
    ones = torch.ones(kv_heads, dtype=torch.float32, device=batch.q.device)
    return dataclasses.replace(batch, k_cache=batch.k_cache.to(torch.float8_e4m3fn),
                               v_cache=batch.v_cache.to(torch.float8_e4m3fn)), ones


def kernels_child(ns, out: Path) -> None:
    import torch

    t_end = time.perf_counter() + ns.child_budget - CHILD_GRACE_S  # the sweeps stop here

    from fleetlm.kernels import attention, kv_cache
    from fleetlm.kernels.bench import make_paged_batch, time_ms

    ceil = _guard(out, "ceilings", _ceilings)
    copy = ceil.get("copy_gbps")
    shape = dict(num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda")
    quick = ns.quick or ns.smoke
    decode_cases = [(64, 4096), (8, 8192), (1, 32768)] if not quick else [(16, 2048), (1, 8192)]

    tol = dict(atol=2e-2, rtol=2e-2)  # bf16 outputs (tests/gpu/test_kv_fp8_gpu.py's tolerance)

    def check(got, ref) -> dict:
        """Correctness before any timing: the kernel's output against the reference's."""
        err = (got.float() - ref.float()).abs().max().item()
        return {"fp8_vs_ref_max_abs_err": err, "fp8_matches_ref": bool(torch.allclose(got.float(), ref.float(), **tol))}

    def decode(reqs: int, ctx: int) -> dict:
        batch = make_paged_batch([1] * reqs, [ctx] * reqs, **shape)
        fp8, ones = _fp8_batch(batch)
        run_bf16 = lambda: attention.paged_attention(*batch.args())  # noqa: E731
        run_fp8 = lambda: attention.paged_attention(*fp8.args(), k_scale=ones, v_scale=ones)  # noqa: E731
        res = check(run_fp8(), attention.paged_attention_ref(*fp8.args(), k_scale=ones, v_scale=ones))
        cfg = attention.default_decode_config(fp8.q, reqs, 8, ctx, fp8.k_cache.dtype)
        res["fp8_config"] = f"n{cfg.block_n}_s{cfg.num_stages}_splits{cfg.num_splits}"
        res["bf16_splits"] = attention.default_decode_config(batch.q, reqs, 8, ctx).num_splits
        ms_bf16, ms_fp8 = time_ms(run_bf16), time_ms(run_fp8)
        tokens = reqs * ctx
        res.update({
            "bf16_ms": round(ms_bf16, 4), "fp8_ms": round(ms_fp8, 4),
            "bf16_gbps": round(batch.kv_bytes() / ms_bf16 / 1e6, 1), "fp8_gbps": round(fp8.kv_bytes() / ms_fp8 / 1e6, 1),
            "bf16_ctx_tokens_per_s": round(tokens / ms_bf16 * 1e3), "fp8_ctx_tokens_per_s": round(tokens / ms_fp8 * 1e3),
            "speedup": round(ms_bf16 / ms_fp8, 3), "roofline_copy_gbps": copy, "roofline_speedup": 2.0,
        })
        if copy:
            res["fp8_pct_of_copy"] = round(100 * res["fp8_gbps"] / copy, 1)
            res["bf16_pct_of_copy"] = round(100 * res["bf16_gbps"] / copy, 1)
        del batch, fp8
        torch.cuda.empty_cache()
        return res

    for reqs, ctx in decode_cases:
        _guard(out, f"decode_attn_{reqs}x{ctx}", lambda r=reqs, c=ctx: decode(r, c))

    def prefill() -> dict:
        n = 2048 if not quick else 512
        batch = make_paged_batch([n] * 4, [n] * 4, **shape)
        fp8, ones = _fp8_batch(batch)
        flops = 4 * 32 * 128 * batch.num_pairs()
        ref = attention.paged_attention_ref(*fp8.args(), k_scale=ones, v_scale=ones)
        res = check(attention.paged_attention(*fp8.args(), k_scale=ones, v_scale=ones), ref)
        ms_bf16 = time_ms(lambda: attention.paged_attention(*batch.args()))
        ms_fp8 = time_ms(lambda: attention.paged_attention(*fp8.args(), k_scale=ones, v_scale=ones))
        res.update({"shape": f"4 x {n} causal", "bf16_tflops": round(flops / ms_bf16 / 1e9, 1),
                    "fp8_tflops": round(flops / ms_fp8 / 1e9, 1), "speedup": round(ms_bf16 / ms_fp8, 3),
                    "roofline_matmul_bf16_tflops": ceil.get("matmul_bf16_tflops")})
        # FP8 prefill tiles (the default is bf16's 128 x 32, 3 stages): TFLOP/s each, checked first.
        default = attention.default_prefill_config(fp8.q, 8)
        tiles: dict[str, Any] = {}
        for block_n in (32, 64):
            for stages in (2, 3):
                c = attention.PrefillConfig(block_m=default.block_m, block_n=block_n, num_warps=4, num_stages=stages)
                if time.perf_counter() > t_end - 30:  # leave the store and the decode sweep their time
                    tiles[f"m{c.block_m}_n{block_n}_s{stages}"] = "out of time"
                    continue
                run = lambda c=c: attention.paged_attention_prefill(  # noqa: E731
                    *fp8.args()[:7], c, k_scale=ones, v_scale=ones)
                try:
                    if not check(run(), ref)["fp8_matches_ref"]:
                        tiles[f"m{c.block_m}_n{block_n}_s{stages}"] = "wrong"
                        continue
                    tiles[f"m{c.block_m}_n{block_n}_s{stages}"] = round(flops / time_ms(run, iters=10) / 1e9, 1)
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                    tiles[f"m{c.block_m}_n{block_n}_s{stages}"] = type(e).__name__
        res["fp8_tiles_tflops"] = tiles
        return res

    _guard(out, "prefill_attn", prefill)

    def store() -> dict:
        tokens, kh, d = 8192, 8, 128
        gen = torch.Generator(device="cuda").manual_seed(0)
        # N(0, 1) spread over 2^-14 .. 2^9: E4M3 subnormals, ties and saturation all occur.
        spread = torch.exp2(torch.randint(-14, 10, (tokens, kh, d), generator=gen, device="cuda").float())
        k = (torch.randn(tokens, kh, d, generator=gen, device="cuda") * spread).to(torch.bfloat16)
        v = (torch.randn(tokens, kh, d, generator=gen, device="cuda") * spread.flip(0)).to(torch.bfloat16)
        slots = torch.randperm((tokens // 16 + 1) * 16, generator=gen, device="cuda")[:tokens]
        res: dict[str, Any] = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
            kc = torch.zeros(tokens // 16 + 1, 16, kh, d, dtype=torch.uint8, device="cuda")
            kc = kc.view(dtype) if dtype == torch.float8_e4m3fn else kc.to(dtype)
            vc = kc.clone()
            scales = {"k_scale": torch.ones(kh, device="cuda"), "v_scale": torch.ones(kh, device="cuda")} \
                if dtype != torch.bfloat16 else {}
            if scales:  # bits first: the kernel, the torch reference and torch's own cast
                kv_cache.store_kv_cache(k, v, kc, vc, slots, **scales)
                kr, vr = (torch.zeros(kc.shape, dtype=torch.uint8, device="cuda").view(dtype) for _ in range(2))
                kv_cache.store_kv_cache_ref(k, v, kr, vr, slots, **scales)
                got = torch.cat([kc.view(torch.uint8).flatten(), vc.view(torch.uint8).flatten()])
                want = torch.cat([kr.view(torch.uint8).flatten(), vr.view(torch.uint8).flatten()])
                bad = (got != want).nonzero().flatten()
                res["fp8_bits_equal_ref"] = bad.numel() == 0
                res["fp8_bytes_differing"] = bad.numel()
                res["fp8_first_differences"] = [[int(got[i]), int(want[i])] for i in bad[:8].tolist()]
                flat = torch.cat([k.flatten(), v.flatten()]).float().clamp(-448.0, 448.0)
                cast = flat.to(dtype).view(torch.uint8)
                enc = kv_cache.encode_e4m3(flat)
                res["torch_cuda_cast_equals_encoding"] = bool(torch.equal(cast, enc))
            ms = time_ms(lambda: kv_cache.store_kv_cache(k, v, kc, vc, slots, **scales))
            moved = 2 * tokens * kh * d * (2 + kc.element_size())
            res[f"{name}_gbps"] = round(moved / ms / 1e6, 1)
        res["roofline_copy_gbps"] = copy
        return res

    _guard(out, "store_kv", store)

    def sweep() -> dict:
        """FP8 decode: block_n x stages x splits around the default, each checked against the reference."""
        cases = {"64x4096": (64, 4096), "8x8192": (8, 8192), "1x32768": (1, 32768)} if not quick \
            else {"16x2048": (16, 2048), "1x8192": (1, 8192)}
        res: dict[str, Any] = {}
        for label, (reqs, ctx) in cases.items():
            batch = make_paged_batch([1] * reqs, [ctx] * reqs, **shape)
            fp8, ones = _fp8_batch(batch)
            ref = attention.paged_attention_ref(*fp8.args(), k_scale=ones, v_scale=ones)
            default = attention.default_decode_config(fp8.q, reqs, 8, ctx, fp8.k_cache.dtype)
            timings: dict[str, Any] = {}
            others = sorted({max(1, default.num_splits // 2), min(64, default.num_splits * 2)} - {default.num_splits})
            for splits in [default.num_splits, *others]:  # the default's first: a cut sweep still compares
                for block_n in (64, 128):
                    for stages in (2, 3):
                        key = f"n{block_n}_s{stages}_splits{splits}"
                        if time.perf_counter() > t_end:  # bounded: what is left unmeasured says so
                            timings[key] = "out of time"
                            continue
                        cfg = attention.DecodeConfig(block_n=block_n, num_splits=splits, num_warps=4, num_stages=stages)
                        run = lambda c=cfg: attention.paged_attention_decode(  # noqa: E731
                            *fp8.args()[:7], ctx, c, k_scale=ones, v_scale=ones)
                        try:
                            if not check(run(), ref)["fp8_matches_ref"]:
                                timings[key] = "wrong"
                                continue
                            timings[key] = round(fp8.kv_bytes() / time_ms(run, iters=10) / 1e6, 1)
                        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                            timings[key] = type(e).__name__
            res[label] = {"default": f"n{default.block_n}_s{default.num_stages}_splits{default.num_splits}",
                          "gbps": timings}
            del batch, fp8, ref
            torch.cuda.empty_cache()
        return res

    _guard(out, "fp8_decode_sweep", sweep)


# --- engine (child) -----------------------------------------------------------------------------


def _run_offline(llm, num: int, input_len: int, output_len: int, time_limit: float, seed: int) -> dict:
    """Random prompts of exactly input_len tokens, ignore_eos: exactly output_len tokens each (unless cut)."""
    import random

    from fleetlm import SamplingParams

    engine = llm.engine
    rng = random.Random(seed)
    vocab = int(engine.config.model.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    prompts = [[rng.randrange(10, vocab) for _ in range(input_len)] for _ in range(num)]
    pre0 = engine.stats().num_preemptions
    ids = [f"b{seed}-{i}" for i in range(num)]
    t0 = time.perf_counter()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    done, out_tokens, peak_running = 0, 0, 0
    finished: set[str] = set()
    deadline = t0 + time_limit
    while engine.has_unfinished_requests():
        if time.perf_counter() > deadline:  # count what the unfinished ones produced, then stop them
            for rid in ids:
                if rid not in finished and (aborted := engine.abort_request(rid)) is not None:
                    out_tokens += len(aborted.outputs[0].token_ids)
            break
        for out in engine.step(emit_unfinished=False):
            if out.finished:
                done += 1
                finished.add(out.request_id)
                out_tokens += len(out.outputs[0].token_ids)
        peak_running = max(peak_running, len(engine.scheduler.running))
    wall = time.perf_counter() - t0
    while engine.has_unfinished_requests():  # drain what the aborts left in flight
        engine.step(emit_unfinished=False)
    # A cut run's rates count every token produced (finished or not) over the time it ran.
    return {
        "complete": done == num, "finished_requests": done, "wall_s": round(wall, 3),
        "output_tokens_per_s": round(out_tokens / wall, 1),
        "total_tokens_per_s": round((done * input_len + out_tokens) / wall, 1),  # prompts of finished ones
        "requests_per_s": round(done / wall, 3), "peak_running": peak_running,
        "preemptions": engine.stats().num_preemptions - pre0,
    }


def roofline_seconds(hf: dict, num: int, input_len: int, output_len: int, pool_tokens: int, max_num_seqs: int,
                     kv_elem_bytes: float, ceilings: dict, weight_bytes_per_param: float = 2.0) -> float | None:
    """Ideal seconds: prefill at the matmul ceiling, then waves of decode steps at the copy bandwidth.

    A wave holds as many sequences as max_num_seqs and the pool allow (each needs input + output
    tokens of KV); a decode step reads every weight once plus the wave's K/V.
    """
    peak, bw = ceilings.get("matmul_bf16_tflops"), ceilings.get("copy_gbps")
    if not peak or not bw:
        return None
    h, inter, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    heads, kv_heads, vocab = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"], hf["vocab_size"]
    d = hf.get("head_dim") or h // heads
    linear = layers * (h * (heads + 2 * kv_heads) * d + heads * d * h + 3 * h * inter)
    params = linear + 2 * vocab * h
    prefill_flops = num * (2 * linear * input_len + 4 * layers * heads * d * input_len * (input_len + 1) / 2)
    kv_per_token = 2 * layers * kv_heads * d * kv_elem_bytes
    batch = max(1, min(max_num_seqs, num, pool_tokens // (input_len + output_len)))
    decode_s = 0.0
    left = num
    while left > 0:
        b = min(batch, left)
        for t in range(output_len):
            read = params * weight_bytes_per_param + b * (input_len + t) * kv_per_token
            flops = b * (2 * (linear + vocab * h) + 4 * layers * heads * d * (input_len + t))
            decode_s += max(read / (bw * 1e9), flops / (peak * 1e12))
        left -= b
    return prefill_flops / (peak * 1e12) + decode_s


def engine_child(ns, out: Path, kv_cache_dtype: str) -> None:
    from fleetlm import LLM

    ceilings = json.loads(ns.ceilings) if ns.ceilings else {}
    t_end = time.perf_counter() + ns.child_budget - CHILD_GRACE_S
    kw = dict(model=ns.model, load_format="dummy", device=ns.device, kv_cache_dtype=kv_cache_dtype)
    if ns.device == "cpu":
        kw.update(dtype="float32", max_model_len=512, cpu_kv_cache_bytes=4 << 20)
    kw.update(_engine_args(ns.engine_arg))
    t0 = time.perf_counter()
    llm = LLM(**kw)
    cfg = llm.engine.config
    pool_tokens = llm.engine.workers.num_blocks * cfg.cache.block_size
    _emit(out, f"{kv_cache_dtype}_engine", {
        "build_s": round(time.perf_counter() - t0, 1), "num_blocks": llm.engine.workers.num_blocks,
        "pool_tokens": pool_tokens, "cache_dtype": cfg.cache.cache_dtype, "max_num_seqs": cfg.scheduler.max_num_seqs,
        "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens, "max_model_len": cfg.model.max_model_len,
        "cuda_graphs": cfg.use_cuda_graphs, "async_scheduling": cfg.async_scheduling, "engine_kwargs": kw,
    })
    kv_elem = 1.0 if cfg.cache.cache_dtype == "fp8_e4m3" else 2.0
    for name, seed in (("offline_512", 1), ("long_context", 2)):
        num, n_in, n_out = WORKLOADS[name][_mode(ns)]
        left = t_end - time.perf_counter()
        if left < 10:
            _emit(out, f"{kv_cache_dtype}_{name}", {"skipped": f"out of time ({left:.0f} s left)"})
            continue
        budget = left if name == "long_context" else min(left, 0.35 * (ns.child_budget - CHILD_GRACE_S))

        def run(num=num, n_in=n_in, n_out=n_out, seed=seed, budget=budget):
            # Untimed first: a few requests of the workload's shape compile every kernel variant it takes
            # (the engine's own warm-up covers serving's shapes, not necessarily this batch composition).
            t_warm = time.perf_counter()
            _run_offline(llm, min(num, 16 if n_in <= 1024 else 3), n_in, 2, min(30.0, budget / 3), seed + 100)
            warm_s = time.perf_counter() - t_warm
            res = _run_offline(llm, num, n_in, n_out, budget - warm_s, seed)
            res["untimed_warmup_s"] = round(warm_s, 2)
            res["workload"] = f"{num} x {n_in} in / {n_out} out"
            ideal = roofline_seconds(cfg.model.hf_config, num, n_in, n_out, pool_tokens, cfg.scheduler.max_num_seqs,
                                     kv_elem, ceilings)
            if ideal is not None:
                res["roofline_s"] = round(ideal, 3)
                res["pct_of_roofline"] = round(100 * ideal / res["wall_s"], 1) if res["complete"] else None
            return res

        _guard(out, f"{kv_cache_dtype}_{name}", run)


def _engine_args(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values parsed as JSON when they parse: numbers, true/false) for LLM(...)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-arg takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# --- orchestration ------------------------------------------------------------------------------


def _child(ns, part: str, budget: float, out: Path, extra: list[str]) -> str:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--child-out", str(out),
           "--child-budget", str(budget), "--model", ns.model, "--device", ns.device, *extra]
    for pair in ns.engine_arg:
        cmd += ["--engine-arg", pair]
    cmd += ["--quick"] if ns.quick else []
    cmd += ["--smoke"] if ns.smoke else []
    print(f"[kv-fp8] {part}: starting, budget {budget:.0f} s", flush=True)
    try:
        r = subprocess.run(cmd, timeout=budget, cwd=REPO)
        return "ok" if r.returncode == 0 else f"exit status {r.returncode}"
    except subprocess.TimeoutExpired:
        return f"killed at its {budget:.0f} s limit"


def _read(out: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                found.update(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _cell(d: dict[str, Any], key: str) -> str:
    """A figure, or why it is missing."""
    for k in (key, "error", "skipped"):
        if d.get(k) is not None:
            return str(d[k])[:28]
    return "-"


def summarize(f: dict[str, Any]) -> tuple[dict[str, Any], list[list[str]]]:
    ae, fe = f.get("auto_engine", {}), f.get("fp8_engine", {})
    summary: dict[str, Any] = {"pool_tokens_ratio": _ratio(fe.get("pool_tokens"), ae.get("pool_tokens"))}
    rows = [["KV pool tokens", _cell(ae, "pool_tokens"), _cell(fe, "pool_tokens"), str(summary["pool_tokens_ratio"]),
             "2.0 (1 byte vs 2)", "2x"]]
    for name in ("offline_512", "long_context"):
        a, b = f.get(f"auto_{name}", {}), f.get(f"fp8_{name}", {})
        ratio = _ratio(b.get("output_tokens_per_s"), a.get("output_tokens_per_s"))
        if ratio is not None and not (a.get("complete") and b.get("complete")):
            ratio = f"{ratio} (cut)"  # a run hit its time limit: rates over what it did
        ideal = _ratio(a.get("roofline_s"), b.get("roofline_s"))
        summary[f"{name}_ratio"], summary[f"{name}_roofline_ratio"] = ratio, ideal
        roof = "-" if ideal is None else f"{ideal} (runs at {a.get('pct_of_roofline')}% / {b.get('pct_of_roofline')}%)"
        rows.append([f"{name} out tok/s, {a.get('workload', b.get('workload', '?'))}", _cell(a, "output_tokens_per_s"),
                     _cell(b, "output_tokens_per_s"), str(ratio), roof,
                     ">= 1.15x" if name == "long_context" else "report"])
    for key in sorted(k for k in f if k.startswith("decode_attn_")):
        d = f[key]
        summary[f"{key}_speedup"] = d.get("speedup")
        pct = "" if d.get("fp8_pct_of_copy") is None else f" ({d.get('bf16_pct_of_copy')}% / {d.get('fp8_pct_of_copy')}%)"
        rows.append([f"{key.removeprefix('decode_attn_')} decode attention GB/s", _cell(d, "bf16_gbps"),
                     _cell(d, "fp8_gbps"), str(d.get("speedup")),
                     f"2.0 at copy {d.get('roofline_copy_gbps')} GB/s{pct}", "report"])
    p = f.get("prefill_attn", {})
    rows.append(["prefill attention TFLOP/s, " + str(p.get("shape", "")), _cell(p, "bf16_tflops"),
                 _cell(p, "fp8_tflops"), str(p.get("speedup")), f"matmul {p.get('roofline_matmul_bf16_tflops')}",
                 "report"])
    st = f.get("store_kv", {})
    rows.append(["KV store GB/s (read + written)", _cell(st, "bf16_gbps"), _cell(st, "fp8_gbps"),
                 f"bits = ref: {st.get('fp8_bits_equal_ref')}", f"copy {st.get('roofline_copy_gbps')}", "report"])
    for label, sw in (f.get("fp8_decode_sweep") or {}).items():
        if isinstance(sw, dict) and isinstance(sw.get("gbps"), dict):
            numeric = {k: v for k, v in sw["gbps"].items() if isinstance(v, (int, float))}
            if numeric:
                best = max(numeric, key=numeric.get)
                rows.append([f"fp8 decode tiles {label}: best {best}", "", str(numeric.get(sw["default"], "-")),
                             f"best {numeric[best]}", f"default {sw['default']}", "report"])
    return summary, rows


def orchestrate(ns) -> int:
    out_dir = Path(ns.out or os.environ.get("OUT") or HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    scratch = out_dir / f"kv-fp8-{stamp}.partial.jsonl"
    deadline = time.time() + ns.budget
    notes: dict[str, str] = {}
    if ns.device == "cuda" and "kernels" in ns.parts:
        budget = min(BUDGET_S[_mode(ns)]["kernels"], deadline - time.time())
        notes["kernels"] = _child(ns, "kernels", budget, scratch, [])
    ceilings = {k: v for k, v in _read(scratch).get("ceilings", {}).items() if k != "seconds"}
    for part in ("auto", "fp8"):
        if part not in ns.parts:
            continue
        budget = min(BUDGET_S[_mode(ns)][part], deadline - time.time())
        if budget < 30:
            notes[part] = f"skipped: {budget:.0f} s left"
            continue
        notes[part] = _child(ns, part, budget, scratch, ["--ceilings", json.dumps(ceilings)])
    figures = _read(scratch)
    summary, rows = summarize(figures)
    from fleetlm.benchmarks.records import make_record

    config = {"model": ns.model, "load_format": "dummy", "device": ns.device, "mode": _mode(ns),
              "engine_args": _engine_args(ns.engine_arg), "workloads": {k: v[_mode(ns)] for k, v in WORKLOADS.items()}}
    record = make_record("kv-cache-fp8", config, figures, device=ns.device, commit=ns.commit, children=notes,
                         ceilings=ceilings, summary=summary,
                         targets={"pool_tokens_ratio": "2.0", "long_context_ratio": ">= 1.15"})
    path = out_dir / f"kv-cache-fp8-{stamp}.json"
    path.write_text(json.dumps(record, indent=2))
    scratch.unlink(missing_ok=True)
    print(f"\n[kv-fp8] wrote {path}; children: {notes}")
    print(f"\nFP8 KV cache vs auto, {record['card']}, {ns.model} (dummy weights), commit {record['commit'][:12]}")
    header = ["figure", "auto", "fp8", "fp8/auto", "roofline", "target"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=None, help="results directory (default: $OUT, else benchmarks/results)")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse HEAD, else unknown)")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for everything")
    p.add_argument("--parts", default="kernels,auto,fp8")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine argument for both engines (e.g. quantization=fp8, max_num_seqs=128)")
    p.add_argument("--quick", action="store_true", help="smaller workloads, same parts")
    p.add_argument("--smoke", action="store_true", help="tiny workloads (the CPU self-test)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-budget", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--ceilings", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    ns.parts = [p for p in str(ns.parts).split(",") if p]
    if ns.child is None:
        return orchestrate(ns)
    out = Path(ns.child_out)
    if ns.child == "kernels":
        kernels_child(ns, out)
    else:
        engine_child(ns, out, ns.child)
    return 0


if __name__ == "__main__":
    sys.exit(main())
