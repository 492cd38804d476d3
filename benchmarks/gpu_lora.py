"""Multi-LoRA on one GPU (issue 16): every check and figure in one bounded process, a table printed last.

    python benchmarks/gpu_lora.py --out $OUT                  # Llama-3.1-8B shape, dummy bf16 weights
    python benchmarks/gpu_lora.py --cpu-smoke --out /tmp/x    # the same code on CPU, tiny model (self-test)
    python benchmarks/gpu_lora.py --parts kernels,parity_ref,base   # then --parts lora: two device calls

Adapters: rank 16 on all seven projections (q, k, v, o, gate, up, down),
written in PEFT's on-disk format (``adapter_config.json`` +
``adapter_model.safetensors``, PEFT's tensor names; the CPU tests check the
reader against files ``peft`` itself saved), bf16, A ~ N(0, 1/in), B ~ N(0,
0.02). Eight adapter directories; the 100-adapter run gives 100 distinct
adapter ids (each its own host-cache entry, slot load and prefix-cache key)
over those eight directories.

Parts, in order (each bounded by time; a failure is recorded and the rest runs):

============ =================================================================
ceilings     device copy GB/s and bf16 matmul TFLOP/s: the rooflines
kernels      LoRA shrink + expand at the model's projection shapes, 8 slots:
             ms, bytes, roofline ms at the copy rate; Triton vs the torch reference
parity_ref   transformers on the same weights with PEFT's LoRA math hooked onto
             its projections (base(x) + lora_B(lora_A(x)) * scaling): greedy
             tokens of 4 prompts x (base + 3 adapters); freed before the engines
base         engine without LoRA: 256 x 512 in / 128 out submitted at once
             (out tok/s, TTFT p50); batch-1 decode tok/s (MBU)
parity       the LoRA engine (max_loras 8): those 16 requests in one batch,
             against the reference (bf16: a divergence passes only where the
             reference's top-2 logits are within hf_baseline.PARITY_GAP_TOL)
lora8        the same load spread evenly over 8 adapters
lora100      100 adapters in host memory (max_cpu_loras 100), 8 device slots
decode1      batch-1 decode with one adapter; and a base request on the LoRA engine
============ =================================================================

Targets (issue 16): lora8 throughput >= 0.85x base, TTFT p50 <= 1.3x base;
lora100 within 10% of lora8; decode1 with an adapter >= 0.90x base.

A bound worth knowing when reading lora100: with 8 slots, a step holds at
most 8 adapters, so 100 adapters' requests of 128 output tokens need at least
ceil(100 / 8) * 128 = 1664 forward passes if every request is admitted at
once (base: 128 + the prefill steps); the record carries that lower bound in
seconds next to the measured time.

Writes ``lora-<card>-<date>.json`` into ``--out`` (default ``$OUT``) after
every part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


# -- adapters ----------------------------------------------------------------------------


def module_shapes(hf: dict) -> dict[str, tuple[int, int]]:
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    d = hf.get("head_dim") or h // heads
    q, kv, inter = heads * d, hf.get("num_key_value_heads", heads) * d, hf["intermediate_size"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}


def write_peft_adapter(path: Path, hf: dict, r: int = 16, alpha: float = 32, seed: int = 0, sigma: float = 0.02,
                       targets=TARGETS, dtype=torch.bfloat16) -> str:
    """A LoRA adapter in PEFT's format for a Llama-shaped model of config ``hf``; returns its directory."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(hf)
    tensors = {}
    for i in range(hf["num_hidden_layers"]):
        for t in targets:
            d_in, d_out = shapes[t]
            key = f"base_model.model.model.layers.{i}.{'self_attn' if t in ATTN else 'mlp'}.{t}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, d_in, generator=gen) / d_in ** 0.5).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, r, generator=gen) * sigma).to(dtype)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": targets,
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return str(path)


class LoRAHooks:
    """PEFT's LoRA forward on a transformers Llama: ``out + lora_B(lora_A(x)) * scaling`` per projection."""

    def __init__(self, model, device) -> None:
        self.adapters: dict[str, tuple[float, dict]] = {}
        self.active: str | None = None
        for i, layer in enumerate(model.model.layers):
            for t in TARGETS:
                block = layer.self_attn if t in ATTN else layer.mlp
                getattr(block, t).register_forward_hook(self._hook(i, t))
        self.device = device

    def add(self, name: str, path: str) -> None:
        from safetensors.torch import load_file

        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        raw = load_file(str(Path(path) / "adapter_model.safetensors"), device=str(self.device))
        weights = {}
        for key, t in raw.items():
            parts = key.split(".")
            layer, module, ab = int(parts[4]), parts[6], parts[7][-1]
            weights.setdefault((layer, module), [None, None])[ab == "B"] = t
        self.adapters[name] = (cfg["lora_alpha"] / cfg["r"], weights)

    def _hook(self, layer: int, module: str):
        def hook(mod, inputs, out):
            if self.active is None:
                return out
            scaling, weights = self.adapters[self.active]
            a, b = weights[(layer, module)]
            return out + torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], a), b) * scaling
        return hook


# -- helpers -----------------------------------------------------------------------------


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def card() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def measure_ceilings(device: str) -> dict:
    if device != "cuda":
        return {"copy_GBps": None, "matmul_TFLOPs": None}
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    copy = 2 * 10 * x.numel() / (time.perf_counter() - t) / 1e9
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ a
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    tflops = 10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12
    del x, y, a
    torch.cuda.empty_cache()
    return {"copy_GBps": copy, "matmul_TFLOPs": tflops}


def run_load(engine, jobs, output_len: int, deadline: float, tag: str) -> dict:
    """Submit every (prompt, lora) at once; step until all finish (or the deadline: then abort, complete=False)."""
    from fleetlm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    ids = []
    for i, (prompt, lora) in enumerate(jobs):
        rid = f"{tag}-{i}"
        engine.add_request(rid, prompt, params, lora_request=lora)
        ids.append(rid)
    done = {}
    complete = True
    while engine.has_unfinished_requests():
        if time.perf_counter() > deadline:
            complete = False
            for rid in ids:
                engine.abort_request(rid)
            break
        for out in engine.step(emit_unfinished=False):
            if out.finished:
                done[out.request_id] = out
    sync()
    wall = time.perf_counter() - t0
    outs = [done[r] for r in ids if r in done]
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs
            if o.metrics and o.metrics.first_token_time is not None]
    return {"complete": complete, "requests": len(outs), "wall_s": wall, "output_tokens": out_tokens,
            "output_tok_per_s": out_tokens / wall, "requests_per_s": len(outs) / wall,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p90_s": pct(ttft, 0.9),
            "tokens": {r: list(done[r].outputs[0].token_ids) for r in ids if r in done}}


def decode_rate(engine, prompt, lora, output_len: int, deadline: float, tag: str) -> dict:
    """Batch-1 decode: (tokens - 1) / (finish - first token), median of 3 runs."""
    rates = []
    for k in range(3):
        if time.perf_counter() > deadline:
            break
        res = run_load(engine, [(prompt, lora)], output_len, deadline, f"{tag}{k}")
        if not res["complete"]:
            break
        decode_s = res["wall_s"] - res["ttft_p50_s"]
        rates.append((res["output_tokens"] - 1) / decode_s)
    return {"tok_per_s": statistics.median(rates) if rates else None, "runs": len(rates)}


# -- the parts ---------------------------------------------------------------------------


def part_kernels(hf: dict, device: str, dtype, ceilings: dict, deadline: float) -> dict:
    from fleetlm.kernels import select_ops
    from fleetlm.kernels.bench import time_ms
    from fleetlm.kernels.lora import LoRABatch, build_tile_table, lora_expand_ref, lora_shrink_ref

    ops = select_ops(device)
    shapes = module_shapes(hf)
    layers = {"qkv": (shapes["q_proj"][0], (shapes["q_proj"][1], shapes["k_proj"][1], shapes["v_proj"][1])),
              "o": (shapes["o_proj"][0], (shapes["o_proj"][1],)),
              "gate_up": (shapes["gate_proj"][0], (shapes["gate_proj"][1], shapes["up_proj"][1])),
              "down": (shapes["down_proj"][0], (shapes["down_proj"][1],))}
    slots, rank, elem = 8, 16, torch.tensor([], dtype=dtype).element_size()
    out = {}
    for rows in (1, 16, 256, 8192):
        for name, (k, slices) in layers.items():
            if time.perf_counter() > deadline:
                return {**out, "complete": False}
            n = sum(slices)
            a = torch.randn(slots, len(slices) * rank, k, device=device).div_(k ** 0.5).to(dtype)
            b = (torch.randn(slots, n, rank, device=device) * 0.02).to(dtype)
            x = torch.randn(rows, k, device=device).to(dtype)
            y = torch.randn(rows, n, device=device).to(dtype)
            token_slot = (torch.arange(rows) * slots // rows).numpy().astype("int32")  # rows spread over 8 slots
            order, ts, tst, te = build_tile_table(token_slot, rows, slots)
            i32 = lambda v: torch.from_numpy(v).to(device)  # noqa: E731
            batch = LoRABatch(i32(order), i32(ts), i32(tst), i32(te), torch.full((slots,), 2.0, device=device))
            fn = lambda: ops.lora_expand(y, ops.lora_shrink(x, a, batch), b, batch, slices)  # noqa: E731
            ms = time_ms(fn, iters=20) if device == "cuda" else None
            used = min(rows, slots)
            moved = used * (a[0].numel() + b[0].numel()) * elem + x.numel() * elem + 2 * y.numel() * elem
            entry = {"ms": ms, "bytes": moved,
                     "roofline_ms": moved / (ceilings["copy_GBps"] * 1e9) * 1e3 if ceilings.get("copy_GBps") else None}
            if rows == 256:
                got = ops.lora_expand(y.clone(), ops.lora_shrink(x, a, batch), b, batch, slices).float()
                want = lora_expand_ref(y.clone(), lora_shrink_ref(x, a, batch), b, batch, slices).float()
                entry["max_abs_err_vs_torch"] = (got - want).abs().max().item()
                entry["close_to_torch"] = bool(torch.allclose(got, want, atol=6e-2, rtol=3e-2))
            out[f"{name}@{rows}"] = entry
    return {**out, "complete": True}


def part_parity_ref(ns, hf: dict, adapter_dirs: list[str], prompts, deadline: float) -> dict:
    import hf_baseline

    model = hf_baseline.build_hf_model(ns.model, device=ns.device, dtype=ns.torch_dtype, load_format="dummy")
    hooks = LoRAHooks(model, ns.device)
    refs = {}
    try:
        for name in [None] + [f"parity-{j}" for j in range(3)]:
            if name is not None:
                hooks.add(name, adapter_dirs[int(name[-1])])
            hooks.active = name
            if time.perf_counter() > deadline:
                break
            with torch.inference_mode():
                refs[name or "base"] = hf_baseline.greedy_reference(model, prompts, ns.parity_tokens)
    finally:
        del model, hooks
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return refs


def compare_parity(engine, refs: dict, loras: dict, prompts, max_tokens: int, deadline: float) -> dict:
    import hf_baseline

    from fleetlm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    names = list(refs)
    ids = []
    for name in names:
        for i, p in enumerate(prompts):
            rid = f"parity-{name}-{i}"
            engine.add_request(rid, p, params, lora_request=loras.get(name))
            ids.append((name, rid))
    done = {}
    while engine.has_unfinished_requests() and time.perf_counter() < deadline:
        for out in engine.step(emit_unfinished=False):
            done[out.request_id] = out
    result = {"per_adapter": {}}
    ok = True
    for name in names:
        got = [done[rid].outputs[0] if rid in done else None for n, rid in ids if n == name]
        cmp = hf_baseline.compare_greedy(refs[name], [list(g.token_ids) if g else [] for g in got],
                                         [g.logprobs if g else None for g in got])
        within = all(e["diverged_at"] is None or (e.get("ref_gap_to_engine_token") is not None and
                                                  e["ref_gap_to_engine_token"] <= hf_baseline.PARITY_GAP_TOL)
                     for e in cmp["per_prompt"])
        ok &= within
        result["per_adapter"][name] = {k: v for k, v in cmp.items() if k != "per_prompt"} | {"within_tolerance": within}
    base = refs["base"]
    result["adapters_change_tokens"] = all(any(r["tokens"] != b["tokens"] for r, b in zip(refs[n], base))
                                           for n in names if n != "base")
    result["within_tolerance"] = ok
    return result


# -- main ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON record (default: $OUT)")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--budget", type=float, default=460.0, help="seconds for the whole run")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, tiny loads (tests the script)")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD, else 'unknown')")
    p.add_argument("--parts", default="ceilings,kernels,parity_ref,base,lora",
                   help="comma-separated parts to run (ceilings always run: the rooflines need them)")
    ns = p.parse_args(argv)
    if not ns.out:
        p.error("--out (or $OUT) is required")
    start = time.perf_counter()
    end = start + ns.budget
    ns.device = "cpu" if ns.cpu_smoke else "cuda"
    if ns.cpu_smoke:
        ns.model, dtype, ns.num_prompts, ns.input_len, ns.output_len = "tiny-llama-8h4kv", "float32", 16, 24, 6
        ns.parity_tokens, ns.num_adapters_many, decode_len = 6, 12, 8
    else:
        dtype, ns.num_prompts, ns.input_len, ns.output_len = "bfloat16", 256, 512, 128
        ns.parity_tokens, ns.num_adapters_many, decode_len = 32, 100, 256
    ns.torch_dtype = getattr(torch, dtype)
    from fleetlm.workers.loader import resolve_model

    hf = resolve_model(ns.model, "dummy").hf_config
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc)
    record = {"benchmark": "lora", "date": stamp.isoformat(timespec="seconds"), "commit": ns.commit or git_commit(),
              "card": card(), "torch": torch.__version__,
              "config": {"model": ns.model, "dtype": dtype, "rank": 16, "targets": TARGETS, "max_loras": 8,
                         "num_prompts": ns.num_prompts, "input_len": ns.input_len, "output_len": ns.output_len,
                         "adapters_many": ns.num_adapters_many, "budget_s": ns.budget},
              "parts": {}}
    path = out_dir / f"lora-{'cpu-smoke' if ns.cpu_smoke else card().replace(' ', '-')}-{stamp:%Y%m%d-%H%M%S}.json"

    def save():
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")

    wanted = set(ns.parts.split(",")) | {"ceilings"}

    def part(name, fn, seconds):
        if name not in wanted:
            return None
        left = end - time.perf_counter()
        if left < 5:
            record["parts"][name] = {"skipped": f"out of time ({left:.0f} s left)"}
            save()
            return None
        t0 = time.perf_counter()
        print(f"[lora] {name} (budget {min(seconds, left):.0f} s)", flush=True)
        try:
            result = fn(time.perf_counter() + min(seconds, left))
        except Exception as e:  # noqa: BLE001 - one part's failure must not cost the others
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"[:2000]}
        if isinstance(result, dict):
            result.setdefault("part_s", time.perf_counter() - t0)
        record["parts"][name] = result
        save()
        return result

    import random

    rng = random.Random(0)
    vocab = min(hf["vocab_size"], 32000)
    prompts = [[rng.randrange(10, vocab) for _ in range(ns.input_len)] for _ in range(ns.num_prompts)]
    decode_prompt = [rng.randrange(10, vocab) for _ in range(128 if not ns.cpu_smoke else 16)]
    work = Path(tempfile.mkdtemp(prefix="fleetlm-lora-"))
    t0 = time.perf_counter()
    dirs = [write_peft_adapter(work / f"adapter{j}", hf, seed=j, dtype=ns.torch_dtype) for j in range(8)]
    record["adapter_write_s"] = time.perf_counter() - t0
    ceilings = part("ceilings", lambda d: measure_ceilings(ns.device), 30) or {}
    part("kernels", lambda d: part_kernels(hf, ns.device, ns.torch_dtype, ceilings, d), 40)
    import hf_baseline

    parity_prompts = hf_baseline.parity_prompts(hf["vocab_size"], 4, seed=0)
    holder: dict = {}

    ref_file = out_dir / "lora-parity-reference.json"  # a later call (--parts lora) reads it

    def parity_ref(deadline):
        holder["refs"] = part_parity_ref(ns, hf, dirs, parity_prompts, deadline)
        ref_file.write_text(json.dumps({"model": ns.model, "tokens": ns.parity_tokens, "refs": holder["refs"]}))
        return {"runs": sorted(holder["refs"]), "prompts": len(parity_prompts), "tokens": ns.parity_tokens}

    part("parity_ref", parity_ref, 90)
    refs = holder.get("refs")
    if refs is None and ref_file.is_file():
        saved = json.loads(ref_file.read_text())
        if saved.get("model") == ns.model and saved.get("tokens") == ns.parity_tokens:
            refs = saved["refs"]
    from fleetlm import LLM, LoRARequest

    engine_kw = dict(model=ns.model, load_format="dummy", dtype=dtype, device=ns.device,
                     max_model_len=ns.input_len + ns.output_len + 128, max_num_seqs=256 if not ns.cpu_smoke else 16)
    jobs_base = [(pr, None) for pr in prompts]

    def base_part(deadline):
        llm = LLM(**engine_kw)
        try:
            run_load(llm.engine, jobs_base[:8], 8, deadline, "warm")
            res = run_load(llm.engine, jobs_base, ns.output_len, deadline, "base")
            res.pop("tokens")
            res["decode1"] = decode_rate(llm.engine, decode_prompt, None, decode_len, deadline, "b1")
            return res
        finally:
            llm.engine.shutdown()
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    base = part("base", base_part, 150) or {}

    def lora_parts(deadline):
        llm = LLM(enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=ns.num_adapters_many + 8,
                  **engine_kw)
        eng = llm.engine
        results = {}
        try:
            eight = [LoRARequest(f"a{j}", j + 1, dirs[j]) for j in range(8)]
            for lora in eight:
                eng.add_lora(lora)
            run_load(eng, [(pr, eight[i % 8]) for i, pr in enumerate(prompts[:16])], 8, deadline, "warm")
            if isinstance(refs, dict) and "base" in refs:
                parity_loras = {f"parity-{j}": eight[j] for j in range(3)}
                results["parity"] = compare_parity(eng, refs, parity_loras, parity_prompts, ns.parity_tokens, deadline)
            r8 = run_load(eng, [(pr, eight[i % 8]) for i, pr in enumerate(prompts)], ns.output_len, deadline, "l8")
            r8.pop("tokens")
            results["lora8"] = r8
            many = [LoRARequest(f"m{j}", 1000 + j, dirs[j % 8]) for j in range(ns.num_adapters_many)]
            t0 = time.perf_counter()
            for lora in many:
                eng.add_lora(lora)
            fill_s = time.perf_counter() - t0
            loads0 = eng.stats().lora_loads
            r100 = run_load(eng, [(pr, many[i % len(many)]) for i, pr in enumerate(prompts)], ns.output_len,
                            deadline, "l100")
            r100.pop("tokens")
            r100["host_cache_fill_s"] = fill_s
            r100["slot_loads"] = eng.stats().lora_loads - loads0
            results["lora100"] = r100
            results["decode1"] = {"adapter": decode_rate(eng, decode_prompt, eight[0], decode_len, deadline, "l1"),
                                  "base_on_lora_engine": decode_rate(eng, decode_prompt, None, decode_len, deadline,
                                                                     "lb")}
            return results
        finally:
            llm.engine.shutdown()
            del llm, eng
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    lora = part("lora", lora_parts, 260) or {}
    summarize(record, base, lora, ceilings, hf, ns)
    save()
    print_table(record)
    print(f"record: {path}")
    return 0


def summarize(record, base, lora, ceilings, hf, ns) -> None:
    """Ratios against the targets, and the rooflines next to the figures."""
    s = {}
    r8, r100, d1 = lora.get("lora8") or {}, lora.get("lora100") or {}, lora.get("decode1") or {}
    if base.get("output_tok_per_s") and r8.get("output_tok_per_s"):
        s["lora8_throughput_x_base"] = r8["output_tok_per_s"] / base["output_tok_per_s"]
        s["lora8_ttft_p50_x_base"] = (r8["ttft_p50_s"] / base["ttft_p50_s"]) if base.get("ttft_p50_s") else None
    if r8.get("output_tok_per_s") and r100.get("output_tok_per_s"):
        s["lora100_throughput_x_lora8"] = r100["output_tok_per_s"] / r8["output_tok_per_s"]
    b1 = (base.get("decode1") or {}).get("tok_per_s")
    a1 = (d1.get("adapter") or {}).get("tok_per_s")
    if b1 and a1:
        s["decode1_adapter_x_base"] = a1 / b1
    bw = ceilings.get("copy_GBps")
    if bw:
        n_params = sum(a * b for a, b in module_shapes(hf).values()) * hf["num_hidden_layers"]
        n_params += 2 * hf["vocab_size"] * hf["hidden_size"]
        weight_bytes = 2 * n_params
        adapter_bytes = 2 * 16 * sum(a + b for a, b in module_shapes(hf).values()) * hf["num_hidden_layers"]
        s["decode1_roofline_tok_per_s"] = bw * 1e9 / weight_bytes
        s["decode1_adapter_roofline_tok_per_s"] = bw * 1e9 / (weight_bytes + adapter_bytes)
        if b1:
            s["decode1_base_MBU"] = b1 / s["decode1_roofline_tok_per_s"]
        step_s = weight_bytes / (bw * 1e9)  # a forward reads every weight at least once
        flops = 2 * n_params * ns.num_prompts * ns.input_len
        prefill_s = flops / (ceilings["matmul_TFLOPs"] * 1e12) if ceilings.get("matmul_TFLOPs") else 0.0
        # 8 slots: every adapter's requests need output_len forward passes with it resident.
        passes = -(-ns.num_adapters_many // 8) * ns.output_len
        s["lora100_lower_bound_s"] = prefill_s + passes * step_s
        s["base_lower_bound_s"] = prefill_s + ns.output_len * step_s
    record["summary"] = s
    record["targets"] = {"lora8_throughput_x_base": ">= 0.85", "lora8_ttft_p50_x_base": "<= 1.3",
                         "lora100_throughput_x_lora8": ">= 0.90", "decode1_adapter_x_base": ">= 0.90"}


def print_table(record) -> None:
    parts, s = record["parts"], record.get("summary", {})
    base, lora = parts.get("base") or {}, parts.get("lora") or {}
    rows = [("base", base), ("lora8", lora.get("lora8") or {}), ("lora100", lora.get("lora100") or {})]
    print(f"\ncard: {record['card']}  commit {record['commit'][:10]}")
    print(f"{'run':<10}{'out tok/s':>11}{'req/s':>8}{'TTFT p50':>10}{'wall s':>8}{'complete':>10}")
    for name, r in rows:
        if r.get("output_tok_per_s"):
            print(f"{name:<10}{r['output_tok_per_s']:>11.0f}{r['requests_per_s']:>8.2f}{(r['ttft_p50_s'] or 0):>10.3f}"
                  f"{r['wall_s']:>8.1f}{str(r['complete']):>10}")
        else:
            print(f"{name:<10}  {r.get('error') or r.get('skipped') or 'no result'}")
    d1 = lora.get("decode1") or {}
    print(f"decode1 tok/s: base {((base.get('decode1') or {}).get('tok_per_s') or 0):.1f}, "
          f"adapter {((d1.get('adapter') or {}).get('tok_per_s') or 0):.1f}, "
          f"base on LoRA engine {((d1.get('base_on_lora_engine') or {}).get('tok_per_s') or 0):.1f}, "
          f"roofline {s.get('decode1_roofline_tok_per_s') or 0:.1f}")
    par = lora.get("parity") or {}
    print(f"parity: within tolerance {par.get('within_tolerance')}, adapters change tokens "
          f"{par.get('adapters_change_tokens')}")
    for key, target in record.get("targets", {}).items():
        v = s.get(key)
        print(f"  {key:<30}{('%.3f' % v) if v is not None else '-':>8}   target {target}")
    if s.get("lora100_lower_bound_s"):
        print(f"  lora100 lower bound {s['lora100_lower_bound_s']:.1f} s (8 slots), base lower bound "
              f"{s['base_lower_bound_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
