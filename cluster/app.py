"""The Ray Serve application: ``OpenAIIngress`` (FastAPI) in front of one ``LLMReplica`` deployment per model.

``build_app(args)`` is the application builder (``fleetlm serve`` and
``serve run configs/serve/*.yaml`` both call it): ``args`` is parsed by
``serve_config.parse_app_args`` (unknown keys are an error). This module
holds only the deployments and their Serve options; what the ingress does
with a request is ``server.py`` (routes), ``generation.py`` (the flow of
one generation request), ``completions.py`` and ``chat.py`` (the two
endpoints), ``http_plumbing.py`` (auth, body limit, strict JSON, SSE); the
replica is ``replica.py``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from fleetlm.cluster.backend import ModelBackend
from fleetlm.cluster.replica import LLMReplica, replica_id
from fleetlm.cluster.serve_config import ModelDeploymentConfig, ServeAppConfig, parse_app_args
from fleetlm.cluster.server import OpenAIServer, create_app

APP_NAME = "fleetlm"


class OpenAIIngress:
    """The ingress deployment: an ``OpenAIServer`` over the models' replica handles."""

    def __init__(self, config: ServeAppConfig, replicas: dict[str, Any]) -> None:
        from fleetlm.cluster.access_log import quiet_probe_access_logs

        quiet_probe_access_logs()
        backends = {name: ModelBackend(name, h) for name, h in replicas.items()}
        self.server = OpenAIServer(config, backends, replica=replica_id())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.server)

    # Control plane, called by `fleetlm serve` through the app handle.
    def start_draining(self) -> int:
        return self.server.start_draining()

    def num_inflight(self) -> int:
        return self.server.inflight

    def abort_inflight(self) -> int:
        return self.server.abort_inflight()


def _deployment_name(model: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return f"LLMReplica-{safe}"


def _resolve_device(device: str) -> str:
    """"auto" -> "cuda" when the cluster has GPUs (build_app runs on a connected driver)."""
    if device != "auto":
        return device
    try:
        import ray

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            return "cuda"
    except Exception:  # noqa: BLE001 - not connected: plan for CPU
        pass
    return "cpu"


def replica_deployment_options(m: ModelDeploymentConfig, config: ServeAppConfig) -> dict[str, Any]:
    """Ray Serve options of one model's ``LLMReplica`` deployment."""
    opts: dict[str, Any] = {
        "name": _deployment_name(m.name),
        # Admission is the engine's (429 past max_queued_requests): Serve must
        # not queue in front of it, so its per-replica cap is never the limit.
        "max_ongoing_requests": (m.max_num_seqs or 256) + config.max_queued_requests + 64,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": 10.0,
    }
    if m.autoscaling is not None:
        from fleetlm.cluster.autoscaling import serve_autoscaling_config

        opts["autoscaling_config"] = serve_autoscaling_config(m.autoscaling)
    else:
        opts["num_replicas"] = m.num_replicas
    if config.router == "prefix_aware":
        from fleetlm.cluster.serve_router import request_router_options

        opts.update(request_router_options())
    device = _resolve_device(m.device)
    if not m.uses_worker_actors:
        opts["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0}
    else:
        # One placement group per replica: a bundle for the replica actor
        # (engine and scheduler), then one per pipeline stage holding its TP
        # workers (parallel/placement.py); the replica's RayWorkerGroup places
        # its worker actors in this group.
        from fleetlm.parallel.placement import PlacementSpec, stage_bundles

        spec = PlacementSpec.for_device(device)
        opts["ray_actor_options"] = {"num_cpus": 1}
        opts["placement_group_bundles"] = [{"CPU": 1}] + stage_bundles(
            spec, m.tensor_parallel_size, m.pipeline_parallel_size)
        opts["placement_group_strategy"] = spec.strategy
    return opts


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Ray Serve application builder: ``fleetlm.cluster.app:build_app``."""
    from ray import serve

    config = args if isinstance(args, ServeAppConfig) else parse_app_args(args)
    replica_cls = serve.deployment(LLMReplica)
    replicas = {}
    for m in config.models:
        dep = replica_cls.options(**replica_deployment_options(m, config))
        replicas[m.name] = dep.bind(m, config.max_queued_requests, config.max_n, config.max_logprobs)
    ingress_cls = serve.deployment(
        serve.ingress()(OpenAIIngress),
        name="OpenAIIngress",
        num_replicas=1,
        # Every open HTTP request (a stream lasts seconds) is one ongoing request.
        max_ongoing_requests=100_000,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=10.0,
    )
    return ingress_cls.bind(config, replicas)


__all__ = ["APP_NAME", "OpenAIIngress", "build_app", "replica_deployment_options"]
