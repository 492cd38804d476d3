"""``fleetlm bench``: throughput, latency, prefix, startup and serve benchmarks, each writing a JSON record.

    fleetlm bench throughput --model llama-3.1-8b --load-format dummy --num-prompts 1000 --input-len 256 --output-len 256
    fleetlm bench latency    --model llama-3.1-8b --load-format dummy --batch-size 1 --input-len 128 --output-len 512
    fleetlm bench prefix     --model llama-3.1-8b --load-format dummy --prefix-len 2000 --shared-fraction 0.9
    fleetlm bench startup    --model llama-3.1-8b --load-format dummy --max-model-len 4096
    fleetlm bench serve      --base-url http://127.0.0.1:8000 --max-concurrency 1,8,32,128 --input-len 512 --output-len 128

Every run writes one JSON record (``records.py``: card, versions, commit,
date, config, figures) to ``<name>-<UTC time>.json`` in the current
directory (or ``--results-dir``, or exactly ``--output``). What the figures
mean is said where they are computed: ``ceilings.py`` (matmul and copy
ceilings), ``offline.py`` (MFU, MBU, time limits), ``startup.py``, ``serve_load.py``.
``main`` is the CLI (``fleetlm.cluster.cli`` dispatches ``fleetlm bench ...``
here).
"""


from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fleetlm.benchmarks.ceilings import free_device_memory, measure_ceilings
from fleetlm.benchmarks.offline import (
    prefix_comparison,
    resolve_prefix_shape,
    run_latency,
    run_prefix,
    run_throughput,
)
from fleetlm.benchmarks.records import BenchError, make_record, write_record
from fleetlm.engine.config import KV_CACHE_DTYPES
from fleetlm.benchmarks.serve_load import fetch_model_name, run_serve, server_root


# Engine flags: argparse dest -> EngineArgs field (only flags the user gave are passed on).
ENGINE_FLAGS = (
    "model", "load_format", "dtype", "device", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
    "gpu_memory_utilization", "tensor_parallel_size", "pipeline_parallel_size", "enforce_eager",
    "enable_prefix_caching", "num_kv_blocks", "block_size", "quantization",
    "kv_cache_dtype",
)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m-instruct")
    g.add_argument("--load-format", choices=("auto", "safetensors", "gguf", "dummy"))
    g.add_argument("--quantization", help="weight format (awq, gptq, gguf, ...; default: the checkpoint's own); "
                   "dummy weights take a config.json with a quantization_config as --model")
    g.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="KV cache storage: auto (the model's dtype) or fp8 = fp8_e4m3 (E4M3 with scales)")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    g.add_argument("--device", choices=("auto", "cpu", "cuda"))
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--gpu-memory-utilization", type=float)
    g.add_argument("--tensor-parallel-size", type=int)
    g.add_argument("--pipeline-parallel-size", type=int)
    g.add_argument("--enforce-eager", action="store_true", default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--num-kv-blocks", type=int)
    g.add_argument("--block-size", type=int)
    g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineArgs field (VALUE parsed as JSON when it can be)")


def _add_common_args(p: argparse.ArgumentParser, ceilings: bool = True) -> None:
    g = p.add_argument_group("record")
    g.add_argument("--output", help="write the JSON record here (default: <name>-<UTC time>.json in --results-dir)")
    g.add_argument("--results-dir", help="directory for the record when --output is not given (default: the current directory)")
    g.add_argument("--commit", help="commit to record (default: git rev-parse HEAD, else 'unknown')")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--time-limit", type=float, default=600.0,
                   help="seconds; at the limit the run aborts what is left and reports complete=false")
    if ceilings:
        g.add_argument("--no-ceilings", action="store_true", help="skip measuring matmul/copy ceilings (no MFU/MBU)")
        g.add_argument("--matmul-size", type=int, help="ceiling matmul size n (default 8192 on GPU, 1024 on CPU)")
        g.add_argument("--ceiling-seconds", type=float, default=1.0, help="time each ceiling measurement about this long")
        g.add_argument("--no-warmup", action="store_true")


def engine_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    kw = {name: getattr(ns, name) for name in ENGINE_FLAGS if getattr(ns, name, None) is not None}
    for item in ns.engine_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--engine-arg wants KEY=VALUE, got {item!r}")
        try:
            kw[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            kw[key.replace("-", "_")] = value
    return kw


def _resolved_device_dtype(kw: dict[str, Any]) -> tuple[str, str]:
    from fleetlm.engine.args import EngineArgs

    try:
        device = EngineArgs.from_kwargs(**kw).resolve_device()
    except TypeError as e:
        raise BenchError(str(e)) from None
    dtype = kw.get("dtype") or "auto"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


def _default_make_llm(**kw):
    from fleetlm import LLM

    return LLM(**kw)


def _release(llm, device: str) -> None:
    llm.engine.shutdown()
    del llm
    free_device_memory(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetlm bench", description="Benchmark FleetLM; each run writes a JSON record.")
    sub = parser.add_subparsers(dest="subcommand", required=True)

    t = sub.add_parser("throughput", help="offline throughput (requests/s, tokens/s, MFU)")
    _add_engine_args(t)
    t.add_argument("--num-prompts", type=int, default=1000)
    t.add_argument("--input-len", type=int, default=256)
    t.add_argument("--output-len", type=int, default=256)
    t.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]")
    t.add_argument("--temperature", type=float, default=0.0)
    _add_common_args(t)

    lat = sub.add_parser("latency", help="decode step time of a fixed batch, tokens/s, MBU")
    _add_engine_args(lat)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=512)
    lat.add_argument("--num-iters", type=int, default=3)
    _add_common_args(lat)

    pre = sub.add_parser("prefix", help="shared-prefix workload with prefix caching on and off")
    _add_engine_args(pre)
    pre.add_argument("--num-prompts", type=int, default=64)
    pre.add_argument("--shared-fraction", type=float, default=0.9, help="fraction of each prompt that is the shared prefix")
    pre.add_argument("--prefix-len", type=int, help="shared prefix tokens (default 2000; prompt = prefix / fraction)")
    pre.add_argument("--input-len", type=int, help="prompt tokens (instead of --prefix-len)")
    pre.add_argument("--output-len", type=int, default=16)
    pre.add_argument("--modes", default="on,off", help="which caching modes to run, in order (on, off or both)")
    pre.add_argument("--repeats", type=int, default=1,
                     help="run the modes this many times, alternating (on, off, on, off, ...); report each mode's median")
    _add_common_args(pre, ceilings=False)
    pre.add_argument("--no-warmup", action="store_true")

    st = sub.add_parser("startup", help="start-up breakdown and first-request latency, cold and warm compile cache")
    _add_engine_args(st)
    st.add_argument("--compile-cache-dir", help="an empty or new directory for the cache (default: a temporary one)")
    st.add_argument("--no-warmup", action="store_true", help="start without the warm-up (to see what it saves)")
    st.add_argument("--input-len", type=int, default=128, help="prompt tokens of the timed requests")
    st.add_argument("--output-len", type=int, default=128, help="tokens of the timed batch-1 decodes")
    st.add_argument("--steady-requests", type=int, default=5, help="requests after the first, for the steady state")
    _add_common_args(st, ceilings=False)

    s = sub.add_parser("serve", help="load a running OpenAI-compatible endpoint (streaming)")
    s.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server, as http://host:port or (as OpenAI clients take it) http://host:port/v1")
    s.add_argument("--served-model", help="`model` to send (default: the first of GET /v1/models)")
    s.add_argument("--api-key")
    s.add_argument("--num-prompts", type=int, default=200, help="per concurrency level")
    s.add_argument("--input-len", type=int, default=512)
    s.add_argument("--output-len", type=int, default=128)
    s.add_argument("--vocab-size", type=int, default=32000, help="random prompt ids are drawn below this")
    s.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: all at once)")
    s.add_argument("--max-concurrency", default=None, help="limit on requests in flight; a comma list runs a sweep")
    s.add_argument("--duration", type=float, default=120.0, help="no request starts after this many seconds")
    s.add_argument("--request-timeout", type=float, default=300.0)
    s.add_argument("--warmup-requests", type=int, default=1)
    _add_common_args(s, ceilings=False)
    return parser


def _positive(ns: argparse.Namespace, *names: str) -> None:
    for name in names:
        v = getattr(ns, name)
        if v is not None and v < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _ceilings_for(ns: argparse.Namespace, device: str, dtype: str) -> dict[str, Any] | None:
    if ns.no_ceilings:
        return None
    return measure_ceilings(device, dtype, matmul_size=ns.matmul_size, min_seconds=ns.ceiling_seconds)


def _finish(ns: argparse.Namespace, name: str, config: dict[str, Any], figures: dict[str, Any], device: str,
            summary: str) -> int:
    record = make_record(name, config, figures, device=device, commit=ns.commit)
    path = write_record(record, ns.output, ns.results_dir)
    print(f"{name}: {summary}")
    print(f"record: {path}")
    return 0


def cmd_throughput(ns, make_llm) -> int:
    _positive(ns, "num_prompts", "input_len", "output_len")
    kw = engine_kwargs(ns)
    device, dtype = _resolved_device_dtype(kw)
    ceilings = _ceilings_for(ns, device, dtype)
    llm = (make_llm or _default_make_llm)(**kw)
    figures = run_throughput(llm, num_prompts=ns.num_prompts, input_len=ns.input_len, output_len=ns.output_len,
                             range_ratio=ns.range_ratio, seed=ns.seed, temperature=ns.temperature,
                             time_limit=ns.time_limit, ceilings=ceilings, warmup=not ns.no_warmup)
    if make_llm is None:
        _release(llm, device)
    config = {"engine": kw, "num_prompts": ns.num_prompts, "input_len": ns.input_len, "output_len": ns.output_len,
              "range_ratio": ns.range_ratio, "temperature": ns.temperature, "seed": ns.seed,
              "time_limit_s": ns.time_limit, "ceilings": ceilings}
    mfu = figures["mfu"]
    summary = (f"{figures['requests_per_s']:.2f} req/s, {figures['output_tokens_per_s']:.1f} output tok/s, "
               f"{figures['total_tokens_per_s']:.1f} total tok/s"
               + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")
               + ("" if figures["complete"] else " (time limit hit)"))
    return _finish(ns, "throughput", config, figures, device, summary)


def cmd_latency(ns, make_llm) -> int:
    _positive(ns, "batch_size", "input_len", "output_len", "num_iters")
    kw = engine_kwargs(ns)
    device, dtype = _resolved_device_dtype(kw)
    ceilings = _ceilings_for(ns, device, dtype)
    llm = (make_llm or _default_make_llm)(**kw)
    figures = run_latency(llm, batch_size=ns.batch_size, input_len=ns.input_len, output_len=ns.output_len,
                          num_iters=ns.num_iters, seed=ns.seed, time_limit=ns.time_limit, ceilings=ceilings,
                          warmup=not ns.no_warmup)
    if make_llm is None:
        _release(llm, device)
    config = {"engine": kw, "batch_size": ns.batch_size, "input_len": ns.input_len, "output_len": ns.output_len,
              "num_iters": ns.num_iters, "seed": ns.seed, "time_limit_s": ns.time_limit, "ceilings": ceilings}
    if "error" in figures:
        summary = figures["error"]
    else:
        mbu = figures["mbu"]
        summary = (f"{figures['decode_tokens_per_s']:.1f} decode tok/s, {figures['decode_step_ms']['mean']:.2f} ms/step, "
                   f"TTFT {figures['ttft_ms']:.1f} ms" + (f", MBU {100 * mbu:.1f}%" if mbu is not None else ""))
    return _finish(ns, "latency", config, figures, device, summary)


def cmd_prefix(ns, make_llm) -> int:
    _positive(ns, "num_prompts", "output_len", "repeats")
    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes) or len(set(modes)) != len(modes):
        raise BenchError(f"--modes takes on, off or on,off; got {ns.modes!r}")
    input_len, prefix_len = resolve_prefix_shape(ns.input_len, ns.prefix_len, ns.shared_fraction)
    kw = engine_kwargs(ns)
    if "enable_prefix_caching" in kw:
        raise BenchError("prefix runs caching on and off itself (see --modes); drop --[no-]enable-prefix-caching")
    device, _ = _resolved_device_dtype(kw)
    # A small difference between modes (the cost of caching with nothing to
    # share) is below the noise of one run: alternate the modes and take medians.
    trials: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(ns.repeats):
        for mode in modes:
            llm = (make_llm or _default_make_llm)(**kw, enable_prefix_caching=mode == "on")
            trials[mode].append(run_prefix(llm, num_prompts=ns.num_prompts, input_len=input_len, prefix_len=prefix_len,
                                           output_len=ns.output_len, seed=ns.seed, time_limit=ns.time_limit,
                                           warmup=not ns.no_warmup))
            if make_llm is None:
                _release(llm, device)
    runs = {m: dict(sorted(t, key=lambda r: r["requests_per_s"])[(len(t) - 1) // 2]) for m, t in trials.items()}
    if ns.repeats > 1:
        for m, t in trials.items():
            runs[m]["requests_per_s_all"] = [r["requests_per_s"] for r in t]
    figures: dict[str, Any] = dict(runs)
    if "on" in runs and "off" in runs:
        figures.update(prefix_comparison(runs["on"], runs["off"]))
    config = {"engine": kw, "num_prompts": ns.num_prompts, "input_len": input_len, "prefix_len": prefix_len,
              "shared_fraction": ns.shared_fraction, "output_len": ns.output_len, "modes": modes, "seed": ns.seed,
              "repeats": ns.repeats, "time_limit_s": ns.time_limit}
    parts = [f"caching {m}: {r['requests_per_s']:.2f} req/s, hit rate {100 * r['prefix_cache_hit_rate']:.0f}%"
             for m, r in runs.items()]
    if figures.get("speedup") is not None:
        parts.append(f"speedup {figures['speedup']:.2f}x")
    return _finish(ns, "prefix", config, figures, device, "; ".join(parts))


def cmd_serve(ns, make_llm) -> int:
    _positive(ns, "num_prompts", "input_len", "output_len", "vocab_size")
    levels: list[int | None] = [None]
    if ns.max_concurrency:
        try:
            levels = [int(x) for x in ns.max_concurrency.split(",") if x.strip()]
        except ValueError:
            raise BenchError(f"--max-concurrency takes integers (a comma list for a sweep), got {ns.max_concurrency!r}") from None
        if not levels or min(levels) < 1:
            raise BenchError("--max-concurrency values must be >= 1")
    if ns.output and len(levels) > 1:
        raise BenchError("--output names one file; a concurrency sweep writes one record per level (use --results-dir)")
    if not (ns.request_rate > 0):
        raise BenchError("--request-rate must be > 0 (inf: all at once)")
    ns.base_url = server_root(ns.base_url)
    model = ns.served_model or asyncio.run(fetch_model_name(ns.base_url, ns.api_key))
    for level in levels:
        figures = asyncio.run(run_serve(
            base_url=ns.base_url, model=model, num_prompts=ns.num_prompts, input_len=ns.input_len,
            output_len=ns.output_len, vocab_size=ns.vocab_size, request_rate=ns.request_rate, max_concurrency=level,
            duration_s=min(ns.duration, ns.time_limit), request_timeout_s=ns.request_timeout, api_key=ns.api_key,
            seed=ns.seed, warmup_requests=ns.warmup_requests,
        ))
        config = {"base_url": ns.base_url, "model": model, "num_prompts": ns.num_prompts, "input_len": ns.input_len,
                  "output_len": ns.output_len, "request_rate": ns.request_rate, "max_concurrency": level,
                  "duration_s": ns.duration, "request_timeout_s": ns.request_timeout, "seed": ns.seed,
                  "note": "card and versions describe the client machine"}
        name = "serve" if level is None else f"serve-c{level}"
        summary = (f"{figures['completed']}/{figures['num_prompts']} ok, {figures['errors']} errors, "
                   f"{figures['requests_per_s']:.2f} req/s, {figures['output_tokens_per_s']:.1f} output tok/s, "
                   f"TTFT p50 {_fmt(figures['ttft_ms']['p50'])} ms, TPOT p50 {_fmt(figures['tpot_ms']['p50'])} ms")
        record = make_record(name, config, figures, device="cpu", commit=ns.commit)
        path = write_record(record, ns.output, ns.results_dir, name=name)
        print(f"{name}: {summary}")
        print(f"record: {path}")
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def cmd_startup(ns, make_llm) -> int:
    from fleetlm.benchmarks.startup import run_startup, summary

    _positive(ns, "input_len", "output_len", "steady_requests")
    kw = {**engine_kwargs(ns), "warmup": not ns.no_warmup}
    device, _ = _resolved_device_dtype(kw)
    try:
        runs = run_startup(kw, compile_cache_dir=ns.compile_cache_dir, input_len=ns.input_len,
                           output_len=ns.output_len, steady_requests=ns.steady_requests, timeout_s=ns.time_limit)
    except ValueError as e:
        raise BenchError(str(e)) from None
    config = {"engine": kw, "input_len": ns.input_len, "output_len": ns.output_len,
              "steady_requests": ns.steady_requests, "compile_cache_dir": ns.compile_cache_dir}
    return _finish(ns, "startup", config, runs, device, summary(runs))


COMMANDS: dict[str, Callable[..., int]] = {
    "throughput": cmd_throughput,
    "latency": cmd_latency,
    "prefix": cmd_prefix,
    "startup": cmd_startup,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None, *, make_llm: Callable[..., Any] | None = None) -> int:
    """Entry point of ``fleetlm bench``. ``make_llm(**engine_kwargs)`` builds the engine
    (default ``fleetlm.LLM``); an injected one is not shut down afterwards."""
    ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return COMMANDS[ns.subcommand](ns, make_llm)
    except BenchError as e:
        print(f"fleetlm bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
