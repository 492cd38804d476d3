"""``/v1/chat/completions``: the chat request, its endpoint and its response shapes.

The messages are rendered with the model's chat template (a generation
prompt added) and tokenized by the engine's own tokenizer. Text content
only (a string, or a list of ``{"type": "text"}`` parts); ``developer`` is
OpenAI's newer name for the system role. A streamed response opens with one
``{"role": "assistant"}`` delta per choice.

Tool calling (``tools``, ``tool_choice``, ``parallel_tool_calls``; assistant
messages with ``tool_calls`` and ``tool`` messages with ``tool_call_id`` in
the conversation) is ``tool_calling.py``'s: checked once the model's tool
settings are known (``ModelInfo``), rendered into the prompt, and read back
into ``tool_calls``, whole or as streamed deltas.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from fleetlm.cluster.errors import bad_request
from fleetlm.cluster.generation import ChoiceState, Endpoint, Prepared, Update, off_loop
from fleetlm.cluster.messages import ModelInfo, TokenLogprob
from fleetlm.cluster.protocol import SamplingRequest, Strict
from fleetlm.cluster.tool_calling import ToolError, ToolStreamState, check_tools, parser_for, render_messages

CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


def _check_content(v: Any) -> str:
    """str | list of {"type": "text", "text": str} parts -> the text."""
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise ValueError("must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(v):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"content[{i}] must be {{'type': 'text', 'text': <string>}} (only text is supported)")
        if set(part) - {"type", "text"}:
            raise ValueError(f"content[{i}] has unknown keys {sorted(set(part) - {'type', 'text'})}")
        texts.append(part["text"])
    return "".join(texts)


class ToolCallFunction(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(Strict):
    id: str
    type: str = "function"
    function: ToolCallFunction

    @field_validator("type")
    @classmethod
    def _function(cls, v: str) -> str:
        if v != "function":
            raise ValueError("only 'function' tool calls are supported")
        return v


class ChatMessage(Strict):
    # Validated in this order: content's rule reads role and tool_calls.
    role: str
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message answers this call
    content: Any = Field(default=None, validate_default=True)

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in CHAT_ROLES:
            raise ValueError(f"unknown role {v!r}; expected one of {', '.join(CHAT_ROLES)}")
        return v

    @field_validator("tool_calls")
    @classmethod
    def _assistant_calls(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return v

    @field_validator("tool_call_id")
    @classmethod
    def _tool_answers(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("role") != "tool":
            raise ValueError("only tool messages have a tool_call_id")
        return v

    @field_validator("content")
    @classmethod
    def _content_text(cls, v: Any, info: ValidationInfo) -> str | None:
        if v is None:
            if info.data.get("role") == "assistant" and info.data.get("tool_calls"):
                return None  # a message that only calls tools
            raise ValueError("is required (null only in an assistant message with tool_calls)")
        return _check_content(v)

    @model_validator(mode="after")
    def _tool_message(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def for_template(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for the system role.
        role = "system" if self.role == "developer" else self.role
        m: dict[str, Any] = {"role": role, "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m


class ChatCompletionRequest(SamplingRequest):
    id_prefix: ClassVar[str] = "chatcmpl"
    prompt_param: ClassVar[str] = "messages"
    logprobs_param: ClassVar[str] = "top_logprobs"
    # OpenAI's newer name wins over the older one.
    max_tokens_fields: ClassVar[tuple[str, ...]] = ("max_completion_tokens", "max_tokens")

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("tools")
    @classmethod
    def _tools_shape(cls, v: Any) -> Any:
        # What needs no server setting is checked here; the rest once the model is known (use_tools).
        try:
            check_tools(v, None, None, auto_enabled=True, parser_name="hermes")
        except ToolError as e:
            raise ValueError(f"{e.param}: {e}") from None
        return v

    # Set when the model's tool settings are known (ChatEndpoint.tokenize).
    _tools: Any = PrivateAttr(default=None)  # a tool_calling.ToolRequest
    _parser: Any = PrivateAttr(default=None)  # the model's ToolParser, if any
    _streams: dict = PrivateAttr(default_factory=dict)  # choice index -> ToolStreamState

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        kw = super().sampling_kwargs(max_tokens)
        forced = self._tools.guided() if self._tools is not None else None
        if forced is not None:  # tool_choice "required" or a named function: the call must parse
            kw["guided_decoding"] = forced
        return kw

    def use_tools(self, info: ModelInfo) -> None:
        """Check the tool fields against the model's tool settings (400 naming the field)."""
        try:
            self._tools = check_tools(self.tools, self.tool_choice, self.parallel_tool_calls,
                                      info.enable_auto_tool_choice, info.tool_call_parser)
        except ToolError as e:
            raise bad_request(f"Invalid value for '{e.param}': {e}", e.param) from None
        if self._tools is not None and self._tools.choice in ("required", "named") and self._guided is not None:
            raise bad_request("tool_choice 'required' or a named function cannot be combined with "
                              "response_format or guided_* (both would constrain the output).", "tool_choice")
        self._parser = parser_for(info.tool_call_parser)

    def tool_stream(self, index: int) -> ToolStreamState | None:
        if self._tools is None or self._tools.choice == "none":
            return None
        if index not in self._streams:
            self._streams[index] = ToolStreamState(self._tools, self._parser)
        return self._streams[index]

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def default_max_tokens(self, room: int) -> int:
        return room  # a chat answer may take the whole context left

    def check(self) -> None:
        super().check()
        # OpenAI's rule: top_logprobs needs logprobs=true.
        if self.top_logprobs is not None and not self.logprobs and self.top_logprobs > 0:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")


# --- response shapes -------------------------------------------------------------


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": _bytes(e.token),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": _bytes(t)} for _, t, lp in e.top],
        }
        for e in entries
    ]}


def chat_choice(c: ChoiceState, want_logprobs: bool, req: ChatCompletionRequest | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    finish_reason = c.finish_reason
    tools = req._tools if req is not None else None
    if tools is not None and tools.choice != "none":
        content, calls, finish_reason = tools.read(c.text, c.finish_reason, req._parser)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
    return {
        "index": c.index,
        "message": message,
        "logprobs": chat_logprobs(c.logprobs) if want_logprobs else None,
        "finish_reason": finish_reason,
        "stop_reason": c.stop_reason,
    }


def warm_chat_template(tokenizer: Any) -> None:
    """Render the chat template once (Jinja compiles it on first use), as the first chat request would."""
    from fleetlm.engine.llm import apply_chat_template

    try:
        apply_chat_template(tokenizer, [{"role": "user", "content": "Hello"}], True)
    except Exception:  # noqa: BLE001 - a model without a template: its chat requests get a 400 anyway
        pass


# --- the endpoint --------------------------------------------------------------------


class ChatEndpoint(Endpoint):
    request_cls = ChatCompletionRequest
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    async def tokenize(self, req: ChatCompletionRequest, info: ModelInfo) -> tuple[list[list[int]], list[str]]:
        from fleetlm.engine.llm import apply_chat_template

        req.use_tools(info)
        template = getattr(info.tokenizer, "chat_template", None)
        messages, tools = render_messages(req.template_messages(), req._tools, template, info.tool_call_parser)
        size = sum(len(m["content"] or "") for m in messages)
        try:
            ids = await off_loop(size, apply_chat_template, info.tokenizer, messages, True, tools)
        except Exception as e:  # noqa: BLE001 - a template or tokenizer refusing the input
            raise bad_request(f"The messages could not be tokenized: {e}", "messages") from None
        return [list(ids)], [""]

    def opening_choices(self, p: Prepared) -> list[dict[str, Any]]:
        return [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for k in range(len(p.gen_reqs) * p.n)]

    def stream_choice(self, p: Prepared, u: Update) -> dict[str, Any]:
        d = u.delta
        lp = chat_logprobs(d.logprobs) if p.want_logprobs and d.logprobs is not None else None
        tools = p.req.tool_stream(u.state.index)
        if tools is None:
            delta, finish_reason = ({"content": d.text} if d.text else {}), d.finish_reason
        else:
            delta, finish_reason = tools.feed(d.text, d.finish_reason)
        return {"index": u.state.index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}

    def final_choice(self, p: Prepared, s: ChoiceState) -> dict[str, Any]:
        return chat_choice(s, p.want_logprobs, p.req)


__all__ = ["CHAT_ROLES", "ChatCompletionRequest", "ChatEndpoint", "ChatMessage", "chat_choice", "chat_logprobs",
           "warm_chat_template"]
