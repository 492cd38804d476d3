"""How ``fleetlm serve`` lives and ends: the supervisor, the stop signals, the drain.

A local cluster runs under a small supervisor (:func:`supervise`): the
command's own process stays in the caller's process group and forwards
SIGTERM / SIGINT to the serving process, which runs (with every Ray process
it starts) in a session of its own. So a signal to the whole process group
reaches the supervisor alone and the drain runs with Ray still up. The
serving process dies with the supervisor (PR_SET_PDEATHSIG) if the
supervisor is killed outright.

In the serving process, :class:`Signals` turns the first SIGTERM/SIGINT into
a drain (:func:`drain`: new requests get 503, in-flight ones may finish for
the drain timeout, then end with an error event) and the second into an
immediate stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

# Set in the serving process the supervisor starts (never by users).
SUPERVISED_ENV = "FLEETLM_SERVE_SUPERVISED"
# After forwarding a stop, how long the supervisor waits beyond the drain
# timeout for Serve and Ray to shut down before it kills the serving session.
SHUTDOWN_GRACE_S = 60.0


class Signals:
    """SIGTERM/SIGINT: the first asks for a drain, the second for an immediate stop."""

    class Interrupted(Exception):
        pass

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.force = threading.Event()
        self.ready = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            self.force.set()
            if not self.ready:
                raise self.Interrupted()
            return
        self.stop.set()
        if not self.ready:
            raise self.Interrupted()  # still starting: abandon startup, go straight to cleanup


def log(msg: str) -> None:
    print(f"fleetlm: {msg}", file=sys.stderr, flush=True)


def _call_ingress(handle: Any, method: str) -> int:
    """Call ``method`` on every ingress replica; the sum of the int results."""
    results = handle.broadcast(method).results(timeout_s=5.0, return_exceptions=True)
    return sum(r for r in results if isinstance(r, int))


def drain(handle: Any, timeout_s: float, force: threading.Event) -> bool:
    """Stop admitting, let in-flight requests finish; True if all finished in time."""
    inflight = _call_ingress(handle, "start_draining")
    log(f"draining: {inflight} request(s) in flight, up to {timeout_s:g} s")
    deadline = time.monotonic() + timeout_s
    while not force.is_set() and time.monotonic() < deadline:
        if _call_ingress(handle, "num_inflight") == 0:
            return True
        time.sleep(0.1)
    aborted = _call_ingress(handle, "abort_inflight")
    log(f"drain timeout: ended {aborted} request(s) with an error")
    grace = time.monotonic() + 2.0
    while time.monotonic() < grace and _call_ingress(handle, "num_inflight") > 0:
        time.sleep(0.1)
    return False


def _die_with_parent() -> None:
    """In the serving process before exec: SIGTERM when the supervisor dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(argv: Sequence[str], environ: Mapping[str, str], http_port: int, drain_timeout_s: float) -> int:
    """Run ``fleetlm serve`` in a session of its own and forward stop signals to it (module docstring)."""
    from fleetlm.cluster.loopback import build_shim, loopback_environ

    shim, why = build_shim()
    if shim is None:
        log(f"warning: Ray's ports will listen on all interfaces ({why}); firewall them")
    env = loopback_environ({**environ, SUPERVISED_ENV: "1"}, http_port, shim)
    child = subprocess.Popen([sys.executable, "-m", "fleetlm.cluster.cli", *argv], env=env,
                             start_new_session=True, preexec_fn=_die_with_parent)
    stop_at: list[float] = []

    def forward(signum: int, frame: Any) -> None:
        if not stop_at:
            stop_at.append(time.monotonic())
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        try:
            code = child.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if stop_at and time.monotonic() - stop_at[0] > drain_timeout_s + SHUTDOWN_GRACE_S:
                log("shutdown is taking too long: killing the serving process and its Ray cluster")
                try:
                    os.killpg(child.pid, signal.SIGKILL)  # the child leads its own process group
                except ProcessLookupError:
                    pass
    return 128 - code if code < 0 else code


__all__ = ["SHUTDOWN_GRACE_S", "SUPERVISED_ENV", "Signals", "drain", "log", "supervise"]
