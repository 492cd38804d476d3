"""configs/nginx/fleetlm.conf in front of two emulated nodes, one of whose Serve proxies dies mid-run.

Two Ray nodes (``ray.cluster_utils.Cluster``) each run a Serve HTTP proxy
(``proxy_location: EveryNode``; the worker node's on its own port, as two
machines' would be on their own addresses). nginx (Debian's package) runs
the shipped config with its upstreams pointed at the two proxies. Clients
stream completions through nginx with the ``openai`` client; while they do,
the worker node's proxy actor is killed. Then:

- traffic continues: every request started after the kill completes in full
  (nginx passes it to the live proxy);
- every request the ingress accepted ends exactly once: its ledger
  (``/debug/invariants``) is balanced and idle, its count of complete
  requests equals the streams the clients saw complete, and the streams cut
  with the dead proxy are counted as ended too, once each;
- nothing is left on the replica (its engine idle, every KV block free).
"""

from __future__ import annotations

import re
import shutil
import threading
import time

import httpx
import openai
import pytest

from cluster_local import APP, MODEL, SERVE_ENV, free_port
from ops_tools import REPO, running_nginx

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

API_KEY = "nginx-test-key"
STREAMS_BEFORE = 6      # open when the proxy dies
STREAMS_AFTER = 6       # started after it died
MAX_TOKENS = 40


def nginx_conf(tmp, upstreams: list[str], port: int) -> str:
    """The shipped site config, upstreams and listen port substituted, inside a minimal main config."""
    site = (REPO / "configs" / "nginx" / "fleetlm.conf").read_text()
    servers = re.findall(r"^    server \S+ (.*);$", site, re.M)
    assert len(servers) == 2, servers
    site = re.sub(r"^    server \S+ .*;\n", "", site, flags=re.M)
    site = site.replace("    keepalive 64;", "".join(f"    server {u} {servers[0]};\n" for u in upstreams)
                        + "    keepalive 64;")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{port};")
    (tmp / "nginx").mkdir(exist_ok=True)
    (tmp / "nginx" / "fleetlm.conf").write_text(site)
    t = tmp / "nginx"
    return (f"daemon off;\npid {t}/nginx.pid;\nerror_log {t}/error.log warn;\nevents {{}}\nhttp {{\n"
            "  log_format up 'upstream=$upstream_addr status=$status $request';\n"
            f"  access_log {t}/access.log up;\n"
            f"  client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fcgi;"
            f" uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;\n"
            f"  include {t}/fleetlm.conf;\n}}\n")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a worker node, a Serve proxy on each, the embedded model deployed."""
    import os
    import tempfile

    import ray
    from ray import serve
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from fleetlm.cluster.app import build_app

    # Ray's single-machine mode: every node's address (and every Ray port) on 127.0.0.1. The
    # processes read the variable; this process has imported Ray already, so its constant too.
    env = {**SERVE_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in env}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    head_port, worker_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="fln-", dir="/tmp")  # short: Ray's unix sockets live here
    # Serve runs a proxy on the head node and on every node that hosts a replica: the head gets no
    # CPU, so the model's replica (one CPU) lands on the worker node and that node's proxy exists.
    # (With CPUs on both, the replica landed on the head in some runs and the worker's proxy never came.)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "temp_dir": ray_tmp})
    try:
        worker = cluster.add_node(num_cpus=3, env_vars={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(worker_port)})
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": head_port})
        args = {"api_key": API_KEY, "models": [{"model": MODEL, "num_replicas": 1}]}
        serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
        urls = [f"http://127.0.0.1:{p}" for p in (head_port, worker_port)]
        deadline = time.monotonic() + 300
        while not all(_healthy(u) for u in urls):
            assert time.monotonic() < deadline, serve.status()
            time.sleep(0.5)
        yield {"urls": urls, "worker_node_id": worker.node_id, "tmp": tmp_path_factory.mktemp("nginx")}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag
            shutil.rmtree(ray_tmp, ignore_errors=True)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


class Stream(threading.Thread):
    """One streamed completion through nginx: it ends "complete" (finish_reason and the
    stream's end), "cut" (the connection broke mid-stream) or "failed" (no stream at all)."""

    def __init__(self, base: str, i: int) -> None:
        super().__init__(daemon=True)
        self.base, self.i = base, i
        self.outcome: str | None = None
        self.tokens = 0
        self.error: str | None = None
        self.first = threading.Event()

    def run(self) -> None:
        client = openai.OpenAI(base_url=self.base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        try:
            stream = client.completions.create(model=MODEL, prompt=f"Story {self.i}: once upon a time",
                                               max_tokens=MAX_TOKENS, stream=True,
                                               stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
            finish = None
            for chunk in stream:
                # A chunk may carry several tokens (the replica coalesces deltas under load) or
                # none (a token that ends inside a UTF-8 character): count from the usage chunk.
                for c in chunk.choices:
                    finish = c.finish_reason or finish
                if chunk.usage is not None:
                    self.tokens = chunk.usage.completion_tokens
                self.first.set()
            self.outcome = "complete" if finish == "length" else "cut"
        except (openai.APIConnectionError, openai.APIError, httpx.HTTPError) as e:
            self.outcome = "cut" if self.first.is_set() else "failed"
            self.error = repr(e)
        finally:
            self.first.set()


def test_streams_through_nginx_survive_a_dead_proxy(two_nodes):
    import ray

    t0 = time.monotonic()
    port = free_port()
    upstreams = [u.removeprefix("http://") for u in two_nodes["urls"]]
    with running_nginx(nginx_conf(two_nodes["tmp"], upstreams, port), two_nodes["tmp"]):
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health", timeout=30).status_code == 200
        # nginx answers an oversized body itself, with FleetLM's error body.
        r = httpx.post(base + "/v1/completions", content=b"x" * (2 << 20),
                       headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

        before = [Stream(base, i) for i in range(STREAMS_BEFORE)]
        for s in before:
            s.start()
        for s in before:
            assert s.first.wait(120), "no first chunk"
        proxy = ray.get_actor(f"SERVE_PROXY_ACTOR-{two_nodes['worker_node_id']}", namespace="serve")
        ray.kill(proxy, no_restart=True)
        killed_at = time.monotonic()
        # Dead once its port refuses connections (a request that raced the death got a 502 from
        # nginx: sent, then reset; nginx never replays a sent POST, and the ingress never saw it).
        dead_port = int(upstreams[1].rsplit(":", 1)[1])
        deadline = time.monotonic() + 30
        while _accepts(dead_port):
            assert time.monotonic() < deadline, "the killed proxy still accepts connections"
            time.sleep(0.1)

        after = [Stream(base, 100 + i) for i in range(STREAMS_AFTER)]
        for s in after:
            s.start()
            time.sleep(0.2)
        for s in before + after:
            s.join(180)
            assert not s.is_alive()
        print(f"\n[nginx] before the kill: {[s.outcome for s in before]}; after: {[s.outcome for s in after]}")

        # Traffic continued: every stream started after the kill completed in full.
        assert [s.outcome for s in after] == ["complete"] * STREAMS_AFTER, [s.error for s in after]
        assert [s.tokens for s in after] == [MAX_TOKENS] * STREAMS_AFTER
        # Streams open on the dead proxy were cut; the others completed. None failed outright.
        assert all(s.outcome in ("complete", "cut") for s in before), [s.error for s in before]
        cut = sum(s.outcome == "cut" for s in before)
        # least_conn had spread the open streams over both proxies: those on the killed one were cut.
        served = re.findall(r"^upstream=(\S+) ", (two_nodes["tmp"] / "nginx" / "access.log").read_text(), re.M)
        assert set(upstreams) <= {a for field in served for a in field.split(",")}, served
        assert cut >= 1, [s.outcome for s in before]
        complete = sum(s.outcome == "complete" for s in before + after)

        # Every accepted request ended exactly once (the ingress ledger, read through nginx).
        deadline = time.monotonic() + 60
        while True:
            inv = httpx.get(base + "/debug/invariants", headers={"Authorization": f"Bearer {API_KEY}"},
                            timeout=30).json()
            led = inv["ledger"][MODEL]
            if inv["ok"] or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert inv["ok"], inv
        assert led["accepted"] == STREAMS_BEFORE + STREAMS_AFTER, led  # every one got its 200
        finished = led["finished"]
        assert finished.get("length", 0) == complete, (finished, complete)
        assert sum(finished.values()) == led["accepted"] and led["inflight"] == 0, led
        assert sum(v for k, v in finished.items() if k != "length") == cut, (finished, cut)
        print(f"[nginx] ledger {finished}; {cut} cut with the proxy; "
              f"{time.monotonic() - killed_at:.1f} s from the kill to idle; test {time.monotonic() - t0:.0f} s")
