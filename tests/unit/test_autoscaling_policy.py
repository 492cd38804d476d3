"""The engine-aware autoscaling decision, without Ray: exact numbers."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from fleetlm.cluster.autoscaling import (
    KV_CACHE_USAGE,
    NUM_RUNNING,
    NUM_WAITING,
    POLICY_PATH,
    EngineAwareAutoscalingPolicy,
    EngineLoad,
    ScalingParams,
    autoscaling_stats,
    desired_replicas,
    engine_loads,
    replica_pressure,
    serve_autoscaling_config,
)
from fleetlm.cluster.serve_config import AutoscalingConfig

P = ScalingParams(target_ongoing_requests=4.0)  # waiting_threshold=1, kv_high_watermark=0.9


def test_ongoing_requests_alone_is_rays_rule():
    assert desired_replicas(12.0, {}, P) == 3.0
    assert desired_replicas(0.0, {}, P) == 0.0
    assert desired_replicas(-1.0, {}, P) == 0.0  # a glitching counter never asks for less than zero


def test_queue_pressure_is_running_plus_waiting_over_target():
    assert replica_pressure(EngineLoad(num_running=2, num_waiting=0, kv_cache_usage=0.1), P) == 0.5


def test_a_waiting_queue_counts_the_replica_as_full():
    # 2 running + 1 waiting is under the target of 4, but the engine queues: full + its queue.
    assert replica_pressure(EngineLoad(2, 1, 0.1), P) == 1.25
    # Below the threshold (a mean of 0.5 waiting: transient) it does not.
    assert replica_pressure(EngineLoad(2, 0.5, 0.1), P) == 0.625
    # A longer queue than the target itself: the queue term dominates.
    assert replica_pressure(EngineLoad(8, 8, 0.1), P) == 4.0


def test_a_full_kv_cache_counts_the_replica_as_busy():
    assert replica_pressure(EngineLoad(1, 0, 0.9), P) == pytest.approx(1.0)
    assert replica_pressure(EngineLoad(1, 0, 0.99), P) == pytest.approx(1.1)
    assert replica_pressure(EngineLoad(1, 0, 0.45), P) == pytest.approx(0.5)


def test_engines_can_ask_for_more_than_the_request_count():
    # Handles count 6 ongoing (1.5 replicas' worth), but both engines queue.
    engines = {"a": EngineLoad(3, 1, 0.5), "b": EngineLoad(2, 2, 0.6)}
    d = desired_replicas(6.0, engines, P)
    assert d == pytest.approx(1.25 + 1.5)
    assert math.ceil(d) == 3


def test_one_full_replica_and_one_idle_do_not_scale_up():
    engines = {"a": EngineLoad(1, 0, 0.95), "b": EngineLoad(0, 0, 0.0)}
    d = desired_replicas(1.0, engines, P)
    assert d == pytest.approx(0.95 / 0.9)
    assert math.ceil(d) == 2  # the current count: the router should balance, not the autoscaler


def test_idle_means_zero_so_min_replicas_decides():
    engines = {"a": EngineLoad(0, 0, 0.0), "b": EngineLoad(0, 0, 0.0)}
    assert desired_replicas(0.0, engines, P) == 0.0


def test_params_are_checked():
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        ScalingParams(target_ongoing_requests=0)
    with pytest.raises(ValueError, match="kv_high_watermark"):
        ScalingParams(4.0, kv_high_watermark=1.5)
    with pytest.raises(ValueError, match="waiting_threshold"):
        ScalingParams(4.0, waiting_threshold=0)


def test_engine_loads_reads_aggregated_metrics_of_running_replicas():
    metrics = {
        NUM_RUNNING: {"r1": 2.0, "r2": 1.0, "stopped": 9.0},
        NUM_WAITING: {"r1": 1.0},
        KV_CACHE_USAGE: {"r1": 0.5, "r2": 0.25},
    }
    loads = engine_loads(metrics, ["r1", "r2", "r3"])
    assert loads == {"r1": EngineLoad(2.0, 1.0, 0.5), "r2": EngineLoad(1.0, 0.0, 0.25)}
    assert engine_loads({}, ["r1"]) == {}


def _ctx(total: float, metrics: dict, replicas: list, target: float = 4.0):
    return SimpleNamespace(
        total_num_requests=total,
        aggregated_metrics=metrics,
        running_replicas=replicas,
        config=SimpleNamespace(get_target_ongoing_requests=lambda: target),
    )


def test_policy_object_follows_the_pure_function():
    policy = EngineAwareAutoscalingPolicy(waiting_threshold=2.0, kv_high_watermark=0.8)
    metrics = {NUM_RUNNING: {"r1": 4.0}, NUM_WAITING: {"r1": 2.0}, KV_CACHE_USAGE: {"r1": 0.4}}
    desired, state = policy(_ctx(5.0, metrics, ["r1"]))
    assert desired == pytest.approx(1.5)  # max(5/4, (4+2)/4, 1 + 2/4, 0.4/0.8)
    assert state == {}
    desired, _ = policy(_ctx(3.0, None, []))
    assert desired == pytest.approx(0.75)


def test_autoscaling_stats_are_numbers_only():
    engine = SimpleNamespace(stats=lambda: SimpleNamespace(num_running=3, num_waiting=1, kv_cache_usage=0.25))
    stats = autoscaling_stats(engine)
    assert stats == {NUM_RUNNING: 3.0, NUM_WAITING: 1.0, KV_CACHE_USAGE: 0.25}
    assert all(type(v) is float for v in stats.values())


def test_serve_autoscaling_config_keeps_rays_fields_and_adds_the_policy():
    cfg = AutoscalingConfig(max_replicas=3, min_replicas=0, target_ongoing_requests=2,
                            upscale_delay_s=1, downscale_delay_s=2, look_back_period_s=5)
    out = serve_autoscaling_config(cfg, kv_high_watermark=0.8)
    assert out == {
        "max_replicas": 3, "min_replicas": 0, "target_ongoing_requests": 2.0,
        "upscale_delay_s": 1.0, "downscale_delay_s": 2.0, "look_back_period_s": 5.0, "metrics_interval_s": 2.5,
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": {"kv_high_watermark": 0.8}},
    }
    assert POLICY_PATH == "fleetlm.cluster.autoscaling:EngineAwareAutoscalingPolicy"


def test_importing_the_policy_does_not_import_ray():
    code = "import sys, fleetlm.cluster.autoscaling; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
