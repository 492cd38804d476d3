"""What a newcomer does with the README, checked: its serve command, then a stop.

    python3 .ci/newcomer.py command serve|test   # print the README's command
    python3 .ci/newcomer.py serve-check          # run the serve command as written

``serve-check`` runs the README's serve command exactly as written (in the
active venv, in its own process group, as a shell job, systemd or Docker
runs it), waits for ``/health`` 200, sends one chat completion, starts a
streaming completion and then sends SIGTERM to the command's whole process
group. The stream must still end in full (the drain), the command must exit
0 within the drain timeout plus shutdown, and no process it started may
remain. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8000"  # the README's address
INSTALL_AND_START_S = 1200  # a fresh venv installs torch, Ray, transformers... before it serves
DRAIN_TIMEOUT_S = 30  # `fleetlm serve`'s default --drain-timeout
SHUTDOWN_S = 45  # Serve and Ray stopping after the drain


def readme_command(which: str) -> str:
    """The indented command under "Install and serve" / "Install and run the tests"."""
    text = (ROOT / "README.md").read_text()
    heading = {"serve": "Install and serve", "test": "Install and run the tests"}[which]
    after = text[text.index(heading):]
    match = re.search(r"\n\n    (\S.*)\n", after)
    if match is None:
        raise SystemExit(f"README: no indented command after {heading!r}")
    return match.group(1)


def _get(path: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(URL + path, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(path: str, body: dict, timeout: float = 300):
    req = urllib.request.Request(URL + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def _marked(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{entry}/environ").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def serve_check() -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8000))
        except OSError:
            print("serve-check: port 8000 is taken; the README's command serves there", file=sys.stderr)
            return 1
    command = readme_command("serve")
    marker = f"FLEETLM_CI_MARKER={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    env.pop("RAY_ADDRESS", None)
    print(f"serve-check: $ {command}", flush=True)
    log = open("/tmp/fleetlm-ci-serve.log", "wb")
    proc = subprocess.Popen(["bash", "-c", command], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the serve command exited with {proc.returncode} before /health was 200")
            if time.monotonic() - t0 > INSTALL_AND_START_S:
                raise AssertionError(f"/health not 200 after {INSTALL_AND_START_S} s")
            try:
                if _get("/health", 5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(2)
        print(f"serve-check: /health 200 after {time.monotonic() - t0:.0f} s (install included)", flush=True)
        with _post("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                            "max_tokens": 16, "temperature": 0}) as r:
            answer = json.loads(r.read())
        text = answer["choices"][0]["message"]["content"]
        assert answer["choices"][0]["finish_reason"] in ("stop", "length") and text.strip(), answer
        print(f"serve-check: chat answered {text!r}", flush=True)

        chunks: list[str] = []
        stream_done = threading.Event()

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 64, "stream": True, "ignore_eos": True}
            with _post("/v1/completions", body) as r:
                for line in r:
                    if line.startswith(b"data: "):
                        chunks.append(line[6:].decode().strip())
            stream_done.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        while not chunks and reader.is_alive():
            time.sleep(0.05)
        t1 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # the command's whole process group
        rc = proc.wait(DRAIN_TIMEOUT_S + SHUTDOWN_S)
        took = time.monotonic() - t1
        reader.join(10)
        assert stream_done.is_set() and chunks and chunks[-1] == "[DONE]", chunks[-3:]
        last = json.loads(chunks[-2])
        assert last["choices"][0]["finish_reason"] == "length", last  # drained in full, not cut off
        assert rc == 0, f"exit status {rc}"
        print(f"serve-check: group SIGTERM -> stream drained ({len(chunks) - 1} chunks), exit 0 in {took:.1f} s",
              flush=True)
        deadline = time.monotonic() + 15
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _marked(marker)
        assert not left, f"processes left behind: {left}"
        return 0
    except (AssertionError, OSError, subprocess.TimeoutExpired) as e:
        print(f"serve-check FAILED: {e}\n--- serve log (tail) ---", file=sys.stderr)
        log.flush()
        sys.stderr.write(Path("/tmp/fleetlm-ci-serve.log").read_bytes()[-6000:].decode(errors="replace"))
        return 1
    finally:
        for pid in _marked(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["command"] and len(argv) == 2:
        print(readme_command(argv[1]))
        return 0
    if argv == ["serve-check"]:
        return serve_check()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
