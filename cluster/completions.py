"""``/v1/completions``: the legacy text completion request, its endpoint and its response shapes.

A prompt is a string, a list of strings, a list of token ids or a list of
lists of token ids; each prompt is one engine request with ``n`` choices
(choice ``k = prompt index * n + j``). ``echo`` returns the prompt before the
completion; ``logprobs`` are OpenAI's parallel lists with ``text_offset``
into the returned text. ``echo`` with ``logprobs`` scores the prompt too
(``SamplingParams.prompt_logprobs``): its tokens come first, the first with
a null logprob (nothing before it to score it), as in OpenAI's legacy API
and vLLM; this is how evaluation harnesses score a model through a server.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from fleetlm.cluster.errors import bad_request
from fleetlm.cluster.generation import ChoiceState, Endpoint, Prepared, Update, off_loop
from fleetlm.cluster.messages import ModelInfo, TokenLogprob
from fleetlm.cluster.protocol import SamplingRequest

# Each prompt of a batched request is one engine request; this bounds the
# fan-out of a single HTTP request (the body limit alone allows ~10^5).
MAX_PROMPTS_PER_REQUEST = 256
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class CompletionRequest(SamplingRequest):
    id_prefix: ClassVar[str] = "cmpl"
    prompt_param: ClassVar[str] = "prompt"
    logprobs_param: ClassVar[str] = "logprobs"

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

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        kw = super().sampling_kwargs(max_tokens)
        if self.echo and self.logprobs is not None:
            kw["prompt_logprobs"] = self.logprobs
        return kw

    def default_max_tokens(self, room: int) -> int:
        return min(room, COMPLETION_DEFAULT_MAX_TOKENS)

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise bad_request("best_of is not supported (it must equal n).", "best_of")

    def check_own_limits(self, limits: Any) -> None:
        if len(self.prompts()) > MAX_PROMPTS_PER_REQUEST:
            raise bad_request(f"At most {MAX_PROMPTS_PER_REQUEST} prompts are allowed per request.", "prompt")


# --- response shapes -------------------------------------------------------------


def completion_logprobs(entries: list[TokenLogprob], text_offset: int,
                        prompt: list[TokenLogprob] | None = None) -> dict[str, Any]:
    """Legacy completions logprobs: parallel lists, offsets into the returned text.

    ``prompt``: the echoed prompt's entries, first (offsets from 0); the first
    prompt token has no logprob and no alternatives (null, as OpenAI and vLLM).
    """
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []

    def put(e: TokenLogprob, offset: int) -> int:
        tokens.append(e.token)
        token_logprobs.append(e.logprob)
        top_logprobs.append(None if e.logprob is None else {tok: lp for _, tok, lp in e.top})
        offsets.append(offset)
        return offset + len(e.token)

    offset = 0
    for e in prompt or ():
        offset = put(e, offset)
    for e in entries:
        text_offset = put(e, text_offset)
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}


def completion_choice(c: ChoiceState, want_logprobs: bool, echo_text: str = "") -> dict[str, Any]:
    return {
        "index": c.index,
        "text": echo_text + c.text,
        "logprobs": completion_logprobs(c.logprobs, len(echo_text), c.prompt_logprobs) if want_logprobs else None,
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
    }


def _encode(tokenizer: Any, text: str) -> list[int]:
    # As LLMEngine.tokenize: no special tokens added to raw completion prompts.
    return list(tokenizer.encode(text, add_special_tokens=False))


def warm_encoding(tokenizer: Any) -> None:
    """A first encode and decode, as the first completion would do them (server.OpenAIServer.warm)."""
    tokenizer.decode(_encode(tokenizer, "Hello, world."))


# --- the endpoint --------------------------------------------------------------------


class CompletionsEndpoint(Endpoint):
    request_cls = CompletionRequest
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    async def tokenize(self, req: CompletionRequest, info: ModelInfo) -> tuple[list[list[int]], list[str]]:
        tok = info.tokenizer
        prompts: list[list[int]] = []
        echo_texts: list[str] = []
        for p in req.prompts():
            if isinstance(p, str):
                try:
                    ids = await off_loop(len(p), _encode, tok, p)
                except Exception as e:  # noqa: BLE001 - a tokenizer refusing the input
                    raise bad_request(f"The prompt could not be tokenized: {e}", "prompt") from None
                text = p
            else:
                bad = next((t for t in p if not 0 <= t < info.vocab_size), None)
                if bad is not None:
                    raise bad_request(f"Token id {bad} is outside the vocabulary [0, {info.vocab_size}).", "prompt")
                ids = p
                text = (await off_loop(len(p) * 4, tok.decode, p)) if req.echo else ""
            if not ids:
                raise bad_request("The prompt has no tokens.", "prompt")
            prompts.append(ids)
            echo_texts.append(text if req.echo else "")
        return prompts, echo_texts

    def stream_choice(self, p: Prepared, u: Update) -> dict[str, Any]:
        d = u.delta
        echo = p.echo_texts[u.state.index // p.n]
        lp = None
        if p.want_logprobs and (d.logprobs is not None or (u.first and u.state.prompt_logprobs)):
            lp = completion_logprobs(d.logprobs or [], len(echo) + u.logprob_chars_before,
                                     u.state.prompt_logprobs if u.first else None)
        return {"index": u.state.index, "text": (echo if u.first else "") + d.text, "logprobs": lp,
                "finish_reason": d.finish_reason}

    def final_choice(self, p: Prepared, s: ChoiceState) -> dict[str, Any]:
        return completion_choice(s, p.want_logprobs, p.echo_texts[s.index // p.n])


__all__ = ["COMPLETION_DEFAULT_MAX_TOKENS", "CompletionRequest", "CompletionsEndpoint", "MAX_PROMPTS_PER_REQUEST",
           "completion_choice", "completion_logprobs", "warm_encoding"]
