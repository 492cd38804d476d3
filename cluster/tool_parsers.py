"""Tool calls out of generated text, per model family (vLLM's ``--tool-call-parser`` names).

- ``hermes`` (Hermes 2/3, Qwen 2.5, and FleetLM's own tool prompt for templates
  that do not render tools): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks, any number, text around them is content.
- ``llama3_json`` (Llama 3.1 / 3.2 JSON tool calling): the whole output is
  ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``),
  several separated by ``;``; anything else is plain content.

Each parser answers a whole text (``parse``) or a stream (``stream()``:
``feed(delta)`` returns the content that is safe to show now and the calls
completed so far; ``finish()`` the rest). Streaming holds back only what could
still turn into a tool call (a partial ``<tool_call>`` tag, an output that
starts with ``{``), so plain answers stream as they come. Text that looks
like a call but does not parse (bad JSON, no name) stays content, as in vLLM.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def to_openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return d if index is None else {"index": index, **d}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(obj, args_key: str) -> ToolCall | None:
    """A ToolCall from a decoded JSON object, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models emit the arguments already encoded
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), new_call_id())


class ToolParser:
    name = ""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content or None, tool calls) of a whole output."""
        raise NotImplementedError

    def stream(self) -> ToolStream:
        raise NotImplementedError


class ToolStream:
    """Incremental parse of one output; see the module docstring."""

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError


# --- hermes ---------------------------------------------------------------------
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class HermesParser(ToolParser):
    name = "hermes"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if _OPEN not in text:
            return text, []
        calls = []
        for m in _HERMES_BLOCK.finditer(text):
            call = _hermes_call(m.group(1))
            if call is None:
                return text, []  # a malformed block: the whole output is content
            calls.append(call)
        content = _HERMES_BLOCK.sub("", text).strip()
        return content or None, calls

    def stream(self) -> ToolStream:
        return _HermesStream()


def _hermes_call(body: str) -> ToolCall | None:
    try:
        return _call(json.loads(body.strip()), "arguments")
    except json.JSONDecodeError:
        return None


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class _HermesStream(ToolStream):
    def __init__(self) -> None:
        self.buf = ""
        self.inside = False

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self.buf += delta
        content, calls = [], []
        while True:
            if not self.inside:
                i = self.buf.find(_OPEN)
                if i < 0:
                    keep = _partial_tag(self.buf, _OPEN)
                    content.append(self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                content.append(self.buf[:i])
                self.buf, self.inside = self.buf[i + len(_OPEN):], True
            j = self.buf.find(_CLOSE)
            if j < 0:
                break
            body, self.buf, self.inside = self.buf[:j], self.buf[j + len(_CLOSE):], False
            call = _hermes_call(body)
            if call is None:  # not a call after all: show it as it was
                content.append(_OPEN + body + _CLOSE)
            else:
                calls.append(call)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        buf, inside, self.buf = self.buf, self.inside, ""
        if not inside:
            return buf, []
        call = _hermes_call(buf)  # the output ended inside an unclosed block
        return ("", [call]) if call is not None else (_OPEN + buf, [])


# --- llama3_json -------------------------------------------------------------------
_PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(_PYTHON_TAG):
            body = body[len(_PYTHON_TAG):].lstrip()
        if not body.startswith("{"):
            return text, []
        calls, pos, dec = [], 0, json.JSONDecoder()
        while pos < len(body):
            try:
                obj, end = dec.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = _call(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            rest = body[pos:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                return text, []
            pos = len(body) - len(rest)
        return None, calls

    def stream(self) -> ToolStream:
        return _Llama3Stream(self)


class _Llama3Stream(ToolStream):
    """A call can only be the whole output: decide on its first visible characters."""

    def __init__(self, parser: Llama3JsonParser) -> None:
        self.parser, self.buf, self.mode = parser, "", None  # mode: None undecided, "text", "call"

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        if self.mode == "text":
            return delta, []
        self.buf += delta
        head = self.buf.lstrip()
        if not head or (_PYTHON_TAG.startswith(head) and len(head) < len(_PYTHON_TAG)):
            return "", []
        self.mode = "call" if head.startswith("{") or head.startswith(_PYTHON_TAG) else "text"
        if self.mode == "text":
            out, self.buf = self.buf, ""
            return out, []
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        buf, self.buf = self.buf, ""
        if self.mode == "text" or not buf:
            return buf, []
        content, calls = self.parser.parse(buf)
        return content or "", calls


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser)}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"tool_call_parser must be one of {', '.join(sorted(PARSERS))}, got {name!r}") from None
