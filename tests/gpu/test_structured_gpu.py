"""Structured output on one GPU: the bitmask kernel at full size, and guided decoding with CUDA
graphs and asynchronous scheduling on (masks of an ahead step built while its forward runs).

A tiny dummy Llama (``configs/models/tiny-llama-8h4kv.json``, byte-level vocabulary of 512) in
float32. Run on the device machine: ``pytest -m gpu tests/gpu/test_structured_gpu.py -s``
(needs xgrammar: ``bash benchmarks/gpu_wheels.sh`` here, carry ``.whl``, ``pip install --no-index --no-deps .whl/*.whl`` there).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from fleetlm import LLM, GuidedDecodingParams, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

xgr = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {
    "kind": {"enum": ["alpha", "beta", "gamma"]},
    "n": {"type": "integer", "minimum": 0, "maximum": 999},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["kind", "n", "tags", "ok"]}


def test_bitmask_kernel_full_size_is_exact():
    from fleetlm.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, vocab, dtype in ((256, 128256, torch.float32), (7, 152064, torch.bfloat16), (1, 32000, torch.float16)):
        logits = torch.randn(rows + 3, vocab, device="cuda", generator=gen).to(dtype)
        idx = torch.randperm(rows + 3, device="cuda", generator=gen)[:rows]
        bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, -(-vocab // 32)), device="cuda", generator=gen,
                                dtype=torch.int32)
        ref = logits.clone()
        apply_token_bitmask_ref(ref, idx, bitmask)
        apply_token_bitmask(logits, idx, bitmask)
        assert torch.equal(logits, ref), (rows, vocab, dtype)


@pytest.fixture(scope="module")
def llm():
    llm = LLM(model="tiny-llama-8h4kv", load_format="dummy", device="cuda", dtype="float32", max_model_len=512,
              max_num_seqs=16, num_kv_blocks=256)
    assert llm.engine.async_scheduling and llm.engine.workers.worker.runner.graphs is not None
    return llm


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(5, 60))] for _ in range(n)]


def _walks(llm, guided, token_ids) -> bool:
    compiled = llm.engine._structured().prepare(SamplingParams(guided_decoding=guided)).result(timeout=60)
    m = xgr.GrammarMatcher(compiled)
    return all(m.accept_token(t) for t in token_ids)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_guided_outputs_async_equal_sync_and_follow_the_grammar(llm, temperature):
    guided = GuidedDecodingParams(json=SCHEMA)
    free = SamplingParams(temperature=temperature, seed=3, max_tokens=40, ignore_eos=True)
    constrained = SamplingParams(temperature=temperature, seed=3, max_tokens=80, guided_decoding=guided)
    prompts = _prompts(12, seed=1)
    params = [constrained if i % 3 else free for i in range(len(prompts))]  # a mixed batch
    runs = {}
    for mode in (True, False):
        llm.engine.async_scheduling = mode
        llm.engine.scheduler.blocks.reset_prefix_cache()
        ahead = llm.engine.num_steps_ahead
        runs[mode] = llm.generate(prompts, params)
        assert (llm.engine.num_steps_ahead > ahead) == mode
        assert llm.engine.idle_invariants()["ok"]
    llm.engine.async_scheduling = True
    for a, s, p in zip(runs[True], runs[False], params):
        assert a.outputs[0].token_ids == s.outputs[0].token_ids
        if p.guided_decoding is not None:
            comp = a.outputs[0]
            assert _walks(llm, guided, comp.token_ids)
            if comp.finish_reason == "stop":
                json.loads(comp.text)
