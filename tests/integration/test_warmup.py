"""Warm-up before ready (engine/warmup.py): every path taken once, no trace left, bounded in time."""

from __future__ import annotations

import statistics
import time

import pytest

from fleetlm import LLM, SamplingParams
from fleetlm.engine.warmup import warm_up


@pytest.fixture(scope="module")
def warm_llm(embedded_model):
    return LLM(model=embedded_model, warmup=True, max_num_batched_tokens=256, max_num_seqs=16,
               max_model_len=1024)


def test_warmup_runs_every_path_before_the_engine_is_handed_out(warm_llm):
    engine = warm_llm.engine
    report = engine.warmup_report
    assert report is not None and report.finished
    assert {"prefill", "prefix_store", "prefix_hit", "mixed", "decode_bs1", "decode_bs3", "decode_bs16",
            "sampling_batch"} <= set(report.phases)
    assert sum(k.startswith("sampling_") and k != "sampling_batch" for k in report.phases) == 5
    assert report.requests >= 30 and report.steps > report.requests / 16
    # The start-up breakdown names each phase, warm-up included.
    assert {"workers", "load_weights", "kv_cache", "warmup"} <= set(engine.startup_seconds)
    assert engine.startup_seconds["warmup"] == report.seconds > 0


def test_warmup_leaves_no_trace(warm_llm):
    engine = warm_llm.engine
    stats, snap = engine.stats(), engine.snapshot()
    assert stats.prefix_cache_queried_tokens == stats.prefix_cache_hit_tokens == 0
    assert stats.num_preemptions == 0 and stats.num_running == stats.num_waiting == 0
    assert snap.num_cached_free_blocks == 0  # warm-up prompts are not in the prefix cache
    assert engine.idle_invariants()["ok"]


def test_first_request_after_ready_is_not_slow(warm_llm):
    """The first request pays no start-up cost: its latency is close to the next ones' (generous on CPU)."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [f"Request number {i} asks about the weather in city {i}." for i in range(6)]
    seconds = []
    for p in prompts:
        t = time.perf_counter()
        warm_llm.generate(p, params)
        seconds.append(time.perf_counter() - t)
    steady = statistics.median(seconds[1:])
    assert seconds[0] <= 3 * steady, seconds


def test_a_spent_time_limit_stops_the_warmup_cleanly(warm_llm):
    report = warm_up(warm_llm.engine, time_limit_s=0.0)
    assert not report.finished and report.requests == 0
    assert warm_llm.engine.idle_invariants()["ok"]
    out = warm_llm.generate("Still serving?", SamplingParams(temperature=0.0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


def test_warmup_defaults_off_on_cpu(embedded_model):
    from fleetlm.engine.args import EngineArgs

    assert EngineArgs(model=embedded_model, device="cpu").create_engine_config().warmup is False
    assert EngineArgs(model=embedded_model, device="cpu", warmup=True).create_engine_config().warmup is True
    with pytest.raises(ValueError, match="warmup"):
        EngineArgs(model=embedded_model, device="cpu", warmup="yes").create_engine_config()
