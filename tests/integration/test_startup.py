"""Cold start (issue 19) on CPU: the start-up breakdown, the compile cache across starts, ``fleetlm build``
and ``fleetlm bench startup``.

On CPU no Triton kernel is compiled, so what a start finds in the cache is
the marker a finished warm-up of the same settings left
(``workers/compile_cache.py``); the start-time breakdown
(``LLMEngine.startup_details``) says whether the cache was warm.
"""

from __future__ import annotations

import json

import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.workers import compile_cache

SMALL = {"device": "cpu", "max_model_len": 256, "max_num_seqs": 4, "max_num_batched_tokens": 64}


def _start(model: str, cache: str, **kw) -> tuple[dict, dict]:
    llm = LLM(model=model, warmup=True, compile_cache_dir=cache, **{**SMALL, **kw})
    try:
        return dict(llm.engine.startup_seconds), llm.engine.startup_details
    finally:
        llm.engine.shutdown()


def test_a_compile_cache_written_by_one_start_is_used_by_the_next(embedded_model, tmp_path, monkeypatch):
    seconds, details = _start(embedded_model, str(tmp_path))
    assert {"tokenizer", "workers", "load_weights", "kv_cache", "warmup"} <= set(seconds)
    first = details["compile_cache"]
    assert first["warm"] is False and first["entries_at_start"] == 0
    weights = details["weights"]
    assert weights["bytes"] > 100e6 and weights["gbps"] > 0  # 135M parameters in float32, on the device

    _, details = _start(embedded_model, str(tmp_path))
    second = details["compile_cache"]
    assert second["warm"] is True and (second["dir"], second["fingerprint"]) == (first["dir"], first["fingerprint"])

    # Other settings that change what is compiled: not warm for them.
    _, details = _start(embedded_model, str(tmp_path), max_num_seqs=3)
    assert details["compile_cache"]["warm"] is False

    # A cache from another version is ignored: another directory, nothing found there.
    monkeypatch.setattr(compile_cache.torch, "__version__", "9.9.9+other")
    _, details = _start(embedded_model, str(tmp_path))
    other = details["compile_cache"]
    assert other["warm"] is False and other["entries_at_start"] == 0 and other["dir"] != first["dir"]


def test_fleetlm_build_fills_the_cache_a_later_start_finds_warm(embedded_model, tmp_path, capsys):
    from fleetlm.cluster.cli import main

    argv = ["build", embedded_model, "--compile-cache-dir", str(tmp_path)]
    for key, value in SMALL.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    assert "built" in capsys.readouterr().err
    _, details = _start(embedded_model, str(tmp_path))
    assert details["compile_cache"]["warm"] is True
    # Without a cache directory on CPU there is nothing to fill: a clear error, status 2.
    assert main(["build", embedded_model, "--device", "cpu"]) == 2
    assert "--compile-cache-dir" in capsys.readouterr().err


def test_bench_startup_reports_cold_and_warm_starts(embedded_model, tmp_path):
    from fleetlm.benchmarks.cli import main

    out = tmp_path / "startup.json"
    argv = ["startup", "--model", embedded_model, "--input-len", "16", "--output-len", "4", "--steady-requests", "2",
            "--output", str(out), "--time-limit", "400"]
    for key, value in SMALL.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "startup" and record["card"].startswith("CPU")
    cold, warm = record["figures"]["cold"], record["figures"]["warm"]
    assert "error" not in cold and "error" not in warm, (cold.get("stderr"), warm.get("stderr"))
    assert cold["startup_details"]["compile_cache"]["warm"] is False
    assert warm["startup_details"]["compile_cache"]["warm"] is True
    for run in (cold, warm):
        assert run["startup_seconds"]["warmup"] > 0 and run["build_s"] > 0
        assert run["first_ttft_s"] > 0 and run["steady_ttft_s"] > 0 and run["ttft_ratio"] == pytest.approx(
            run["first_ttft_s"] / run["steady_ttft_s"])


def test_the_tokenizer_loads_while_the_workers_start_and_a_failed_load_stops_them(embedded_model, monkeypatch):
    import threading
    import time

    from fleetlm.workers import loader, worker_group

    spans: dict[str, tuple[float, float, int]] = {}
    made = []
    real_tokenizer, real_group = loader.model_tokenizer, worker_group.create_worker_group

    def timed(name, fn):
        def run(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            spans[name] = (t0, time.perf_counter(), threading.get_ident())
            return out
        return run

    def group(config):
        made.append(real_group(config))
        return made[-1]

    monkeypatch.setattr(loader, "model_tokenizer", timed("tokenizer", real_tokenizer))
    monkeypatch.setattr(worker_group, "create_worker_group", timed("workers", group))
    llm = LLM(model=embedded_model, **SMALL)
    try:
        (t_start, t_end, t_thread), (w_start, w_end, w_thread) = spans["tokenizer"], spans["workers"]
        assert t_thread != w_thread and t_start < w_end and w_start < t_end, spans  # the two overlapped
        assert llm.generate(["Hello"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    finally:
        llm.engine.shutdown()

    def broken(mc):
        raise OSError("no tokenizer here")

    monkeypatch.setattr(loader, "model_tokenizer", broken)
    made.clear()
    with pytest.raises(OSError, match="no tokenizer here"):
        LLM(model=embedded_model, **SMALL)
    assert len(made) == 1 and made[0].worker is None  # the workers that start made were shut down
