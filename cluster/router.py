"""Prefix-aware request routing: send a request where its prompt's KV blocks already are.

Three pieces, one concept:

1. The replica side, :func:`routing_summary`: what an ``LLMReplica`` returns
   from Ray Serve's ``record_routing_stats`` hook. Ray Serve's controller
   calls it every ``ROUTING_STATS_PERIOD_S`` and hands the dict to every
   router of the deployment (``RunningReplica.routing_stats``): no extra
   infrastructure. It holds the engine's queue depth, KV usage, the time it
   was taken, and at most ``SUMMARY_MAX_BLOCKS`` (4096) ids of blocks in the
   prefix cache, packed as little-endian int64 (32 KiB at most).

2. The policy, :func:`choose_replica` / :func:`decide`: a pure function of the
   request's block hash ids, the replicas' stats, and the router's memory of
   its own recent decisions. No Ray, no I/O, no clock (``now`` is an argument),
   so it is unit-tested exactly. The rule, in one paragraph:

   A replica's *match* is the number of leading request blocks found in its
   summary (if the summary is fresher than ``stats_ttl_s``) or among the
   blocks this router itself sent there in the last ``memory_ttl_s``. Its
   *load* is Serve's own live count of requests on it when the router has
   one (its queue-length cache), else its reported ``num_running +
   num_waiting`` plus the requests this router sent it since that report
   and that are still in flight. The
   replicas are ranked by (longest match, lowest load, fewest blocks this
   router recently sent there, id); the first wins, unless its match is not
   zero and its load is out of balance with the least loaded replica:
   ``load > min_load + imbalance_abs and load > imbalance_ratio * min_load``.
   Then the choice is power of two choices on load (ties by id). With no
   match anywhere the ranking already picks the least loaded replica, and
   between equally loaded ones the replica this router gave the fewest new
   blocks (SGLang's "smallest tree" rule: new prefixes spread out).

3. The Ray Serve adapter, :class:`PrefixAwareRequestRouter` (a
   ``ray.serve.request_router.RequestRouter``): reads each candidate's
   routing stats and the request's ``block_hash_ids`` (the ingress puts them
   in the ``GenerateRequest`` it sends), calls the policy, returns the ranked
   replicas ``[[chosen], [the others by load]]``, hands each chosen replica
   to the request it was chosen for, and records where requests went and
   when they completed. Nothing in it awaits or blocks.

Memory bound (:class:`RouterMemory`): at most ``max_blocks`` (replica, block
id) entries (default 32768, about 8.5 MiB of Python objects, measured) in
one LRU, and at most ``max_inflight`` in-flight sends (default 16384, about
6.6 MiB); both also expire by age. So one router (one per model per ingress
replica) holds at most about 15 MiB, whatever the traffic.
"""

from __future__ import annotations

import random
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Replica summary ------------------------------------------------------------------------

SUMMARY_VERSION = 1
# Block ids per summary: 4096 * 8 bytes = 32 KiB on the wire per replica per period.
SUMMARY_MAX_BLOCKS = 4096
# How often Ray Serve asks each replica for its summary (RequestRouterConfig).
ROUTING_STATS_PERIOD_S = 2.0
ROUTING_STATS_TIMEOUT_S = 10.0


def pack_block_ids(ids: Sequence[int]) -> bytes:
    """Block hash ids (63-bit, non-negative) -> little-endian int64 bytes."""
    a = array("q", ids)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def unpack_block_ids(data: bytes) -> array:
    """Inverse of :func:`pack_block_ids`; a trailing partial item is dropped."""
    a = array("q")
    a.frombytes(data[: len(data) - len(data) % a.itemsize])
    if sys.byteorder != "little":
        a.byteswap()
    return a


def select_summary_blocks(ids: Sequence[int], max_blocks: int = SUMMARY_MAX_BLOCKS) -> list[int]:
    """At most ``max_blocks`` of the cache's block ids, given in registration order.

    When the cache holds more, the summary keeps the oldest half and the
    newest half. The oldest entries still cached survived every eviction
    (the prefix cache evicts least recently used first), so they are the
    hot shared prefixes (system prompts); the newest are what was just
    computed. The middle is what LRU eviction takes next anyway, and the
    router's memory of its own recent decisions covers new prefixes.
    """
    if max_blocks <= 0:
        return []
    if len(ids) <= max_blocks:
        return list(ids)
    newest = max_blocks // 2
    return list(ids[: max_blocks - newest]) + list(ids[len(ids) - newest:])


def routing_summary(engine: Any, max_blocks: int = SUMMARY_MAX_BLOCKS) -> dict[str, Any]:
    """The compact routing summary of one replica's engine (``record_routing_stats``).

    ``engine`` is an ``AsyncEngine`` (``stats()`` and ``cached_block_hash_ids()``).
    Size: about 100 bytes plus 8 bytes per block id, so at most 32 KiB + 100 B.
    """
    s = engine.stats()
    ids = select_summary_blocks(engine.cached_block_hash_ids(), max_blocks)
    return {
        "v": SUMMARY_VERSION,
        "t": time.time(),  # the router compares it with its own time.time()
        "num_running": int(s.num_running),
        "num_waiting": int(s.num_waiting),
        "kv_cache_usage": float(s.kv_cache_usage),
        "block_hash_ids": pack_block_ids(ids),
    }


# The policy's inputs ---------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingRequest:
    """What the policy knows of a request: its prompt's full-block hash ids, in order."""

    block_hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReplicaStats:
    """One candidate replica as the router sees it.

    ``timestamp`` is when the replica took its summary (None: it never
    reported). ``num_ongoing`` is Serve's own live count of requests on the
    replica when the router has one (its queue-length cache), else None.
    """

    replica_id: str
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    block_hash_ids: frozenset[int] = frozenset()
    timestamp: float | None = None
    num_ongoing: int | None = None

    @classmethod
    def from_summary(cls, replica_id: str, summary: Mapping[str, Any] | None,
                     num_ongoing: int | None = None) -> ReplicaStats:
        """Parse a :func:`routing_summary` dict; anything malformed counts as no report."""
        if not summary or summary.get("v") != SUMMARY_VERSION:
            return cls(replica_id, num_ongoing=num_ongoing)
        try:
            packed = summary.get("block_hash_ids", b"")
            return cls(
                replica_id=replica_id,
                num_running=max(0, int(summary.get("num_running", 0))),
                num_waiting=max(0, int(summary.get("num_waiting", 0))),
                kv_cache_usage=float(summary.get("kv_cache_usage", 0.0)),
                block_hash_ids=frozenset(unpack_block_ids(packed)) if packed else frozenset(),
                timestamp=float(summary["t"]),
                num_ongoing=num_ongoing,
            )
        except (KeyError, TypeError, ValueError):
            return cls(replica_id, num_ongoing=num_ongoing)


@dataclass(frozen=True)
class RouterConfig:
    """Knobs of the policy (``request_router_kwargs``); every one has a reason.

    - ``stats_ttl_s``: a summary older than this says nothing about the
      cache (the replica may have evicted it since); five stats periods.
    - ``imbalance_abs`` / ``imbalance_ratio``: the best-prefix replica is
      out of balance when its load exceeds the least loaded one's by more
      than ``imbalance_abs`` requests AND more than ``imbalance_ratio``
      times. Both: at low load a gap of a few requests is cheaper than
      recomputing a long prefix; at high load only a relative gap matters.
    - ``memory_ttl_s``: how long a block this router sent to a replica
      counts as cached there without the replica saying so.
    - ``max_memory_blocks`` / ``max_inflight`` / ``inflight_ttl_s``: the
      memory bounds (see :class:`RouterMemory`).
    """

    stats_ttl_s: float = 5 * ROUTING_STATS_PERIOD_S
    imbalance_abs: int = 4
    imbalance_ratio: float = 2.0
    memory_ttl_s: float = 30.0
    max_memory_blocks: int = 32768
    max_inflight: int = 16384
    inflight_ttl_s: float = 600.0

    def __post_init__(self) -> None:
        for name in ("stats_ttl_s", "memory_ttl_s", "inflight_ttl_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name in ("imbalance_abs", "max_memory_blocks", "max_inflight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        r = self.imbalance_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r < 1.0:
            raise ValueError(f"imbalance_ratio must be a number >= 1, got {r!r}")


# The router's memory of its own decisions -------------------------------------------------


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
    def from_config(cls, config: RouterConfig) -> RouterMemory:
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


# The policy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingDecision:
    replica_id: str
    reason: str  # "prefix" (longest match), "least_loaded" (no match anywhere), "imbalance" (p2c)
    matched_blocks: int
    loads: Mapping[str, int] = field(default_factory=dict)


def is_fresh(stats: ReplicaStats, now: float, config: RouterConfig) -> bool:
    return stats.timestamp is not None and now - stats.timestamp <= config.stats_ttl_s


def replica_load(stats: ReplicaStats, memory: RouterMemory) -> int:
    """Requests on the replica: Serve's live count when the router has one, else the
    reported queue depth plus this router's requests sent since that report.

    Serve's count (its queue-length cache) moves with every send and completion
    and is corrected by every replica answer, so it is fresher than a report
    that may be seconds old: a report still counts requests that have finished
    since, and adding the newer ones to it overstates a busy replica.
    """
    if stats.num_ongoing is not None:
        return stats.num_ongoing
    reported = stats.num_running + stats.num_waiting if stats.timestamp is not None else 0
    return reported + memory.inflight_since(stats.replica_id, stats.timestamp)


def matched_blocks(request: RoutingRequest, stats: ReplicaStats, memory: RouterMemory,
                   now: float, config: RouterConfig) -> int:
    """Leading request blocks the replica holds (fresh summary) or was recently sent (memory)."""
    summary = stats.block_hash_ids if is_fresh(stats, now, config) else frozenset()
    rid = stats.replica_id
    n = 0
    for h in request.block_hash_ids:
        if h in summary or memory.has_block(rid, h, now):
            n += 1
        else:
            break
    return n


def is_out_of_balance(load: int, min_load: int, config: RouterConfig) -> bool:
    return load > min_load + config.imbalance_abs and load > config.imbalance_ratio * min_load


def _request_rng(request: RoutingRequest) -> random.Random:
    # Deterministic when the caller brings no generator: the same request
    # against the same stats always gets the same pair.
    return random.Random(hash(request.block_hash_ids[:4]) ^ len(request.block_hash_ids))


def decide(request: RoutingRequest, replicas: Sequence[ReplicaStats], memory: RouterMemory,
           now: float, config: RouterConfig = RouterConfig(),
           rng: random.Random | None = None) -> RoutingDecision:
    """The routing rule of the module docstring; ``replicas`` are the candidates.

    Replicas absent from ``replicas`` do not exist for this decision, whatever
    the memory holds about them; a replica listed twice counts once (first).
    Raises ValueError when there is no candidate.
    """
    uniq: dict[str, ReplicaStats] = {}
    for s in replicas:
        uniq.setdefault(s.replica_id, s)
    if not uniq:
        raise ValueError("no replica to route to")
    loads = {rid: replica_load(s, memory) for rid, s in uniq.items()}
    matches = {rid: matched_blocks(request, s, memory, now, config) for rid, s in uniq.items()}
    best = min(uniq, key=lambda rid: (-matches[rid], loads[rid], memory.num_blocks(rid), rid))
    min_load = min(loads.values())
    if matches[best] == 0:
        return RoutingDecision(best, "least_loaded", 0, loads)
    if not is_out_of_balance(loads[best], min_load, config):
        return RoutingDecision(best, "prefix", matches[best], loads)
    # Out of balance: power of two choices on load.
    ids = sorted(uniq)
    if len(ids) > 2:
        ids = (rng or _request_rng(request)).sample(ids, 2)
    chosen = min(ids, key=lambda rid: (loads[rid], rid))
    return RoutingDecision(chosen, "imbalance", matches[chosen], loads)


def choose_replica(request: RoutingRequest, replicas: Sequence[ReplicaStats], memory: RouterMemory,
                   now: float, config: RouterConfig = RouterConfig(),
                   rng: random.Random | None = None) -> str:
    """The id of the replica the request should go to (see :func:`decide`)."""
    return decide(request, replicas, memory, now, config, rng).replica_id


# The Ray Serve adapter ---------------------------------------------------------------------


def request_block_hash_ids(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    """The prompt's block hash ids carried by a handle call: a ``block_hash_ids``
    keyword argument, or the attribute of an argument (the ``GenerateRequest``)."""
    ids = kwargs.get("block_hash_ids")
    if ids is None:
        for v in (*args, *kwargs.values()):
            ids = getattr(v, "block_hash_ids", None)
            if ids is not None:
                break
    try:
        return tuple(int(h) for h in ids) if ids else ()
    except (TypeError, ValueError):
        return ()


def _make_ray_router_class() -> type:
    # Ray is imported only here, so the policy above (and its unit tests) never need it.
    from ray.serve.request_router import RequestRouter

    class PrefixAwareRequestRouter(RequestRouter):
        """Ray Serve request router running :func:`decide` inside Serve's routing path.

        Configure with ``RequestRouterConfig(request_router_class=
        "fleetlm.cluster.router:PrefixAwareRequestRouter",
        request_router_kwargs={...RouterConfig fields...})``. Requests are
        matched to the replica chosen for them (no FIFO mixin: a replica
        chosen for one prompt must not serve another).
        """

        def initialize_state(self, **kwargs: Any) -> None:
            self._config = RouterConfig(**kwargs)
            self._memory = RouterMemory.from_config(self._config)
            self._rng = random.Random()
            # replica id -> (its routing_stats dict, that dict parsed); holding the
            # dict keeps the identity check sound (no id reuse after a free).
            self._parsed: dict[Any, tuple[Any, ReplicaStats]] = {}

        def _stats_of(self, replica: Any) -> ReplicaStats:
            raw = replica.routing_stats
            key = replica.replica_id
            cached = self._parsed.get(key)
            if cached is None or cached[0] is not raw:
                cached = (raw, ReplicaStats.from_summary(key.unique_id, raw))
                self._parsed[key] = cached
            ongoing = None
            if self._use_replica_queue_len_cache:
                ongoing = self._replica_queue_len_cache.get(key)
            stats = cached[1]
            if ongoing is not None:
                stats = ReplicaStats(stats.replica_id, stats.num_running, stats.num_waiting,
                                     stats.kv_cache_usage, stats.block_hash_ids, stats.timestamp, ongoing)
            return stats

        async def choose_replicas(self, candidate_replicas: list[Any],
                                  pending_request: Any = None) -> list[list[Any]]:
            if not candidate_replicas:
                return []
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            request = RoutingRequest(
                request_block_hash_ids(pending_request.args, pending_request.kwargs)
                if pending_request is not None else ())
            now = time.time()
            decision = decide(request, [self._stats_of(r) for r in candidate_replicas],
                              self._memory, now, self._config, self._rng)
            if pending_request is not None:
                # Every candidate is ranked: if none can take the request now, Serve
                # must back off before asking again (else its retry loop spins).
                pending_request.routing_context.should_backoff = True
                # Tentative: concurrent decisions before this one is accepted see it.
                self._memory.record(decision.replica_id, request.block_hash_ids, now)
            chosen = by_id[decision.replica_id]
            rest = sorted((r for rid, r in by_id.items() if rid != decision.replica_id),
                          key=lambda r: (decision.loads[r.replica_id.unique_id], r.replica_id.unique_id))
            return [[chosen], rest] if rest else [[chosen]]

        def _fulfill_next_pending_request(self, replica: Any, request_metadata: Any = None) -> None:
            # The replica was chosen for the request whose metadata this is. The base
            # class matches on internal_request_id alone, which the sub-requests of one
            # HTTP request share (n prompts): match the metadata object itself first.
            if request_metadata is not None:
                for pr in self._pending_requests_to_fulfill:
                    if pr.metadata is request_metadata:
                        if not pr.future.done():
                            self._cancel_routing_task_for_pending_request(pr)
                            self._record_queue_wait_time(pr)
                            pr.future.set_result(replica)
                            self._remove_pending_request_from_indices(pr)
                        return
            super()._fulfill_next_pending_request(replica, request_metadata)

        def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
            # Where the request really went (Serve may have used a lower rank).
            now = time.time()
            rid = replica_id.unique_id
            self._memory.record(rid, request_block_hash_ids(pending_request.args, pending_request.kwargs), now)
            self._memory.sent(pending_request.metadata.internal_request_id, rid, now)

        def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
            self._memory.complete(internal_request_id, replica_id.unique_id)

        def update_replicas(self, replicas: list[Any]) -> None:
            before = set(self._replica_id_set)
            super().update_replicas(replicas)
            for gone in before - set(self._replica_id_set):
                self._forget(gone)

        def on_replica_actor_died(self, replica_id: Any) -> None:
            super().on_replica_actor_died(replica_id)
            self._forget(replica_id)

        def _forget(self, replica_id: Any) -> None:
            self._parsed.pop(replica_id, None)
            self._memory.forget_replica(replica_id.unique_id)

    PrefixAwareRequestRouter.__module__ = __name__
    PrefixAwareRequestRouter.__qualname__ = "PrefixAwareRequestRouter"
    return PrefixAwareRequestRouter


def __getattr__(name: str) -> Any:
    # ``fleetlm.cluster.router:PrefixAwareRequestRouter`` resolves lazily (module
    # __getattr__), so importing this module for the policy never imports Ray.
    if name == "PrefixAwareRequestRouter":
        cls = _make_ray_router_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ROUTER_CLASS_PATH = f"{__name__}:PrefixAwareRequestRouter"


def request_router_options(config: RouterConfig | None = None) -> dict[str, Any]:
    """Ray Serve deployment options that put :class:`PrefixAwareRequestRouter` in front of a deployment."""
    from ray.serve.config import RequestRouterConfig

    kwargs = {} if config is None else {
        f: getattr(config, f) for f in RouterConfig.__dataclass_fields__
        if getattr(config, f) != RouterConfig.__dataclass_fields__[f].default}
    return {"request_router_config": RequestRouterConfig(
        request_router_class=ROUTER_CLASS_PATH,
        request_router_kwargs=kwargs,
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        request_routing_stats_timeout_s=ROUTING_STATS_TIMEOUT_S,
    )}


__all__ = [
    "ROUTER_CLASS_PATH",
    "ROUTING_STATS_PERIOD_S",
    "SUMMARY_MAX_BLOCKS",
    "ReplicaStats",
    "RouterConfig",
    "RouterMemory",
    "RoutingDecision",
    "RoutingRequest",
    "choose_replica",
    "decide",
    "matched_blocks",
    "pack_block_ids",
    "replica_load",
    "request_block_hash_ids",
    "request_router_options",
    "routing_summary",
    "select_summary_blocks",
    "unpack_block_ids",
]
