"""Tool calling's request side: checks (400s naming the field), the grammar for required and named
choices, prompt rendering for templates with and without tool support, reading outputs back."""

import json

import pytest
from xgrammar.testing import _is_grammar_accept_string as accepts

from fleetlm.cluster.tool_calling import ToolError, check_tools, render_messages, template_knows_tools
from fleetlm.cluster.tool_parsers import HermesParser
from fleetlm.engine.grammars import build_grammar

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}


def check(tools=(WEATHER, TIME), choice=None, parallel=None, auto=True, parser="hermes"):
    return check_tools(list(tools) if tools is not None else None, choice, parallel, auto, parser)


@pytest.mark.parametrize("kw,param,match", [
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name", "needs a name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "two tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools[0].function.parameters", "invalid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
     "tools[0].function.parameters", "unsupported JSON schema keyword 'not'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]}, "tools[0].function", "unknown keys"),
    ({"choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
    ({"choice": "sometimes"}, "tool_choice", "must be"),
    ({"choice": "auto", "auto": False}, "tool_choice", "--enable-auto-tool-choice"),
    ({"tools": None, "choice": "required"}, "tool_choice", "needs tools"),
    ({"parallel": "yes"}, "parallel_tool_calls", "boolean"),
])
def test_bad_tools_are_refused_naming_the_field(kw, param, match):
    with pytest.raises(ToolError, match=match) as info:
        check(**kw)
    assert info.value.param == param


def test_no_tools_and_defaults():
    assert check(tools=None) is None and check(tools=[]) is None
    req = check()
    assert req.choice == "auto" and req.parallel and req.guided() is None
    assert check(choice="none").for_template is None  # no tools shown


def test_named_choice_generates_the_arguments():
    req = check(choice={"type": "function", "function": {"name": "get_weather"}})
    g = build_grammar(req.guided())[1]
    assert accepts(g, '{"city": "Oslo", "unit": "c"}') and not accepts(g, '{"unit": "c"}')
    content, calls, reason = req.read('{"city": "Oslo"}', "stop", None)
    assert content is None and reason == "stop"  # a forced call: OpenAI says stop
    assert (calls[0].name, json.loads(calls[0].arguments)) == ("get_weather", {"city": "Oslo"})


@pytest.mark.parametrize("parallel", [True, False])
def test_required_is_an_array_of_calls(parallel):
    req = check(choice="required", parallel=parallel)
    g = build_grammar(req.guided())[1]
    one = '[{"name": "get_time", "parameters": {"tz": "UTC"}}]'
    two = '[{"name": "get_time", "parameters": {"tz": "UTC"}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]'
    assert accepts(g, one) and accepts(g, two) == parallel
    assert not accepts(g, "[]") and not accepts(g, '[{"name": "get_time", "parameters": {"city": "Rome"}}]')
    content, calls, reason = req.read(two, "stop", None)
    assert content is None and reason == "tool_calls"
    assert [c.name for c in calls] == (["get_time", "get_weather"] if parallel else ["get_time"])
    assert req.read(two[:20], "length", None) == (two[:20], [], "length")  # cut short: text, as generated


def test_auto_reads_with_the_parser_and_drops_unknown_functions():
    req = check()
    text = ('Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>'
            '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>')
    content, calls, reason = req.read(text, "stop", HermesParser())
    assert content == "Checking." and [c.name for c in calls] == ["get_weather"] and reason == "tool_calls"
    assert req.read("Just words.", "stop", HermesParser()) == ("Just words.", [], "stop")


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Lima?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, cloudy"},
]


def test_templates_with_tool_support_get_tools_and_objects():
    template = "{% for m in messages %}{{ m.role }}{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
    assert template_knows_tools(template) and not template_knows_tools("{{ messages }}")
    msgs, tools = render_messages(CONVERSATION, check(), template, "hermes")
    assert tools == check().tools
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Lima"}
    assert msgs[3] == CONVERSATION[3]  # role tool and tool_call_id go to the template as they are


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_templates_without_tool_support_get_the_tool_prompt(parser):
    msgs, tools = render_messages(CONVERSATION, check(), "{{ messages }}", parser)
    assert tools is None
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_time"' in msgs[0]["content"] and "<tools>" in msgs[0]["content"]
    assert ("<tool_call>" in msgs[0]["content"]) == (parser == "hermes")
    assert msgs[2]["role"] == "assistant" and '"city": "Lima"' in msgs[2]["content"]
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n18 C, cloudy\n</tool_response>"}
    assert all(set(m) == {"role", "content"} for m in msgs)
    none_shown, _ = render_messages(CONVERSATION, check(choice="none"), "{{ messages }}", parser)
    assert none_shown[0] == {"role": "system", "content": "Be brief."}
