"""Exactly one ending per accepted request: the ingress's ledger of one model.

Every HTTP request the ingress accepts (valid, admitted) gets an
:class:`Ending`; whatever path the request takes afterwards (a complete
answer, an error body, an SSE error event, the client leaving, a drain), the
first ``end(reason)`` counts it in ``fleetlm_requests_finished_total{reason}``
and later calls do nothing. So once the server is idle,
``accepted == sum(finished)`` over all reasons, and ``inflight`` is 0: the
tests check exactly that after every fault they inject.

Reasons: ``stop`` / ``length`` (complete; ``length`` if any choice hit its
limit), ``abort`` (the client went away), or the error's code
(``unavailable``, ``queue_full``, ``internal``, ``invalid_request_error``...).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any


def request_reason(finish_reasons: Iterable[str | None]) -> str:
    """One reason for a request from its choices' finish reasons."""
    reasons = [r or "error" for r in finish_reasons]
    if not reasons:
        return "error"
    bad = next((r for r in reasons if r not in ("stop", "length")), None)
    if bad is not None:
        return bad
    return "length" if "length" in reasons else "stop"


class Ending:
    """The one ending of one accepted request."""

    __slots__ = ("_ledger", "reason", "_on_end")

    def __init__(self, ledger: Ledger, on_end: Callable[[], None] | None) -> None:
        self._ledger = ledger
        self.reason: str | None = None
        self._on_end = on_end

    @property
    def ended(self) -> bool:
        return self.reason is not None

    def end(self, reason: str) -> bool:
        """Count the request as finished with ``reason``; False if it had already ended."""
        if self.reason is not None:
            return False
        self.reason = reason
        self._ledger._finished(reason)
        if self._on_end is not None:
            self._on_end()
        return True


class Ledger:
    """Accepted / finished / in flight / migrated of one model, mirrored into Prometheus."""

    def __init__(self, metrics: Any = None) -> None:
        self._metrics = metrics
        self.accepted = 0
        self.finished: Counter[str] = Counter()
        self.migrated = 0

    @property
    def inflight(self) -> int:
        return self.accepted - sum(self.finished.values())

    def accept(self, on_end: Callable[[], None] | None = None) -> Ending:
        self.accepted += 1
        if self._metrics is not None:
            self._metrics.ledger_accepted()
        return Ending(self, on_end)

    def _finished(self, reason: str) -> None:
        self.finished[reason] += 1
        if self._metrics is not None:
            self._metrics.ledger_finished(reason)

    def snapshot(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "finished": dict(self.finished), "inflight": self.inflight,
                "migrated": self.migrated, "balanced": self.inflight == 0}


__all__ = ["Ending", "Ledger", "request_reason"]
