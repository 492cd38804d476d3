"""The engine against Hugging Face transformers, float32 on CPU: identical greedy tokens.

The reference runs the prompts through ``generate`` in left-padded batches of
similar lengths (one test checks it against one prompt at a time); the engine runs
them all in one continuously batched run with mixed lengths, then again under
prefix caching, a KV pool small enough to force preemption, tiny prefill
chunks and n=3 — each must give the same tokens. The shared engine and the
preemption case run with asynchronous scheduling forced on (the default on
GPU), the chunked-prefill case synchronously (the default on CPU).
"""

from __future__ import annotations

import pytest

from fleetlm import LLM, SamplingParams
from hf_reference import hf_greedy, hf_greedy_batch, hf_model_from_source

MAX_TOKENS = 64

RAW = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "import numpy as np\n\n# compute the mean of an array\n",
    "Q: What is 12 times 12?\nA:",
    "El perro come",
]
CHAT = [
    "What is the capital of Japan?",
    "Write a haiku about the ocean.",
    "Explain what a hash table is in one paragraph.",
    "List three fruits that are red.",
]
LONG_TEXT = (
    "The history of computing is a story of people building machines to help them think. "
    "Early mechanical calculators could add and subtract; later designs stored programs and data "
    "in the same memory, which made general purpose computers possible. "
) * 8


def _prompts(tok):
    prompts = [tok.encode(p, add_special_tokens=False) for p in RAW]
    for q in CHAT:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    long_ids = tok.encode(LONG_TEXT, add_special_tokens=False)
    assert len(long_ids) > 300
    prompts.append(long_ids + tok.encode(" In summary,", add_special_tokens=False))
    prompts.append(long_ids[:310])
    chat_long = tok.apply_chat_template(
        [{"role": "system", "content": LONG_TEXT}, {"role": "user", "content": "Summarize the text."}],
        add_generation_prompt=True,
        tokenize=True,
    )
    prompts.append(list(chat_long["input_ids"] if hasattr(chat_long, "keys") else chat_long))
    prompts.append(long_ids[:200] + tok.encode(" The next step was", add_special_tokens=False))
    assert len(prompts) == 16
    return prompts


@pytest.fixture(scope="module")
def llm(embedded_model):
    return LLM(model=embedded_model, async_scheduling=True)


@pytest.fixture(scope="module")
def prompts(llm):
    return _prompts(llm.get_tokenizer())


@pytest.fixture(scope="module")
def hf_model(llm):
    from fleetlm.workers.loader import resolve_model

    return hf_model_from_source(resolve_model(llm.engine.model_config.model))


@pytest.fixture(scope="module")
def reference(llm, prompts, hf_model):
    eos = list(llm.engine.model_config.eos_token_ids)
    return hf_greedy_batch(hf_model, prompts, MAX_TOKENS, eos)


def test_batched_reference_equals_one_prompt_at_a_time(llm, prompts, hf_model, reference):
    """The batched reference (the other tests' and other modules') against ``generate`` on one prompt
    alone, on the shortest and the longest prompt (a full check takes 50 s: ``hf_greedy_batch``)."""
    eos = list(llm.engine.model_config.eos_token_ids)
    for i in (min(range(len(prompts)), key=lambda i: len(prompts[i])), max(range(len(prompts)), key=lambda i: len(prompts[i]))):
        tokens, lps = hf_greedy(hf_model, prompts[i], MAX_TOKENS, eos)
        assert tokens == reference[i][0]
        assert max(abs(a - b) for a, b in zip(lps, reference[i][1])) < 1e-4


def _check(outputs, reference, prompts):
    assert len(outputs) == len(reference)
    for i, (out, (ref_tokens, _)) in enumerate(zip(outputs, reference)):
        got = out.outputs[0].token_ids
        assert got == ref_tokens, f"prompt {i} ({len(prompts[i])} tokens): first diff at {_first_diff(got, ref_tokens)}"


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1)


@pytest.fixture(scope="module")
def batch_outputs(llm, prompts):
    return llm.generate(prompts, GREEDY)


def test_greedy_matches_transformers_in_one_mixed_batch(llm, batch_outputs, prompts, reference):
    _check(batch_outputs, reference, prompts)
    assert llm.engine.async_scheduling and llm.engine.num_steps_ahead > 0
    assert any(len(p) > 300 for p in prompts) and any(len(p) < 10 for p in prompts)


def test_top1_logprobs_match_transformers(batch_outputs, reference):
    for out, (ref_tokens, ref_lps) in zip(batch_outputs, reference):
        comp = out.outputs[0]
        assert comp.token_ids == ref_tokens
        for step, (tok, ref_lp) in enumerate(zip(comp.token_ids, ref_lps)):
            entry = comp.logprobs[step]
            assert tok in entry and entry[tok].rank == 1
            assert abs(entry[tok].logprob - ref_lp) < 1e-4, (step, entry[tok].logprob, ref_lp)


def test_prefix_cache_reuses_blocks_and_keeps_tokens(llm, prompts, reference):
    stats0 = llm.engine.stats()
    outputs = llm.generate(prompts, GREEDY)  # second pass: prompts already cached
    _check(outputs, reference, prompts)
    stats1 = llm.engine.stats()
    hits = stats1.prefix_cache_hit_tokens - stats0.prefix_cache_hit_tokens
    assert hits > 0
    assert sum(o.num_cached_tokens for o in outputs) == hits


def test_preemption_keeps_tokens(embedded_model, prompts, reference):
    # 100 blocks of 16 tokens hold about half of the batch (~2,900 tokens of KV at the end).
    small = LLM(model=embedded_model, num_kv_blocks=100, max_num_seqs=16, async_scheduling=True)
    outputs = small.generate(prompts, GREEDY)
    assert small.engine.scheduler.num_preemptions > 0 and small.engine.num_steps_ahead > 0
    _check(outputs, reference, prompts)
    small.engine.scheduler.blocks.check_invariants()
    assert small.engine.stats().kv_cache_usage == 0.0


def test_small_prefill_chunks_keep_tokens(embedded_model, prompts, reference):
    # A 96-token step budget splits every long prompt (200-420 tokens) into
    # several chunks that share steps with other requests' decodes.
    chunked = LLM(model=embedded_model, max_num_batched_tokens=96, enable_prefix_caching=False)
    assert not chunked.engine.async_scheduling
    picked = [0, 4, 8, 12, 13, 14, 15]
    outputs = chunked.generate([prompts[i] for i in picked], GREEDY)
    _check(outputs, [reference[i] for i in picked], [prompts[i] for i in picked])


def test_n3_seeded_greedy_children_share_prompt_blocks(llm, prompts, reference):
    params = SamplingParams(n=3, temperature=0.0, seed=1234, max_tokens=MAX_TOKENS)
    llm.engine.scheduler.blocks.reset_prefix_cache()
    before = llm.engine.stats().prefix_cache_hit_tokens
    i = 9  # a chat prompt of a few full blocks
    assert len(prompts[i]) > 32
    outputs = llm.generate([prompts[i]], params)
    assert len(outputs[0].outputs) == 3
    for comp in outputs[0].outputs:
        assert comp.token_ids == reference[i][0]
    # child 0 misses (cache reset); children 1 and 2 reuse its full prompt blocks
    full = (len(prompts[i]) - 1) // 16 * 16
    assert llm.engine.stats().prefix_cache_hit_tokens - before == 2 * full


def _check_prompt_logprobs(outputs, hf_model, prompts, k):
    import torch

    for out, ids in zip(outputs, prompts):
        plp = out.prompt_logprobs
        assert plp is not None and len(plp) == len(ids) and plp[0] is None
        with torch.inference_mode():
            ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)
        for p in range(1, len(ids)):
            entry, row = plp[p], ref[p - 1]
            want = row[ids[p]].item()
            assert abs(entry[ids[p]].logprob - want) < 1e-4, (p, entry[ids[p]].logprob, want)
            assert entry[ids[p]].rank == int((row > row[ids[p]]).sum()) + 1
            top = row.topk(k).indices.tolist()
            assert {t for t, lp in entry.items() if lp.rank <= k} == set(top)


def test_prompt_logprobs_match_transformers_chunked_and_cached(llm, embedded_model, prompts, hf_model):
    """vLLM's prompt_logprobs: every prompt position's logprob (its own token's, plus the top k),
    through prefill chunks and with the prompt already in the prefix cache (which it must not skip)."""
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    picked = [prompts[i] for i in (0, 3, 12, 13)]
    first = llm.generate(picked, params)
    _check_prompt_logprobs(first, hf_model, picked, 3)
    again = llm.generate(picked, params)  # their blocks are cached now
    _check_prompt_logprobs(again, hf_model, picked, 3)
    chunked = LLM(model=embedded_model, max_num_batched_tokens=96, cpu_kv_cache_bytes=64 << 20)
    out = chunked.generate(picked[2:], params)  # 200-420 tokens: several chunks each
    _check_prompt_logprobs(out, hf_model, picked[2:], 3)
    assert llm.generate(picked[:1], SamplingParams(max_tokens=1))[0].prompt_logprobs is None
