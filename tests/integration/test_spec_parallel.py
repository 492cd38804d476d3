"""N-gram speculation over Ray worker actors: TP=2 and PP=2 give the single device's tokens (CPU, gloo).

A small Llama shape with dummy float32 weights and a 512-token vocabulary:
its random continuations repeat short n-grams, so lookups with
``prompt_lookup_min`` 1 propose in most steps. Every rank builds the same
verify step; the last stage's rank 0 accepts and samples.
"""

from __future__ import annotations

import pytest
import ray

from fleetlm import LLM, SamplingParams

pytestmark = pytest.mark.timeout(600)

TINY = dict(model="tiny-llama-8h4kv", load_format="dummy", device="cpu", dtype="float32", max_model_len=512,
            cpu_kv_cache_bytes=16 << 20)
PROMPTS = [[(7 * i + 3 * j) % 500 + 3 for j in range(5 + 3 * i)] * 2 for i in range(6)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2,
         "min_acceptance_rate": 0.0}


@pytest.fixture(scope="module")
def reference():
    llm = LLM(**TINY)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_ngram_over_workers_matches_single_device(ray_local, reference, tp, pp):
    llm = LLM(**TINY, tensor_parallel_size=tp, pipeline_parallel_size=pp, speculative_config=NGRAM)
    try:
        outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
        stats = llm.engine.stats()
        assert outs == reference
        assert stats.spec_decode_proposed_tokens > 50 and stats.spec_decode_accepted_tokens > 0
        assert llm.engine.idle_invariants()["ok"]
    finally:
        llm.engine.shutdown()
