"""The two autoscalers together: Serve adds replicas, Ray's autoscaler adds the GPU nodes they need.

``ray.cluster_utils.AutoscalingCluster`` runs Ray's real autoscaler (the
monitor process) with the fake multi-node provider: a "node" it launches is
a new raylet on this machine with the resources of its node type. The head
has no GPU; the one worker node type, ``gpu_node``, has one (fake) GPU, at
most two of them, none at rest, and idle ones go after ``IDLE_TIMEOUT_S``.

Each LLM replica asks for one GPU, as it does on a GPU cluster (the model
runs on the CPU: the GPU is a resource to place, not a device here). Then:

1. deploy (min 1 replica): the replica is pending, a gpu_node is launched,
   the replica runs;
2. load (streams over ``target_ongoing_requests``): Serve wants a second
   replica, it is pending, a second gpu_node is launched, two replicas run;
3. load gone: Serve removes a replica, the node it left goes idle and the
   autoscaler terminates it after the idle timeout: one gpu_node again.

A request every 0.5 s runs throughout, besides the load: not one request of
either kind may fail.

``AutoscalingCluster.start()``/``shutdown()`` run ``ray stop --force``,
which would end every Ray process on the machine (other tests', other
users'), and read an example config the wheel does not ship; the subclass
below starts its head with ``ray start`` in its own temp dir on free
loopback ports and stops only the processes it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid

import httpx
import openai
import pytest

from cluster_local import APP, MODEL, SERVE_ENV, free_port
from serve_harness import marked_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

IDLE_TIMEOUT_S = 15
GPU_NODE = {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}
TARGET_ONGOING = 2


class LocalAutoscalingCluster:
    """``ray.cluster_utils.AutoscalingCluster``'s config, started safely (see the module docstring)."""

    def __init__(self, head_resources: dict, worker_node_types: dict, **config_kwargs) -> None:
        from ray.cluster_utils import AutoscalingCluster

        class _Cluster(AutoscalingCluster):
            def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kw):
                # Ray's fake_multi_node/example.yaml (not in the wheel), then what the parent adds.
                config = {
                    "cluster_name": "fake_multinode", "max_workers": 8,
                    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                                 "disable_node_updaters": True, "disable_launch_config_check": True},
                    "available_node_types": {}, "head_node_type": "ray.head.default", "auth": {},
                    "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
                    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
                    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
                    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
                    "rsync_exclude": [], "rsync_filter": [],
                }
                config["available_node_types"] = dict(worker_node_types)
                config["available_node_types"]["ray.head.default"] = {
                    "resources": head_resources, "node_config": {}, "max_workers": 0}
                config.update(kw)
                return config

        self._cluster = _Cluster(dict(head_resources), worker_node_types, **config_kwargs)
        self.config = self._cluster._config
        self.tmp = tempfile.mkdtemp(prefix="fla-", dir="/tmp")  # short: Ray's unix sockets live here
        self.marker = uuid.uuid4().hex
        self.gcs_address = f"127.0.0.1:{free_port()}"
        self.config["provider"]["gcs_address"] = self.gcs_address

    def start(self, env: dict[str, str]) -> None:
        cfg = os.path.join(self.tmp, "autoscaling.json")
        with open(cfg, "w") as f:
            json.dump(self.config, f)
        head = self.config["available_node_types"]["ray.head.default"]["resources"]
        cmd = ["ray", "start", "--head", f"--autoscaling-config={cfg}", f"--temp-dir={self.tmp}",
               f"--port={self.gcs_address.rsplit(':', 1)[1]}", "--node-ip-address=127.0.0.1",
               "--include-dashboard=false", f"--num-cpus={head['CPU']}", "--num-gpus=0", "--disable-usage-stats"]
        full_env = {**os.environ, **env, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
                    # Ray's single-machine mode: every node (the launched ones too) on 127.0.0.1.
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "FLEETLM_TEST_SESSION": self.marker,
                    # Loopback only and torn down by the test: no token (else `ray start` turns token
                    # auth on when ~/.ray/auth_token exists, and the driver must carry it).
                    "RAY_AUTH_MODE": "disabled"}
        full_env.pop("RAY_ADDRESS", None)
        subprocess.run(cmd, env=full_env, check=True, capture_output=True, timeout=120)

    def shutdown(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in marked_pids(self.marker):  # only what this cluster started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while marked_pids(self.marker) and time.monotonic() < deadline:
                time.sleep(0.3)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _gpu_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def _replicas() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    dep = app.deployments.get(f"LLMReplica-{MODEL}") if app else None
    return {str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()}


class Timeline:
    """What happened when, for the assertions and the test's log."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str]] = []

    def note(self, what: str) -> None:
        self.events.append((time.monotonic() - self.t0, what))
        print(f"[autoscaling] {time.monotonic() - self.t0:6.1f} s  {what}", flush=True)

    def wait(self, what: str, cond, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for: {what}; replicas {_replicas()}, " \
                                                f"GPU nodes {_gpu_nodes()}"
            time.sleep(0.5)
        self.note(what)


class Requests:
    """Streamed completions in threads; every outcome kept."""

    def __init__(self, url: str) -> None:
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def one(self, max_tokens: int) -> None:
        try:
            finish = None
            for chunk in self.client.completions.create(model=MODEL, prompt="Count: one, two, three,",
                                                        max_tokens=max_tokens, stream=True,
                                                        extra_body={"ignore_eos": True}):
                for c in chunk.choices:
                    finish = c.finish_reason or finish
            assert finish == "length", finish
            with self.lock:
                self.ok += 1
        except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the test
            with self.lock:
                self.failures.append(repr(e))


def test_ray_autoscaler_adds_and_removes_gpu_nodes_for_serve_replicas(monkeypatch):
    import ray
    from ray import serve
    from ray._private import ray_constants

    from fleetlm.cluster import app as app_module

    cluster = LocalAutoscalingCluster({"CPU": 4}, {"gpu_node": GPU_NODE},
                                      idle_timeout_minutes=IDLE_TIMEOUT_S / 60, upscaling_speed=1.0)
    port = free_port()
    tl = Timeline()
    try:
        cluster.start(SERVE_ENV)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        # This driver in Ray's single-machine mode too (its node address 127.0.0.1, as the cluster's).
        monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        ray.init(address=cluster.gcs_address, logging_level="WARNING", log_to_driver=False)
        tl.note("head up: no GPU node")
        assert _gpu_nodes() == 0
        # Replicas ask for a GPU as on a GPU cluster ("auto" resolves to CUDA where the cluster has
        # GPUs; this one has none until the autoscaler adds them). Inside, "auto" is the CPU.
        monkeypatch.setattr(app_module, "_resolve_device", lambda device: "cuda")
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        args = {"models": [{"model": MODEL, "max_num_seqs": 4, "autoscaling": {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": TARGET_ONGOING,
            "upscale_delay_s": 1, "downscale_delay_s": 5, "look_back_period_s": 5}}]}
        # 1. The first replica needs a GPU node: serve.run returns once it runs, on a launched node.
        serve.run(app_module.build_app(args), name=APP, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        tl.wait("replica 1 running", lambda: _replicas().get("RUNNING", 0) == 1, 240)
        assert _gpu_nodes() == 1, "the autoscaler launched no GPU node for replica 1"
        tl.note("on GPU node 1, launched by the autoscaler")
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)

        reqs = Requests(url)
        stop_trickle = threading.Event()

        def trickle() -> None:  # a request every 0.5 s through every phase
            while not stop_trickle.is_set():
                reqs.one(4)
                stop_trickle.wait(0.5)

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()

        # 2. Load over the target: a second replica, pending until a second GPU node joins.
        stop_load = threading.Event()

        def load() -> None:
            while not stop_load.is_set():
                reqs.one(48)

        loaders = [threading.Thread(target=load, daemon=True) for _ in range(3 * TARGET_ONGOING)]
        for t in loaders:
            t.start()
        tl.note(f"load: {len(loaders)} concurrent streams")
        tl.wait("Serve wants replica 2", lambda: sum(_replicas().values()) - _replicas().get("STOPPING", 0) >= 2,
                120)
        # It cannot run yet: no node has a free GPU until the autoscaler adds one.
        assert _replicas().get("RUNNING", 0) == 1 and _gpu_nodes() == 1, (_replicas(), _gpu_nodes())
        tl.wait("autoscaler launched GPU node 2", lambda: _gpu_nodes() == 2, 180)
        tl.wait("replica 2 running", lambda: _replicas().get("RUNNING", 0) == 2, 240)
        time.sleep(3)  # both replicas serve some of the load

        # 3. Load gone: a replica goes, then its idle node.
        stop_load.set()
        for t in loaders:
            t.join(300)
        tl.note("load stopped")
        tl.wait("Serve removed replica 2", lambda: _replicas() == {"RUNNING": 1}, 120)
        tl.wait("autoscaler removed the idle GPU node", lambda: _gpu_nodes() == 1, 60 + 4 * IDLE_TIMEOUT_S)
        time.sleep(2)
        stop_trickle.set()
        trickler.join(60)
        assert reqs.failures == [], reqs.failures
        assert reqs.ok >= 20, reqs.ok
        tl.note(f"{reqs.ok} requests, 0 failed")
        scale_down = [t for t, w in tl.events if w == "autoscaler removed the idle GPU node"][0] - \
            [t for t, w in tl.events if w == "Serve removed replica 2"][0]
        assert scale_down >= IDLE_TIMEOUT_S * 0.5, scale_down  # not before it was idle for a while
    finally:
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        cluster.shutdown()
