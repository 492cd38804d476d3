"""Reserving a replica's devices in Ray: its own placement group, or the one it runs in.

``parallel/placement.py`` says which bundle each rank takes (plain functions,
testable without Ray); this module makes or borrows the placement group
and reads the free resources of its bundles.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from fleetlm.parallel.placement import PlacementSpec, assign_bundles, check_cluster_fits, stage_bundles


def reserve(spec: PlacementSpec, tp_size: int, pp_size: int) -> tuple[PlacementGroup, bool, list[int]]:
    """(placement group, whether this call made it, bundle index of each rank).

    Inside a Ray Serve replica (or any actor in a placement group) the workers'
    devices are already reserved in the current group: borrow it. Otherwise make
    one bundle per stage (a bundle sits on one node, so a stage does too).
    Raises TimeoutError, naming what could not be had, after ``spec.timeout_s``.
    """
    current = get_current_placement_group()
    if current is not None:
        _wait_ready(current, spec, tp_size, pp_size)
        return current, False, _plan_in_borrowed_group(current, spec, tp_size, pp_size)
    if spec.fail_fast:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        check_cluster_fits(spec, tp_size, pp_size, nodes)
    pg = placement_group(stage_bundles(spec, tp_size, pp_size), strategy=spec.strategy)
    try:
        _wait_ready(pg, spec, tp_size, pp_size)
    except TimeoutError:
        remove_placement_group(pg)
        raise
    return pg, True, [stage for stage in range(pp_size) for _ in range(tp_size)]


def _wait_ready(pg: PlacementGroup, spec: PlacementSpec, tp_size: int, pp_size: int) -> None:
    ready, _ = ray.wait([pg.ready()], timeout=spec.timeout_s)
    if not ready:
        need = {k: v * tp_size * pp_size for k, v in spec.worker_resources().items()}
        raise TimeoutError(
            f"could not reserve {need} for tp {tp_size} x pp {pp_size} workers within {spec.timeout_s:g} s; "
            f"available now: { {k: ray.available_resources().get(k, 0.0) for k in need} } "
            "(other replicas may hold them)"
        )


def _plan_in_borrowed_group(pg: PlacementGroup, spec: PlacementSpec, tp_size: int, pp_size: int) -> list[int]:
    table = placement_group_table(pg)
    pg_hex = pg.id.hex()
    avail = ray.available_resources()
    # What is still free in each bundle (the replica actor itself may use one).
    free = [{k: avail.get(f"{k}_group_{i}_{pg_hex}", 0.0) for k in bundle} for i, bundle in enumerate(pg.bundle_specs)]
    nodes = [table["bundles_to_node_id"].get(i, "") for i in range(len(pg.bundle_specs))]
    return assign_bundles(spec, tp_size, pp_size, free, nodes)
