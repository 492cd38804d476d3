"""The OpenAI wire format: request models, their checks, and response/chunk builders.

Requests are pydantic models in strict mode: a wrong JSON type is a 400
naming the field (``"max_tokens": "16"`` is a mistake, not 16), unknown
fields are a 400 naming the field (a typo such as ``max_token`` must not be
silently ignored), and non-finite numbers are rejected. Fields that are
OpenAI's but not supported here (``suffix``, ``tools``, ``response_format``...)
are accepted only when empty, otherwise rejected with a clear message.

Optional fields accept ``null`` (OpenAI clients send it for "default").
Defaults are resolved once, in :func:`sampling_kwargs`, which returns the
keyword arguments of ``SamplingParams``; the service's limits (``max_n``,
``max_logprobs``, stop strings, ``max_tokens``, prompt length) are checked by
:func:`check_limits` and :func:`resolve_max_tokens`.

Responses are plain dicts (built per token when streaming: cheaper than
models), shaped as OpenAI's so the official client parses them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleetlm.cluster.errors import bad_request

# --- requests ----------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string or a list of strings")


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    n: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: Any = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Any] | None = None
    # Extras beyond OpenAI's (vLLM's names and meanings).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    # Sent by some clients and meaningless here: accepted, ignored.
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_type(cls, v: Any) -> Any:
        return _check_stop(v)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_ids(cls, v: Any) -> Any:
        # OpenAI sends {"<token id>": bias}; JSON keys are strings.
        if v is None:
            return v
        out = {}
        for k, b in v.items():
            if not (isinstance(k, str) and k.isascii() and k.isdigit()):
                raise ValueError(f"keys must be token ids, got {k!r}")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise ValueError(f"values must be numbers in [-100, 100], got {b!r}")
            out[int(k)] = float(b)
        return out

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: Any
    suffix: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0)
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        # str | list[str] | list[int] | list[list[int]], each non-empty.
        def is_id(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if isinstance(v, str):
            if not v:
                raise ValueError("must not be empty")
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty string, list of strings, list of token ids or list of lists of token ids")
        if all(isinstance(x, str) for x in v):
            for i, s in enumerate(v):
                if not s:
                    raise ValueError(f"prompt[{i}] must not be empty")
            return v
        if all(is_id(x) for x in v):
            return v
        if all(isinstance(x, list) for x in v):
            for i, ids in enumerate(v):
                if not ids or not all(is_id(t) for t in ids):
                    raise ValueError(f"prompt[{i}] must be a non-empty list of token ids")
            return v
        raise ValueError("must be a string, list of strings, list of token ids or list of lists of token ids")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: Any) -> Any:
        if v:
            raise ValueError("suffix is not supported (no fill-in-the-middle model is served)")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (strings or token-id lists)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


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


CHAT_ROLES = ("system", "user", "assistant", "developer")


class ChatMessage(_Strict):
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


class ResponseFormat(_Strict):
    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"response_format type {v!r} is not supported (only 'text')")
        return v


class ChatCompletionRequest(_SamplingFields):
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


def _param_of(loc: tuple[Any, ...]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def parse_request(cls: type[_SamplingFields], data: Any) -> Any:
    """Validate a decoded JSON body; any mistake -> OpenAIError 400 naming the param."""
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param_of(tuple(err["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "Unrecognized request argument supplied"
        elif err["type"] == "missing":
            msg = "Missing required parameter"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        raise bad_request(f"Invalid value for '{param}': {msg}.", param) from None
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    if isinstance(req, CompletionRequest) and req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of is not supported (it must equal n).", "best_of")
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
        # OpenAI's rule: top_logprobs needs logprobs=true.
        if req.top_logprobs > 0:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    return req


# --- limits --------------------------------------------------------------------


def num_logprobs(req: _SamplingFields) -> int | None:
    """Top-k logprobs requested (None: none asked)."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs  # type: ignore[attr-defined]


# Each prompt of a batched /v1/completions request is one engine request; this
# bounds the fan-out of a single HTTP request (the body limit alone allows ~10^5).
MAX_PROMPTS_PER_REQUEST = 256


def check_limits(req: _SamplingFields, limits: Any) -> None:
    """The service's configured limits (a ServeAppConfig): each exceeded -> 400 naming the param."""
    n = req.n or 1
    if n > limits.max_n:
        raise bad_request(f"n must be at most {limits.max_n}, got {n}.", "n")
    k = num_logprobs(req)
    if k is not None and k > limits.max_logprobs:
        param = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
        raise bad_request(f"{param} must be at most {limits.max_logprobs}, got {k}.", param)
    stops = req.stop_list
    if len(stops) > limits.max_stop_sequences:
        raise bad_request(
            f"At most {limits.max_stop_sequences} stop sequences are allowed, got {len(stops)}.", "stop")
    for s in stops:
        if not s:
            raise bad_request("Stop sequences must not be empty.", "stop")
        if len(s) > limits.max_stop_length:
            raise bad_request(f"Stop sequences must be at most {limits.max_stop_length} characters.", "stop")
    if isinstance(req, CompletionRequest) and len(req.prompts()) > MAX_PROMPTS_PER_REQUEST:
        raise bad_request(f"At most {MAX_PROMPTS_PER_REQUEST} prompts are allowed per request.", "prompt")
    cap = getattr(limits, "max_tokens_limit", None)
    if cap is not None:
        # Both spellings are bounded, even the one max_completion_tokens overrides.
        for name in ("max_tokens", "max_completion_tokens"):
            v = getattr(req, name, None)
            if v is not None and v > cap:
                raise bad_request(f"{name} must be at most {cap}, got {v}.", name)
    if req.min_tokens is not None:
        mt = requested_max_tokens(req)
        if mt is not None and req.min_tokens > mt:
            raise bad_request("min_tokens must not exceed max_tokens.", "min_tokens")


def requested_max_tokens(req: _SamplingFields) -> int | None:
    if isinstance(req, ChatCompletionRequest):
        return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return req.max_tokens  # type: ignore[attr-defined]


def max_tokens_param(req: _SamplingFields) -> str:
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens"


COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def resolve_max_tokens(
    req: _SamplingFields,
    prompt_len: int,
    max_model_len: int,
    max_tokens_limit: int | None,
) -> int:
    """max_tokens for one prompt, or a 400 when the prompt plus it cannot fit.

    A prompt alone at or over the context leaves no room: 400 on the prompt.
    An explicit max_tokens over the room left is a 400 (as OpenAI and vLLM);
    an absent one defaults to the room left (chat) or 16 (completions), capped.
    """
    param_prompt = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{prompt_len} tokens, which leaves no room for a completion.", param_prompt)
    room = max_model_len - prompt_len
    asked = requested_max_tokens(req)
    param = max_tokens_param(req)
    if asked is not None:
        if max_tokens_limit is not None and asked > max_tokens_limit:
            raise bad_request(f"{param} must be at most {max_tokens_limit}, got {asked}.", param)
        if asked > room:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion).", param)
        return asked
    default = room if isinstance(req, ChatCompletionRequest) else min(room, COMPLETION_DEFAULT_MAX_TOKENS)
    if max_tokens_limit is not None:
        default = min(default, max_tokens_limit)
    return default


# OpenAI param names of SamplingParams fields, to name the param when the
# engine's own validation (ValueError naming its field) rejects a value.
_SAMPLING_TO_OPENAI = {
    "n": "n",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "stop_token_ids": "stop_token_ids",
    "min_tokens": "min_tokens",
    "stop": "stop",
    "logit_bias": "logit_bias",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
}


def param_from_message(message: str, req: _SamplingFields) -> str | None:
    """Best guess of the OpenAI param a SamplingParams ValueError message names."""
    # SamplingParams messages start with the field they are about
    # ("min_tokens must be <= max_tokens=4, ..."): that one first.
    lead = message.split(" ", 1)[0]
    if lead in _SAMPLING_TO_OPENAI and lead != "max_tokens":
        return _SAMPLING_TO_OPENAI[lead]
    if "max_tokens" in message:
        return max_tokens_param(req)
    if "logprobs" in message:
        return "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
    for name, param in sorted(_SAMPLING_TO_OPENAI.items(), key=lambda kv: -len(kv[0])):
        if name in message:
            return param
    return None


def sampling_kwargs(req: _SamplingFields, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments of ``SamplingParams`` for this request, defaults resolved."""
    kw: dict[str, Any] = {
        "n": req.n or 1,
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "stop": req.stop_list,
    }
    optional = {
        "seed": req.seed,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "min_tokens": req.min_tokens,
        "ignore_eos": req.ignore_eos,
        "stop_token_ids": req.stop_token_ids,
        "skip_special_tokens": req.skip_special_tokens,
        "logprobs": num_logprobs(req),
        "logit_bias": req.logit_bias or None,
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    if kw.get("top_k") == 0:
        kw["top_k"] = -1  # 0 and -1 both mean "no top-k" to clients
    return kw


# --- responses -----------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


@dataclass
class TokenLogprob:
    """One generated token's logprob and its top alternatives (decoded strings)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class ChoiceState:
    """What the ingress has accumulated for one choice (non-streaming responses)."""

    index: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_logprobs(entries: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """Legacy completions logprobs: parallel lists, offsets into the returned text."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for e in entries:
        tokens.append(e.token)
        token_logprobs.append(e.logprob)
        top_logprobs.append({tok: lp for _, tok, lp in e.top})
        offsets.append(text_offset)
        text_offset += len(e.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}


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


def completion_choice(
    c: ChoiceState, want_logprobs: bool, echo_text: str = ""
) -> dict[str, Any]:
    return {
        "index": c.index,
        "text": echo_text + c.text,
        "logprobs": completion_logprobs(c.logprobs, len(echo_text)) if want_logprobs else None,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


def completion_response(
    id: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def chat_choice(c: ChoiceState, want_logprobs: bool) -> dict[str, Any]:
    return {
        "index": c.index,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": chat_logprobs(c.logprobs) if want_logprobs else None,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


def chat_response(
    id: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def completion_chunk(
    id: str, created: int, model: str, choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None, include_usage: bool = False,
) -> dict[str, Any]:
    out = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if include_usage:
        out["usage"] = usage
    return out


def chat_chunk(
    id: str, created: int, model: str, choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None, include_usage: bool = False,
) -> dict[str, Any]:
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": choices}
    if include_usage:
        out["usage"] = usage
    return out


def model_card(name: str, created: int, max_model_len: int | None = None) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": created, "owned_by": "fleetlm"}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


__all__ = [
    "COMPLETION_DEFAULT_MAX_TOKENS",
    "ChatCompletionRequest",
    "ChatMessage",
    "ChoiceState",
    "CompletionRequest",
    "MAX_PROMPTS_PER_REQUEST",
    "TokenLogprob",
    "chat_chunk",
    "chat_choice",
    "chat_logprobs",
    "chat_response",
    "check_limits",
    "completion_chunk",
    "completion_choice",
    "completion_logprobs",
    "completion_response",
    "model_card",
    "new_id",
    "now",
    "num_logprobs",
    "param_from_message",
    "parse_request",
    "requested_max_tokens",
    "resolve_max_tokens",
    "sampling_kwargs",
    "usage_dict",
]
