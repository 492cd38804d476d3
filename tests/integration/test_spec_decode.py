"""Speculative decoding changes nothing in the output (embedded model, float32 CPU).

Greedy outputs with n-gram proposals and with a draft model are identical to
decoding without speculation, for many prompts, alone (batch 1) and together
(batch 16) in a KV pool small enough to force preemption, with prefix caching
on (the prompts share a prefix, and each run repeats earlier ones). The draft
model is the target itself (acceptance near 100%: the accept path) and a
perturbed copy of it (acceptance low: the reject path). The reference is the
first engine with speculation switched off; every engine reports the
proposed / accepted counts that show the intended path ran.
"""

from __future__ import annotations

import json

import pytest
import torch

from fleetlm import LLM, SamplingParams

PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, lit the great lamp, "
           "and wrote the weather in a leather book.")
CODE = "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n"
PROMPTS = [
    f"Copy the sentence.\nSentence: {PASSAGE}\nCopy: The lighthouse keeper",
    f"{CODE}    return 2 * (width + height)\n\n\n{CODE}",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    f"{PASSAGE} {PASSAGE[:60]}",
    "Q: What is 12 times 12?\nA:",
    "Write a short poem about the moon and the stars over a quiet lake at night.",
    "a b c a b c a b c a b",
    "The three primary colors are",
    f"Summary of the text below.\n{PASSAGE}\nSummary:",
    "def fibonacci(n):\n    ",
    "Monday, Tuesday, Wednesday,",
    f"Copy the sentence.\nSentence: {PASSAGE}\nCopy:",
    "<html>\n<body>\n<p>Hello</p>\n</body>\n</html>\n<html>\n<body>\n",
    "Translate to French: The cat sleeps on the warm windowsill.",
]
MAX = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX)
# 28 blocks of 16 tokens hold about six of these requests at once: batch 16 preempts.
KV = dict(num_kv_blocks=28, block_size=16)
COMMA, PERIOD = 28, 30  # ',' and '.' in this vocabulary
FEATURES = [
    SamplingParams(temperature=0.0, max_tokens=MAX, logprobs=2),
    SamplingParams(temperature=0.0, max_tokens=MAX, stop=["\n"]),
    SamplingParams(temperature=0.0, max_tokens=MAX, stop_token_ids=[PERIOD]),
    SamplingParams(temperature=0.0, max_tokens=MAX, stop_token_ids=[COMMA], min_tokens=5),
    SamplingParams(temperature=0.0, max_tokens=10, repetition_penalty=1.3, presence_penalty=0.2),
    SamplingParams(temperature=0.0, max_tokens=7, n=2),
    SamplingParams(temperature=0.0, max_tokens=1),
]
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=11, n=2, max_tokens=MAX, logprobs=1)


def _tokens(outputs):
    return [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in outputs]


def _runs(llm: LLM, features: bool = True) -> dict:
    """Batch 1 (each prompt alone, on an empty prefix cache), batch 16 (all at once), and one
    request per sampling feature."""
    eng = llm.engine
    eng.scheduler.blocks.reset_prefix_cache()
    pre = eng.scheduler.num_preemptions
    got = {"alone": [llm.generate(p, GREEDY)[0] for p in PROMPTS[:4]], "together": llm.generate(PROMPTS, GREEDY)}
    if features:
        got["features"] = llm.generate([PROMPTS[i] for i in range(len(FEATURES))], FEATURES)
    assert eng.idle_invariants()["ok"], eng.idle_invariants()
    got["preemptions"] = eng.scheduler.num_preemptions - pre
    return got


def _spec_counts(llm: LLM, before):
    s = llm.engine.stats()
    return (s.spec_decode_proposed_tokens - before.spec_decode_proposed_tokens,
            s.spec_decode_accepted_tokens - before.spec_decode_accepted_tokens)


def _same(got: dict, ref: dict) -> None:
    for key in ("alone", "together", "features"):
        if key in got:
            assert _tokens(got[key]) == _tokens(ref[key]), key
    # A verify step scores several positions in one pass: logprobs agree to float32 rounding.
    for x, y in zip(got.get("features", ref["features"])[0].outputs[0].logprobs, ref["features"][0].outputs[0].logprobs):
        assert x.keys() == y.keys()
        for t in x:
            assert x[t].rank == y[t].rank and x[t].logprob == pytest.approx(y[t].logprob, abs=1e-4)
    assert got["preemptions"] > 0


@pytest.fixture(scope="module")
def draft_llm(embedded_model):
    # Off above 6 running requests: batch 16 moves across the switch both ways, so the draft
    # falls behind (asynchronous steps without it) and catches up.
    llm = LLM(model=embedded_model, **KV, async_scheduling=True, speculative_config={
        "model": embedded_model, "num_speculative_tokens": 3, "min_acceptance_rate": 0.0,
        "disable_by_batch_size": 6})
    yield llm
    llm.engine.shutdown()


@pytest.fixture(scope="module")
def reference(draft_llm):
    draft_llm.engine.spec.enabled = False
    before = draft_llm.engine.stats()
    ref = _runs(draft_llm)
    ref["seeded"] = draft_llm.generate(PROMPTS[:3], SEEDED)
    assert _spec_counts(draft_llm, before) == (0, 0)
    draft_llm.engine.spec.enabled = True
    return ref


def test_draft_model_same_as_target_accepts_nearly_all(draft_llm, reference):
    before = draft_llm.engine.stats()
    got = _runs(draft_llm)
    _same(got, reference)
    proposed, accepted = _spec_counts(draft_llm, before)
    assert proposed > 100 and accepted / proposed > 0.9, (proposed, accepted)


def _resume(llm: LLM, ref, cut: int = 5):
    """A request migrated after ``cut`` tokens (resumed from its prior output) continues exactly."""
    eng = llm.engine
    prior = list(ref.outputs[0].token_ids[:cut])
    eng.add_group(eng.make_group("resumed", ref.prompt_token_ids, GREEDY, prior_output_token_ids=prior))
    done = None
    while done is None:
        done = next((o for o in eng.step() if o.finished and o.request_id == "resumed"), None)
    return prior + list(done.outputs[0].token_ids)


def test_migrated_requests_resume_exactly(draft_llm, ngram_llm, reference):
    ref = reference["alone"][0]
    assert _resume(draft_llm, ref) == list(ref.outputs[0].token_ids)
    assert _resume(ngram_llm, ref) == list(ref.outputs[0].token_ids)


def test_draft_model_seeded_sampling_is_reproducible(draft_llm):
    first = draft_llm.generate(PROMPTS[:3], SEEDED)
    second = draft_llm.generate(PROMPTS[:3], SEEDED)
    assert _tokens(first) == _tokens(second)
    assert first[0].outputs[0].token_ids != first[0].outputs[1].token_ids  # n=2 children differ


@pytest.fixture(scope="module")
def ngram_llm(embedded_model):
    # Asynchronous scheduling on: steps without a likely proposal run ahead as usual.
    llm = LLM(model=embedded_model, **KV, async_scheduling=True, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
        "min_acceptance_rate": 0.0})
    yield llm
    llm.engine.shutdown()


def test_ngram_greedy_identical(ngram_llm, reference):
    before = ngram_llm.engine.stats()
    ahead = ngram_llm.engine.num_steps_ahead
    got = _runs(ngram_llm)
    _same(got, reference)
    proposed, accepted = _spec_counts(ngram_llm, before)
    assert proposed > 50 and accepted > 25, (proposed, accepted)
    assert ngram_llm.engine.num_steps_ahead > ahead  # steps without proposals still went ahead


def test_ngram_seeded_sampling_equals_no_speculation(ngram_llm, reference):
    # Deterministic proposals are verified by sampling each position as without
    # speculation: seeded outputs are the same token for token.
    before = ngram_llm.engine.stats()
    got = ngram_llm.generate(PROMPTS[:3], SEEDED)
    assert _tokens(got) == _tokens(reference["seeded"])
    assert _spec_counts(ngram_llm, before)[0] > 0


@pytest.fixture(scope="module")
def perturbed_draft(embedded_model, tmp_path_factory):
    """A perturbed copy of the embedded model (Gaussian noise of 0.25 x each matrix's spread),
    written as a Hugging Face safetensors directory: it proposes mostly wrong tokens."""
    from safetensors.torch import save_file

    from fleetlm.workers.loader import iter_weights, resolve_model

    source = resolve_model(embedded_model, "auto")
    out = tmp_path_factory.mktemp("perturbed-draft")
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, lazy in iter_weights(source, device=torch.device("cpu"), dtype=torch.float32):
        w = lazy.load()
        if w.dim() == 2 and "embed" not in name:
            w = w + torch.randn(w.shape, generator=gen) * w.std() * 0.25
        state[name] = w.to(torch.float16).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(source.hf_config))
    return str(out)


def test_draft_model_perturbed_copy_rejects_most(reference, perturbed_draft, embedded_model):
    llm = LLM(model=embedded_model, **KV, speculative_config={
        "model": perturbed_draft, "num_speculative_tokens": 2, "min_acceptance_rate": 0.0})
    try:
        before = llm.engine.stats()
        got = _runs(llm, features=False)
        _same(got, reference)
        proposed, accepted = _spec_counts(llm, before)
        assert proposed > 150 and 0.02 < accepted / proposed < 0.4, (proposed, accepted)
    finally:
        llm.engine.shutdown()


def test_draft_model_with_an_fp8_kv_cache(embedded_model):
    """kv_cache_dtype="fp8" holds the draft's K/V as it holds the target's: E4M3 blocks with each
    draft layer's own power-of-two scales (bounded from the draft's weights), a block's bytes
    counted for both models. The draft here is the target itself: its scales equal the target's
    and nearly every proposal is accepted. Tokens are the FP8 engine's own without speculation,
    up to a near-tie (a verify step's shape moves E4M3's last bits: test_kv_cache_fp8.py)."""
    from test_kv_cache_fp8 import GREEDY_LP, _same_or_near_tie
    from test_kv_cache_fp8 import PROMPTS as FP8_PROMPTS

    llm = LLM(model=embedded_model, kv_cache_dtype="fp8", cpu_kv_cache_bytes=64 << 20, speculative_config={
        "model": embedded_model, "num_speculative_tokens": 3, "min_acceptance_rate": 0.0})
    try:
        runner = llm.engine.workers.worker.runner
        target, draft = runner.kv_caches, runner.drafter.kv_caches
        assert len(draft) == len(target) > 0
        for t, d in zip(target, draft):
            assert d.k.dtype == d.v.dtype == torch.float8_e4m3fn and d.k.shape == t.k.shape == d.v.shape
            assert torch.equal(d.k_scale, t.k_scale) and torch.equal(d.v_scale, t.v_scale)
        assert runner.kv_bytes_per_block() == 2 * runner.drafter.kv_bytes_per_block()
        kv_heads, head_dim = d.k.shape[2:]
        assert runner.drafter.kv_bytes_per_block() == 2 * len(draft) * runner.block_size * kv_heads * head_dim
        llm.engine.spec.enabled = False
        ref = [o.outputs[0] for o in llm.generate(FP8_PROMPTS, GREEDY_LP)]
        llm.engine.spec.enabled = True
        before = llm.engine.stats()
        got = [o.outputs[0] for o in llm.generate(FP8_PROMPTS, GREEDY_LP)]
        _same_or_near_tie(ref, got)
        proposed, accepted = _spec_counts(llm, before)
        assert proposed > 50 and accepted / proposed > 0.8, (proposed, accepted)
        assert llm.engine.idle_invariants()["ok"]
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def adapters(embedded_model, tmp_path_factory):
    from hf_reference import hf_model_from_source
    from lora_adapters import RECIPES, make_peft_model

    from fleetlm import LoRARequest
    from fleetlm.workers.loader import resolve_model

    _, paths = make_peft_model(hf_model_from_source(resolve_model(embedded_model)), RECIPES[:2],
                               tmp_path_factory.mktemp("spec-adapters"))
    return [None] + [LoRARequest(r.name, i + 1, paths[r.name]) for i, r in enumerate(RECIPES[:2])]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_lora_requests_keep_their_adapters_tokens(embedded_model, adapters, method):
    """Base and adapter requests mixed in one batch: the same greedy tokens with speculation as
    without, in both verify layouts (one row per request; the GPU's one row per token, whose
    LoRA tile table maps each verified token to its request's adapter). The draft model runs
    without the adapter (its proposals are only proposals)."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3} \
        if method == "ngram" else {"model": embedded_model, "num_speculative_tokens": 3}
    llm = LLM(model=embedded_model, enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=2,
              speculative_config={**spec, "min_acceptance_rate": 0.0})
    try:
        cases = [(p, lora) for p in PROMPTS[:4] for lora in adapters]
        runner = llm.engine.workers.worker.runner

        def run():
            return [o.outputs[0].token_ids for o in llm.generate([p for p, _ in cases], GREEDY,
                                                                  lora_request=[lora for _, lora in cases])]
        llm.engine.spec.enabled = False
        ref = run()
        n = len(adapters)  # the adapters change tokens against the base model's
        assert any(ref[i] != ref[i - i % n] for i in range(len(ref)))
        llm.engine.spec.enabled = True
        for per_token in (False, True):
            runner.verify_as_decode = per_token
            before = llm.engine.stats()
            assert run() == ref, per_token
            proposed, accepted = _spec_counts(llm, before)
            assert proposed > 30 and accepted > 10, (per_token, proposed, accepted)
    finally:
        llm.engine.shutdown()


def test_gguf_kept_quantized_keeps_its_tokens(embedded_model):
    """The embedded GGUF kept quantized (Q4_1 blocks read by the int4 GGUF path, as the GPU runs
    it by default) with n-gram speculation: the same greedy tokens as without, in both verify
    layouts."""
    llm = LLM(model=embedded_model, quantization="gguf", **KV, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
        "min_acceptance_rate": 0.0})
    try:
        assert llm.engine.config.model.quantization == "gguf"
        runner = llm.engine.workers.worker.runner
        llm.engine.spec.enabled = False
        ref = _tokens(llm.generate(PROMPTS[:8], GREEDY))
        llm.engine.spec.enabled = True
        for per_token in (False, True):
            runner.verify_as_decode = per_token
            before = llm.engine.stats()
            assert _tokens(llm.generate(PROMPTS[:8], GREEDY)) == ref, per_token
            proposed, accepted = _spec_counts(llm, before)
            assert proposed > 30 and accepted > 15, (per_token, proposed, accepted)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_verify_steps_as_decode_rows_give_the_same_tokens(method):
    """The GPU's layout of a verify step (one attention row per token, ``verify_as_decode``) on
    the CPU: the same tokens and acceptance as one row per request."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2} \
        if method == "ngram" else {"model": "tiny-llama-8h4kv", "num_speculative_tokens": 3}
    llm = LLM(model="tiny-llama-8h4kv", load_format="dummy", max_model_len=256,
              speculative_config={**spec, "min_acceptance_rate": 0.0})
    runner = llm.engine.workers.worker.runner
    prompts = [[(7 * i + j) % 500 + 3 for j in range(10 + i)] * 2 for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = []
    for per_token in (False, True):
        runner.verify_as_decode = per_token
        before = llm.engine.stats()
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        s = llm.engine.stats()
        results.append((outs, s.spec_decode_proposed_tokens - before.spec_decode_proposed_tokens,
                        s.spec_decode_accepted_tokens - before.spec_decode_accepted_tokens))
    assert results[0] == results[1] and results[0][1] > 50
    llm.engine.shutdown()


def test_cpu_benchmark_smoke(tmp_path):
    """benchmarks/spec_decode.py on the CPU (the figures in benchmarks/RESULTS.md come from a longer run):
    it writes its record, n-gram proposals on the copy-heavy prompts are mostly accepted, and the
    outputs are the same with and without speculation."""
    import json

    from fleetlm.benchmarks import spec_decode

    assert spec_decode.main(["--device", "cpu", "--parts", "copy", "--num-prompts", "1", "--max-tokens", "32",
                             "--budget-s", "20", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("spec-decode-*.json")
    copy = json.loads(path.read_text())["figures"]["copy"]
    assert copy["greedy_outputs_identical"] is True
    assert copy["acceptance_rate"] > 0.5 and copy["mean_accepted_length"] > 2.5, copy
    assert copy["decode_tokens_per_s_on"] > 0 and copy["decode_tokens_per_s_off"] > 0
