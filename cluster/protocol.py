"""The OpenAI wire format both generation endpoints share: the request base, its rules, response pieces.

Requests are pydantic models in strict mode: a wrong JSON type is a 400
naming the field (``"max_tokens": "16"`` is a mistake, not 16), unknown
fields are a 400 naming the field (a typo such as ``max_token`` must not be
silently ignored), and non-finite numbers are rejected. Fields that are
OpenAI's but not supported here (``suffix``...) are accepted only when
empty, otherwise rejected with a clear message. Structured output
(``response_format``, vLLM's ``guided_*``) is ``structured.py``'s.

Optional fields accept ``null`` (OpenAI clients send it for "default").
A request knows its own rules: :meth:`SamplingRequest.check_limits` (the
service's limits: ``max_n``, ``max_logprobs``, stop strings, ``max_tokens``),
:meth:`~SamplingRequest.resolve_max_tokens` (the prompt against the context)
and :meth:`~SamplingRequest.sampling_params` (defaults resolved once). What
differs between completions and chat (which field is ``max_tokens``, its
default, how logprobs are asked) are class attributes and small methods of
the two subclasses, ``completions.CompletionRequest`` and
``chat.ChatCompletionRequest``.

Responses are plain dicts (built per token when streaming: cheaper than
models), shaped as OpenAI's so the official client parses them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from fleetlm.cluster.errors import bad_request
from fleetlm.cluster.structured import GUIDED_FIELDS, ResponseFormat, guided_from_request

# --- requests ----------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool | None = None


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string or a list of strings")


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


class SamplingRequest(Strict):
    """Fields and rules shared by /v1/completions and /v1/chat/completions."""

    # What the subclasses say about themselves.
    id_prefix: ClassVar[str]  # of the response id
    prompt_param: ClassVar[str]  # the field holding the prompt
    logprobs_param: ClassVar[str]  # the field holding the number of top logprobs
    # The fields that set max_tokens, the one that wins first.
    max_tokens_fields: ClassVar[tuple[str, ...]] = ("max_tokens",)

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
    # Structured output (structured.py): OpenAI's, then vLLM's extras.
    response_format: ResponseFormat | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    # Sent by some clients and meaningless here: accepted, ignored.
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # The checked constraint of response_format / guided_* (set by check()).
    _guided: Any = PrivateAttr(default=None)

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

    # -- what the subclasses define ----------------------------------------------
    def num_logprobs(self) -> int | None:
        """Top-k logprobs requested per generated token (None: none asked)."""
        raise NotImplementedError

    def default_max_tokens(self, room: int) -> int:
        """max_tokens when the request gives none, with ``room`` tokens left in the context."""
        raise NotImplementedError

    def check(self) -> None:
        """Rules across fields, after parsing (400 naming the param)."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")

    @property
    def constrained(self) -> bool:
        return (self.response_format is not None and self.response_format.type != "text") or any(
            getattr(self, f) is not None for f in GUIDED_FIELDS) or self.guided_decoding_backend is not None

    def check_guided(self) -> None:
        """Check the output constraint (400 naming the field); a new grammar may take a while
        to check, so the endpoint runs this in a worker thread when the request has one."""
        self._guided = guided_from_request(self)

    def check_own_limits(self, limits: Any) -> None:
        """Limits only this endpoint has (checked in :meth:`check_limits`)."""

    # -- rules ---------------------------------------------------------------------
    def requested_max_tokens(self) -> int | None:
        return next((v for f in self.max_tokens_fields if (v := getattr(self, f)) is not None), None)

    def max_tokens_param(self) -> str:
        return next((f for f in self.max_tokens_fields if getattr(self, f) is not None), "max_tokens")

    def check_limits(self, limits: Any) -> None:
        """The service's configured limits (a ServeAppConfig): each exceeded -> 400 naming the param."""
        n = self.n or 1
        if n > limits.max_n:
            raise bad_request(f"n must be at most {limits.max_n}, got {n}.", "n")
        k = self.num_logprobs()
        if k is not None and k > limits.max_logprobs:
            param = self.logprobs_param
            raise bad_request(f"{param} must be at most {limits.max_logprobs}, got {k}.", param)
        stops = self.stop_list
        if len(stops) > limits.max_stop_sequences:
            raise bad_request(
                f"At most {limits.max_stop_sequences} stop sequences are allowed, got {len(stops)}.", "stop")
        for s in stops:
            if not s:
                raise bad_request("Stop sequences must not be empty.", "stop")
            if len(s) > limits.max_stop_length:
                raise bad_request(f"Stop sequences must be at most {limits.max_stop_length} characters.", "stop")
        self.check_own_limits(limits)
        cap = getattr(limits, "max_tokens_limit", None)
        if cap is not None:
            # Every spelling is bounded, even one another overrides.
            for name in reversed(self.max_tokens_fields):
                v = getattr(self, name)
                if v is not None and v > cap:
                    raise bad_request(f"{name} must be at most {cap}, got {v}.", name)
        if self.min_tokens is not None:
            mt = self.requested_max_tokens()
            if mt is not None and self.min_tokens > mt:
                raise bad_request("min_tokens must not exceed max_tokens.", "min_tokens")

    def resolve_max_tokens(self, prompt_len: int, max_model_len: int, max_tokens_limit: int | None) -> int:
        """max_tokens for one prompt, or a 400 when the prompt plus it cannot fit.

        A prompt alone at or over the context leaves no room: 400 on the prompt.
        An explicit max_tokens over the room left is a 400 (as OpenAI and vLLM);
        an absent one defaults to :meth:`default_max_tokens`, capped.
        """
        if prompt_len >= max_model_len:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                f"{prompt_len} tokens, which leaves no room for a completion.", self.prompt_param)
        room = max_model_len - prompt_len
        asked = self.requested_max_tokens()
        param = self.max_tokens_param()
        if asked is not None:
            if max_tokens_limit is not None and asked > max_tokens_limit:
                raise bad_request(f"{param} must be at most {max_tokens_limit}, got {asked}.", param)
            if asked > room:
                raise bad_request(
                    f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                    f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion).", param)
            return asked
        default = self.default_max_tokens(room)
        if max_tokens_limit is not None:
            default = min(default, max_tokens_limit)
        return default

    def param_from_message(self, message: str) -> str | None:
        """Best guess of the OpenAI param a SamplingParams ValueError message names."""
        # SamplingParams messages start with the field they are about
        # ("min_tokens must be <= max_tokens=4, ..."): that one first.
        lead = message.split(" ", 1)[0]
        if lead in _SAMPLING_TO_OPENAI and lead != "max_tokens":
            return _SAMPLING_TO_OPENAI[lead]
        if "max_tokens" in message:
            return self.max_tokens_param()
        if "logprobs" in message:
            return self.logprobs_param
        for name, param in sorted(_SAMPLING_TO_OPENAI.items(), key=lambda kv: -len(kv[0])):
            if name in message:
                return param
        return None

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        """Keyword arguments of ``SamplingParams`` for this request, defaults resolved."""
        kw: dict[str, Any] = {
            "n": self.n or 1,
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "stop": self.stop_list,
        }
        optional = {
            "seed": self.seed,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "stop_token_ids": self.stop_token_ids,
            "skip_special_tokens": self.skip_special_tokens,
            "logprobs": self.num_logprobs(),
            "logit_bias": self.logit_bias or None,
            "guided_decoding": self._guided,
        }
        kw.update({k: v for k, v in optional.items() if v is not None})
        if kw.get("top_k") == 0:
            kw["top_k"] = -1  # 0 and -1 both mean "no top-k" to clients
        return kw

    def sampling_params(self, max_tokens: int, vocab_size: int) -> Any:
        """This request as ``SamplingParams``; the engine's own refusal is a 400 naming the param."""
        from fleetlm.engine.sampling_params import SamplingParams

        kw = self.sampling_kwargs(max_tokens)
        if kw.get("top_k", 0) >= vocab_size:
            # Keeping every token is no top-k at all; and a k past int32 must not
            # reach the sampler's tensors (it killed the engine loop).
            kw["top_k"] = -1
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e), self.param_from_message(str(e))) from None


def _param_of(loc: tuple[Any, ...]) -> str | None:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def parse_request(cls: type[SamplingRequest], data: Any) -> Any:
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
    req.check()
    return req


# --- response pieces -------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response_body(obj: str, id: str, created: int, model: str, choices: list[dict[str, Any]],
                  usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": id, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}


def chunk_body(obj: str, id: str, created: int, model: str, choices: list[dict[str, Any]],
               usage: dict[str, Any] | None = None, include_usage: bool = False) -> dict[str, Any]:
    out = {"id": id, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
        out["usage"] = usage
    return out


def model_card(name: str, created: int, max_model_len: int | None = None) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": created, "owned_by": "fleetlm"}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


__all__ = [
    "SamplingRequest",
    "StreamOptions",
    "Strict",
    "chunk_body",
    "model_card",
    "new_id",
    "now",
    "parse_request",
    "response_body",
    "usage_dict",
]
