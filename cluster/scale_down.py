"""Cache-aware scale-down: when replicas go, those holding the least unique prefix cache go first.

Ray Serve chooses which replicas to stop on a downscale by node (pending
ones, then off the head node, then nodes with the fewest replicas) and then
age (newest first). For an LLM deployment that can throw away the replica
holding a hot tenant's long system prompt while keeping one whose cache any
other replica duplicates; the tenant's next requests all miss and re-prefill.

The rule, a pure function of the replicas' routing summaries (the cached
prefix-block ids each replica already reports to the routers through
``record_routing_stats``, ``router.routing_summary``):

    a replica's *unique* blocks are those no other replica reports. Remove
    first the replica with the fewest unique blocks, then the fewest blocks
    in all, then the one Ray itself would have chosen. A replica that has
    not reported yet holds nothing.

Where it runs: Ray Serve 2.60 has no public hook to rank replicas for
removal (its custom autoscaling policy decides how many, not which), so
:func:`install` wraps two private methods of Serve's controller once, in
the controller process (``EngineAwareAutoscalingPolicy.__init__`` calls it;
the policy is instantiated there):

- ``DeploymentState.scale_deployment_replicas``: when it asks for a
  downscale, the deployment's running replicas' routing stats are handed to
  the scheduler for that one decision;
- ``DeploymentScheduler._get_replicas_to_stop``: Ray chooses as always
  (it keeps stopping pending and starting replicas first, and gang
  deployments are left to it); the running replicas among its choice are
  then swapped for the running replicas that rank first by the rule above
  (a replica on the head node last, as in Ray's own order).

Only deployments whose replicas report FleetLM routing summaries are
re-ranked; every other deployment keeps Ray's choice. If Ray's internals
change shape, :func:`install` logs a warning and changes nothing
(tests/integration/test_cache_aware_scale_down.py shows the effect).
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

# A child of Serve's logger: in the controller its records go to Serve's controller log.
logger = logging.getLogger("ray.serve.fleetlm_scale_down")

_INSTALLED_FLAG = "_fleetlm_cache_aware_scale_down"
_PENDING_ATTR = "_fleetlm_routing_stats_for_downscale"


def unique_blocks(caches: Mapping[Hashable, frozenset[int]]) -> dict[Hashable, int]:
    """Per replica: how many of its cached block ids no other replica holds."""
    holders = Counter(b for blocks in caches.values() for b in blocks)
    return {r: sum(1 for b in blocks if holders[b] == 1) for r, blocks in caches.items()}


def removal_order(caches: Mapping[Hashable, frozenset[int] | None], preferred: Sequence[Hashable] = (),
                  last: frozenset[Hashable] = frozenset()) -> list[Hashable]:
    """The replicas of ``caches``, the first to remove first.

    ``caches[r]`` is the set of block ids replica ``r`` reports (None: it has
    not reported: nothing cached). Order: replicas in ``last`` (the head
    node's) after all others; then fewest unique blocks; then fewest blocks;
    then those in ``preferred`` (Ray's own choice) in its order; then by id.
    """
    sets = {r: (c or frozenset()) for r, c in caches.items()}
    unique = unique_blocks(sets)
    rank = {r: i for i, r in enumerate(preferred)}
    return sorted(sets, key=lambda r: (r in last, unique[r], len(sets[r]), rank.get(r, len(rank)), str(r)))


def summary_blocks(routing_stats: Any) -> frozenset[int] | None:
    """The cached block ids of a FleetLM routing summary; None if it is not one."""
    from fleetlm.cluster.router import SUMMARY_VERSION, ReplicaStats

    if not isinstance(routing_stats, Mapping) or routing_stats.get("v") != SUMMARY_VERSION:
        return None
    stats = ReplicaStats.from_summary("", routing_stats)
    return stats.block_hash_ids if stats.timestamp is not None else None


def choose_replicas_to_stop(ray_choice: set[Any], running: Sequence[Any], stats: Mapping[Any, Any],
                            on_head: frozenset[Any] = frozenset()) -> set[Any]:
    """Ray's choice with its running replicas swapped for the cache-aware ones.

    ``running``: the deployment's running replica ids (oldest first, as Ray
    keeps them); ``stats``: replica id -> routing stats dict. Replicas in
    ``ray_choice`` that are not running (pending, starting) stay chosen. If
    no running replica reports a FleetLM summary, Ray's choice stands.
    """
    running_set = set(running)
    chosen_running = [r for r in ray_choice if r in running_set]
    if not chosen_running:
        return set(ray_choice)
    caches = {r: summary_blocks(stats.get(r)) for r in running}
    if all(c is None for c in caches.values()):
        return set(ray_choice)
    order = removal_order(caches, preferred=chosen_running, last=on_head)
    return {r for r in ray_choice if r not in running_set} | set(order[:len(chosen_running)])


def _uid(replica_id: Any) -> str:
    return str(getattr(replica_id, "unique_id", replica_id))


def install() -> bool:
    """Wrap Serve's controller methods (idempotent). True when the cache-aware choice is active.

    Outside a Ray process (a unit test constructing the policy) there is no controller to change."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        from ray.serve._private.common import ReplicaState
        from ray.serve._private.deployment_scheduler import DeploymentScheduler
        from ray.serve._private.deployment_state import DeploymentState
    except ImportError as e:
        logger.warning("cache-aware scale-down unavailable (Ray Serve internals moved: %s)", e)
        return False
    if getattr(DeploymentScheduler, _INSTALLED_FLAG, False):
        return True
    scale = getattr(DeploymentState, "scale_deployment_replicas", None)
    pick = getattr(DeploymentScheduler, "_get_replicas_to_stop", None)
    if scale is None or pick is None:
        logger.warning("cache-aware scale-down unavailable: Ray Serve's controller has no "
                       "scale_deployment_replicas / _get_replicas_to_stop")
        return False

    def scale_deployment_replicas(self: Any, *args: Any, **kwargs: Any) -> Any:
        upscale, downscale = scale(self, *args, **kwargs)
        if downscale is not None:
            try:
                stats = {r.replica_id: r.routing_stats for r in self._replicas.get(states=[ReplicaState.RUNNING])}
                self._deployment_scheduler.__dict__.setdefault(_PENDING_ATTR, {})[self._id] = stats
            except Exception as e:  # noqa: BLE001 - never break Serve's control loop: Ray's choice then
                logger.warning("cache-aware scale-down skipped: %r", e)
        return upscale, downscale

    def get_replicas_to_stop(self: Any, deployment_id: Any, max_num_to_stop: int, *args: Any,
                             **kwargs: Any) -> Any:
        chosen = pick(self, deployment_id, max_num_to_stop, *args, **kwargs)
        stats = self.__dict__.get(_PENDING_ATTR, {}).pop(deployment_id, None)
        if stats is None or kwargs.get("gang_id_by_replica") is not None or (args and args[0] is not None):
            return chosen  # not a FleetLM downscale, or a gang deployment: Ray's choice
        try:
            running_nodes = self._running_replicas[deployment_id]  # replica id -> node id, oldest first
            head = getattr(self, "_head_node_id", None)
            on_head = frozenset(r for r, node in running_nodes.items() if node == head)
            new = choose_replicas_to_stop(set(chosen), list(running_nodes), stats, on_head)
        except Exception as e:  # noqa: BLE001 - as above
            logger.warning("cache-aware scale-down skipped: %r", e)
            return chosen
        if new != set(chosen):
            logger.info("cache-aware scale-down of %s: stopping %s instead of %s", deployment_id.name,
                        sorted(_uid(r) for r in new), sorted(_uid(r) for r in chosen))
        return new

    DeploymentState.scale_deployment_replicas = scale_deployment_replicas
    DeploymentScheduler._get_replicas_to_stop = get_replicas_to_stop
    setattr(DeploymentScheduler, _INSTALLED_FLAG, True)
    return True


__all__ = ["choose_replicas_to_stop", "install", "removal_order", "summary_blocks", "unique_blocks"]
