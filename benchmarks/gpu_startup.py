"""Cold start on one GPU (issue 19): how fast a new replica is ready, and how fast its first request is.

    python benchmarks/gpu_startup.py --out $OUT [--model llama-3.1-8b] [--skip serve,weights,...]

One process, every part bounded in time (``--time-limit``, default 470 s in
all), a failure in one part recorded and the rest still run. Parts:

- ``offline``: ``LLM`` starts in fresh processes (``fleetlm.benchmarks.startup``),
  8B shape, dummy bf16: warm-up on with an empty compile cache, then with the
  cache that start filled. Each: the start-up breakdown, the weights' GB/s
  (dummy weights generated on the device), the first request's TTFT (128
  prompt tokens, one output token) against the median of the next five.
- ``serve``: ``fleetlm serve`` timed from the command to ``/health`` 200 with
  an empty cache (cold), then ``fleetlm build`` into another cache directory
  and ``fleetlm serve`` on it (warm); each time the first chat completion
  after ready against the median of the next five (time to first token, over
  HTTP, streamed), ``/ready``, and the replica's ``fleetlm_startup_seconds``.
- ``weights``: a real safetensors checkpoint (the ``smollm2-1.7b`` shape,
  3.4 GB bf16) written here, read onto the GPU by FleetLM's parallel reader
  and by plain ``safetensors`` (each from the page cache and, after
  ``posix_fadvise(DONTNEED)``, from the disk), beside the disk's own
  sequential read.

Targets (the issue's): first request after ready through ``fleetlm serve`` at
TTFT <= 2x steady state; command to ready <= 40 s cold, <= 15 s warm. The
last lines are a table of each figure against its target; the JSON record
(card, date, commit, config, figures, targets) goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"serve_first_ttft_ratio": 2.0, "serve_ready_cold_s": 40.0, "serve_ready_warm_s": 15.0}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, most: float) -> float:
        return max(1.0, min(most, self.end - time.monotonic()))


# --- offline ------------------------------------------------------------------------------


def offline(ns, root: Path, budget: Budget) -> dict:
    from fleetlm.benchmarks.startup import run_start

    engine = {"model": ns.model, "load_format": "dummy", "dtype": "bfloat16", "max_model_len": ns.max_model_len,
              "warmup": True,
              "compile_cache_dir": str(root / "offline")}
    out = {}
    for name in ("cold", "warm"):
        out[name] = r = run_start(engine, timeout_s=budget.left(150))
        print("offline", name, json.dumps({k: r.get(k) for k in ("build_s", "first_ttft_s", "steady_ttft_s",
                                                                 "ttft_ratio", "startup_seconds", "error")}),
              flush=True)
    return out


# --- serve --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except Exception:  # noqa: BLE001 - not up yet
        return 0, ""


def _chat_ttft(base: str, model: str, i: int) -> float:
    """Seconds from sending a streamed chat completion to its first content event."""
    body = json.dumps({"model": model, "max_tokens": 2, "stream": True, "ignore_eos": True,
                       "messages": [{"role": "user", "content": f"{i} " + "x " * 120}]})
    req = urllib.request.Request(base + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                ttft = time.perf_counter() - t
                r.read()
                return ttft
    raise RuntimeError("no content event")


def _startup_metrics(base: str) -> dict:
    _, text = _get(base + "/metrics", 30)
    phases = {}
    for line in text.splitlines():
        if line.startswith("fleetlm_startup_seconds{"):
            labels, value = line.rsplit(" ", 1)
            phase = labels.split('phase="', 1)[1].split('"', 1)[0]
            phases[phase] = float(value)
    return phases


def _model_flags(ns, cache: str) -> list[str]:
    return [ns.model, "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", str(ns.max_model_len),
            "--compile-cache-dir", cache]


def build(ns, cache: str, budget: Budget) -> dict:
    cmd = ["fleetlm", "build", *_model_flags(ns, cache)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget.left(150), check=False)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd), "error": f"no result within {time.perf_counter() - t:.0f} s"}
    out = {"command": " ".join(cmd), "seconds": time.perf_counter() - t, "rc": proc.returncode,
           "log": proc.stderr[-1500:]}
    print("build", json.dumps({k: out.get(k) for k in ("seconds", "rc", "error")}), flush=True)
    return out


def serve(ns, cache: str, budget: Budget) -> dict:
    port = _free_port()
    cmd = ["fleetlm", "serve", *_model_flags(ns, cache), "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"command": " ".join(cmd)}
    limit = budget.left(150)
    try:
        while time.perf_counter() - t0 < limit and proc.poll() is None:
            if _get(base + "/health")[0] == 200:
                result["ready_s"] = time.perf_counter() - t0
                break
            time.sleep(0.25)
        if "ready_s" in result:
            result["startup_seconds"] = _startup_metrics(base)
            status, body = _get(base + "/ready", 30)
            result["ready_route"] = {"status": status, "body": json.loads(body) if body else None}
            ttfts = [_chat_ttft(base, ns.model, i) for i in range(6)]
            steady = statistics.median(ttfts[1:])
            result.update(first_ttft_s=ttfts[0], steady_ttft_s=steady, ttft_ratio=ttfts[0] / steady, ttfts_s=ttfts)
        else:
            result["error"] = "not ready in time" if proc.poll() is None else f"exited {proc.returncode}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=10)
        if "error" in result:
            result["stderr"] = (proc.stderr.read() if proc.stderr else "")[-3000:]
    print("serve", json.dumps({k: result.get(k) for k in ("ready_s", "first_ttft_s", "steady_ttft_s", "ttft_ratio",
                                                         "startup_seconds", "error")}), flush=True)
    return result


# --- weights ------------------------------------------------------------------------------


def _drop_from_page_cache(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def weights(ns, root: Path, budget: Budget) -> dict:
    """GB/s of reading a safetensors checkpoint onto the GPU: FleetLM's parallel reader, plain safetensors, the disk."""
    import torch
    from safetensors.torch import save_file

    from fleetlm.workers.loader.dummy import dummy_tensor_shapes
    from fleetlm.workers.loader.safetensors_io import ParallelReader, read_header

    hf = json.loads((HERE.parent / "configs" / "models" / f"{ns.weights_model}.json").read_text())
    directory = root / "ckpt"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf))
    path = directory / "model.safetensors"
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16).cpu()
               for name, shape in dummy_tensor_shapes(hf)}
    t = time.perf_counter()
    save_file(tensors, str(path))
    nbytes = path.stat().st_size
    out: dict = {"model": ns.weights_model, "bytes": nbytes, "write_s": time.perf_counter() - t}
    del tensors
    entries = read_header(path)
    dev = torch.device("cuda:0")

    def fleetlm_read() -> None:
        reader = ParallelReader(dev)
        try:
            for e in entries.values():
                reader.read_rows(path, e, None)
        finally:
            reader.close()

    def safetensors_read() -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name).to(dev)

    def disk_read() -> None:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(64 << 20)
            while f.readinto(buf):
                pass

    for name, fn in (("disk_sequential", disk_read), ("fleetlm_parallel", fleetlm_read),
                     ("safetensors", safetensors_read)):
        for where in ("disk", "page_cache"):
            if budget.left(60) < 5:
                break
            if where == "disk" and not _drop_from_page_cache(path):
                out[f"{name}_{where}"] = {"error": "could not drop the file from the page cache"}
                continue
            if where == "page_cache" and name == "disk_sequential":
                disk_read()  # make sure it is cached
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            s = time.perf_counter() - t
            out[f"{name}_{where}"] = {"seconds": s, "gbps": nbytes / s / 1e9}
            print("weights", name, where, f"{nbytes / s / 1e9:.2f} GB/s", flush=True)
    shutil.rmtree(directory, ignore_errors=True)
    return out


# --- the record ---------------------------------------------------------------------------


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def table(record: dict) -> list[tuple[str, str, str]]:
    rows = []
    f = record["figures"]
    for name in ("cold", "warm"):
        s = f.get("serve", {}).get(name, {})
        ready_target = TARGETS[f"serve_ready_{name}_s"]
        rows.append((f"serve {name}: command to /health 200", _fmt(s.get("ready_s"), "s"), f"<= {ready_target:g} s"))
        rows.append((f"serve {name}: first TTFT / steady", _fmt(s.get("ttft_ratio"), "x"),
                     f"<= {TARGETS['serve_first_ttft_ratio']:g}x"))
    for name in ("cold", "warm"):
        o = f.get("offline", {}).get(name, {})
        rows.append((f"offline {name}: LLM() build", _fmt(o.get("build_s"), "s"), ""))
        rows.append((f"offline {name}: first TTFT / steady", _fmt(o.get("ttft_ratio"), "x"), "<= 2x"))
        w = (o.get("startup_details") or {}).get("weights") or {}
        rows.append((f"offline {name}: dummy weights on device", _fmt(w.get("gbps"), "GB/s"),
                     f"copy ceiling ~{record['config']['copy_gbps_ceiling']:g}"))
    w = f.get("weights", {})
    for key in ("disk_sequential_disk", "fleetlm_parallel_disk", "safetensors_disk", "fleetlm_parallel_page_cache",
                "safetensors_page_cache"):
        rows.append((f"weights {key}", _fmt((w.get(key) or {}).get("gbps"), "GB/s"), "disk's own: first row"))
    return rows


def _fmt(x, unit: str) -> str:
    return "-" if x is None else f"{x:.2f} {unit}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--weights-model", default="smollm2-1.7b", help="configs/models shape of the safetensors test")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--skip", default="", help="comma list of parts to skip: offline, serve, weights")
    p.add_argument("--time-limit", type=float, default=470.0, help="seconds for everything")
    ns = p.parse_args(argv)
    import torch

    budget = Budget(ns.time_limit)
    skip = {s.strip() for s in ns.skip.split(",") if s.strip()}
    root = Path(tempfile.mkdtemp(prefix="fleetlm-startup-"))
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    record: dict = {"benchmark": "startup", "card": card, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "commit": _commit(), "targets": TARGETS,
                    "config": {"model": ns.model, "dtype": "bfloat16", "load_format": "dummy",
                               "max_model_len": ns.max_model_len,
                               "copy_gbps_ceiling": 4280 if "H200" in card else 3000},
                    "figures": {"offline": {}, "serve": {}, "weights": {}}}
    # (part, key in it, what runs): each recorded on its own, a failure does not lose the others.
    steps = [("offline", None, lambda: offline(ns, root, budget)),
             ("serve", "cold", lambda: serve(ns, str(root / "serve-cold"), budget)),
             ("serve", "build", lambda: build(ns, str(root / "serve-built"), budget)),
             ("serve", "warm", lambda: serve(ns, str(root / "serve-built"), budget)),
             ("weights", None, lambda: weights(ns, root, budget))]
    for part, key, fn in steps:
        if part in skip:
            continue
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - record it, run the rest
            result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            print(part, key or "", "failed:", e, flush=True)
        if key is None:
            record["figures"][part] = result
        else:
            record["figures"][part][key] = result
    shutil.rmtree(root, ignore_errors=True)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"startup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    rows = table(record)
    record["table"] = rows
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"record: {path}")
    width = max(len(r[0]) for r in rows)
    for what, value, target in rows:
        print(f"{what:<{width}}  {value:>12}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
