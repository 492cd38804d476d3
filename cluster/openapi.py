"""The OpenAPI 3.1 document of the FleetLM HTTP API, with this deployment's limits.

The route handlers read raw request bodies (strict JSON, size limits, our own
error bodies), so FastAPI cannot derive a useful document from them; this
module writes it down instead, field by field from the request models of
``completions.py`` and ``chat.py`` (``tests/unit/test_openapi.py`` checks
that every model field is described and nothing else), with the service's
configured limits as JSON-schema bounds: ``max_n``, ``max_logprobs``, stop
sequences, ``max_tokens_limit``, the served model names, and, when known, the
vocabulary (token ids) and context length.

A request that conforms to this document may still be refused (a prompt
longer than the context, ``min_tokens`` over ``max_tokens``, a full queue):
the document says what is well-formed, the server what fits. Anything that
does not conform gets a 4xx with an OpenAI error body. Fuzzers
(``tests/integration/test_fuzz_schemathesis.py``) generate from it.
"""

from __future__ import annotations

from typing import Any

from fleetlm.cluster.chat import CHAT_ROLES
from fleetlm.cluster.completions import MAX_PROMPTS_PER_REQUEST

OPENAPI_VERSION = "3.1.0"
_REF = "#/components/schemas/"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional request field: OpenAI clients send ``null`` for "default"."""
    return {"anyOf": [schema, {"type": "null"}]}


def _int(minimum: int | None = None, maximum: int | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "integer"}
    if minimum is not None:
        s["minimum"] = minimum
    if maximum is not None:
        s["maximum"] = maximum
    return s


def _num(minimum: float | None = None, maximum: float | None = None, exclusive_minimum: float | None = None
         ) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "number"}
    if minimum is not None:
        s["minimum"] = minimum
    if exclusive_minimum is not None:
        s["exclusiveMinimum"] = exclusive_minimum
    if maximum is not None:
        s["maximum"] = maximum
    return s


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF + name}


def _token_id(vocab_size: int | None) -> dict[str, Any]:
    return _int(0, vocab_size - 1 if vocab_size else None)


def sampling_properties(config: Any, model_names: list[str], vocab_size: int | None) -> dict[str, Any]:
    """Fields of both generation endpoints (``protocol.SamplingRequest``)."""
    stop_string = {"type": "string", "minLength": 1, "maxLength": config.max_stop_length}
    return {
        "model": _nullable({"type": "string", "enum": list(model_names)}),
        "n": _nullable(_int(1, config.max_n)),
        "temperature": _nullable(_num(0.0, 2.0)),
        "top_p": _nullable(_num(maximum=1.0, exclusive_minimum=0.0)),
        "stop": _nullable({"anyOf": [
            stop_string,
            {"type": "array", "items": stop_string, "maxItems": config.max_stop_sequences},
        ]}),
        "seed": _nullable(_int(-(2**63), 2**64 - 1)),
        "presence_penalty": _nullable(_num(-2.0, 2.0)),
        "frequency_penalty": _nullable(_num(-2.0, 2.0)),
        "user": _nullable({"type": "string"}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable(_ref("StreamOptions")),
        "logit_bias": _nullable({
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": _num(-100.0, 100.0),
        }),
        "top_k": _nullable(_int(-1)),
        "min_p": _nullable(_num(0.0, 1.0)),
        "repetition_penalty": _nullable(_num(maximum=10.0, exclusive_minimum=0.0)),
        "min_tokens": _nullable(_int(0, config.max_tokens_limit)),
        "ignore_eos": _nullable({"type": "boolean"}),
        "stop_token_ids": _nullable({"type": "array", "items": _token_id(vocab_size)}),
        "skip_special_tokens": _nullable({"type": "boolean"}),
        "metadata": _nullable({"type": "object"}),
        "store": _nullable({"type": "boolean"}),
        "service_tier": _nullable({"type": "string"}),
        # Structured output: one of these at most (the server refuses two).
        "response_format": _nullable(_ref("ResponseFormat")),
        "guided_json": _nullable({"anyOf": [{"type": "object"}, {"type": "string"}]}),
        "guided_regex": _nullable({"type": "string", "minLength": 1}),
        "guided_choice": _nullable({"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}),
        "guided_grammar": _nullable({"type": "string", "minLength": 1}),
        "guided_decoding_backend": _nullable({"type": "string", "enum": ["xgrammar", "auto"]}),
    }


def completion_request_schema(config: Any, model_names: list[str], vocab_size: int | None) -> dict[str, Any]:
    ids = {"type": "array", "items": _token_id(vocab_size), "minItems": 1}
    text = {"type": "string", "minLength": 1}
    props = sampling_properties(config, model_names, vocab_size)
    props.update({
        "prompt": {"anyOf": [
            text,
            {"type": "array", "items": text, "minItems": 1, "maxItems": MAX_PROMPTS_PER_REQUEST},
            ids,
            {"type": "array", "items": ids, "minItems": 1, "maxItems": MAX_PROMPTS_PER_REQUEST},
        ]},
        # Fill-in-the-middle is not served: only an empty suffix is accepted.
        "suffix": _nullable({"type": "string", "maxLength": 0}),
        "max_tokens": _nullable(_int(1, config.max_tokens_limit)),
        "echo": _nullable({"type": "boolean"}),
        "logprobs": _nullable(_int(0, config.max_logprobs)),
        "best_of": _nullable(_int(1, config.max_n)),
    })
    return {"type": "object", "properties": props, "required": ["prompt"], "additionalProperties": False}


def chat_request_schema(config: Any, model_names: list[str], vocab_size: int | None) -> dict[str, Any]:
    props = sampling_properties(config, model_names, vocab_size)
    props.update({
        "messages": {"type": "array", "items": _ref("ChatMessage"), "minItems": 1},
        "max_tokens": _nullable(_int(1, config.max_tokens_limit)),
        "max_completion_tokens": _nullable(_int(1, config.max_tokens_limit)),
        "logprobs": _nullable({"type": "boolean"}),
        "top_logprobs": _nullable(_int(0, config.max_logprobs)),
        "tools": _nullable({"type": "array", "items": _ref("Tool")}),
        # "auto" also needs a server started with --enable-auto-tool-choice.
        "tool_choice": _nullable({"anyOf": [
            {"type": "string", "enum": ["none", "auto", "required"]}, _ref("NamedToolChoice")]}),
        "parallel_tool_calls": _nullable({"type": "boolean"}),
    })
    return {"type": "object", "properties": props, "required": ["messages"], "additionalProperties": False}


def _component_schemas(config: Any, model_names: list[str], vocab_size: int | None) -> dict[str, Any]:
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }},
    }
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {k: {"type": "integer", "minimum": 0}
                       for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    }
    finish = {"type": ["string", "null"], "enum": ["stop", "length", "tool_calls", "abort", "error", None]}
    return {
        "CompletionRequest": completion_request_schema(config, model_names, vocab_size),
        "ChatCompletionRequest": chat_request_schema(config, model_names, vocab_size),
        "ChatMessage": {
            "type": "object",
            "required": ["role"],
            "additionalProperties": False,
            "description": "content may be null only in an assistant message with tool_calls",
            # A tool message answers a call: it names it.
            "if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
            "then": {"required": ["role", "tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}},
            "properties": {
                "role": {"type": "string", "enum": list(CHAT_ROLES)},
                "content": _nullable({"anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": _ref("TextPart")},
                ]}),
                "name": _nullable({"type": "string"}),
                "tool_calls": _nullable({"type": "array", "items": _ref("ToolCall")}),
                "tool_call_id": _nullable({"type": "string"}),
            },
        },
        "ToolCall": {
            "type": "object",
            "required": ["id", "function"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string"},
                "type": {"type": "string", "enum": ["function"]},
                "function": {"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                             "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}},
            },
        },
        "Tool": {
            "type": "object",
            "required": ["function"],
            "properties": {
                "type": {"type": "string", "enum": ["function"]},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                        "description": _nullable({"type": "string"}),
                        "parameters": _nullable({"type": "object"}),
                        "strict": _nullable({"type": "boolean"}),
                    },
                },
            },
        },
        "NamedToolChoice": {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"type": "string", "enum": ["function"]},
                "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            },
        },
        "TextPart": {
            "type": "object",
            "required": ["type", "text"],
            "additionalProperties": False,
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
        },
        "ResponseFormat": {
            "type": "object",
            "required": ["type"],
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
                "json_schema": _nullable(_ref("JSONSchemaFormat")),
            },
        },
        "JSONSchemaFormat": {
            "type": "object",
            "required": ["name", "schema"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "schema": {"type": "object"},
                "description": _nullable({"type": "string"}),
                "strict": _nullable({"type": "boolean"}),
            },
        },
        "StreamOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"include_usage": _nullable({"type": "boolean"})},
        },
        "Error": error,
        "Completion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["text_completion"]},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {
                    "type": "object",
                    "required": ["index", "text", "finish_reason"],
                    "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                   "finish_reason": finish},
                }},
                "usage": usage,
            },
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["chat.completion"]},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {"type": "object", "required": ["role", "content"],
                                    "properties": {"role": {"type": "string"},
                                                   "content": {"type": ["string", "null"]},
                                                   "tool_calls": {"type": "array", "items": _ref("ToolCall")}}},
                        "finish_reason": finish,
                    },
                }},
                "usage": usage,
            },
        },
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {"type": "array", "items": {
                    "type": "object",
                    "required": ["id", "object", "created", "owned_by"],
                    "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                   "created": {"type": "integer"}, "owned_by": {"type": "string"}},
                }},
            },
        },
    }


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Invalid request (the message names the parameter).", 401: "Missing or invalid API key.",
            404: "Unknown model.", 413: "Request body over the configured limit.",
            429: "Overloaded: too many requests waiting (see Retry-After).",
            503: "Draining, or no replica of the model is available."}
    return {str(c): {"description": text[c],
                     "content": {"application/json": {"schema": _ref("Error")}}} for c in codes}


def _generation_operation(summary: str, request: str, response: str, secured: bool) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {
                "description": "The completion (JSON), or server-sent events when stream is true.",
                "content": {"application/json": {"schema": _ref(response)},
                            "text/event-stream": {"schema": {"type": "string"}}},
            },
            **_errors(400, 401, 404, 413, 429, 503),
        },
    }
    if not secured:
        op["security"] = []
    return op


def openapi_document(
    config: Any,
    *,
    vocab_size: int | None = None,
    extra_paths: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The document for a ``ServeAppConfig``; ``vocab_size`` bounds token ids when known."""
    names = [m.name for m in config.models]
    secured = bool(config.api_key)
    paths: dict[str, Any] = {
        "/v1/completions": {"post": _generation_operation(
            "Text completion", "CompletionRequest", "Completion", secured)},
        "/v1/chat/completions": {"post": _generation_operation(
            "Chat completion", "ChatCompletionRequest", "ChatCompletion", secured)},
        "/v1/models": {"get": {
            "summary": "Served models",
            "responses": {"200": {"description": "The served models.",
                                  "content": {"application/json": {"schema": _ref("ModelList")}}},
                          **_errors(401)},
            **({} if secured else {"security": []}),
        }},
        "/health": {"get": {
            "summary": "Liveness of the ingress and of every replica (no API key)",
            "security": [],
            "responses": {"200": {"description": "Every model can serve: its replicas healthy and the ingress warm "
                                                 "for it, or none while autoscaling may cold-start one.",
                                  "content": {"application/json": {"schema": {"type": "object"}}}},
                          "503": {"description": "Draining, a replica unhealthy, or the ingress still warming.",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}},
        }},
        "/ping": {"get": {
            "summary": "The same answer as /health (vLLM's liveness route; no API key)",
            "security": [],
            "responses": {"200": {"description": "Every model can serve: its replicas healthy and the ingress warm "
                                                 "for it, or none while autoscaling may cold-start one.",
                                  "content": {"application/json": {"schema": {"type": "object"}}}},
                          "503": {"description": "Draining, a replica unhealthy, or the ingress still warming.",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}},
        }},
        "/version": {"get": {
            "summary": "FleetLM's version",
            "responses": {"200": {"description": "The version.",
                                  "content": {"application/json": {"schema": {
                                      "type": "object", "properties": {"version": {"type": "string"}},
                                      "required": ["version"]}}}},
                          **_errors(401)},
            **({} if secured else {"security": []}),
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics of the ingress and every replica (no API key)",
            "security": [],
            "responses": {"200": {"description": "Prometheus text exposition.",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
    }
    paths.update(extra_paths or {})
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "FleetLM", "version": "0.1.0",
                 "description": "OpenAI-compatible LLM serving on Ray Serve."},
        "paths": paths,
        "components": {"schemas": _component_schemas(config, names, vocab_size)},
    }
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


__all__ = ["OPENAPI_VERSION", "chat_request_schema", "completion_request_schema", "openapi_document"]
