"""OpenAI tool calling: the request's tools checked, rendered into the prompt, enforced, read back.

- ``check_tools``: ``tools``, ``tool_choice``, ``parallel_tool_calls`` ->
  a ``ToolRequest``, or a 400 naming the field (a tool without a name, a
  ``parameters`` schema that is invalid or uses a keyword that would not be
  enforced, a named choice that is not among the tools, ``auto`` on a server
  started without ``--enable-auto-tool-choice``), before any compute.
- The prompt: a chat template that knows tools (Llama 3.1+, Qwen 2.5,
  Hermes) gets them as ``tools=`` and the conversation as it is (assistant
  ``tool_calls`` with their arguments decoded, ``tool`` messages with their
  ``tool_call_id``). A template that does not (the embedded SmolLM2's) gets
  FleetLM's own tool prompt in the system message, in the format of the
  server's tool-call parser, and earlier calls and results as text in it.
- What constrains the output: ``required`` and a named function are enforced
  with a grammar (guided JSON), so the call always parses: a named choice
  generates the function's arguments, ``required`` a JSON array of
  ``{"name", "parameters"}`` objects (one when ``parallel_tool_calls`` is
  false). ``auto`` is free text read by the parser; ``none`` shows no tools.
- ``ToolRequest.read``: the generated text -> (content, tool calls,
  finish_reason); OpenAI's reasons: ``tool_calls`` when the model chose to
  call, ``stop`` for a forced named call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fleetlm.cluster.tool_parsers import ToolCall, ToolParser, get_tool_parser, new_call_id
from fleetlm.engine.grammars import InvalidGuidedDecoding, build_grammar
from fleetlm.engine.sampling_params import GuidedDecodingParams

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@lru_cache(maxsize=512)
def _check_parameters(text: str) -> str | None:
    """None if the schema is usable, else why not (cached: agents resend the same tools)."""
    try:
        build_grammar(GuidedDecodingParams(json=text))
    except InvalidGuidedDecoding as e:
        return e.reason
    return None


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict]  # normalized OpenAI tool objects
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True

    @property
    def by_name(self) -> dict[str, dict]:
        return {t["function"]["name"]: t["function"] for t in self.tools}

    @property
    def for_template(self) -> list[dict] | None:
        return None if self.choice == "none" else self.tools

    def guided(self) -> GuidedDecodingParams | None:
        if self.choice == "named":
            return GuidedDecodingParams(json=self.by_name[self.named]["parameters"])
        if self.choice != "required":
            return None
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                                   "parameters": f["parameters"]},
                  "required": ["name", "parameters"]} for f in self.by_name.values()]
        schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return GuidedDecodingParams(json=schema)

    def read(self, text: str, finish_reason: str | None, parser: ToolParser | None) -> tuple[str | None, list[ToolCall], str | None]:
        """(content, tool calls, finish_reason) of a finished output."""
        calls: list[ToolCall] = []
        content: str | None = text
        if self.choice == "named":
            return None, [ToolCall(self.named, text, new_call_id())], finish_reason
        if self.choice == "required":
            try:
                calls = [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False), new_call_id())
                         for c in json.loads(text)]
                content = None
            except (json.JSONDecodeError, TypeError, KeyError):  # cut short by max_tokens
                calls = []
        elif self.choice == "auto" and parser is not None:
            content, calls = parser.parse(text)
            calls = [c for c in calls if c.name in self.by_name] if calls else []
        if calls and not self.parallel:
            calls = calls[:1]
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return content, calls, finish_reason


def check_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any, auto_enabled: bool,
                parser_name: str | None) -> ToolRequest | None:
    """Check a chat request's tool fields (raises ``ToolError`` naming the field); None when it has no tools."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice", "tool_choice needs tools")
        return None
    if not isinstance(tools, list):
        raise ToolError("tools", "tools must be a list of {'type': 'function', 'function': {...}}")
    norm, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolError(f"{where}.type", "only tools of type 'function' are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function", "each tool needs a 'function' object")
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise ToolError(f"{where}.function", f"unknown keys {sorted(unknown)}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name",
                            "each function needs a name of 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise ToolError(f"{where}.function.name", f"two tools are named {name!r}")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ToolError(f"{where}.function.description", "must be a string")
        params = fn.get("parameters", EMPTY_PARAMETERS)
        if params is None:
            params = EMPTY_PARAMETERS
        if not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters", "must be a JSON schema object")
        why = _check_parameters(json.dumps(params))
        if why is not None:
            raise ToolError(f"{where}.function.parameters", why)
        out = {"name": name, "parameters": params}
        if fn.get("description"):
            out["description"] = fn["description"]
        norm.append({"type": "function", "function": out})
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if not isinstance(parallel, bool):
        raise ToolError("parallel_tool_calls", "must be a boolean")
    choice, named = tool_choice if tool_choice is not None else "auto", None
    if isinstance(choice, dict):
        fn = choice.get("function")
        named = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(named, str):
            raise ToolError("tool_choice", "a named tool_choice is {'type': 'function', 'function': {'name': ...}}")
        if named not in seen:
            raise ToolError("tool_choice", f"tool_choice names {named!r}, which is not among the tools")
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise ToolError("tool_choice", "tool_choice must be 'none', 'auto', 'required' or a named function")
    if choice == "auto" and not (auto_enabled and parser_name):
        raise ToolError("tool_choice", "tool_choice 'auto' needs a server started with --enable-auto-tool-choice "
                                       "and --tool-call-parser; 'required' and a named function work without")
    return ToolRequest(norm, choice, named, parallel)


# --- the prompt ---------------------------------------------------------------------


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", template) is not None


_CALL_FORMAT = {
    "hermes": ('For each function call, return a JSON object with the function name and arguments within '
               '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
               '<args-json-object>}\n</tool_call>'),
    "llama3_json": ('To call a function, respond only with a JSON object of the form {"name": <function-name>, '
                    '"parameters": <args-json-object>}; several calls are separated by ";".'),
}


def tool_prompt(tools: list[dict], parser_name: str | None) -> str:
    """FleetLM's tool prompt, for templates that do not render tools (Hermes's wording)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query.\n\nYou are provided with function "
            f"signatures within <tools></tools> XML tags:\n<tools>\n{listing}\n</tools>\n\n"
            + _CALL_FORMAT.get(parser_name or "hermes", _CALL_FORMAT["hermes"]))


def _call_text(call: dict, parser_name: str | None) -> str:
    fn = call["function"]
    args = _decoded(fn.get("arguments"))
    if parser_name == "llama3_json":
        return json.dumps({"name": fn["name"], "parameters": args}, ensure_ascii=False)
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


def _decoded(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def render_messages(messages: list[dict], tools: ToolRequest | None, template: str | None,
                    parser_name: str | None) -> tuple[list[dict], list[dict] | None]:
    """(messages, ``tools=`` argument) for ``tokenizer.apply_chat_template``.

    ``messages`` are OpenAI's (roles system/user/assistant/tool, assistant
    ``tool_calls`` with JSON-string arguments, tool ``tool_call_id``)."""
    shown = tools.for_template if tools is not None else None
    if template_knows_tools(template):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):  # templates render arguments with tojson: give them objects
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _decoded(c["function"].get("arguments"))}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, shown
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(_call_text(c, parser_name) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + calls})
        else:
            out.append({"role": role, "content": content})
    if shown:
        prompt = tool_prompt(shown, parser_name)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def parser_for(name: str | None) -> ToolParser | None:
    return get_tool_parser(name) if name else None


class ToolStreamState:
    """One streamed choice's tool calls as OpenAI deltas: ``feed(text, finish_reason)`` ->
    (the ``delta`` object, the finish_reason to send). A named call streams its arguments as
    they come; ``required`` sends its calls at the end (the array must close to parse);
    ``auto`` shows content at once and each call when the parser completes it."""

    def __init__(self, tools: ToolRequest, parser: ToolParser | None) -> None:
        self.tools, self.parser = tools, parser
        self.stream = parser.stream() if tools.choice == "auto" and parser is not None else None
        self.buf: list[str] = []
        self.sent = 0  # tool calls sent so far
        self.call_id = new_call_id()

    def feed(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        t = self.tools
        if t.choice == "named":
            first, self.sent = self.sent == 0, 1
            if not text and not first:
                return {}, finish_reason
            call = {"index": 0, "function": {"arguments": text}}
            if first:
                call = {"index": 0, "id": self.call_id, "type": "function",
                        "function": {"name": t.named, "arguments": text}}
            return {"tool_calls": [call]}, finish_reason
        if t.choice == "required":
            self.buf.append(text)
            if finish_reason is None:
                return {}, None
            content, calls, finish_reason = t.read("".join(self.buf), finish_reason, None)
            return self._delta(content, calls), finish_reason
        if self.stream is None:  # "none": plain text
            return ({"content": text} if text else {}), finish_reason
        content, calls = self.stream.feed(text)
        if finish_reason is not None:
            more_content, more_calls = self.stream.finish()
            content, calls = content + more_content, calls + more_calls
        calls = [c for c in calls if c.name in t.by_name]
        if not t.parallel:
            calls = calls[: max(0, 1 - self.sent)]
        delta = self._delta(content, calls)
        if finish_reason == "stop" and self.sent:
            finish_reason = "tool_calls"
        return delta, finish_reason

    def _delta(self, content: str | None, calls: list[ToolCall]) -> dict:
        delta: dict = {}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [c.to_openai(self.sent + i) for i, c in enumerate(calls)]
            self.sent += len(calls)
        return delta
