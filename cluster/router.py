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

   A request with a LoRA adapter first prefers the replicas that hold it:
   in a device slot (the replica's summary lists it), else already checked
   and read into host memory, else any (the replica will read it; its
   requests wait for that load, so it counts in the load that autoscaling
   sees as waiting requests). Within that,
   a replica's *match* is the number of leading request blocks found in its
   summary (if the summary is fresher than ``stats_ttl_s``) or among the
   blocks this router itself sent there in the last ``memory_ttl_s``. Its
   *load* is Serve's own live count of requests on it when the router has
   one (its queue-length cache), else its reported ``num_running +
   num_waiting`` plus the requests this router sent it since that report
   and that are still in flight. The
   replicas are ranked by (adapter affinity, longest match, lowest load,
   fewest blocks this router recently sent there, id); the first wins,
   unless its affinity or match is not zero and its load is out of balance
   with the least loaded replica:
   ``load > min_load + imbalance_abs and load > imbalance_ratio * min_load``.
   Then the choice is power of two choices on load (ties by id). With no
   match anywhere the ranking already picks the least loaded replica, and
   between equally loaded ones the replica this router gave the fewest new
   blocks (SGLang's "smallest tree" rule: new prefixes spread out).

3. The Ray Serve adapter, ``serve_router.PrefixAwareRequestRouter`` (a
   ``ray.serve.request_router.RequestRouter``): reads each candidate's
   routing stats and the request's ``block_hash_ids`` (the ingress puts them
   in the ``GenerateRequest`` it sends), calls the policy, returns the ranked
   replicas ``[[chosen], [the others by load]]``, hands each chosen replica
   to the request it was chosen for, and records where requests went and
   when they completed. Nothing in it awaits or blocks.

Memory bound (``router_memory.RouterMemory``): at most ``max_blocks`` (replica, block
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetlm.cluster.router_memory import RouterMemory

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
        # LoRA adapter ids (none for an engine without LoRA): in the device slots, and read into host memory.
        "lora_resident": pack_block_ids(getattr(s, "lora_resident_ids", ())),
        "lora_known": pack_block_ids(getattr(s, "lora_known_ids", ())),
    }


# The policy's inputs ---------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingRequest:
    """What the policy knows of a request: its prompt's full-block hash ids, in order, and its LoRA adapter."""

    block_hash_ids: tuple[int, ...] = ()
    lora_id: int | None = None


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
    lora_resident: frozenset[int] = frozenset()  # adapter ids in the device slots
    lora_known: frozenset[int] = frozenset()  # adapter ids checked and read into host memory

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
                lora_resident=frozenset(unpack_block_ids(summary.get("lora_resident", b""))),
                lora_known=frozenset(unpack_block_ids(summary.get("lora_known", b""))),
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


# The policy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingDecision:
    replica_id: str
    reason: str  # "prefix" (adapter or longest match), "least_loaded" (no match anywhere), "imbalance" (p2c)
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


def adapter_affinity(request: RoutingRequest, stats: ReplicaStats, now: float, config: RouterConfig) -> int:
    """2: the request's adapter is in the replica's device slots; 1: in its host memory; else 0."""
    if request.lora_id is None or not is_fresh(stats, now, config):
        return 0
    return 2 if request.lora_id in stats.lora_resident else 1 if request.lora_id in stats.lora_known else 0


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
    affinity = {rid: adapter_affinity(request, s, now, config) for rid, s in uniq.items()}
    best = min(uniq, key=lambda rid: (-affinity[rid], -matches[rid], loads[rid], memory.num_blocks(rid), rid))
    min_load = min(loads.values())
    if matches[best] == 0 and affinity[best] == 0:
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


def request_lora_id(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
    """The LoRA adapter id of a handle call's ``GenerateRequest`` (None: the base model)."""
    for v in (*args, *kwargs.values()):
        lora = getattr(v, "lora_request", None)
        if lora is not None:
            return getattr(lora, "lora_int_id", None)
    return None


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


__all__ = [
    "ROUTING_STATS_PERIOD_S",
    "ROUTING_STATS_TIMEOUT_S",
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
    "request_lora_id",
    "routing_summary",
    "select_summary_blocks",
    "unpack_block_ids",
]
