"""Placement: how a replica's TP x PP workers map onto Ray bundles and nodes.

A replica is ONE placement group with ONE BUNDLE PER PIPELINE STAGE, each
bundle holding that stage's ``tp_size`` devices: ``[{"GPU": tp}] * pp`` with
strategy PACK. Why this shape:

- A bundle is the unit Ray always places on a single node, so a stage's TP
  ranks share a node (their all-reduces stay on NVLink) by construction.
  "STRICT_PACK per stage, stages free to spread" is not a strategy one
  placement group can state over per-GPU bundles; per-stage bundles state
  it exactly. (Alternatives: one placement group per stage is not atomic,
  so two replicas each holding half their stages can wait on each other
  forever; per-GPU bundles under PACK can split a stage over two nodes.)
- One group reserves the whole replica or nothing (gang scheduling): no
  partial replicas hold GPUs while waiting for the rest.
- PACK keeps stages on one node when they fit (pipeline sends over NVLink)
  and spreads them over nodes when they do not (a model too big for a node).
- The replica creates the group and it fate-shares with its creator; the
  worker actors are scheduled into it and owned by the replica too, so
  removing the replica (or its process dying) removes its workers.

Inside a Ray Serve replica the deployment already reserved the group
(``cluster/app.py``: a bundle for the replica actor, then
:func:`stage_bundles`); the worker group then places its actors in that group
(it could not reserve the same GPUs twice), each stage in the smallest free
bundle that holds it. A borrowed group with per-worker bundles works too:
:func:`assign_bundles` packs each stage into the bundles of one node when it
can, and says so when it cannot.

Before anything is reserved, :func:`check_cluster_fits` compares the request
with the cluster's nodes and fails at once with the numbers (instead of a
placement group that waits forever for GPUs that do not exist).

Resource names: ``"GPU"`` on CUDA; on CPU a small ``"CPU"`` fraction per
worker (a CPU worker runs one torch thread; six of them share two cores in
tests); tests emulating GPU nodes use a custom resource such as
``"fake_gpu"`` (``ray.cluster_utils.Cluster`` nodes with
``resources={"fake_gpu": 2}``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger("fleetlm.placement")

_EPS = 1e-9


class PlacementError(ValueError):
    """The replica cannot be placed on this cluster (the message names the numbers)."""


@dataclass(frozen=True)
class PlacementSpec:
    """What each worker actor asks of Ray, and how long to wait for it."""

    resource: str = "GPU"  # the device resource: "GPU", "CPU", or a custom name
    per_worker: float = 1.0  # units of `resource` per worker
    cpus_per_worker: float = 0.0  # extra CPUs per worker (when resource != "CPU")
    strategy: str = "PACK"  # placement group strategy over the stage bundles
    timeout_s: float = 300.0  # how long to wait for the reservation
    # Compare with the cluster's nodes before reserving. Turn off on an
    # autoscaling cluster whose missing nodes the autoscaler would add for a
    # pending placement group; then `timeout_s` alone bounds the wait.
    fail_fast: bool = True

    def __post_init__(self) -> None:
        if not self.resource:
            raise ValueError("placement resource name must not be empty")
        if self.per_worker <= 0:
            raise ValueError(f"per_worker must be > 0, got {self.per_worker}")
        if self.cpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if self.strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"unknown placement strategy {self.strategy!r}")

    @classmethod
    def for_device(cls, device: str) -> PlacementSpec:
        if device == "cuda":
            return cls(resource="GPU", per_worker=1.0, cpus_per_worker=1.0)
        # CPU workers run one torch thread each and mostly wait on each other;
        # a token reservation lets a 6-worker replica fit on a 2-core machine.
        return cls(resource="CPU", per_worker=0.01)

    def worker_resources(self) -> dict[str, float]:
        """One worker's demand, as a resource dict."""
        res = {self.resource: self.per_worker}
        if self.cpus_per_worker and self.resource != "CPU":
            res["CPU"] = self.cpus_per_worker
        return res

    def actor_options(self) -> dict:
        """Keyword arguments for ``ActorClass.options`` giving one worker's demand."""
        res = self.worker_resources()
        opts: dict = {"num_cpus": res.pop("CPU", 0.0), "num_gpus": res.pop("GPU", 0.0)}
        if res:
            opts["resources"] = res
        return opts


def stage_bundles(spec: PlacementSpec, tp_size: int, pp_size: int) -> list[dict[str, float]]:
    """The bundles of a replica's placement group: one per stage, tp_size workers each.

    Also what a Ray Serve deployment should reserve for its workers (after its
    own bundle for the replica actor).
    """
    bundle = {k: v * tp_size for k, v in spec.worker_resources().items()}
    return [dict(bundle) for _ in range(pp_size)]


def check_cluster_fits(
    spec: PlacementSpec, tp_size: int, pp_size: int, node_resources: Sequence[Mapping[str, float]]
) -> None:
    """Fail fast when the cluster's alive nodes (their TOTAL resources) can never hold the replica.

    Each stage needs ``tp_size`` workers on one node, so besides the total
    the nodes must offer ``pp_size`` stage-sized slots.
    """
    world = tp_size * pp_size
    res = spec.resource
    per_stage = spec.worker_resources()
    stage_need = {k: v * tp_size for k, v in per_stage.items()}
    total_need = {k: v * world for k, v in per_stage.items()}
    for name, need in total_need.items():
        have = sum(float(n.get(name, 0.0)) for n in node_resources)
        if have + _EPS < need:
            raise PlacementError(
                f"tensor_parallel_size ({tp_size}) x pipeline_parallel_size ({pp_size}) = {world} workers "
                f"need {need:g} {name} but the cluster has {have:g} {name} in total "
                f"(on {len(node_resources)} node(s))"
            )
    slots = 0
    largest = 0.0
    for n in node_resources:
        fits = min(int(float(n.get(k, 0.0)) / v + _EPS) for k, v in stage_need.items())
        slots += fits
        largest = max(largest, float(n.get(res, 0.0)))
    if slots < pp_size:
        raise PlacementError(
            f"each pipeline stage puts its tensor_parallel_size ({tp_size}) workers on one node "
            f"({stage_need[res]:g} {res}); the cluster's nodes (largest: {largest:g} {res}) hold only "
            f"{slots} such stage(s), pipeline_parallel_size is {pp_size}"
        )


def assign_bundles(
    spec: PlacementSpec,
    tp_size: int,
    pp_size: int,
    bundles: Sequence[Mapping[str, float]],
    bundle_nodes: Sequence[str],
) -> list[int]:
    """Bundle index of each global rank (``pp_rank * tp_size + tp_rank``).

    Works for the group this module creates (stage ``s`` -> bundle ``s``) and
    for one reserved by someone else (Ray Serve), possibly with per-worker
    bundles and an extra bundle for the replica actor. Stages are filled in
    order; each first tries the smallest bundle that holds the whole stage, then the
    bundles of one node together; only if neither exists does a stage span
    nodes (correct, but its all-reduces cross the network), with a warning.
    """
    demand = spec.worker_resources()
    remaining = [
        min(int(float(b.get(k, 0.0)) / v + _EPS) for k, v in demand.items()) for b in bundles
    ]
    world = tp_size * pp_size
    if sum(remaining) < world:
        raise PlacementError(
            f"the placement group's bundles hold {sum(remaining)} workers of "
            f"{demand}, the replica needs {world} (tp {tp_size} x pp {pp_size})"
        )
    plan: list[int] = []
    for stage in range(pp_size):
        chosen = _fit_stage(remaining, bundle_nodes, tp_size)
        if chosen is None:
            logger.warning(
                "pipeline stage %d's %d TP ranks do not fit on one node of the given placement "
                "group; its all-reduces will cross nodes", stage, tp_size
            )
            chosen = [i for i, n in enumerate(remaining) for _ in range(n)][:tp_size]
        for i in chosen:
            remaining[i] -= 1
        plan.extend(chosen)
    return plan


def _fit_stage(remaining: list[int], bundle_nodes: Sequence[str], tp_size: int) -> list[int] | None:
    # Best fit: the smallest bundle that holds the whole stage. A stage-sized
    # bundle wins over a bigger one (such as a Serve replica's own CPU bundle
    # on a CPU deployment, should its use not show in the availability yet).
    fits = [(n, i) for i, n in enumerate(remaining) if n >= tp_size]
    if fits:
        return [min(fits)[1]] * tp_size
    by_node: dict[str, list[int]] = {}
    for i, node in enumerate(bundle_nodes):
        by_node.setdefault(node, []).append(i)
    for indices in by_node.values():
        if sum(remaining[i] for i in indices) >= tp_size:
            return [i for i in indices for _ in range(remaining[i])][:tp_size]
    return None
