"""Speculation over Ray worker actors: TP=2 and PP=2 give the single device's tokens (CPU, gloo).

A small Llama shape with dummy float32 weights and a 512-token vocabulary:
its random continuations repeat short n-grams, so lookups with
``prompt_lookup_min`` 1 propose in most steps. Every rank builds the same
verify step; the last stage's rank 0 accepts and samples, and runs the draft
model whole (``workers/drafter.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

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


SEEDED = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=16, ignore_eos=True) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory) -> str:
    """A draft that is not the target: fewer layers, so other (dummy) weights and few acceptances."""
    config = json.loads((Path(__file__).parents[2] / "configs/models/tiny-llama-8h4kv.json").read_text())
    path = tmp_path_factory.mktemp("draft") / "tiny-draft-1layer.json"
    path.write_text(json.dumps(dict(config, num_hidden_layers=1)))
    return str(path)


def _draft(model: str) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": 3, "min_acceptance_rate": 0.0}


@pytest.mark.parametrize("tp, pp, draft", [(2, 1, "same"), (1, 2, "other")])
def test_draft_model_over_workers_matches_single_device(ray_local, reference, other_draft, tp, pp, draft):
    spec = _draft(TINY["model"] if draft == "same" else other_draft)
    single = LLM(**TINY, speculative_config=spec)
    try:
        seeded_reference = [o.outputs[0].token_ids for o in single.generate(PROMPTS, SEEDED)]
    finally:
        single.engine.shutdown()
    llm = LLM(**TINY, tensor_parallel_size=tp, pipeline_parallel_size=pp, speculative_config=spec)
    try:
        outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
        greedy = llm.engine.stats()
        seeded = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SEEDED)]
        assert outs == reference  # greedy: the tokens without speculation
        assert seeded == seeded_reference  # sampled: the single device's draws, proposals and rejections
        rate = greedy.spec_decode_accepted_tokens / greedy.spec_decode_proposed_tokens
        # The same weights accept (nearly) every proposal; a one-layer draft of other weights few.
        assert rate > 0.9 if draft == "same" else rate < 0.5
        assert llm.engine.idle_invariants()["ok"]
    finally:
        llm.engine.shutdown()
