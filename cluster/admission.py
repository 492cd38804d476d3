"""Admission control of one model at the ingress: refuse early (429) rather than queue.

A model has ``seats``: sequences its replicas run at once (live replicas x the
engine's ``max_num_seqs``). The ingress counts the sequences it has admitted
and not yet seen end (``inflight``; a completion request is prompts x n
sequences) and the prompt tokens of those not yet past their prefill
(``prefill_tokens``: no output yet). A new request is admitted when

- the sequences *waiting for a seat* stay within ``max_waiting_requests``:
  ``inflight + k <= seats + max_waiting_requests``, and
- the prefill backlog stays within ``max_waiting_tokens``:
  ``prefill_tokens + t <= max_waiting_tokens`` (or the backlog is empty, so a
  long prompt is never refused forever),

otherwise it gets a 429 with ``Retry-After`` at once, before any replica sees
it. Admitted requests then find a seat (or a short queue) at their replica,
so their time to first token stays that of a lightly loaded server, and no
queue anywhere (ingress, Serve's router, engine) grows without bound. A
request larger than the whole model at its largest (``k`` over
``max_seats + max_waiting_requests``) could never be admitted: 400.

Plain Python, no Ray, no clock: the ingress feeds it replica counts and
request events; unit-tested in microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.cluster import errors
from fleetlm.cluster.errors import OpenAIError


@dataclass(frozen=True)
class AdmissionLimits:
    """Per-model limits; None: that bound is off."""

    max_waiting_requests: int | None = None
    max_waiting_tokens: int | None = None

    @property
    def enabled(self) -> bool:
        return self.max_waiting_requests is not None or self.max_waiting_tokens is not None


class Ticket:
    """One admitted request: ``started(i)`` when sequence group i has output, ``release()`` at its end."""

    def __init__(self, admission: Admission, group_tokens: list[int], group_seqs: int) -> None:
        self._admission = admission
        self._pending_tokens = list(group_tokens)  # per prompt: tokens still in the prefill backlog
        self._seqs = group_seqs * len(group_tokens)
        self.released = False

    @property
    def num_sequences(self) -> int:
        return self._seqs

    def started(self, group: int) -> None:
        """Prompt ``group`` has its first output (or ended): its tokens leave the backlog."""
        t = self._pending_tokens[group]
        if t and not self.released:
            self._pending_tokens[group] = 0
            self._admission.prefill_tokens -= t

    def release(self) -> None:
        """Every sequence of the request has ended (idempotent)."""
        if self.released:
            return
        self.released = True
        self._admission.prefill_tokens -= sum(self._pending_tokens)
        self._pending_tokens = [0] * len(self._pending_tokens)
        self._admission.inflight -= self._seqs


class Admission:
    """Counters and the admission rule of one model (see the module docstring)."""

    def __init__(self, limits: AdmissionLimits, max_num_seqs: int, num_replicas: int, max_replicas: int) -> None:
        self.limits = limits
        self.max_num_seqs = max_num_seqs
        self.num_replicas = num_replicas
        self.max_replicas = max(max_replicas, num_replicas)
        self.inflight = 0
        self.prefill_tokens = 0
        self.num_rejected = 0

    @property
    def seats(self) -> int:
        return self.num_replicas * self.max_num_seqs

    @property
    def num_waiting(self) -> int:
        """Admitted sequences beyond the seats (queued at some replica)."""
        return max(0, self.inflight - self.seats)

    def set_replicas(self, num_replicas: int, max_num_seqs: int | None = None) -> None:
        self.num_replicas = max(0, num_replicas)
        if max_num_seqs is not None:
            self.max_num_seqs = max_num_seqs
        self.max_replicas = max(self.max_replicas, self.num_replicas)

    def check_size(self, num_sequences: int, param: str = "n") -> None:
        """400 for a request larger than the model could ever take at once."""
        w = self.limits.max_waiting_requests
        if w is None:
            return
        most = self.max_replicas * self.max_num_seqs + w
        if num_sequences > most:
            raise errors.bad_request(
                f"The request needs {num_sequences} sequences (prompts x n) at once; this model "
                f"admits at most {most}.", param)

    def admit(self, group_tokens: list[int], n: int, param: str = "n") -> Ticket:
        """A ticket for a request of ``len(group_tokens)`` prompts x ``n``, or 429 / 400."""
        k = len(group_tokens) * n
        self.check_size(k, param)
        t = sum(group_tokens) * n
        w, wt = self.limits.max_waiting_requests, self.limits.max_waiting_tokens
        if w is not None and self.inflight + k > self.seats + w:
            raise self._reject()
        if wt is not None and self.prefill_tokens > 0 and self.prefill_tokens + t > wt:
            raise self._reject()
        self.inflight += k
        self.prefill_tokens += t
        return Ticket(self, [x * n for x in group_tokens], n)

    def _reject(self) -> OpenAIError:
        self.num_rejected += 1
        return errors.queue_full(retry_after_s=1)

    def snapshot(self) -> dict[str, int]:
        return {"seats": self.seats, "inflight": self.inflight, "waiting": self.num_waiting,
                "prefill_tokens": self.prefill_tokens, "rejected": self.num_rejected}


__all__ = ["Admission", "AdmissionLimits", "Ticket"]
