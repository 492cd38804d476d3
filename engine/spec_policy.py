"""When speculation pays: the adaptive off switch, decided per step and per request.

A verify step of ``k`` proposals costs about one decode step while the
batch is memory bound (the weights are read once for all ``k + 1`` query
tokens) and up to ``k + 1`` decode steps once it is compute bound. So:

- per step, by batch size: with more than ``disable_by_batch_size`` running
  requests nothing is proposed, and the step is an ordinary decode step (no
  lookups, no draft model, asynchronous scheduling as without speculation);
- per request, by measured acceptance: each verify updates a moving average
  of the request's acceptance rate (accepted / proposed); below
  ``min_acceptance_rate`` the request stops proposing, and tries again once
  every ``probe_interval`` steps (its text may have turned repetitive).

Plain Python over ints; the per-request state lives as long as its request.
"""

from __future__ import annotations

import weakref

from fleetlm.engine.request import Request
from fleetlm.engine.spec_config import SpeculativeConfig

# Weight of the newest verify in a request's acceptance average: a request that
# never agrees is paused after 7 verifies from the optimistic start of 1.0.
EMA_WEIGHT = 0.3


class _Acceptance:
    __slots__ = ("rate", "paused_steps")

    def __init__(self) -> None:
        self.rate = 1.0
        self.paused_steps = 0


class SpecPolicy:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.max_batch = config.disable_by_batch_size
        self.min_rate = config.min_acceptance_rate
        self.probe_interval = config.probe_interval
        self._state: weakref.WeakKeyDictionary[Request, _Acceptance] = weakref.WeakKeyDictionary()

    def step_on(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch

    def request_on(self, req: Request) -> bool:
        """Whether ``req`` proposes this step (counts the steps of a paused request)."""
        st = self._state.get(req)
        if st is None or st.rate >= self.min_rate:
            return True
        st.paused_steps += 1
        if st.paused_steps >= self.probe_interval:
            st.paused_steps = 0
            return True
        return False

    def observe(self, req: Request, proposed: int, accepted: int) -> None:
        st = self._state.get(req)
        if st is None:
            st = self._state[req] = _Acceptance()
        st.rate += EMA_WEIGHT * (accepted / proposed - st.rate)

    def rate(self, req: Request) -> float | None:
        st = self._state.get(req)
        return None if st is None else st.rate
