"""Per-request sampling parameters, with vLLM's names, defaults and meanings.

``SamplingParams`` is checked once, when it is built: every invalid value raises
``ValueError`` whose message starts with the parameter's name, so the HTTP layer
can turn it into an OpenAI error with ``param`` set. Checks that need the model
(vocabulary size, logprob limits) live in ``validate_for_model``, which the
engine calls when the request arrives.

The object is frozen: one instance may be shared by many prompts (``LLM.generate
(prompts, params)``), so the engine derives per-sequence variants with
``dataclasses.replace`` / ``clone_for_child`` instead of mutating it.

Torch-free on purpose: the scheduler and the HTTP ingress import it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

# Below this temperature sampling is greedy (same threshold as vLLM).
SAMPLING_EPS = 1e-5


def needs_output_history(params: SamplingParams) -> bool:
    """Sampling reads the values of earlier output tokens on the host (penalties),
    so a step cannot sample this request before the previous step's token is back."""
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


def _is_int(x) -> bool:
    # bool is an int subclass, but SamplingParams(top_k=True) is a caller bug.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _fail(name: str, requirement: str, value) -> None:
    raise ValueError(f"{name} must be {requirement}, got {value!r}.")


GUIDED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True, kw_only=True)
class GuidedDecodingParams:
    """Constrain the output to a JSON schema, a regex, one of some strings, or a grammar
    (vLLM's names): exactly one of ``json`` (a schema, as a dict or its JSON text),
    ``regex``, ``choice`` (a list of strings), ``grammar`` (EBNF/GBNF with a ``root``
    rule, or Lark with a ``start`` rule), ``json_object=True`` (any JSON object).

    Only the shape is checked here; whether the schema, regex or grammar is
    valid and supported is checked when the engine receives the request
    (``engine/structured_output.py``), before any compute.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None  # None or "xgrammar" (the only one)
    disable_any_whitespace: bool = False  # JSON: no whitespace beyond what JSON needs

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        given = [k for k in GUIDED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"guided_decoding must set exactly one of {', '.join(GUIDED_KINDS)}; got "
                f"{', '.join(given) if given else 'none'}."
            )
        if self.json is not None and not isinstance(self.json, (str, dict)):
            _fail("guided_decoding.json", "a JSON schema (a dict or its JSON text)", self.json)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                _fail(f"guided_decoding.{name}", "a non-empty string", v)
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                _fail("guided_decoding.choice", "a non-empty list of non-empty strings", self.choice)
            set_("choice", list(self.choice))
        if self.json_object not in (None, True, False):
            _fail("guided_decoding.json_object", "a boolean", self.json_object)
        if self.backend not in (None, "xgrammar", "auto"):
            _fail("guided_decoding.backend", "None or 'xgrammar' (the only grammar engine here)", self.backend)
        if not isinstance(self.disable_any_whitespace, bool):
            _fail("guided_decoding.disable_any_whitespace", "a boolean", self.disable_any_whitespace)

    @property
    def kind(self) -> str:
        return next(k for k in GUIDED_KINDS if getattr(self, k) not in (None, False))


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one request's completion(s). See vLLM's docs for each field.

    Normalizations done on construction: ``top_k=-1`` becomes 0 (both mean
    disabled); ``stop`` becomes a list of strings and ``stop_token_ids`` a list
    of ints (``[]`` when None); greedy requests (temperature < 1e-5) get
    ``top_p=1, top_k=0, min_p=0`` since filters cannot change an argmax.
    ``max_tokens=None`` means "up to max_model_len"; the engine resolves it.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    detokenize: bool = True
    guided_decoding: GuidedDecodingParams | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)

        if not _is_int(self.n) or self.n < 1:
            _fail("n", "an integer >= 1", self.n)
        if self.best_of is not None and (not _is_int(self.best_of) or self.best_of != self.n):
            _fail("best_of", f"None or equal to n={self.n} (best_of > n is not supported)", self.best_of)

        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2.0 <= v <= 2.0:
                _fail(name, "a number in [-2, 2]", v)
        v = self.repetition_penalty
        if not _is_real(v) or not (v > 0 and math.isfinite(v)):
            _fail("repetition_penalty", "a finite number > 0", v)

        v = self.temperature
        if not _is_real(v) or not (v >= 0 and math.isfinite(v)):
            _fail("temperature", "a finite number >= 0", v)
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            _fail("top_p", "a number in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < -1:
            _fail("top_k", "an integer: 0 or -1 (disabled) or >= 1", self.top_k)
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            _fail("min_p", "a number in [0, 1]", self.min_p)
        if self.seed is not None and not _is_int(self.seed):
            _fail("seed", "None or an integer", self.seed)

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            _fail("max_tokens", "None or an integer >= 1", self.max_tokens)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            _fail("min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", f"<= max_tokens={self.max_tokens}", self.min_tokens)

        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                _fail(name, "None or an integer >= 0", v)

        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stop = list(stop)
        else:
            _fail("stop", "a string or a list of strings", stop)
        if any(s == "" for s in stop):
            _fail("stop", "non-empty strings", self.stop)
        if stop and not self.detokenize:
            _fail("stop", "empty when detokenize=False (stop strings need text)", self.stop)
        set_("stop", stop)

        ids = self.stop_token_ids
        if ids is None:
            ids = []
        elif not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            _fail("stop_token_ids", "a list of non-negative integers", ids)
        set_("stop_token_ids", [int(t) for t in ids])

        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, Mapping):
                _fail("logit_bias", "a dict of token id -> bias", bias)
            for k, v in bias.items():
                if not _is_int(k) or k < 0:
                    _fail("logit_bias", "keyed by non-negative integer token ids", k)
                if not _is_real(v) or not -100.0 <= v <= 100.0:
                    _fail("logit_bias", "values in [-100, 100]", v)
            set_("logit_bias", {int(k): float(v) for k, v in bias.items()})

        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            _fail("guided_decoding", "None or a GuidedDecodingParams", self.guided_decoding)

        if self.top_k == -1:
            set_("top_k", 0)
        if self.temperature < SAMPLING_EPS:
            set_("top_p", 1.0)
            set_("top_k", 0)
            set_("min_p", 0.0)

    # -- derived ---------------------------------------------------------------
    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    def clone_for_child(self, i: int) -> SamplingParams:
        """Params of the i-th of the n sequences of one request: n=1, seed+i when seeded.

        Distinct seeds make the n children differ while each stays reproducible.
        """
        if not _is_int(i) or not 0 <= i < self.n:
            _fail("i", f"an integer in [0, n={self.n})", i)
        seed = None if self.seed is None else self.seed + i
        # The prompt's logprobs are the request's, not each child's: the first child computes them.
        prompt_logprobs = self.prompt_logprobs if i == 0 else None
        return dataclasses.replace(self, n=1, best_of=None, seed=seed, prompt_logprobs=prompt_logprobs)

    def validate_for_model(self, vocab_size: int, max_logprobs: int = 20, max_n: int | None = None) -> None:
        """Checks that need the model; raises ValueError naming the parameter."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            _fail("stop_token_ids", f"token ids < vocab_size={vocab_size}", bad)
        if self.logit_bias:
            bad = [t for t in self.logit_bias if t >= vocab_size]
            if bad:
                _fail("logit_bias", f"keyed by token ids < vocab_size={vocab_size}", bad)
        limit = min(max_logprobs, vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v > limit:
                _fail(name, f"<= {limit} (the server's max_logprobs)", v)
        if max_n is not None and self.n > max_n:
            _fail("n", f"<= {max_n}", self.n)
