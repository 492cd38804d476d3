"""N-gram proposals (prompt lookup), on the host.

The sequence's last ``n`` tokens (``prompt_lookup_max >= n >= prompt_lookup_min``,
longest first) are looked up among its earlier tokens, prompt and output
alike; the ``k`` tokens that followed their latest earlier occurrence are
the proposal. When that continuation runs into the sequence's end it goes on
with its own first tokens (a repeating pattern keeps repeating). Pays on
outputs that copy their input: edits, rewrites, code, quotes.

Cost: each request keeps an index from every n-gram of its tokens to the
position after its latest occurrence, extended by the tokens added since the
last lookup: ``prompt_lookup_max - prompt_lookup_min + 1`` dict writes per
token, then as many reads per lookup, whatever the sequence's length. The
index lives as long as its request (a weak reference).
"""

from __future__ import annotations

import weakref

from fleetlm.engine.request import Request


class _Index:
    __slots__ = ("after", "upto")

    def __init__(self) -> None:
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> position of the token after its latest occurrence
        self.upto = 0  # tokens indexed


class NgramProposer:
    def __init__(self, num_tokens: int, lookup_min: int, lookup_max: int) -> None:
        self.k, self.lo, self.hi = num_tokens, lookup_min, lookup_max
        self._index: weakref.WeakKeyDictionary[Request, _Index] = weakref.WeakKeyDictionary()

    def propose(self, req: Request, max_tokens: int | None = None) -> list[int]:
        """Up to ``k`` (or ``max_tokens``) proposals to follow ``req``'s real tokens; [] without a match."""
        tokens = req.token_ids
        pos = self.match(req)
        if pos is None:
            return []
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        end = len(tokens)
        out: list[int] = []
        for j in range(k):
            i = pos + j
            out.append(tokens[i] if i < end else out[i - end])
        return out

    def match(self, req: Request) -> int | None:
        """Position after the latest earlier occurrence of the longest matching suffix, or None."""
        tokens = req.token_ids
        idx = self._index.get(req)
        if idx is None:
            idx = self._index[req] = _Index()
        end = len(tokens)
        if end < idx.upto:  # tokens were dropped (never while running; be safe)
            idx.after.clear()
            idx.upto = 0
        after, lo, hi = idx.after, self.lo, self.hi
        # Index the n-grams that end before each new token, with that token's position.
        for i in range(max(idx.upto, lo), end):
            for n in range(lo, min(hi, i) + 1):
                after[tuple(tokens[i - n : i])] = i
        idx.upto = end
        for n in range(min(hi, end - 1), lo - 1, -1):
            pos = after.get(tuple(tokens[end - n :]))
            if pos is not None:
                return pos
        return None
