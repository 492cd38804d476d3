"""xgrammar vs llguidance on this machine's CPU: the measurements behind FleetLM's choice of grammar engine.

    python benchmarks/grammar_engines.py [--out DIR] [--batch 64]

For each engine and each tokenizer (the embedded SmolLM2's real 49k BPE
vocabulary, and the 128k byte-level vocabulary of the dummy Llama-3.1-8B
shape the GPU benchmarks run), with the mid-size schema
``benchmarks/schemas/order.json`` (nested objects, an array of objects,
enums, anyOf, a pattern, a format):

- install: imported version;
- tokenizer setup: seconds to build the engine's tokenizer object;
- compile: seconds from schema to a matcher ready for its first mask, cold
  (no cache), and whether a compile in a thread lets the GIL go (the engine
  loop keeps running while a grammar compiles);
- per-token mask time: microseconds to fill one request's bitmask, walking
  (a) the tokens of a valid instance (``order_example.json``) and (b) a
  random path through allowed tokens (what a random-weight model produces:
  long strings, the costly case), plus one accept per token;
- batch: one step's masks for ``--batch`` requests at once, with each
  engine's own parallel fill; and xgrammar's batch fill at 64, 256 and 1024
  requests by thread count (``fill_threads``: why the engine fills with one);
- bad input: does a malformed schema, regex and grammar raise at once.

Bounded: every walk stops after 200 tokens. The JSON record goes to
``--out`` (default ``$OUT`` when set, else ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SCHEMA = json.loads((HERE / "schemas" / "order.json").read_text())
EXAMPLE = (HERE / "schemas" / "order_example.json").read_text().strip()
MAX_WALK = 200


def tokenizers():
    from fleetlm.workers.loader import load_tokenizer, resolve_model

    out = {}
    for name, fmt in (("smollm2-135m-instruct", "auto"), ("llama-3.1-8b", "dummy")):
        src = resolve_model(name, fmt)
        out[name] = (load_tokenizer(src), int(src.hf_config["vocab_size"]), src.hf_config.get("eos_token_id"))
    return out


def gil_free_fraction(fn) -> float:
    """Share of a main-thread counting loop's speed kept while ``fn`` runs in a thread (1 = GIL released)."""
    def count(seconds):
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        return n

    t = threading.Thread(target=fn)
    t0 = time.perf_counter()
    t.start()
    n_busy, dur = 0, 0.0
    while t.is_alive():
        n_busy += count(0.002)
        dur = time.perf_counter() - t0
    t.join()
    if dur < 0.004:
        return float("nan")
    n_idle = count(dur)
    return n_busy / max(1, n_idle)


def summarize(us: list[float]) -> dict:
    us = sorted(us)
    return {"n": len(us), "mean_us": statistics.fmean(us), "p50_us": us[len(us) // 2],
            "p99_us": us[min(len(us) - 1, int(len(us) * 0.99))], "max_us": us[-1]}


def allowed_ids(words: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


# --- xgrammar ------------------------------------------------------------------
def bench_xgrammar(tok, vocab, eos, batch) -> dict:
    import xgrammar as xgr

    r = {"version": xgr.__version__ if hasattr(xgr, "__version__") else _pip_version("xgrammar")}
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=_ids(eos))
    r["tokenizer_setup_s"] = time.perf_counter() - t
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    r["compile_s"] = time.perf_counter() - t
    # One compile thread, so that a busy second core is not mistaken for a held GIL.
    one = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t = time.perf_counter()
    one.compile_json_schema(json.dumps(SCHEMA))
    r["compile_1thread_s"] = time.perf_counter() - t
    r["compile_gil_free_fraction"] = gil_free_fraction(lambda: one.compile_json_schema(json.dumps(SCHEMA)))
    t = time.perf_counter()
    xgr.Grammar.from_json_schema(json.dumps(SCHEMA))
    r["schema_to_grammar_s"] = time.perf_counter() - t
    mask = xgr.allocate_token_bitmask(1, vocab)

    def walk(choose):
        m = xgr.GrammarMatcher(compiled)
        fill, acc = [], []
        for step in range(MAX_WALK):
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask, 0)
            fill.append((time.perf_counter() - t0) * 1e6)
            token = choose(step, mask[0].numpy())
            if token is None:
                break
            t0 = time.perf_counter()
            assert m.accept_token(token), token
            acc.append((time.perf_counter() - t0) * 1e6)
            if m.is_terminated():
                break
        return fill, acc

    example = tok.encode(EXAMPLE, add_special_tokens=False)
    fill, acc = walk(lambda i, w: example[i] if i < len(example) else None)
    r["instance_walk"] = {"fill": summarize(fill), "accept": summarize(acc)}
    rng = random.Random(0)
    fill, acc = walk(lambda i, w: int(rng.choice(allowed_ids(w, vocab))))
    r["random_walk"] = {"fill": summarize(fill), "accept": summarize(acc)}

    # One step's masks for `batch` requests at different points of the example.
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    for j, m in enumerate(matchers):
        for t_ in example[: (j * 7) % max(1, len(example) - 1)]:
            m.accept_token(t_)
    bm = xgr.allocate_token_bitmask(batch, vocab)
    for threads in (1, os.cpu_count() or 1):
        bmatcher = xgr.BatchGrammarMatcher(max_threads=threads)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            bmatcher.batch_fill_next_token_bitmask(matchers, bm)
            times.append(time.perf_counter() - t0)
        r[f"batch{batch}_fill_ms_threads{threads}"] = 1e3 * statistics.median(times)
    r["fill_threads"] = _xgrammar_fill_threads(xgr, compiled, vocab)
    r["bad_input"] = _bad_inputs_xgrammar(xgr)
    return r


def _xgrammar_fill_threads(xgr, compiled, vocab, sizes=(64, 256, 1024), steps=10) -> dict:
    """ms per batch fill, by batch size and ``BatchGrammarMatcher`` threads: matchers at random-walk
    states (each a few allowed tokens into the schema per step), as in a running batch."""
    rng = random.Random(1)
    out = {}
    for n in sizes:
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(n)]
        bm = xgr.allocate_token_bitmask(n, vocab)
        for threads in sorted({1, 2, os.cpu_count() or 1}):
            batch = xgr.BatchGrammarMatcher(max_threads=threads)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                batch.batch_fill_next_token_bitmask(matchers, bm)
                times.append(time.perf_counter() - t0)
                for i, m in enumerate(matchers):  # one allowed token each (a fresh matcher once one ends)
                    ids = allowed_ids(bm[i].numpy(), vocab)
                    if m.is_terminated() or not len(ids):
                        matchers[i] = xgr.GrammarMatcher(compiled)
                    else:
                        m.accept_token(int(ids[rng.randrange(min(len(ids), 40))]))
            out[f"batch{n}_threads{threads}_ms"] = round(1e3 * statistics.median(times), 3)
    return out


def _bad_inputs_xgrammar(xgr) -> dict:
    out = {}
    for name, fn in (
        ("schema", lambda: xgr.Grammar.from_json_schema('{"type": "object", "properties": {"a": {"type": 3}}}')),
        ("schema_not_json", lambda: xgr.Grammar.from_json_schema('{"type": ')),
        ("regex", lambda: xgr.Grammar.from_regex("a(b")),
        ("ebnf", lambda: xgr.Grammar.from_ebnf('root ::= "a" | ')),
    ):
        t = time.perf_counter()
        try:
            fn()
            out[name] = {"raised": False}
        except Exception as e:  # noqa: BLE001 - recording what each engine does
            out[name] = {"raised": True, "error": f"{type(e).__name__}: {str(e)[:160]}"}
        out[name]["s"] = time.perf_counter() - t
    return out


# --- llguidance ----------------------------------------------------------------
def bench_llguidance(tok, vocab, eos, batch) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as llnp

    r = {"version": _pip_version("llguidance")}
    t = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=_ids(eos) or None)
    r["tokenizer_setup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    r["schema_to_grammar_s"] = time.perf_counter() - t

    def new_matcher():
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    mask = llnp.allocate_token_bitmask(1, vocab)
    t = time.perf_counter()
    m = new_matcher()
    llnp.fill_next_token_bitmask(m, mask, 0)
    r["compile_s"] = time.perf_counter() - t  # llguidance has no ahead-of-time step: matcher + first mask
    r["compile_gil_free_fraction"] = gil_free_fraction(
        lambda: llnp.fill_next_token_bitmask(new_matcher(), llnp.allocate_token_bitmask(1, vocab), 0))

    def walk(choose):
        m = new_matcher()
        fill, acc = [], []
        for step in range(MAX_WALK):
            t0 = time.perf_counter()
            llnp.fill_next_token_bitmask(m, mask, 0)
            fill.append((time.perf_counter() - t0) * 1e6)
            token = choose(step, mask[0])
            if token is None:
                break
            t0 = time.perf_counter()
            assert m.consume_token(token), (token, m.get_error())
            acc.append((time.perf_counter() - t0) * 1e6)
            if m.is_stopped():
                break
        return fill, acc

    example = tok.encode(EXAMPLE, add_special_tokens=False)
    fill, acc = walk(lambda i, w: example[i] if i < len(example) else None)
    r["instance_walk"] = {"fill": summarize(fill), "accept": summarize(acc)}
    rng = random.Random(0)
    fill, acc = walk(lambda i, w: int(rng.choice(allowed_ids(w, vocab))))
    r["random_walk"] = {"fill": summarize(fill), "accept": summarize(acc)}

    matchers = []
    for j in range(batch):
        m = new_matcher()
        for t_ in example[: (j * 7) % max(1, len(example) - 1)]:
            m.consume_token(t_)
        matchers.append(m)
    bm = llnp.allocate_token_bitmask(batch, vocab)
    executor = llguidance.LLExecutor()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        llnp.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bm)
        times.append(time.perf_counter() - t0)
    r[f"batch{batch}_fill_ms_par"] = 1e3 * statistics.median(times)
    r["bad_input"] = _bad_inputs_llguidance(llguidance, lltok)
    return r


def _bad_inputs_llguidance(llguidance, lltok) -> dict:
    """llguidance's grammar_from_* only wrap their input: validate_grammar returns the error text."""
    out = {}
    for name, fn in (
        ("schema", lambda: llguidance.LLMatcher.grammar_from_json_schema({"type": "object", "properties": {"a": {"type": 3}}})),
        ("schema_not_json", lambda: llguidance.LLMatcher.grammar_from_json_schema('{"type": ')),
        ("regex", lambda: llguidance.LLMatcher.grammar_from_regex("a(b")),
        ("lark", lambda: llguidance.LLMatcher.grammar_from_lark('start: "a" | ')),
    ):
        t = time.perf_counter()
        try:
            message = llguidance.LLMatcher.validate_grammar(fn(), lltok)
            out[name] = {"raised": False, "error": message[:160] or None}
        except Exception as e:  # noqa: BLE001
            out[name] = {"raised": True, "error": f"{type(e).__name__}: {str(e)[:160]}"}
        out[name]["s"] = time.perf_counter() - t
    return out


# --- driver ------------------------------------------------------------------
def _ids(eos):
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _pip_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    record = {
        "benchmark": "grammar_engines",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=HERE).stdout.strip(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "schema": "benchmarks/schemas/order.json",
        "results": {},
    }
    for tname, (tok, vocab, eos) in tokenizers().items():
        for ename, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            try:
                record["results"][f"{ename}/{tname}"] = fn(tok, vocab, eos, args.batch)
            except Exception as e:  # noqa: BLE001 - one failure must not hide the rest
                record["results"][f"{ename}/{tname}"] = {"error": f"{type(e).__name__}: {e}"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"grammar-engines-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"{'engine/tokenizer':42s} {'setup s':>8s} {'compile s':>9s} {'GIL free':>8s} "
          f"{'inst p50/p99 us':>16s} {'rand p50/p99 us':>16s} {'batch ms':>9s}")
    for key, r in record["results"].items():
        if "error" in r:
            print(f"{key:42s} ERROR {r['error'][:80]}")
            continue
        batch = next((v for k, v in r.items() if k.startswith(f"batch{args.batch}_fill_ms") and
                      not k.endswith("threads1")), float("nan"))
        iw, rw = r["instance_walk"]["fill"], r["random_walk"]["fill"]
        print(f"{key:42s} {r['tokenizer_setup_s']:8.2f} {r['compile_s']:9.4f} {r['compile_gil_free_fraction']:8.2f} "
              f"{iw['p50_us']:7.1f}/{iw['p99_us']:8.1f} {rw['p50_us']:7.1f}/{rw['p99_us']:8.1f} {batch:9.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
