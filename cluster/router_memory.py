"""The router's memory of its own recent decisions: which blocks it sent where, and what is still in flight.

Between two routing-stats reports (seconds apart) a router would otherwise
not see its own decisions: a burst of requests sharing a new prefix would
scatter. Bounded in size and in age (see :class:`RouterMemory`), so one
router holds at most about 15 MiB, whatever the traffic. Plain Python: no
Ray, no clock (every call takes ``now``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any


class RouterMemory:
    """What this router sent where, so decisions between stats updates see each other.

    Two bounded structures:

    - blocks: LRU of (replica id, block id) -> last time sent, at most
      ``max_blocks`` entries; entries older than ``ttl_s`` do not count and
      are dropped as they reach the LRU front. One entry costs about 270
      bytes of Python objects (tracemalloc), so 32768 entries are 8.5 MiB.
    - in flight: (request id, replica id) -> send times of requests not yet
      completed, at most ``max_inflight`` sends in all (the oldest request
      dropped first; about 420 bytes each); sends older than
      ``inflight_ttl_s`` are dropped too, in case a completion is never
      reported. Keyed by request id AND replica: the sub-requests of one
      HTTP request (n prompts) share Serve's request id.

    Not thread-safe: one router's event loop owns it.
    """

    def __init__(self, max_blocks: int = 32768, max_inflight: int = 16384,
                 ttl_s: float = 30.0, inflight_ttl_s: float = 600.0) -> None:
        self.max_blocks = max_blocks
        self.max_inflight = max_inflight
        self.ttl_s = ttl_s
        self.inflight_ttl_s = inflight_ttl_s
        self._blocks: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._num_blocks: dict[str, int] = {}
        # The same list object sits in both maps.
        self._inflight: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._inflight_by_replica: dict[str, dict[str, list[float]]] = {}
        self._num_inflight = 0

    @classmethod
    def from_config(cls, config: Any) -> RouterMemory:
        """From a ``router.RouterConfig``."""
        return cls(config.max_memory_blocks, config.max_inflight, config.memory_ttl_s, config.inflight_ttl_s)

    # -- recording -------------------------------------------------------------------
    def record(self, replica_id: str, block_hash_ids: Iterable[int], now: float) -> None:
        """Remember that a request with these blocks went to ``replica_id`` at ``now``."""
        self.expire(now)
        blocks = self._blocks
        for h in block_hash_ids:
            key = (replica_id, h)
            if key in blocks:
                blocks.move_to_end(key)
            else:
                self._num_blocks[replica_id] = self._num_blocks.get(replica_id, 0) + 1
            blocks[key] = now
        while len(blocks) > self.max_blocks:
            self._drop_oldest_block()

    def sent(self, request_id: str, replica_id: str, now: float) -> None:
        """A request was accepted by ``replica_id`` at ``now``: it adds to that replica's load."""
        if self.max_inflight <= 0:
            return
        key = (request_id, replica_id)
        times = self._inflight.get(key)
        if times is None:
            times = self._inflight[key] = []
            self._inflight_by_replica.setdefault(replica_id, {})[request_id] = times
        times.append(now)
        self._num_inflight += 1
        while self._num_inflight > self.max_inflight:
            self._drop_request(next(iter(self._inflight)))

    def complete(self, request_id: str, replica_id: str) -> None:
        """One send of the request to the replica ended; unknown ones are ignored."""
        times = self._inflight.get((request_id, replica_id))
        if not times:
            return
        times.pop(0)
        self._num_inflight -= 1
        if not times:
            self._drop_request((request_id, replica_id))

    def forget_replica(self, replica_id: str) -> None:
        """The replica is gone: drop everything about it."""
        for key in [k for k in self._blocks if k[0] == replica_id]:
            del self._blocks[key]
        self._num_blocks.pop(replica_id, None)
        for request_id in list(self._inflight_by_replica.get(replica_id, ())):
            self._drop_request((request_id, replica_id))

    def expire(self, now: float) -> None:
        """Drop block entries older than ``ttl_s`` and sends older than ``inflight_ttl_s``."""
        horizon = now - self.ttl_s
        while self._blocks and next(iter(self._blocks.values())) < horizon:
            self._drop_oldest_block()
        horizon = now - self.inflight_ttl_s
        while self._inflight:
            key, times = next(iter(self._inflight.items()))
            if times[0] >= horizon:
                break
            times.pop(0)  # every pass drops one send: the loop ends
            self._num_inflight -= 1
            if times:
                self._inflight.move_to_end(key)
            else:
                self._drop_request(key)

    def _drop_oldest_block(self) -> None:
        (replica_id, _), _ = self._blocks.popitem(last=False)
        n = self._num_blocks[replica_id] - 1
        if n:
            self._num_blocks[replica_id] = n
        else:
            del self._num_blocks[replica_id]

    def _drop_request(self, key: tuple[str, str]) -> None:
        times = self._inflight.pop(key, None)
        if times is None:
            return
        self._num_inflight -= len(times)
        request_id, replica_id = key
        per = self._inflight_by_replica.get(replica_id)
        if per is not None:
            per.pop(request_id, None)
            if not per:
                del self._inflight_by_replica[replica_id]

    # -- queries (pure reads) ---------------------------------------------------------
    def has_block(self, replica_id: str, block_id: int, now: float) -> bool:
        t = self._blocks.get((replica_id, block_id))
        return t is not None and now - t <= self.ttl_s

    def num_blocks(self, replica_id: str) -> int:
        """Block entries held for ``replica_id`` (expired ones not yet dropped included)."""
        return self._num_blocks.get(replica_id, 0)

    def inflight_since(self, replica_id: str, since: float | None) -> int:
        """Sends to ``replica_id`` after ``since`` (all when None) not completed yet."""
        per = self._inflight_by_replica.get(replica_id)
        if not per:
            return 0
        if since is None:
            return sum(len(ts) for ts in per.values())
        return sum(1 for ts in per.values() for t in ts if t > since)

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def num_inflight(self) -> int:
        return self._num_inflight


__all__ = ["RouterMemory"]
