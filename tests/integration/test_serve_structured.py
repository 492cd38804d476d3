"""Structured output and tool calling through a real `fleetlm serve` and the official `openai`
client, with the embedded model: outputs validate (streamed and not, n > 1), tool calls round
trip (call, tool result back in, answer), bad schemas/regexes/grammars/tools are a 400 naming
the field at once, and the server stays healthy."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from serve_harness import MODEL, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ARGS = f"""\
      models:
        - model: {MODEL}
          device: cpu
          max_model_len: 512
          max_num_seqs: 8
          num_replicas: 1
          tool_call_parser: hermes
          enable_auto_tool_choice: true
      max_n: 4
"""
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}},
                                       "required": ["tz"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]


@pytest.fixture(scope="module")
def server():
    with running_server(ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def validate(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def collect(stream) -> tuple[dict[int, str], dict[int, str], dict[int, dict]]:
    """(text, finish_reason, tool calls by call index) per choice index of a streamed chat."""
    text, finish, calls = {}, {}, {}
    for chunk in stream:
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + (c.delta.content or "")
            for tc in c.delta.tool_calls or ():
                call = calls.setdefault(c.index, {}).setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                if tc.function is not None:
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    return text, finish, calls


def test_json_schema_chat_streamed_and_not_with_n(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], n=2,
              temperature=0.8, seed=3, max_tokens=120, response_format=fmt)
    whole = client.chat.completions.create(**kw)
    streamed_text, streamed_finish, _ = collect(client.chat.completions.create(stream=True, **kw))
    for choice in whole.choices:
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            validate(choice.message.content, PERSON)
        assert streamed_text[choice.index] == choice.message.content  # seeded: the same text either way
        assert streamed_finish[choice.index] == choice.finish_reason
    assert any(c.finish_reason == "stop" for c in whole.choices)


def test_completions_json_object_regex_choice_grammar(client):
    cases = [
        ({"extra_body": {"response_format": {"type": "json_object"}}}, lambda t: isinstance(json.loads(t), dict)),
        ({"extra_body": {"guided_regex": r"[0-9]{3}-[0-9]{4}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
        ({"extra_body": {"guided_choice": ["red", "green", "blue"]}}, lambda t: t in ("red", "green", "blue")),
        ({"extra_body": {"guided_grammar": 'root ::= "x=" [0-9]+ ";"'}}, lambda t: re.fullmatch(r"x=[0-9]+;", t)),
        ({"extra_body": {"guided_json": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}}},
         lambda t: all(isinstance(v, int) for v in json.loads(t))),
    ]
    for kw, ok in cases:
        out = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=48, temperature=0.7, seed=1,
                                        extra_body=kw["extra_body"])
        c = out.choices[0]
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            assert ok(c.text), (kw, c.text)


def test_named_tool_call_round_trip(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                           max_tokens=60, temperature=0)
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "stop" and msg.content is None
    (call,) = msg.tool_calls
    assert call.function.name == "get_weather" and call.id and call.type == "function"
    validate(call.function.arguments, WEATHER["function"]["parameters"])
    # The call and its result go back in; the model answers in text.
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "cloudy"})},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME],
                                            tool_choice="none", max_tokens=24, temperature=0)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    alone = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="none",
                                           max_tokens=1)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result are in the prompt
    # Streamed: the same call, its arguments in deltas.
    text, finish, calls = collect(client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named, max_tokens=60, temperature=0, stream=True))
    streamed = calls[0][0]
    assert (streamed["name"], streamed["arguments"]) == ("get_weather", call.function.arguments)
    assert text[0] == "" and finish[0] == "stop"


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_streamed_and_not(client, parallel):
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=parallel,
              max_tokens=120, temperature=0)
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    if not parallel:
        assert len(choice.message.tool_calls) == 1
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in choice.message.tool_calls:
        validate(call.function.arguments, params[call.function.name])
    _, finish, calls = collect(client.chat.completions.create(stream=True, **kw))
    got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls[0].items())]
    assert got == [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert finish[0] == "tool_calls"


def test_auto_tool_choice_answers_in_text_or_calls(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=80, temperature=0)
    c = out.choices[0]
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls"
        for call in c.message.tool_calls:
            assert call.function.name == "get_weather"
            json.loads(call.function.arguments)
    else:
        assert c.message.content is not None and c.finish_reason in ("stop", "length")


BAD = [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": 3}}}}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"not": {"type": "string"}}}}}, "response_format.json_schema.schema"),
    ("/v1/completions", {"guided_regex": "a(b"}, "guided_regex"),
    ("/v1/completions", {"guided_grammar": 'root ::= "a" |'}, "guided_grammar"),
    ("/v1/completions", {"guided_json": "{not json"}, "guided_json"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "guided_regex": "x"}, "tool_choice"),
]


@pytest.mark.parametrize("path,extra,param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_constraints_are_400_naming_the_field(server, path, extra, param):
    body = {"model": MODEL, "max_tokens": 4, **extra}
    body.update({"messages": ASK} if "chat" in path else {"prompt": "x"})
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
