"""Queue-depth autoscaling that also sees inside the engines.

Ray Serve's default policy scales on ongoing requests per replica against
``target_ongoing_requests``. For an LLM replica that is not enough: a replica
whose engine has a waiting queue (every batch seat taken, or the KV cache
full) is saturated even when its ongoing count is under the target, and a
replica whose KV cache is nearly full cannot take the next long prompt. So
each ``LLMReplica`` reports its engine's ``num_running``, ``num_waiting`` and
``kv_cache_usage`` through Ray Serve's ``record_autoscaling_stats`` hook
(:func:`autoscaling_stats`); Ray averages them over ``look_back_period_s``
and hands them to :class:`EngineAwareAutoscalingPolicy` as
``ctx.aggregated_metrics``.

The decision, :func:`desired_replicas`, is a pure function (unit-tested
without Ray). Each replica's *pressure*, in replicas' worth of work:

- ``(num_running + num_waiting) / target``: its queue against the target;
- ``1 + num_waiting / target`` when ``num_waiting >= waiting_threshold``: a
  replica with a real engine queue counts as full, plus its queue;
- ``kv_cache_usage / kv_high_watermark``: a cache at the watermark counts
  as one full replica.

It takes the largest of the three. The desired count is the largest of
``total_ongoing / target`` (Ray's own rule, over the requests the handles
count) and the sum of the pressures. Ray then applies its own machinery
around the policy (``ray.serve.autoscaling_policy._apply_autoscaling_config``):
rounding up, up/downscaling factors, ``upscale_delay_s`` /
``downscale_delay_s``, ``min_replicas`` / ``max_replicas``, and the cold
start from zero (a request queued at a handle of a deployment with no
replica starts one at once, and waits for it rather than failing).

No Ray import at module level: Ray pickles this module by value into its
controller, and the unit tests import it in microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Custom metric names (ctx.aggregated_metrics keys).
NUM_RUNNING = "fleetlm_num_running"
NUM_WAITING = "fleetlm_num_waiting"
KV_CACHE_USAGE = "fleetlm_kv_cache_usage"

POLICY_PATH = f"{__name__}:EngineAwareAutoscalingPolicy"


def autoscaling_stats(engine: Any) -> dict[str, float]:
    """What an ``LLMReplica`` returns from ``record_autoscaling_stats`` (numbers only)."""
    s = engine.stats()
    return {
        NUM_RUNNING: float(s.num_running),
        NUM_WAITING: float(s.num_waiting),
        KV_CACHE_USAGE: float(s.kv_cache_usage),
    }


@dataclass(frozen=True)
class EngineLoad:
    """One replica's engine, averaged over Ray's look-back window."""

    num_running: float = 0.0
    num_waiting: float = 0.0
    kv_cache_usage: float = 0.0


@dataclass(frozen=True)
class ScalingParams:
    target_ongoing_requests: float
    # Mean engine waiting queue at or above this marks a replica saturated.
    waiting_threshold: float = 1.0
    # KV usage (fraction of blocks referenced by requests) counted as one full replica.
    kv_high_watermark: float = 0.9

    def __post_init__(self) -> None:
        if not self.target_ongoing_requests > 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        if not self.waiting_threshold > 0:
            raise ValueError(f"waiting_threshold must be > 0, got {self.waiting_threshold}")
        if not 0 < self.kv_high_watermark <= 1:
            raise ValueError(f"kv_high_watermark must be in (0, 1], got {self.kv_high_watermark}")


def replica_pressure(load: EngineLoad, params: ScalingParams) -> float:
    """How many replicas' worth of work one replica's engine holds (see module docstring)."""
    target = params.target_ongoing_requests
    queue = (load.num_running + load.num_waiting) / target
    saturated = 1.0 + load.num_waiting / target if load.num_waiting >= params.waiting_threshold else 0.0
    kv = load.kv_cache_usage / params.kv_high_watermark
    return max(queue, saturated, kv)


def desired_replicas(total_ongoing: float, engines: Mapping[Any, EngineLoad], params: ScalingParams) -> float:
    """The replica count the load calls for, before Ray's rounding, delays and bounds.

    ``total_ongoing``: requests running or queued for the deployment, as the
    handles count them. ``engines``: the running replicas that reported
    engine stats (a replica that has not reported yet adds nothing).
    """
    by_requests = max(0.0, total_ongoing) / params.target_ongoing_requests
    by_engines = math.fsum(replica_pressure(e, params) for e in engines.values())
    return max(by_requests, by_engines)


class EngineAwareAutoscalingPolicy:
    """Ray Serve 2.60 custom autoscaling policy (a class: Ray instantiates it once
    with ``policy_kwargs`` and calls it with an ``AutoscalingContext`` each tick)."""

    def __init__(self, waiting_threshold: float = 1.0, kv_high_watermark: float = 0.9) -> None:
        self.waiting_threshold = waiting_threshold
        self.kv_high_watermark = kv_high_watermark
        # Instantiated in Serve's controller: make its downscales cache-aware there (scale_down.py).
        from fleetlm.cluster.scale_down import install

        install()

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        params = ScalingParams(
            target_ongoing_requests=ctx.config.get_target_ongoing_requests(),
            waiting_threshold=self.waiting_threshold,
            kv_high_watermark=self.kv_high_watermark,
        )
        engines = engine_loads(ctx.aggregated_metrics or {}, ctx.running_replicas)
        desired = desired_replicas(ctx.total_num_requests, engines, params)
        return desired, {}


def engine_loads(metrics: Mapping[str, Mapping[Any, float]], replicas: Any) -> dict[Any, EngineLoad]:
    """``ctx.aggregated_metrics`` (metric -> replica -> mean) -> replica -> EngineLoad,
    for the running replicas that reported at least one engine metric."""
    out = {}
    running, waiting, kv = (metrics.get(k, {}) for k in (NUM_RUNNING, NUM_WAITING, KV_CACHE_USAGE))
    for r in replicas:
        if r in running or r in waiting or r in kv:
            out[r] = EngineLoad(float(running.get(r, 0.0)), float(waiting.get(r, 0.0)), float(kv.get(r, 0.0)))
    return out


def serve_autoscaling_config(autoscaling: Any, **policy_kwargs: float) -> dict[str, Any]:
    """The ``autoscaling_config`` deployment option for a ``serve_config.AutoscalingConfig``:
    Ray's own fields plus this module's policy."""
    cfg = dict(autoscaling.to_serve())
    # Ray checks look_back_period_s > metrics_interval_s (default 10 s), a field it no longer
    # reads (replicas push on RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S): a short look-back
    # gets an interval under it rather than a FutureWarning about a field nobody set.
    if cfg.get("look_back_period_s", 30.0) <= 10.0:
        cfg["metrics_interval_s"] = cfg["look_back_period_s"] / 2
    cfg["policy"] = {"policy_function": POLICY_PATH, "policy_kwargs": dict(policy_kwargs)}
    return cfg


__all__ = [
    "EngineAwareAutoscalingPolicy",
    "EngineLoad",
    "KV_CACHE_USAGE",
    "NUM_RUNNING",
    "NUM_WAITING",
    "POLICY_PATH",
    "ScalingParams",
    "autoscaling_stats",
    "desired_replicas",
    "engine_loads",
    "replica_pressure",
    "serve_autoscaling_config",
]
