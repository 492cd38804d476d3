"""Structured output over HTTP: ``response_format`` and vLLM's ``guided_*`` fields -> ``GuidedDecodingParams``.

Both endpoints take OpenAI's ``response_format`` (``{"type": "text"}``,
``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema":
{"name", "schema", "strict", "description"}}``) and vLLM's extras
``guided_json`` (a schema, or its JSON text), ``guided_regex``,
``guided_choice``, ``guided_grammar`` (EBNF/GBNF or Lark) and
``guided_decoding_backend`` (``xgrammar``, the only one). At most one
constraint per request. The grammar is checked here, in the ingress, so a
bad schema, regex or grammar is a 400 naming the field before anything is
queued (``engine/grammars.py``; verdicts are remembered per grammar).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleetlm.cluster.errors import bad_request
from fleetlm.engine.grammars import InvalidGuidedDecoding, check_guided
from fleetlm.engine.sampling_params import GuidedDecodingParams

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, populate_by_name=True)


class JSONSchemaFormat(_Strict):
    name: str
    # "schema" is OpenAI's key; the attribute is renamed because BaseModel has a schema() method.
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not 1 <= len(v) <= 64 or not set(v) <= _NAME_CHARS:
            raise ValueError("must be 1-64 letters, digits, '_' or '-'")
        return v


class ResponseFormat(_Strict):
    type: str
    json_schema: JSONSchemaFormat | None = None

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ("text", "json_object", "json_schema"):
            raise ValueError(f"must be 'text', 'json_object' or 'json_schema', got {v!r}")
        return v


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def guided_from_request(req: Any) -> GuidedDecodingParams | None:
    """The request's constraint, checked (400 naming the field), or None."""
    rf: ResponseFormat | None = req.response_format
    given = [f for f in GUIDED_FIELDS if getattr(req, f) is not None]
    if rf is not None and rf.type != "text":
        given.insert(0, "response_format")
    if len(given) > 1:
        raise bad_request(f"Only one of response_format, {', '.join(GUIDED_FIELDS)} may constrain the output; "
                          f"got {', '.join(given)}.", given[1])
    if req.guided_decoding_backend not in (None, "xgrammar", "auto"):
        raise bad_request(f"guided_decoding_backend must be 'xgrammar' (the only grammar engine here), got "
                          f"{req.guided_decoding_backend!r}.", "guided_decoding_backend")
    if not given:
        return None
    field = given[0]
    param = field
    try:
        if field == "response_format":
            if rf.type == "json_object":
                if rf.json_schema is not None:
                    raise bad_request("response_format json_schema is only allowed with type 'json_schema'.",
                                      "response_format.json_schema")
                guided = GuidedDecodingParams(json_object=True)
            else:
                if rf.json_schema is None:
                    raise bad_request("response_format of type 'json_schema' needs a json_schema.",
                                      "response_format.json_schema")
                param = "response_format.json_schema.schema"
                guided = GuidedDecodingParams(json=rf.json_schema.json_schema)
        else:
            kind = field[len("guided_"):]
            guided = GuidedDecodingParams(**{kind: getattr(req, field)})
        check_guided(guided)
    except InvalidGuidedDecoding as e:
        raise bad_request(f"Invalid value for '{param}': {e.reason}.", param) from None
    except ValueError as e:  # the shape (an empty choice list, a wrong type)
        raise bad_request(f"Invalid value for '{param}': {e}", param) from None
    return guided


__all__ = ["GUIDED_FIELDS", "JSONSchemaFormat", "ResponseFormat", "guided_from_request"]
