"""``/v1/chat/completions``: the chat request, its endpoint and its response shapes.

The messages are rendered with the model's chat template (a generation
prompt added) and tokenized by the engine's own tokenizer. Text content
only (a string, or a list of ``{"type": "text"}`` parts); ``developer`` is
OpenAI's newer name for the system role. A streamed response opens with one
``{"role": "assistant"}`` delta per choice.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from fleetlm.cluster.errors import bad_request
from fleetlm.cluster.generation import ChoiceState, Endpoint, Prepared, Update, off_loop
from fleetlm.cluster.messages import ModelInfo, TokenLogprob
from fleetlm.cluster.protocol import SamplingRequest, Strict

CHAT_ROLES = ("system", "user", "assistant", "developer")


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


class ChatMessage(Strict):
    role: str
    content: Any
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_text(cls, v: Any) -> str:
        return _check_content(v)

    @field_validator("role")
    @classmethod
    def _known_role(cls, v: str) -> str:
        if v not in CHAT_ROLES:
            raise ValueError(f"unknown role {v!r}; expected one of {', '.join(CHAT_ROLES)}")
        return v

    def for_template(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for the system role.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content}


class ResponseFormat(Strict):
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"response_format type {v!r} is not supported (only 'text')")
        return v


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
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: Any) -> Any:
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none"):
            raise ValueError("tool_choice is not supported")
        return v

    def template_messages(self) -> list[dict[str, str]]:
        return [m.for_template() for m in self.messages]

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


def chat_choice(c: ChoiceState, want_logprobs: bool) -> dict[str, Any]:
    return {
        "index": c.index,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": chat_logprobs(c.logprobs) if want_logprobs else None,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


# --- the endpoint --------------------------------------------------------------------


class ChatEndpoint(Endpoint):
    request_cls = ChatCompletionRequest
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    async def tokenize(self, req: ChatCompletionRequest, info: ModelInfo) -> tuple[list[list[int]], list[str]]:
        from fleetlm.engine.llm import apply_chat_template

        messages = req.template_messages()
        size = sum(len(m["content"]) for m in messages)
        try:
            ids = await off_loop(size, apply_chat_template, info.tokenizer, messages, True)
        except Exception as e:  # noqa: BLE001 - a template or tokenizer refusing the input
            raise bad_request(f"The messages could not be tokenized: {e}", "messages") from None
        return [list(ids)], [""]

    def opening_choices(self, p: Prepared) -> list[dict[str, Any]]:
        return [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for k in range(len(p.gen_reqs) * p.n)]

    def stream_choice(self, p: Prepared, u: Update) -> dict[str, Any]:
        d = u.delta
        lp = chat_logprobs(d.logprobs) if p.want_logprobs and d.logprobs is not None else None
        return {"index": u.state.index, "delta": {"content": d.text} if d.text else {}, "logprobs": lp,
                "finish_reason": d.finish_reason}

    def final_choice(self, p: Prepared, s: ChoiceState) -> dict[str, Any]:
        return chat_choice(s, p.want_logprobs)


__all__ = ["CHAT_ROLES", "ChatCompletionRequest", "ChatEndpoint", "ChatMessage", "chat_choice", "chat_logprobs"]
