"""Keep a single-machine `fleetlm serve` off the network, but for its HTTP port.

``fleetlm serve`` without ``--address`` starts its own Ray cluster. Ray's
processes listen on all interfaces whatever the node IP (GCS, raylet, object
manager, dashboard agent, every worker's gRPC server), and Ray runs code for
whoever reaches them. For a cluster of one machine none of them need to be
reachable from outside, so the CLI starts the serving process (and with it
every Ray process) with:

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's own single-machine mode, in
  which the node IP is 127.0.0.1, so every address Ray hands out is loopback;
- ``GLOO_SOCKET_IFNAME=lo`` / ``NCCL_SOCKET_IFNAME=lo``: tensor-parallel
  workers rendezvous over loopback too;
- ``LD_PRELOAD`` of ``loopback.c`` (built here once with the system C
  compiler, cached by source hash): a ``bind()`` that moves every TCP
  listener to loopback except the HTTP port (``FLEETLM_LOOPBACK_KEEP_PORT``),
  which binds where ``--host`` says.

Without a C compiler the shim is skipped with a warning: then Ray's ports
listen on all interfaces, and the host's firewall must close them (the
README lists them).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("loopback.c")
KEEP_PORT_ENV = "FLEETLM_LOOPBACK_KEEP_PORT"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetlm"


def build_shim(cache_dir: Path | None = None) -> tuple[Path | None, str]:
    """(path of the built shim, "") or (None, why it could not be built)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
    directory = cache_dir or default_cache_dir()
    target = directory / f"loopback-{tag}.so"
    if target.is_file():
        return target, ""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".loopback-", suffix=".so")
        os.close(fd)
    except OSError as e:
        return None, f"cannot write {directory}: {e.strerror}"
    try:
        run = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", tmp, str(SOURCE), "-ldl"],
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            return None, f"{cc} failed: {run.stderr.strip()[:300]}"
        os.replace(tmp, target)  # atomic: a concurrent start never loads a half-written file
        return target, ""
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{cc} failed: {e}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def loopback_environ(environ: dict[str, str], http_port: int, shim: Path | None) -> dict[str, str]:
    """The environment of a single-machine serving process (see the module docstring)."""
    env = dict(environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if shim is not None:
        env["LD_PRELOAD"] = " ".join(p for p in (str(shim), environ.get("LD_PRELOAD", "")) if p)
        env[KEEP_PORT_ENV] = str(http_port)
    return env
