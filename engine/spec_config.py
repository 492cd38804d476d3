"""``speculative_config``: vLLM's mapping, validated once at the edge into a frozen config.

Methods (vLLM's names and keys):

- ``{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": M,
  "prompt_lookup_min": m}``: prompt lookup on the host (``engine/spec_ngram.py``);
  when only one of max/min is given the other equals it, neither gives 5/5 (vLLM's
  defaults).
- ``{"method": "draft_model", "model": "<a smaller model sharing the
  tokenizer>", "num_speculative_tokens": k}``: a draft model in the same
  worker (``workers/drafter.py``). ``method`` may be left out when ``model``
  is given. A draft whose vocabulary differs from the target's is refused.

The adaptive off switch (``engine/spec_policy.py``): ``disable_by_batch_size``
(vLLM's name) turns speculation off for a step whose running batch is larger;
per request, proposals pause while they do not pay (by default: measured
tokens per verify against the measured cost of a verify step; with
``min_acceptance_rate``, FleetLM's, against that acceptance rate), probing
again every ``probe_interval`` steps.

Torch-free: the Serve config validates a model entry's mapping with
``parse_speculative_config`` before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fleetlm.engine.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig

METHODS = ("ngram", "draft_model")
NGRAM_DEFAULT_LOOKUP = 5


_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
         "disable_by_batch_size", "min_acceptance_rate", "probe_interval")


def _int(d: Mapping, key: str, low: int, high: int | None = None) -> int:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"speculative_config: {key} must be an integer {bound}, got {v!r}")
    return v


def parse_speculative_config(value: Mapping[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """Check a ``speculative_config`` mapping (unknown keys and bad values are errors naming them)."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"speculative_config must be a mapping (JSON object), got {type(value).__name__}")
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        raise ValueError(f"speculative_config: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(_KEYS)}")
    d = dict(value)
    method = d.get("method")
    if method is None:
        if d.get("model") is None:
            raise ValueError("speculative_config needs a method (ngram or draft_model), or a draft model")
        method = "draft_model"
    if method not in METHODS:
        raise ValueError(f"speculative_config: method must be one of {', '.join(METHODS)}, got {method!r}")
    if "num_speculative_tokens" not in d:
        raise ValueError("speculative_config: num_speculative_tokens is required")
    k = _int(d, "num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
    kw: dict[str, Any] = {"method": method, "num_speculative_tokens": k}
    if method == "ngram":
        if d.get("model") is not None:
            raise ValueError("speculative_config: method ngram takes no model")
        lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
        if lo is None and hi is None:
            lo = hi = NGRAM_DEFAULT_LOOKUP
        look = {"prompt_lookup_min": hi if lo is None else lo, "prompt_lookup_max": lo if hi is None else hi}
        kw["prompt_lookup_min"] = _int(look, "prompt_lookup_min", 1)
        kw["prompt_lookup_max"] = _int(look, "prompt_lookup_max", 1)
        if kw["prompt_lookup_min"] > kw["prompt_lookup_max"]:
            raise ValueError(f"speculative_config: prompt_lookup_min ({kw['prompt_lookup_min']}) is larger than "
                             f"prompt_lookup_max ({kw['prompt_lookup_max']})")
    else:
        for key in ("prompt_lookup_max", "prompt_lookup_min"):
            if d.get(key) is not None:
                raise ValueError(f"speculative_config: {key} is for method ngram, not draft_model")
        model = d.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError("speculative_config: method draft_model needs model (a model name, directory or file)")
        kw["model"] = model
    if d.get("disable_by_batch_size") is not None:
        kw["disable_by_batch_size"] = _int(d, "disable_by_batch_size", 1)
    if d.get("probe_interval") is not None:
        kw["probe_interval"] = _int(d, "probe_interval", 1)
    rate = d.get("min_acceptance_rate")
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"speculative_config: min_acceptance_rate must be a number in [0, 1], got {rate!r}")
        kw["min_acceptance_rate"] = float(rate)
    return SpeculativeConfig(**kw)
