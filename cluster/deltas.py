"""What a replica streams: the engine's cumulative outputs turned into per-choice deltas.

The engine hands over only its latest cumulative ``RequestOutput``;
:class:`DeltaTracker` sends, per choice, only what is new since the previous
chunk (text, token ids, logprobs), so the bytes crossing Ray stay
proportional to the tokens generated, and when the ingress lags the deltas
simply get larger, never more numerous. Logprobs go as ``TokenLogprob``
(the sampled token and its top k by rank, decoded), the prompt's own once.
"""

from __future__ import annotations

from typing import Any

from fleetlm.cluster.messages import ChoiceDelta, GenerateChunk, TokenLogprob

# JSON has no -inf: a token with zero probability (masked by top-k/top-p, or
# banned) reports this floor instead, as vLLM does.
MIN_LOGPROB = -9999.0


def _finite(lp: float) -> float:
    return lp if lp >= MIN_LOGPROB else MIN_LOGPROB  # also maps NaN to the floor


def _token_logprobs(entries: list[dict[int, Any]], token_ids: list[int], k: int) -> list[TokenLogprob]:
    """Engine logprob dicts (sampled token first, then top ranks) -> TokenLogprob with top-k."""
    out = []
    for entry, tid in zip(entries, token_ids):
        sampled = entry.get(tid)
        top = sorted(
            ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
            key=lambda kv: kv[1].rank,
        )[:k]
        out.append(TokenLogprob(
            token_id=tid,
            token=(sampled.decoded_token or "") if sampled is not None else "",
            logprob=_finite(sampled.logprob) if sampled is not None else MIN_LOGPROB,
            top=[(t, lp.decoded_token or "", _finite(lp.logprob)) for t, lp in top],
        ))
    return out


def prompt_token_logprobs(out: Any, k: int, decode: Any) -> list[TokenLogprob]:
    """The prompt's own logprobs with their top ``k``: the first token has none (no context)."""
    entries = [TokenLogprob(out.prompt_token_ids[0], decode(out.prompt_token_ids[0]), None)]
    # A one-token prompt has nothing to score: the engine reports no prompt logprobs at all.
    for tid, scored in zip(out.prompt_token_ids[1:], (out.prompt_logprobs or [])[1:]):
        entries += _token_logprobs([scored], [tid], k) if scored is not None else [TokenLogprob(tid, decode(tid), None)]
    return entries


class DeltaTracker:
    """Turns the engine's cumulative ``RequestOutput`` into what is new per choice.

    ``num_prompt_logprobs``: also send the prompt's logprobs, once (``decode``
    gives the text of the first prompt token, which the engine does not score).
    """

    def __init__(self, num_logprobs: int | None, num_prompt_logprobs: int | None = None,
                 decode: Any = None) -> None:
        self.k = num_logprobs
        self.prompt_k = num_prompt_logprobs
        self.decode = decode
        self.prompt_sent = False
        self.sent_text: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.sent_logprobs: dict[int, int] = {}
        self.done: set[int] = set()

    def update(self, out: Any) -> tuple[GenerateChunk, int]:
        """The delta chunk and the number of new tokens in it."""
        chunk = GenerateChunk(
            num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens,
            finished=out.finished,
        )
        new_tokens = 0
        for c in out.outputs:
            if c.index in self.done:
                continue
            t0 = self.sent_text.get(c.index, 0)
            n0 = self.sent_tokens.get(c.index, 0)
            text = c.text[t0:]
            ids = list(c.token_ids[n0:])
            lps = None
            if self.k is not None and c.logprobs is not None:
                l0 = self.sent_logprobs.get(c.index, 0)
                lps = _token_logprobs(c.logprobs[l0:], list(c.token_ids[l0:]), self.k)
                self.sent_logprobs[c.index] = l0 + len(lps)
            if not text and not ids and c.finish_reason is None:
                continue
            self.sent_text[c.index] = len(c.text)
            self.sent_tokens[c.index] = len(c.token_ids)
            if c.finish_reason is not None:
                self.done.add(c.index)
            new_tokens += len(ids)
            chunk.choices.append(ChoiceDelta(c.index, text, ids, lps, c.finish_reason, c.stop_reason))
        if (self.prompt_k is not None and not self.prompt_sent and chunk.choices
                and (out.prompt_logprobs is not None or len(out.prompt_token_ids) == 1)):
            chunk.prompt_logprobs = prompt_token_logprobs(out, self.prompt_k, self.decode)
            self.prompt_sent = True
        return chunk, new_tokens


__all__ = ["MIN_LOGPROB", "DeltaTracker", "prompt_token_logprobs"]
