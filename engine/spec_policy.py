"""When speculation pays: the adaptive off switch, decided per step and per request.

A verify step of ``k`` proposals costs about one decode step while the
batch is memory bound (the weights are read once for all ``k + 1`` query
tokens) and up to ``k + 1`` decode steps once it is compute bound; it also
runs synchronously (proposals are made from real tokens), so the host's
share of a step is no longer hidden behind the device's. So:

- per step, by batch size: with more than ``disable_by_batch_size`` running
  requests nothing is proposed, and the step is an ordinary decode step (no
  lookups, no draft model, asynchronous scheduling as without speculation);
- per request, by measured acceptance: each verify updates moving averages
  of the request's acceptance rate (accepted / proposed) and of the tokens
  it yields (1 + accepted). By default (``min_acceptance_rate`` None) a
  request proposes while its tokens per verify beat, by 10%, the measured
  cost of a speculating step relative to a plain one (moving averages of the time
  between step completions, each kind at batch sizes speculation runs at);
  with ``min_acceptance_rate`` set, while its acceptance rate reaches that.
  A paused request tries again once every ``probe_interval`` steps (its text
  may have turned repetitive).

Plain Python over floats; the per-request state lives as long as its request.
"""

from __future__ import annotations

import time
import weakref

from fleetlm.engine.request import Request
from fleetlm.engine.config import SpeculativeConfig

# Weight of the newest sample in the moving averages: a request that never
# agrees is paused within a few verifies, one that usually agrees survives a miss.
EMA_WEIGHT = 0.3
# Cost of a speculating step relative to a plain one until both are measured
# (a verify step at small batch on a GPU, with the host's share exposed).
DEFAULT_COST_RATIO = 1.3
_MIN_SAMPLES = 3
# Speculate only where it wins at least this much (measurements are noisy, probes cost).
_MARGIN = 1.1
# A gap this many times the usual step is the engine idling, not a step.
_OUTLIER = 4.0


class _Ema:
    __slots__ = ("value", "n")

    def __init__(self, prior: float | None = None) -> None:
        """``prior``: a first value that the samples then move (else the first sample is the value)."""
        self.value, self.n = (0.0, 0) if prior is None else (prior, 1)

    def add(self, x: float) -> None:
        self.value = x if self.n == 0 else self.value + EMA_WEIGHT * (x - self.value)
        self.n += 1


class _Request:
    __slots__ = ("rate", "tokens", "probe_at")

    def __init__(self) -> None:
        # Optimistic starts: a request is paused after a few misses, not the first.
        self.rate = _Ema(1.0)
        self.tokens = _Ema(2.0)
        self.probe_at: int | None = None  # while paused: the step count at which it tries again


class SpecPolicy:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.max_batch = config.disable_by_batch_size
        self.min_rate = config.min_acceptance_rate
        self.probe_interval = config.probe_interval
        self._state: weakref.WeakKeyDictionary[Request, _Request] = weakref.WeakKeyDictionary()
        self._step_s = {False: _Ema(), True: _Ema()}  # seconds between completions: plain, speculating
        self._last_done: float | None = None
        self._steps = 0  # steps processed (the clock of paused requests' probes)

    def step_on(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch

    def cost_ratio(self) -> float:
        """Measured seconds of a speculating step over a plain one (a default until both are known)."""
        plain, spec = self._step_s[False], self._step_s[True]
        if plain.n < _MIN_SAMPLES or spec.n < _MIN_SAMPLES:
            return DEFAULT_COST_RATIO
        return spec.value / plain.value

    def _pays(self, st: _Request) -> bool:
        if self.min_rate is not None:
            return st.rate.value >= self.min_rate
        return st.tokens.value >= _MARGIN * self.cost_ratio()

    def request_on(self, req: Request) -> bool:
        """Whether ``req`` proposes this step (a paused request: once every probe_interval steps)."""
        st = self._state.get(req)
        if st is None or self._pays(st):
            if st is not None:
                st.probe_at = None
            return True
        if st.probe_at is None or self._steps >= st.probe_at:
            probing = st.probe_at is not None
            st.probe_at = self._steps + self.probe_interval
            return probing
        return False

    def would_propose(self, req: Request) -> bool:
        """What ``request_on`` would say now, without changing anything."""
        st = self._state.get(req)
        return st is None or self._pays(st) or (st.probe_at is not None and self._steps >= st.probe_at)

    def observe(self, req: Request, proposed: int, accepted: int) -> None:
        st = self._state.get(req)
        if st is None:
            st = self._state[req] = _Request()
        st.rate.add(accepted / proposed)
        st.tokens.add(1.0 + accepted)

    def observe_step(self, speculating: bool, batch_size: int) -> None:
        """A step completed: time it against the previous completion (at batch sizes speculation runs at)."""
        self._steps += 1
        now = time.perf_counter()
        last, self._last_done = self._last_done, now
        if last is None or not self.step_on(batch_size):
            return
        ema = self._step_s[speculating]
        if ema.n >= _MIN_SAMPLES and now - last > _OUTLIER * ema.value:
            return
        ema.add(now - last)

    def rate(self, req: Request) -> float | None:
        st = self._state.get(req)
        return None if st is None else st.rate.value
