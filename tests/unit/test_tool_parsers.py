"""Tool-call parsers: whole outputs and streams give the same calls and content, in any chunking."""

import json
import random

import pytest

from fleetlm.cluster.tool_parsers import HermesParser, Llama3JsonParser, get_tool_parser


def calls_of(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def streamed(parser, text, seed=0):
    """Feed ``text`` in random chunks; return (content, calls)."""
    rng = random.Random(seed)
    s, content, calls, i = parser.stream(), [], [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        c, k = s.feed(text[i:i + n])
        content.append(c)
        calls += k
        i += n
    c, k = s.finish()
    return "".join(content) + c, calls + k


HERMES = [
    ("The answer is 4.", "The answer is 4.", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris", "unit": "c"})]),
    ('Let me check.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
     '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>',
     "Let me check.", [("a", {}), ("b", {"x": 1})]),
    ('<tool_call>{"name": "a", "arguments": {"q": "<tool_call>"}}</tool_call>', None, [("a", {"q": "<tool_call>"})]),
    ('<tool_call>{"name": "late", "arguments": {"k": [1, 2]}}', None, [("late", {"k": [1, 2]})]),  # never closed
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ("a < b and <tool but no call", "a < b and <tool but no call", []),
]


@pytest.mark.parametrize("text,content,calls", HERMES)
def test_hermes(text, content, calls):
    p = HermesParser()
    got_content, got_calls = p.parse(text)
    assert got_content == content and calls_of(got_calls) == calls
    for seed in range(5):
        s_content, s_calls = streamed(p, text, seed)
        assert calls_of(s_calls) == calls
        if calls:
            assert s_content.strip() == (content or "")
        else:
            assert s_content == text


LLAMA = [
    ("Paris is the capital.", "Paris is the capital.", []),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": {"n": 2}}', None,
     [("f", {}), ("g", {"n": 2})]),
    ('  {"name": "f", "parameters": {"s": "a;b"}}  ', None, [("f", {"s": "a;b"})]),
    ('{"name": "f", "parameters": {}} and then some words', '{"name": "f", "parameters": {}} and then some words', []),
    ('{"not": "a call"}', '{"not": "a call"}', []),
    ("{broken", "{broken", []),
]


@pytest.mark.parametrize("text,content,calls", LLAMA)
def test_llama3_json(text, content, calls):
    p = Llama3JsonParser()
    got_content, got_calls = p.parse(text)
    assert got_content == content and calls_of(got_calls) == calls
    for seed in range(5):
        s_content, s_calls = streamed(p, text, seed)
        assert calls_of(s_calls) == calls
        assert s_content == ("" if calls else text)


def test_plain_text_streams_without_waiting():
    s = HermesParser().stream()
    assert s.feed("Hello, wor") == ("Hello, wor", [])
    assert s.feed("ld <tool") == ("ld ", [])  # only a possible tag is held back
    assert s.feed("s are fun") == ("<tools are fun", [])
    s = Llama3JsonParser().stream()
    assert s.feed("  ") == ("", []) and s.feed("Sure") == ("  Sure", []) and s.feed("!") == ("!", [])


def test_ids_are_unique_and_parsers_are_named():
    _, calls = HermesParser().parse('<tool_call>{"name": "a", "arguments": {}}</tool_call>' * 2)
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    assert calls[0].to_openai(0) == {"index": 0, "id": calls[0].id, "type": "function",
                                     "function": {"name": "a", "arguments": "{}"}}
    assert isinstance(get_tool_parser("hermes"), HermesParser)
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        get_tool_parser("mistral")


def test_the_serve_config_knows_every_parser():
    from fleetlm.cluster.serve_config import TOOL_CALL_PARSERS
    from fleetlm.cluster.tool_parsers import PARSERS

    assert set(TOOL_CALL_PARSERS) == set(PARSERS)
