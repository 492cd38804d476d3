"""Structured output end to end on the CPU with the embedded model (no Ray): every output that
ends validates (jsonschema, the regex, the choices, the grammar), streamed or not is the serving
side's test; here n > 1, stop strings, max_tokens, async scheduling, preemption, the prefix cache,
migration, verified proposals and a grammar that compiles slowly while others run."""

from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest
from xgrammar.testing import _is_grammar_accept_string as grammar_accepts

from fleetlm import LLM, GuidedDecodingParams, SamplingParams
from fleetlm.engine.grammars import InvalidGuidedDecoding, build_grammar

ORDER = json.loads(open(__file__.rsplit("/tests/", 1)[0] + "/benchmarks/schemas/order.json").read())

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}},
        "required": ["name", "age", "address"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
              "minItems": 1, "maxItems": 4},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"enum": ["S", "M", "L"]}}, "required": ["color", "size"]},
    "anyOf": {"type": "object", "properties": {"value": {"anyOf": [
        {"type": "integer"}, {"type": "string", "maxLength": 10}, {"type": "null"}]}}, "required": ["value"]},
    "formats": {"type": "object", "properties": {"email": {"type": "string", "format": "email"},
                                                 "day": {"type": "string", "format": "date"},
                                                 "id": {"type": "string", "format": "uuid"}},
                "required": ["email", "day", "id"]},
    "refs": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                              "required": ["x", "y"]}},
             "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
             "required": ["a", "b"]},
    "scalars": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                 "score": {"type": "number", "minimum": 0, "maximum": 1}},
                "required": ["ok", "score"]},
    "order": ORDER,
}
REGEXES = [r"\d{3}-\d{4}", r"(yes|no)", r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8})?", r"#[0-9a-f]{6}"]
CHOICES = [["Paris", "London", "Rome"], ["positive", "negative", "neutral"]]
EBNF = 'root ::= num (" " op " " num)?\nnum ::= [1-9] [0-9]? [0-9]?\nop ::= "+" | "-"'


def chat(llm, text):
    return llm.apply_chat_template([{"role": "user", "content": text}])


def check(guided: GuidedDecodingParams, text: str) -> None:
    """Raises unless ``text`` is a sentence of the guided request's language."""
    if guided.json is not None or guided.json_object:
        value = json.loads(text)
        schema = guided.json if guided.json is not None else {"type": "object"}
        jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    elif guided.regex is not None:
        assert re.fullmatch(guided.regex, text), (guided.regex, text)
    elif guided.choice is not None:
        assert text in guided.choice, text
    else:
        assert grammar_accepts(build_grammar(guided)[1], text), text


def cases():
    for name, schema in SCHEMAS.items():
        yield f"Reply with a JSON value for {name}.", GuidedDecodingParams(
            json=schema, disable_any_whitespace=name in ("nested", "order", "formats"))
    for rx in REGEXES:
        yield f"Answer in the format {rx}.", GuidedDecodingParams(regex=rx)
    for ch in CHOICES:
        yield f"Pick one of {', '.join(ch)}.", GuidedDecodingParams(choice=ch)
    yield "Write a small sum.", GuidedDecodingParams(grammar=EBNF)
    yield "Give me any JSON object.", GuidedDecodingParams(json_object=True, disable_any_whitespace=True)


@pytest.fixture(scope="module")
def llm(embedded_model):
    return LLM(model=embedded_model, async_scheduling=True, cpu_kv_cache_bytes=256 << 20)


def run_all(llm, **kw):
    prompts, params = [], []
    for prompt, guided in cases():
        prompts.append(chat(llm, prompt))
        params.append(SamplingParams(guided_decoding=guided, **kw))
    return llm.generate(prompts, params), params


def test_every_output_validates_with_n_and_sampling(llm):
    outs, params = run_all(llm, n=2, temperature=0.8, seed=5, max_tokens=160)
    finished = 0
    for out, p in zip(outs, params):
        assert len(out.outputs) == 2
        for comp in out.outputs:
            if comp.finish_reason == "stop":
                check(p.guided_decoding, comp.text)
                finished += 1
            else:  # cut short: it says so
                assert comp.finish_reason == "length" and len(comp.token_ids) == 160
    assert finished >= 0.8 * 2 * len(outs), f"only {finished} of {2 * len(outs)} outputs ended"
    assert llm.engine.idle_invariants()["ok"]


def test_greedy_async_equals_sync_and_a_prefix_cache_hit(llm):
    # An ahead step's masks come after its launch: they must be exactly the synchronous ones.
    asynch, params = run_all(llm, temperature=0, max_tokens=96)
    assert llm.engine.num_steps_ahead > 0
    llm.engine.async_scheduling = False
    try:
        sync, _ = run_all(llm, temperature=0, max_tokens=96)
    finally:
        llm.engine.async_scheduling = True
    for a, s, p in zip(asynch, sync, params):
        assert a.outputs[0].token_ids == s.outputs[0].token_ids
        assert s.num_cached_tokens > 0  # the same prompts again: prefix-cache hits
        if a.outputs[0].finish_reason == "stop":
            check(p.guided_decoding, a.outputs[0].text)


def test_stop_strings_and_max_tokens(llm):
    guided = GuidedDecodingParams(json=SCHEMAS["enums"], disable_any_whitespace=True)
    prompt = chat(llm, "Reply with a JSON value for enums.")
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64, guided_decoding=guided))[0].outputs[0]
    assert full.finish_reason == "stop"
    check(guided, full.text)
    # Stop strings the output never contains change nothing.
    same = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64, guided_decoding=guided,
                                                 stop=["###", "\n\n"]))[0].outputs[0]
    assert same.text == full.text and same.finish_reason == "stop" and same.stop_reason is None
    # One it contains cuts it there, and says so.
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=64, guided_decoding=guided,
                                                stop=['"size"']))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == '"size"'
    assert full.text.startswith(cut.text) and '"size"' not in cut.text
    # max_tokens cuts a document short: finish_reason says length.
    short = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, guided_decoding=guided))[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 4 and full.text.startswith(short.text)


def test_ignore_eos_and_min_tokens_still_end_with_the_grammar(llm):
    guided = GuidedDecodingParams(choice=["yes", "no"])
    prompt = chat(llm, "Yes or no?")
    for kw in ({"ignore_eos": True}, {"min_tokens": 10}):
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, guided_decoding=guided, **kw))[0]
        assert out.outputs[0].text in ("yes", "no") and out.outputs[0].finish_reason == "stop", kw


def test_migrated_request_resumes_under_its_grammar(llm):
    guided = GuidedDecodingParams(json=SCHEMAS["nested"], disable_any_whitespace=True)
    params = SamplingParams(temperature=0, max_tokens=80, guided_decoding=guided)
    prompt = chat(llm, "Reply with a JSON value for nested.")
    full = llm.generate([prompt], params)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_group(engine.make_group("resume", prompt, params, prior_output_token_ids=full[:7]))
    done = None
    while done is None:
        done = next((o for o in engine.step() if o.finished), None)
    assert done.outputs[0].token_ids == full[7:]


def test_bad_grammar_is_refused_before_any_compute(llm):
    steps = llm.engine.num_steps
    for guided in (GuidedDecodingParams(json={"type": "object", "properties": {"a": {"not": {}}}}),
                   GuidedDecodingParams(regex="a(b"), GuidedDecodingParams(grammar='root ::= "x" |')):
        with pytest.raises(InvalidGuidedDecoding):
            llm.generate(["hi", "there"], [SamplingParams(max_tokens=4), SamplingParams(guided_decoding=guided)])
    assert llm.engine.num_steps == steps and not llm.engine.has_unfinished_requests()


def test_a_compiling_grammar_does_not_hold_up_other_requests(llm):
    engine = llm.engine
    slow = GuidedDecodingParams(regex=r"[0-9]{2}slow")
    structured = engine._structured()
    real_compile, free_done = structured._compile, threading.Event()
    # This grammar's compile lasts until the free request has finished (60 s at most).
    structured._compile = lambda g: (free_done.wait(60), real_compile(g))[1]
    try:
        engine.add_request("slow", chat(llm, "Digits"), SamplingParams(max_tokens=8, guided_decoding=slow))
        engine.add_request("free", chat(llm, "Hello"), SamplingParams(max_tokens=4, ignore_eos=True))
        t0, finished = time.monotonic(), {}
        while len(finished) < 2 and time.monotonic() - t0 < 300:
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = (out, len(engine._parked), time.monotonic() - t0)
                    free_done.set()
    finally:
        structured._compile = real_compile
        free_done.set()
    assert finished["free"][1] == 1  # it ended while the other's grammar was still compiling
    assert finished["free"][2] < 60 and finished["slow"][2] >= finished["free"][2]
    check(slow, finished["slow"][0].outputs[0].text)


def test_verified_proposals_follow_the_grammar(llm):
    """Proposals (speculative decoding's hook): each is verified under the grammar's mask, so
    greedy output is unchanged whatever is proposed, and proposals the grammar forbids are rejected."""
    guided = GuidedDecodingParams(json=SCHEMAS["scalars"], disable_any_whitespace=True)
    params = SamplingParams(temperature=0, max_tokens=48, guided_decoding=guided)
    prompt = chat(llm, "Reply with a JSON value for scalars.")
    engine = llm.engine
    engine.async_scheduling = False
    try:
        reference = llm.generate([prompt], params)[0].outputs[0].token_ids
        bad = llm.get_tokenizer().encode("zzz", add_special_tokens=False)[0]  # never valid in this JSON
        scheduler, real = engine.scheduler, engine.scheduler.schedule
        proposed = {"right": 0, "bad": 0}

        def schedule_with_proposals(*a, **kw):
            for req in scheduler.running:
                if req.grammar is not None and not req.num_pending_tokens:
                    n = req.num_output_tokens
                    # Two right tokens then a forbidden one, every other step; else a forbidden one first.
                    req.spec_token_ids = (reference[n:n + 2] + [bad]) if n % 2 == 0 else [bad] + reference[n:n + 1]
                    proposed["right"] += len(reference[n:n + 2]) if n % 2 == 0 else 0
                    proposed["bad"] += 1
            return real(*a, **kw)

        scheduler.schedule = schedule_with_proposals
        try:
            out = llm.generate([prompt], params)[0].outputs[0]
        finally:
            scheduler.schedule = real
    finally:
        engine.async_scheduling = True
    assert out.token_ids == reference
    assert proposed["bad"] > 0 and proposed["right"] > 0
    check(guided, out.text)


def test_preemption_keeps_guided_outputs(embedded_model, llm):
    reference, params = run_all(llm, temperature=0, max_tokens=64)
    small = LLM(model=embedded_model, num_kv_blocks=24, max_num_seqs=8, async_scheduling=True)
    try:
        outs, _ = run_all(small, temperature=0, max_tokens=64)
        assert small.engine.stats().num_preemptions > 0
    finally:
        small.engine.shutdown()
    for a, b in zip(outs, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
