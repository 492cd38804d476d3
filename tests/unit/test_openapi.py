"""The OpenAPI document (cluster/openapi.py): in step with the request models, the
service's limits as bounds, and accepted by schemathesis and a JSON-schema validator."""

from __future__ import annotations


import pytest

from fleetlm.cluster.chat import ChatCompletionRequest, ChatMessage
from fleetlm.cluster.completions import CompletionRequest
from fleetlm.cluster.openapi import openapi_document
from fleetlm.cluster.serve_config import parse_app_args

CONFIG = parse_app_args({
    "models": [{"model": "smollm2-135m-instruct"}], "api_key": "k", "max_n": 3, "max_logprobs": 4,
    "max_stop_sequences": 2, "max_stop_length": 8, "max_tokens_limit": 32,
})


def doc(**kw):
    return openapi_document(CONFIG, vocab_size=100, **kw)


def validator(name: str):
    import jsonschema
    d = doc()
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": d["components"]})


def test_every_model_field_is_described_and_nothing_else():
    s = doc()["components"]["schemas"]
    assert set(s["CompletionRequest"]["properties"]) == set(CompletionRequest.model_fields)
    assert set(s["ChatCompletionRequest"]["properties"]) == set(ChatCompletionRequest.model_fields)
    assert set(s["ChatMessage"]["properties"]) == set(ChatMessage.model_fields)
    assert s["CompletionRequest"]["required"] == ["prompt"]
    assert s["ChatCompletionRequest"]["required"] == ["messages"]
    assert s["CompletionRequest"]["additionalProperties"] is False


def test_limits_are_bounds():
    p = doc()["components"]["schemas"]["CompletionRequest"]["properties"]
    assert p["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 3}
    assert p["logprobs"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 4}
    assert p["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 32}
    assert p["model"]["anyOf"][0]["enum"] == ["smollm2-135m-instruct"]
    stop = p["stop"]["anyOf"][0]["anyOf"]
    assert stop[0]["maxLength"] == 8 and stop[1]["maxItems"] == 2
    assert p["prompt"]["anyOf"][2]["items"] == {"type": "integer", "minimum": 0, "maximum": 99}


def test_security_covers_all_but_health_ping_and_metrics():
    d = doc()
    assert d["security"] == [{"bearer": []}]
    open_ops = sorted(path for path, ops in d["paths"].items() for op in ops.values() if op.get("security") == [])
    assert open_ops == ["/health", "/metrics", "/ping"]
    unsecured = openapi_document(parse_app_args({"models": [{"model": "m"}]}))
    assert "security" not in unsecured and "securitySchemes" not in unsecured["components"]


def test_extra_paths_are_added():
    d = doc(extra_paths={"/debug/invariants": {"get": {"responses": {"200": {"description": "x"}}}}})
    assert "/debug/invariants" in d["paths"]


@pytest.mark.parametrize("body, valid", [
    ({"prompt": "x"}, True),
    ({"prompt": [1, 2], "max_tokens": 32, "n": None, "stop": ["a", "bb"]}, True),
    ({"prompt": [[1], [2, 3]], "logit_bias": {"5": -100}}, True),
    ({"prompt": ""}, False),
    ({"prompt": [100]}, False),  # outside the vocabulary
    ({"prompt": "x", "max_tokens": 33}, False),
    ({"prompt": "x", "stop": ["a", "b", "c"]}, False),
    ({"prompt": "x", "logit_bias": {"a": 1}}, False),
    ({"prompt": "x", "suffix": "y"}, False),
    ({"prompt": "x", "max_tokenz": 1}, False),
    ({"max_tokens": 1}, False),
])
def test_completion_schema_matches_the_server(body, valid):
    assert validator("CompletionRequest").is_valid(body) == valid
    if valid:  # what the schema calls valid the request model accepts
        CompletionRequest.model_validate(body)


@pytest.mark.parametrize("body, valid", [
    ({"messages": [{"role": "user", "content": "hi"}]}, True),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "tool_choice": "none"}, True),
    ({"messages": []}, False),
    ({"messages": [{"role": "tool", "content": "x"}]}, False),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, False),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, False),
])
def test_chat_schema_matches_the_server(body, valid):
    assert validator("ChatCompletionRequest").is_valid(body) == valid
    if valid:
        ChatCompletionRequest.model_validate(body)


def test_schemathesis_loads_it():
    import schemathesis
    schema = schemathesis.openapi.from_dict(doc())
    labels = sorted(op.ok().label for op in schema.get_all_operations())
    assert labels == ["GET /health", "GET /metrics", "GET /ping", "GET /v1/models", "GET /version",
                      "POST /v1/chat/completions", "POST /v1/completions"]
