"""Start a real ``fleetlm serve`` for a test module and stop everything it started.

Each server gets its own ``RAY_TMPDIR`` (its own local Ray cluster) and a
marker in its environment, so teardown kills only the processes this server
started (never other tests' or the developer's). Used by the fault, overload
and fuzz tests; ``test_serve_openai.py`` and ``test_serve_errors.py`` keep
their own copies of the same steps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

MODEL = "smollm2-135m-instruct"
FLEETLM = ["fleetlm"] if shutil.which("fleetlm") else [sys.executable, "-m", "fleetlm.cluster.cli"]
STARTUP_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (those one server started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    tmp: str
    marker: str
    log_path: str

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def rss_bytes(self) -> int:
        """Resident memory of every process this server started (Ray workers included)."""
        total = 0
        for pid in marked_pids(self.marker):
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                continue
        return total


def serve_config(args_yaml: str, port: int = 8000) -> str:
    """A Serve config file around the application ``args`` (YAML, indented 6 spaces)."""
    return (
        "http_options:\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "applications:\n"
        "  - name: fleetlm\n"
        "    route_prefix: /\n"
        "    import_path: fleetlm.cluster.app:build_app\n"
        "    args:\n"
        f"{args_yaml}"
    )


@contextlib.contextmanager
def running_server(args_yaml: str, *, api_key: str | None = None, num_cpus: int | None = None,
                   extra_flags: tuple[str, ...] = (), extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    """``fleetlm serve --config`` with these app args; yields once ``/health`` is 200."""
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="flm-", dir="/tmp")
    cfg = os.path.join(tmp, "serve.yaml")
    with open(cfg, "w") as f:
        f.write(serve_config(args_yaml))
    marker = uuid.uuid4().hex
    env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "FLEETLM_TEST_SESSION": marker}
    env.pop("RAY_ADDRESS", None)
    env.update(extra_env or {})
    if api_key:
        env["FLEETLM_API_KEY"] = api_key
    cmd = [*FLEETLM, "serve", "--config", cfg, "--port", str(port), "--drain-timeout", "5", *extra_flags]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    log_path = os.path.join(tmp, "serve.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}", proc, tmp, marker, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (rc={proc.returncode}):\n{server.log_tail()}")
            try:
                if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in marked_pids(marker):  # only processes this server started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
