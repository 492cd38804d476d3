"""Engine behaviours beyond greedy parity: resumption, seeds, stops, bad input, invariants."""

from __future__ import annotations

import pytest

from fleetlm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(embedded_model):
    return LLM(model=embedded_model, cpu_kv_cache_bytes=256 << 20)


PROMPT = "Write a short story about a robot who learns to paint."


def _tokens(llm, params, **kw):
    return llm.generate([PROMPT], params, **kw)[0].outputs[0].token_ids


def _resume(llm, params, prior):
    """Resume from prior output tokens, as the ingress does when a replica dies."""
    engine = llm.engine
    ids = engine.tokenize(PROMPT)[1]
    engine.add_group(engine.make_group("resume", ids, params, prior_output_token_ids=prior))
    while True:
        for out in engine.step():
            if out.finished:
                return out.outputs[0].token_ids


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, frequency_penalty=0.5, presence_penalty=0.3, max_tokens=24, ignore_eos=True),
    ],
    ids=["greedy", "seeded", "seeded-penalties"],
)
def test_resumed_request_continues_the_same_tokens(llm, params):
    full = _tokens(llm, params)
    assert len(full) == 24
    assert _resume(llm, params, full[:10]) == full[10:]
    assert llm.engine.idle_invariants()["ok"]


def test_seed_is_independent_of_batch_composition(llm):
    p = SamplingParams(temperature=1.0, seed=11, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], p)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = llm.generate(["Hello there", PROMPT, "1 2 3"], [others, p, others])
    assert mixed[1].outputs[0].token_ids == alone


def test_stop_string_is_not_emitted(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    text = llm.generate([PROMPT], greedy)[0].outputs[0].text
    words = text.split()
    assert len(words) > 4
    stop = words[3]
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert stop not in comp.text and text.startswith(comp.text)


def test_max_tokens_and_min_tokens(llm):
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    eos = llm.engine.model_config.eos_token_ids[0]
    # Greedy on this raw prompt ends at once with EOS; min_tokens bans EOS (and stop
    # token ids) until 8 tokens exist.
    out = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=8, stop_token_ids=[eos]))[0]
    assert len(out.outputs[0].token_ids) >= 8


@pytest.mark.parametrize(
    "prompt, kwargs, param",
    [
        ("", {}, "prompt"),
        ([10**7], {}, "vocabulary"),
        ([-1], {}, "vocabulary"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"max_tokens": -3}, "max_tokens"),
        ("hi", {"temperature": -0.5}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"top_k": 0.5}, "top_k"),
        ("hi", {"n": 0}, "n"),
        ("hi", {"n": 1000}, "n"),
    ],
)
def test_bad_input_is_a_clear_value_error(llm, prompt, kwargs, param):
    with pytest.raises(ValueError, match=param):
        llm.generate([prompt], SamplingParams(**kwargs) if kwargs else SamplingParams())
    assert llm.engine.idle_invariants()["ok"]


def test_prompt_longer_than_max_model_len_is_rejected(embedded_model):
    small = LLM(model=embedded_model, max_model_len=64, cpu_kv_cache_bytes=64 << 20)
    with pytest.raises(ValueError, match="max_model_len"):
        small.generate([list(range(100, 165))], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_model_len"):
        small.generate([list(range(100, 150))], SamplingParams(max_tokens=20))
    out = small.generate([list(range(100, 150))], SamplingParams(max_tokens=14, temperature=0))
    assert len(out[0].outputs[0].token_ids) <= 14
    assert small.engine.idle_invariants()["ok"]


def test_abort_returns_every_block(llm):
    engine = llm.engine
    engine.add_request("to-abort", PROMPT, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().kv_cache_usage > 0
    out = engine.abort_request("to-abort")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.idle_invariants()["ok"]


def test_a_failed_step_stops_the_engine(embedded_model):
    # Progress moves at schedule time; after a step raised, scheduling on would
    # build on work that never ran. Every later step must raise instead.
    small = LLM(model=embedded_model, max_model_len=128, cpu_kv_cache_bytes=64 << 20)
    engine = small.engine
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    real_launch = engine.workers.launch

    def broken(*a, **kw):
        raise OSError("device lost")

    engine.workers.launch = broken
    with pytest.raises(OSError, match="device lost"):
        engine.step()
    engine.workers.launch = real_launch
    with pytest.raises(RuntimeError, match="an earlier step failed.*device lost"):
        engine.step()


def test_chat_template_and_tokenizer_overrides(embedded_model, tmp_path):
    # vLLM's --chat-template (a file or the template itself) replaces the model's own.
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    llm = LLM(model=embedded_model, max_model_len=128, cpu_kv_cache_bytes=32 << 20, chat_template=str(template))
    tok = llm.get_tokenizer()
    ids = llm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<<hi>>"
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=2))[0]
    assert out.prompt_token_ids == ids
    # --tokenizer: another tokenizer directory (here the embedded one, saved).
    tok.save_pretrained(tmp_path / "tok")
    other = LLM(model=embedded_model, max_model_len=128, cpu_kv_cache_bytes=32 << 20, tokenizer=str(tmp_path / "tok"))
    assert other.get_tokenizer().encode("hello world") == tok.encode("hello world")


def _with_proposals(llm, params, propose, k=3):
    """Generate with ``propose(output so far)`` setting each step's proposals, as a proposer will."""
    engine = llm.engine
    engine.add_request("spec", PROMPT, params)
    steps, done = 0, None
    while done is None:
        for req in engine.scheduler.running:
            if not req.num_pending_tokens and req.num_output_tokens:
                req.spec_token_ids = propose(list(req.output_token_ids))[:k]
        for out in engine.step():
            if out.finished:
                done = out.outputs[0]
        steps += 1
    assert engine.idle_invariants()["ok"], engine.idle_invariants()
    return done, steps


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, frequency_penalty=0.5, presence_penalty=0.3, max_tokens=24,
                       ignore_eos=True),
    ],
    ids=["greedy-logprobs", "seeded", "seeded-penalties"],
)
def test_verified_proposals_change_no_token(llm, params):
    """The multi-token step contract through the real runner: proposals that are right,
    wrong, or right then wrong leave the tokens (and logprobs) as without them."""
    ref = llm.generate([PROMPT], params)[0].outputs[0]
    right = lambda out: list(ref.token_ids[len(out):])  # noqa: E731
    wrong = lambda out: [1, 1, 1]  # noqa: E731
    half = lambda out: list(ref.token_ids[len(out):len(out) + 1]) + [1, 1]  # noqa: E731
    results = {}
    for name, propose in (("right", right), ("wrong", wrong), ("half", half)):
        out, steps = _with_proposals(llm, params, propose)
        assert out.token_ids == ref.token_ids, name
        assert out.text == ref.text, name
        if params.logprobs is not None:
            for got, want in zip(out.logprobs, ref.logprobs):
                assert got.keys() == want.keys()
                assert all(abs(got[t].logprob - want[t].logprob) < 1e-4 for t in got)
        results[name] = steps
    # Right proposals save steps (4 tokens a step); wrong ones cost none.
    assert results["right"] < results["half"] < results["wrong"] <= 25


def test_a_stop_string_inside_accepted_tokens_cuts_there(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = llm.generate([PROMPT], params)[0].outputs[0]
    stop = ref.text[len(ref.text) // 2:][:3]  # text somewhere in the middle
    cut = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    out, _ = _with_proposals(llm, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]),
                             lambda o: list(ref.token_ids[len(o):]), k=6)
    assert (out.text, out.token_ids, out.finish_reason, out.stop_reason) == (
        cut.outputs[0].text, cut.outputs[0].token_ids, "stop", stop)
