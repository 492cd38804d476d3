"""Perplexity of a fixed text, measured through the engine itself.

The engine scores the prompt with ``SamplingParams(prompt_logprobs=0)``
(vLLM's way, and what lm-evaluation-harness reads through ``echo`` +
``logprobs`` on a server): each position after the first gets the logprob
of the prompt's own token. Perplexity = exp(-mean of those logprobs).
"""

from __future__ import annotations

import math
from pathlib import Path

from fleetlm import SamplingParams

TEXT = Path(__file__).resolve().parents[1] / "data" / "public_domain_text.txt"


def text_token_ids(tokenizer, max_tokens: int) -> list[int]:
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    return ids[:max_tokens]


def perplexity(llm, token_ids: list[int]) -> float:
    """exp of the mean negative logprob of token_ids[1:] given what precedes each."""
    out = llm.generate([token_ids], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))[0]
    scored = out.prompt_logprobs[1:]
    total = sum(pos[tok].logprob for pos, tok in zip(scored, token_ids[1:]))
    return math.exp(-total / len(scored))
