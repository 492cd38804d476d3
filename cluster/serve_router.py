"""The Ray Serve side of prefix-aware routing: ``PrefixAwareRequestRouter`` and the deployment options.

The policy itself (``router.py``) is a pure function, tested without Ray;
this module adapts it to ``ray.serve.request_router.RequestRouter``: it reads
each candidate's routing stats (what ``LLMReplica.record_routing_stats``
returned) and the request's ``block_hash_ids``, calls the policy, returns
the ranked replicas ``[[chosen], [the others by load]]``, hands each chosen
replica to the request it was chosen for, and records where requests went
and when they completed. Nothing in it awaits or blocks.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

from fleetlm.cluster.router import (
    ROUTING_STATS_PERIOD_S,
    ROUTING_STATS_TIMEOUT_S,
    ReplicaStats,
    RouterConfig,
    RouterMemory,
    RoutingRequest,
    decide,
    request_block_hash_ids,
    request_lora_id,
)


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
                stats = dataclasses.replace(stats, num_ongoing=ongoing)
            return stats

        async def choose_replicas(self, candidate_replicas: list[Any],
                                  pending_request: Any = None) -> list[list[Any]]:
            if not candidate_replicas:
                return []
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            request = RoutingRequest(
                request_block_hash_ids(pending_request.args, pending_request.kwargs),
                request_lora_id(pending_request.args, pending_request.kwargs),
            ) if pending_request is not None else RoutingRequest()
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


__all__ = ["ROUTER_CLASS_PATH", "request_router_options"]
