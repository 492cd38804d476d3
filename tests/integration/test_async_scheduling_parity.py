"""Asynchronous scheduling gives the same tokens as synchronous scheduling (embedded model, float32 CPU).

On CPU the "async" launch computes at once and returns a resolved handle, but
everything else runs as on a GPU: steps scheduled ahead with placeholder
tokens filled from the previous step's sampled tensor, results of ended
requests discarded, synchronous fallback for penalties and preemption.
Each engine is built with ``async_scheduling=True`` and its reference run
switches the flag off (with an empty prefix cache both times).
"""

from __future__ import annotations

import pytest

from fleetlm import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
    "The three primary colors are",
    "Q: What is 12 times 12?\nA:",
    "Write a short poem about the moon and the stars over a quiet lake at night.",
]
COMMA, PERIOD = 28, 30  # ',' and '.' in this vocabulary
MAX = 16

MIXED = [
    SamplingParams(temperature=0.0, max_tokens=MAX, logprobs=2),
    SamplingParams(temperature=0.0, max_tokens=MAX, stop=["\n"]),  # stops after 7 tokens
    SamplingParams(temperature=0.0, max_tokens=MAX, stop_token_ids=[PERIOD]),  # after 11
    # Unconstrained, the third token is a comma; min_tokens bans it for 5 tokens.
    SamplingParams(temperature=0.0, max_tokens=MAX, stop_token_ids=[COMMA], min_tokens=5),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=7, n=2, max_tokens=MAX),
    SamplingParams(temperature=0.0, max_tokens=6, repetition_penalty=1.3, presence_penalty=0.2),
    SamplingParams(temperature=0.0, max_tokens=1),
]


def _tokens(outputs):
    return [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in outputs]


def _run(llm: LLM, async_on: bool, params=MIXED, prompts=PROMPTS):
    eng = llm.engine
    eng.scheduler.blocks.reset_prefix_cache()
    eng.async_scheduling = async_on
    ahead0 = eng.num_steps_ahead
    outs = llm.generate(prompts, params)
    assert eng.idle_invariants()["ok"], eng.idle_invariants()
    return outs, eng.num_steps_ahead - ahead0


@pytest.fixture(scope="module")
def llm(embedded_model):
    llm = LLM(model=embedded_model, async_scheduling=True, cpu_kv_cache_bytes=128 << 20)
    assert llm.engine.async_scheduling
    return llm


@pytest.fixture(scope="module")
def reference(llm):
    outs, ahead = _run(llm, async_on=False)
    assert ahead == 0
    return outs


def test_mixed_batch_is_token_identical(llm, reference):
    outs, ahead = _run(llm, async_on=True)
    assert ahead > 5  # the penalty request holds steps ahead back while it runs
    assert _tokens(outs) == _tokens(reference)
    # The features meant to fire did fire.
    n_tokens = [len(o.outputs[0].token_ids) for o in reference]
    reasons = [o.outputs[0].finish_reason for o in reference]
    assert reasons[1:3] == ["stop"] * 2 and n_tokens[1:3] == [7, 11]
    assert reasons[3] == "length" and COMMA not in reference[3].outputs[0].token_ids[:5]  # min_tokens held it
    assert n_tokens[6] == 1 and len(reference[4].outputs) == 2
    assert reference[4].outputs[0].token_ids != reference[4].outputs[1].token_ids
    # Logprobs come back with the tokens, identical.
    for a, b in zip(outs[0].outputs[0].logprobs, reference[0].outputs[0].logprobs):
        assert {t: (lp.logprob, lp.rank) for t, lp in a.items()} == {t: (lp.logprob, lp.rank) for t, lp in b.items()}


def test_prefix_cache_hits_keep_tokens(llm, reference):
    # After the test above the prompts' full blocks are cached.
    before = llm.engine.stats().prefix_cache_hit_tokens
    again = llm.generate(PROMPTS, MIXED)
    assert llm.engine.stats().prefix_cache_hit_tokens > before
    assert _tokens(again) == _tokens(reference)
    assert llm.engine.idle_invariants()["ok"]


def test_penalties_alone_run_synchronously(llm):
    params = SamplingParams(temperature=0.0, max_tokens=4, frequency_penalty=0.5)
    ref, _ = _run(llm, False, [params] * 2, PROMPTS[:2])
    outs, ahead = _run(llm, True, [params] * 2, PROMPTS[:2])
    assert ahead == 0  # every step would need the token in flight on the host
    assert _tokens(outs) == _tokens(ref)


def test_small_pool_preemption_and_chunked_prefill(embedded_model):
    # 4 blocks of 16 tokens for 4 requests of ~30 tokens each: preemption;
    # an 8-token step budget splits every prompt over 8 tokens.
    llm = LLM(model=embedded_model, async_scheduling=True, num_kv_blocks=4, max_num_batched_tokens=8)
    prompts = [PROMPTS[i] for i in (0, 2, 3, 6)]
    params = [MIXED[0], SamplingParams(temperature=0.0, max_tokens=MAX), MIXED[3], MIXED[4]]
    ref, _ = _run(llm, False, params, prompts)
    pre_sync = llm.engine.scheduler.num_preemptions
    outs, ahead = _run(llm, True, params, prompts)
    assert pre_sync > 0 and llm.engine.scheduler.num_preemptions > pre_sync
    assert ahead > 10
    assert _tokens(outs) == _tokens(ref)


def test_aborts_while_steps_are_in_flight(llm, reference):
    eng = llm.engine
    eng.async_scheduling = True
    eng.add_request("a", PROMPTS[0], MIXED[0])
    eng.add_request("b", PROMPTS[3], MIXED[3])
    eng.add_request("c", PROMPTS[2], MIXED[2])  # stops on a period while its next step is in flight
    done = {}
    for _ in range(3):
        for out in eng.step():
            done[out.request_id] = out
    assert eng._in_flight  # a step is running while we abort
    aborted = eng.abort_request("b")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    got = aborted.outputs[0].token_ids
    assert len(got) == 3 and got == reference[3].outputs[0].token_ids[:3]
    # The id is free at once: a new request under it gets its own tokens.
    eng.add_request("b", PROMPTS[0], MIXED[0])
    while eng.has_unfinished_requests():
        for out in eng.step():
            done[out.request_id] = out
    assert done["a"].outputs[0].token_ids == reference[0].outputs[0].token_ids
    assert done["b"].outputs[0].token_ids == reference[0].outputs[0].token_ids
    assert done["c"].outputs[0].token_ids == reference[2].outputs[0].token_ids
    assert eng.idle_invariants()["ok"]

    # Abort the last request while a step is in flight: the engine waits for that step
    # (it only computed for ended requests) and is idle at once.
    eng.add_request("x", PROMPTS[2], MIXED[0])
    eng.step()
    assert eng._in_flight
    eng.abort_request("x")
    assert not eng.has_unfinished_requests() and eng.idle_invariants()["ok"]
    assert eng.step() == []


def test_async_scheduling_argument():
    from fleetlm.engine.args import EngineArgs

    tiny = dict(model="tiny-llama-8h4kv", load_format="dummy", device="cpu")
    assert EngineArgs(**tiny).create_engine_config().async_scheduling is False  # auto: CUDA only
    assert EngineArgs(**tiny, async_scheduling=True).create_engine_config().async_scheduling is True
    assert EngineArgs(**tiny, tensor_parallel_size=2).create_engine_config().async_scheduling is False
    # One stage of Ray workers launches steps ahead too; pipeline stages run micro-batches instead.
    assert EngineArgs(**tiny, tensor_parallel_size=2, async_scheduling=True).create_engine_config().async_scheduling
    with pytest.raises(ValueError, match="one pipeline stage"):
        EngineArgs(**tiny, pipeline_parallel_size=2, async_scheduling=True).create_engine_config()


def test_distributed_executor_backend_argument():
    from fleetlm.engine.args import EngineArgs

    tiny = dict(model="tiny-llama-8h4kv", load_format="dummy", device="cpu")
    backend = lambda **kw: EngineArgs(**tiny, **kw).create_engine_config().parallel.distributed_executor_backend  # noqa: E731
    assert backend() == "uni" and backend(distributed_executor_backend="mp") == "uni"
    assert backend(tensor_parallel_size=2) == "ray" and backend(distributed_executor_backend="ray") == "ray"
    with pytest.raises(ValueError, match="needs 'ray'"):
        backend(tensor_parallel_size=2, distributed_executor_backend="mp")
    with pytest.raises(ValueError, match="must be one of mp, uni, ray"):
        backend(distributed_executor_backend="multiproc")
