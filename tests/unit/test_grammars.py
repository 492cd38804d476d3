"""Guided decoding requests -> checked grammars: every bad schema, regex or grammar is an error
naming the problem before anything runs; what passes is enforced."""

import json

import pytest
from xgrammar.testing import _is_grammar_accept_string as accepts

from fleetlm.engine.grammars import InvalidGuidedDecoding, build_grammar, choice_ebnf, grammar_key
from fleetlm.engine.sampling_params import GuidedDecodingParams, SamplingParams


def grammar(**kw):
    return build_grammar(GuidedDecodingParams(**kw))[1]


@pytest.mark.parametrize("kw,match", [
    ({}, "exactly one of"),
    ({"json": {"type": "object"}, "regex": "a"}, "exactly one of.*json, regex"),
    ({"json": 3}, "guided_decoding.json"),
    ({"regex": ""}, "guided_decoding.regex"),
    ({"grammar": 5}, "guided_decoding.grammar"),
    ({"choice": []}, "guided_decoding.choice"),
    ({"choice": ["a", ""]}, "guided_decoding.choice"),
    ({"choice": "ab"}, "guided_decoding.choice"),
    ({"json_object": "yes"}, "exactly one of|json_object"),
    ({"regex": "a", "backend": "outlines"}, "guided_decoding.backend"),
])
def test_params_shape_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        GuidedDecodingParams(**kw)


def test_sampling_params_takes_only_guided_params():
    with pytest.raises(ValueError, match="guided_decoding"):
        SamplingParams(guided_decoding={"json": {}})
    assert SamplingParams(guided_decoding=GuidedDecodingParams(regex="a")).guided_decoding.kind == "regex"


BAD = [
    ({"json": '{"type": '}, "not valid JSON"),
    ({"json": "[1, 2]"}, "must be a JSON object"),
    ({"json": {"type": 3}}, "invalid JSON schema at type"),
    ({"json": {"type": "string", "minLength": -1}}, "invalid JSON schema at minLength"),
    ({"json": {"type": "object", "properties": "x"}}, "invalid JSON schema at properties"),
    ({"json": {"not": {"type": "string"}}}, "unsupported JSON schema keyword 'not'"),
    ({"json": {"type": "object", "properties": {"a": {"if": {"minLength": 1}, "then": {}}}}},
     "'if'/'then'/'else' at /properties/a"),
    ({"json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"json": {"allOf": [{"type": "integer"}, {"minimum": 3}]}}, "allOf"),
    ({"json": {"$ref": "https://example.com/schema.json"}}, "remote \\$ref"),
    ({"json": {"$ref": "#/$defs/missing"}}, "Cannot find field"),
    ({"json": {"enum": []}}, "invalid JSON schema|enum"),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum greater than maximum"),
    ({"json": {"type": "string", "pattern": "a(b"}}, "at pattern: 'a\\(b' is not a 'regex'"),
    ({"json": {"type": "string", "pattern": "^a{2,5000}$"}}, "repeats 5000 times; at most 1000"),
    ({"json": {"type": "object", "patternProperties": {"^k{1001}$": {}}}}, "repeats 1001 times"),
    ({"regex": "a(b"}, "invalid regex: Regex parsing error"),
    ({"regex": "(?=a)a"}, "Lookahead is not supported"),
    ({"regex": r"(a)\1"}, "Backreference is not supported"),
    ({"grammar": 'root ::= "a" | '}, "invalid grammar: EBNF parser error"),
    ({"grammar": 'start ::= "a"'}, "root rule"),
    ({"grammar": "root ::= undefined_rule"}, "is not defined"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_is_an_error_naming_the_problem(kw, match):
    with pytest.raises(InvalidGuidedDecoding, match=match) as info:
        build_grammar(GuidedDecodingParams(**kw))
    assert info.value.param == f"guided_decoding.{next(iter(kw))}"
    assert "/project/" not in str(info.value) and ".cc:" not in str(info.value)  # no C++ source paths


def test_a_property_named_like_a_keyword_is_not_a_keyword():
    schema = {"type": "object", "properties": {"not": {"type": "integer"}, "if": {"type": "string"}},
              "required": ["not", "if"]}
    g = grammar(json=schema)
    assert accepts(g, '{"not": 1, "if": "x"}') and not accepts(g, '{"not": "1", "if": "x"}')


def test_schemas_are_enforced():
    schema = {
        "type": "object",
        "properties": {
            "kind": {"enum": ["a", "b"]},
            "n": {"type": "integer", "minimum": 1, "maximum": 9},
            "tags": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 2},
            "v": {"anyOf": [{"type": "null"}, {"type": "number"}]},
            "when": {"type": "string", "format": "date"},
        },
        "required": ["kind", "n"],
    }
    g = grammar(json=schema)
    assert accepts(g, '{"kind": "a", "n": 3, "tags": ["x@y.org"], "v": null, "when": "2024-02-29"}')
    assert not accepts(g, '{"kind": "c", "n": 3}')
    assert not accepts(g, '{"kind": "a", "n": 10}')
    assert not accepts(g, '{"kind": "a", "n": 3, "tags": ["not-an-email"]}')
    assert not accepts(g, '{"kind": "a", "n": 3, "when": "yesterday"}')
    assert not accepts(g, '{"n": 3}')


def test_json_object_is_any_object():
    g = grammar(json_object=True)
    assert accepts(g, '{"a": [1, {"b": null}]}') and accepts(g, "{}")
    assert not accepts(g, "[1]") and not accepts(g, '"x"')


def test_disable_any_whitespace():
    loose, tight = grammar(json={"type": "object"}), grammar(json={"type": "object"}, disable_any_whitespace=True)
    assert accepts(loose, '{ "a" :  1 }') and not accepts(tight, '{ "a" :  1 }')


def test_choice_escapes_every_character():
    choices = ['say "hi"', "back\\slash", "tab\tnew\nline", "café 🎉", "]|[*"]
    g = grammar(choice=choices)
    for c in choices:
        assert accepts(g, c), c
    assert not accepts(g, "say hi") and not accepts(g, "café")
    assert choice_ebnf(["a"]) == 'root ::= "a"'


def test_regex_and_grammars():
    assert accepts(grammar(regex=r"\d{3}-[a-z]+"), "123-abc") and not accepts(grammar(regex=r"\d{3}"), "12")
    ebnf = 'root ::= item ("," item)*\nitem ::= [0-9]+'
    assert accepts(grammar(grammar=ebnf), "1,22,333") and not accepts(grammar(grammar=ebnf), "1,,2")
    lark = 'start: WORD ("-" WORD)*\nWORD: /[a-z]+/'
    assert accepts(grammar(grammar=lark), "ab-cd") and not accepts(grammar(grammar=lark), "ab--cd")


def test_cache_key_equal_for_equal_schemas():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    a = grammar_key(GuidedDecodingParams(json=schema))
    assert a == grammar_key(GuidedDecodingParams(json=json.dumps(schema)))
    reordered = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}
    assert a != grammar_key(GuidedDecodingParams(json=reordered))  # property order is the output's order
    assert a != grammar_key(GuidedDecodingParams(json=schema, disable_any_whitespace=True))
