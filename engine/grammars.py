"""Guided decoding requests turned into checked grammars, before any compute.

``build_grammar(guided)`` returns a cache key and an xgrammar ``Grammar``
(tokenizer-independent, fast: ~1 ms for a mid-size schema), or raises
``InvalidGuidedDecoding`` naming the problem. It is the only gate: the
ingress calls it to answer 400 at once, the engine again on arrival
(offline users, other callers), so no malformed grammar ever reaches the
compiler or a step (CVE-2025-48943 was an invalid guided schema crashing
vLLM's engine).

JSON schemas are checked three ways, because xgrammar alone accepts some
schemas it then does not enforce: against JSON Schema's own meta-schema
(``jsonschema``: ``minLength: -1`` or ``type: 3`` are errors), for keywords
xgrammar does not enforce (``not``, ``if``/``then``/``else``,
``uniqueItems``, ``allOf`` of several schemas, remote ``$ref``: refused
instead of producing output that fails the schema), then by xgrammar's
conversion. Regexes and grammars are checked by xgrammar's parsers;
``choice`` becomes a grammar of escaped literals.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from fleetlm.engine.sampling_params import GuidedDecodingParams

# Keywords xgrammar 0.2 parses but does not enforce (each probed with an
# instance that violates it: benchmarks/grammar_engines.py's notes, tests/unit/test_grammars.py).
_UNENFORCED = {
    "not": "'not'",
    "if": "'if'/'then'/'else'",
    "then": "'if'/'then'/'else'",
    "else": "'if'/'then'/'else'",
    "$dynamicRef": "'$dynamicRef'",
    "$recursiveRef": "'$recursiveRef'",
    "dependencies": "'dependencies' (use dependentRequired)",
}
# Where subschemas sit: name -> how (one schema, a list, or a dict of them).
_ONE = ("items", "additionalProperties", "contains", "propertyNames", "unevaluatedProperties",
        "unevaluatedItems", "additionalItems")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_DICT = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Counted repetitions in a schema's patterns cost xgrammar quadratic time (a{1000}: 0.2 s,
# a{20000}: 39 s on one core): larger counts are refused rather than stalling a compile.
MAX_PATTERN_REPEAT = 1000
_COUNT = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")
_XGR_PREFIX = re.compile(r"^(\[[\d:]+\] )?\S+\.cc:\d+: (Check failed: \(.*?\) is false: )?")


class InvalidGuidedDecoding(ValueError):
    """A guided decoding request that can never run; ``param`` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.reason = message


def _clean(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return _XGR_PREFIX.sub("", text)


def _xgr():
    try:
        import xgrammar
    except ImportError:  # a declared dependency: only a broken install lacks it
        raise InvalidGuidedDecoding("guided_decoding", "structured output needs the xgrammar package, "
                                                       "which this installation lacks") from None
    return xgrammar


def grammar_text(guided: GuidedDecodingParams) -> str:
    """The canonical text of what constrains the output (the schema as compact JSON)."""
    kind = guided.kind
    if kind == "json":
        return _schema_text(guided.json)
    if kind == "choice":
        return choice_ebnf(guided.choice)
    if kind == "json_object":
        return '{"type": "object"}'
    return getattr(guided, kind)


def grammar_key(guided: GuidedDecodingParams) -> tuple:
    """What a compiled grammar is cached by: equal keys, equal grammars."""
    return guided.kind, grammar_text(guided), not guided.disable_any_whitespace


def build_grammar(guided: GuidedDecodingParams):
    """(cache key, xgrammar Grammar) for a guided request; raises ``InvalidGuidedDecoding``."""
    key = grammar_key(guided)
    return key, grammar_from_key(key)


def grammar_from_key(key: tuple):
    """The checked xgrammar Grammar of a ``grammar_key``; raises ``InvalidGuidedDecoding``."""
    xgr = _xgr()
    kind, text, any_ws = key
    param = f"guided_decoding.{kind}"
    try:
        if kind in ("json", "json_object"):
            if kind == "json":
                check_json_schema(json.loads(text), param)
            return xgr.Grammar.from_json_schema(text, any_whitespace=any_ws, strict_mode=True)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "grammar" and "::=" not in text:
            return xgr.Grammar.from_lark(text)
        return xgr.Grammar.from_ebnf(text)  # EBNF / GBNF (llama.cpp's dialect, as vLLM takes it), or a choice
    except InvalidGuidedDecoding:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError for every parse error
        what = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex",
                "grammar": "grammar", "choice": "choice"}[kind]
        raise InvalidGuidedDecoding(param, f"invalid {what}: {_clean(e)}") from None


@lru_cache(maxsize=1024)
def _problem(key: tuple) -> InvalidGuidedDecoding | None:
    try:
        grammar_from_key(key)
    except InvalidGuidedDecoding as e:
        return e
    return None


def check_guided(guided: GuidedDecodingParams) -> None:
    """Raise ``InvalidGuidedDecoding`` for a bad grammar; remembers the verdict per grammar
    (the JSON Schema meta-check takes 20-200 ms, and clients resend the same schemas)."""
    problem = _problem(grammar_key(guided))
    if problem is not None:
        raise InvalidGuidedDecoding(problem.param, problem.reason)


def _schema_text(schema: str | dict) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidGuidedDecoding("guided_decoding.json", f"the schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidGuidedDecoding("guided_decoding.json", f"the schema must be a JSON object, got {schema!r:.60}")
    try:
        # Property order is kept: it is the order the output's properties take.
        return json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidGuidedDecoding("guided_decoding.json", f"the schema is not JSON-serializable: {e}") from None


def check_json_schema(schema: dict, param: str = "guided_decoding.json") -> None:
    """Meta-schema validity, then no keyword that the grammar would silently ignore."""
    from jsonschema import exceptions, validators

    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise InvalidGuidedDecoding(param, f"invalid JSON schema at {where}: {e.message}") from None
    stack = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if not isinstance(node, dict):
            continue
        for kw, name in _UNENFORCED.items():
            if kw in node:
                raise InvalidGuidedDecoding(param, f"unsupported JSON schema keyword {name} at {path or '(root)'}")
        if node.get("uniqueItems") is True:
            raise InvalidGuidedDecoding(param, f"unsupported JSON schema keyword 'uniqueItems' at {path or '(root)'}")
        if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
            raise InvalidGuidedDecoding(
                param, f"unsupported JSON schema keyword 'allOf' with several schemas at {path or '(root)'} "
                "(merge them into one)")
        patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += list(node["patternProperties"])
        for pattern in patterns:
            counts = [int(n) for m in _COUNT.finditer(pattern) for n in m.groups() if n]
            if counts and max(counts) > MAX_PATTERN_REPEAT:
                raise InvalidGuidedDecoding(param, f"pattern {pattern[:60]!r} at {path or '(root)'} repeats "
                                                   f"{max(counts)} times; at most {MAX_PATTERN_REPEAT} are supported")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise InvalidGuidedDecoding(param, f"unsupported remote $ref {ref!r} at {path or '(root)'} "
                                               "(only local '#/...' references)")
        for kw in _ONE:
            if isinstance(node.get(kw), dict):
                stack.append((node[kw], f"{path}/{kw}"))
        for kw in _LIST:
            if isinstance(node.get(kw), list):
                stack += [(s, f"{path}/{kw}/{i}") for i, s in enumerate(node[kw])]
        for kw in _DICT:
            if isinstance(node.get(kw), dict):
                stack += [(s, f"{path}/{kw}/{k}") for k, s in node[kw].items()]


def _ebnf_literal(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:  # control and non-ASCII characters by code point: nothing to mis-escape
            out.append(f"\\U{ord(ch):08x}" if ord(ch) > 0xFFFF else f"\\u{ord(ch):04x}")
    return '"' + "".join(out) + '"'


def choice_ebnf(choices: list[str]) -> str:
    """A grammar whose only sentences are the given strings."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)
