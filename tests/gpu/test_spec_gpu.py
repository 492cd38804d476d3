"""Speculative decoding on one GPU: verify steps as decode rows under CUDA graphs, the draft's graphs.

A small Llama shape with dummy float32 weights and a 512-token vocabulary
(random continuations repeat short n-grams often, so prompt lookups with
``prompt_lookup_min`` 1 propose in most steps), CUDA graphs and asynchronous
scheduling on (the GPU defaults). Greedy outputs must equal those with
speculation switched off, at batch 1 and 16 (where requests with and
without proposals share verify steps: one decode row per token), for n-gram
proposals and for a draft model identical to the target.

Run on the device machine: ``pytest -m gpu tests/gpu/test_spec_gpu.py -s``.
"""

from __future__ import annotations

import random

import pytest
import torch

from fleetlm import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODEL = "tiny-llama-8h4kv"
PARAMS = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        base = [rng.randrange(3, 512) for _ in range(12 + i)]
        out.append(base + base[:8] if i % 2 else base)  # half repeat themselves
    return out


def _compare(llm: LLM, prompts) -> tuple[int, int]:
    eng = llm.engine
    eng.spec.enabled = False
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]
    ref1 = [llm.generate(p, PARAMS)[0].outputs[0].token_ids for p in prompts[:4]]
    eng.spec.enabled = True
    before = eng.stats()
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]
    got1 = [llm.generate(p, PARAMS)[0].outputs[0].token_ids for p in prompts[:4]]
    after = eng.stats()
    assert got == ref and got1 == ref1
    assert eng.idle_invariants()["ok"]
    return (after.spec_decode_proposed_tokens - before.spec_decode_proposed_tokens,
            after.spec_decode_accepted_tokens - before.spec_decode_accepted_tokens)


def test_ngram_verify_graphs_give_the_same_tokens():
    llm = LLM(model=MODEL, load_format="dummy", dtype="float32", max_model_len=512, max_num_seqs=32,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "prompt_lookup_max": 2, "min_acceptance_rate": 0.0})
    runner = llm.engine.workers.worker.runner
    # Verify steps of up to 32 requests x 4 tokens run the decode graphs: captured up to 128 rows.
    assert (128, 1) in runner.graphs.graphs and (136, 1) not in runner.graphs.graphs
    proposed, accepted = _compare(llm, _prompts(16))
    assert proposed > 100 and accepted > 0, (proposed, accepted)
    llm.engine.shutdown()


def test_draft_model_identical_to_the_target_accepts_nearly_all():
    llm = LLM(model=MODEL, load_format="dummy", dtype="float32", max_model_len=512, max_num_seqs=32,
              speculative_config={"model": MODEL, "num_speculative_tokens": 3, "min_acceptance_rate": 0.0})
    drafter = llm.engine.workers.worker.runner.drafter
    assert (1, 1) in drafter.graphs.graphs and (128, 1) in drafter.graphs.graphs
    proposed, accepted = _compare(llm, _prompts(16))
    assert proposed > 300 and accepted / proposed > 0.95, (proposed, accepted)
    llm.engine.shutdown()
