"""The `ray up` configs and the KubeRay manifests carry autoscaler settings that match the Serve
configs' replica autoscaling (tests/integration/test_node_autoscaling.py runs the two levels together)."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_ray_up_and_kuberay_configs_carry_matching_autoscaler_settings():
    """Both levels configured together: GPU worker types start at zero (or the replicas' minimum),
    can hold Serve's max_replicas, idle nodes go after a timeout longer than Serve's own
    downscale delay (a node is not given back while Serve may still want its replica)."""
    serve_tp2 = yaml.safe_load((REPO / "configs" / "serve" / "tp2.yaml").read_text())
    model = serve_tp2["applications"][0]["args"]["models"][0]
    gpus_per_replica = model["tensor_parallel_size"] * model.get("pipeline_parallel_size", 1)
    most_gpus = model["autoscaling"]["max_replicas"] * gpus_per_replica
    downscale_s = model["autoscaling"]["downscale_delay_s"]
    for name in ("aws", "gcp"):
        cfg = yaml.safe_load((REPO / "configs" / "cluster" / f"{name}.yaml").read_text())
        assert cfg["upscaling_speed"] >= 1.0, name
        assert cfg["idle_timeout_minutes"] * 60 >= downscale_s, name
        gpu_types = {k: t for k, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}
        assert gpu_types, name
        for k, t in gpu_types.items():
            assert t["min_workers"] == 0, (name, k)  # no GPU node paid for at rest
            assert t["max_workers"] * t["resources"]["GPU"] >= most_gpus, (name, k)
        assert cfg["max_workers"] >= max(t["max_workers"] for t in gpu_types.values()), name
    for manifest in ("raycluster.yaml", "rayservice.yaml"):
        doc = yaml.safe_load((REPO / "k8s" / manifest).read_text())
        spec = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
        assert spec["enableInTreeAutoscaling"] is True, manifest
        opts = spec["autoscalerOptions"]
        assert opts["upscalingMode"] == "Default", manifest
        assert opts["idleTimeoutSeconds"] >= downscale_s, manifest
        for g in spec["workerGroupSpecs"]:
            gpus = int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            assert g["maxReplicas"] * gpus >= most_gpus, (manifest, g["groupName"])
            assert 0 <= g["minReplicas"] <= g["maxReplicas"], manifest
