"""Asynchronous scheduling on one GPU: same tokens as synchronous, and launching never waits for the device.

A tiny dummy Llama (``configs/models/tiny-llama-8h4kv.json``) in float32 with
CUDA graphs. Run on the device machine:
``pytest -m gpu tests/gpu/test_async_gpu.py -s``.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from fleetlm import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODEL = "tiny-llama-8h4kv"
VOCAB = 512
LENGTHS = [5, 17, 33, 64, 3, 48]


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def llm():
    llm = LLM(model=MODEL, load_format="dummy", device="cuda", dtype="float32", max_model_len=512,
              max_num_seqs=8, num_kv_blocks=256)
    assert llm.engine.async_scheduling, "async scheduling is the default for one in-process CUDA worker"
    assert llm.engine.workers.worker.runner.graphs is not None
    return llm


def _generate(llm, async_on: bool, prompts, params):
    eng = llm.engine
    eng.async_scheduling = async_on
    eng.scheduler.blocks.reset_prefix_cache()
    ahead0 = eng.num_steps_ahead
    outs = llm.generate(prompts, params)
    assert eng.idle_invariants()["ok"]
    return [[c.token_ids for c in o.outputs] for o in outs], eng.num_steps_ahead - ahead0


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.95, seed=5, max_tokens=48, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_async_and_sync_give_identical_tokens(llm, params):
    # Every request runs to max_tokens, so both modes run the same batches
    # through the same CUDA graphs: the tokens must agree bit for bit.
    prompts = _prompts(0)
    sync, ahead = _generate(llm, False, prompts, params)
    assert ahead == 0
    asyn, ahead = _generate(llm, True, prompts, params)
    assert ahead >= 40
    assert asyn == sync
    assert all(len(t[0]) == 48 for t in asyn)


def test_mixed_stops_and_aborts_leave_the_engine_clean(llm):
    eng = llm.engine
    eng.async_scheduling = True
    prompts = _prompts(1)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (1, 7, 30, 2, 19, 40)]
    ref = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in ref] == [1, 7, 30, 2, 19, 40]
    eng.add_request("x", prompts[2], params[5])
    eng.add_request("y", prompts[3], params[5])
    for _ in range(4):
        eng.step()
    eng.abort_request("x")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.idle_invariants()["ok"]


def test_launch_never_waits_for_the_device(llm, monkeypatch):
    """Each launch is timed while the GPU is kept busy by a sleep kernel queued just
    before it: a launch that synchronized would take at least the sleep's time.
    ``set_sync_debug_mode("error")`` also turns PyTorch's known sync points into errors."""
    eng = llm.engine
    eng.async_scheduling = True
    prompts = _prompts(2)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2),
              # min_tokens bans the stop token on the device for the whole run
              SamplingParams(temperature=0.8, seed=1, max_tokens=24, ignore_eos=True, min_tokens=24,
                             stop_token_ids=[7])] * 3
    llm.generate(prompts, params)  # warm up: Triton compiles, pinned host blocks

    cycles = 100_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    sleep_s = start.elapsed_time(end) / 1e3
    assert sleep_s > 0.01

    real_launch = eng.workers.launch
    host_times = []

    def timed_launch(out):
        torch.cuda._sleep(cycles)
        torch.cuda.set_sync_debug_mode("error")
        try:
            t0 = time.perf_counter()
            pending = real_launch(out)
            host_times.append(time.perf_counter() - t0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return pending

    monkeypatch.setattr(eng.workers, "launch", timed_launch)
    for _ in range(2):  # the first run also grows the pinned host pool to what a busy GPU keeps in use
        host_times.clear()
        eng.scheduler.blocks.reset_prefix_cache()
        outs = llm.generate(prompts, params)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert len(host_times) >= 24 and eng.idle_invariants()["ok"]
    print(f"\nsleep {sleep_s * 1e3:.1f} ms; launch host time max {max(host_times) * 1e3:.2f} ms, "
          f"mean {sum(host_times) / len(host_times) * 1e3:.2f} ms over {len(host_times)} launches")
    assert max(host_times) < sleep_s / 2
