"""Real operator tools for the integration tests: Prometheus and nginx, started and stopped here.

Both come from Debian's packages (.ci/run installs them). Each runs on a
free 127.0.0.1 port with its files in the caller's tmp dir, in its own
process group, and is stopped (the group SIGTERMed, then SIGKILLed) on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_harness import free_port

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = REPO / "configs" / "prometheus" / "prometheus.yml"
ALERTS_YML = REPO / "configs" / "prometheus" / "alerts.yml"
GRAFANA_JSON = REPO / "configs" / "grafana" / "fleetlm-dashboard.json"


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    assert path, f"{name} not found: install Debian's {name if name != 'promtool' else 'prometheus'} package"
    return path


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# --- Prometheus --------------------------------------------------------------------------


def prometheus_config(fleetlm_target: str, ray_targets: list[str], tmp: Path, interval_s: int = 1) -> dict:
    """configs/prometheus/prometheus.yml as shipped, pointed at this test's processes: FleetLM's
    target and Ray's file_sd file (written here the way Ray writes it); faster intervals."""
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    cfg["global"].update(scrape_interval=f"{interval_s}s", evaluation_interval=f"{interval_s}s",
                         scrape_timeout=f"{interval_s}s")
    cfg["rule_files"] = [str(PROMETHEUS_YML.parent / f) for f in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    sd = tmp / "prom_metrics_service_discovery.json"
    sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": ray_targets}]))
    jobs["ray"]["file_sd_configs"][0]["files"] = [str(sd)]
    jobs["ray"]["file_sd_configs"][0]["refresh_interval"] = f"{interval_s}s"
    jobs["fleetlm"]["static_configs"][0]["targets"] = [fleetlm_target]
    return cfg


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def get(self, path: str) -> Any:
        r = httpx.get(self.url + path, timeout=30)
        assert r.status_code == 200, (path, r.text[:500])
        return r.json()["data"]

    def wait_for(self, expr: str, timeout_s: float) -> list[dict]:
        """Poll until ``expr`` has a result (bounded); returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            res = self.query(expr)
            if res:
                return res
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result for {expr!r} in {timeout_s:.0f} s\n{self.log.read_text()[-3000:]}")
            time.sleep(1.0)


@contextlib.contextmanager
def running_prometheus(config: dict, tmp: Path) -> Iterator[Prometheus]:
    cfg_path = tmp / "prometheus.yml"
    cfg_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    cmd = [_binary("prometheus"), f"--config.file={cfg_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(prom.url + "/-/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        yield prom
    finally:
        _stop(proc)


# --- PromQL helpers ------------------------------------------------------------------------


_COMPARISON = re.compile(r"(>=|<=|==|!=|>|<)(\s*)(?!\s*bool\b)")


def with_bool_comparisons(expr: str) -> str:
    """``expr`` with every comparison outside label matchers turned into a ``bool`` one, so an
    alert's expression returns its 0/1 series whether or not it fires (``and`` then still
    intersects on labels, so the result is empty only when an operand has no data)."""
    out, depth, quote, i = [], 0, None, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
            out.append(c)
        elif c == "{":
            depth += 1
            out.append(c)
        elif c == "}":
            depth -= 1
            out.append(c)
        elif depth == 0 and (m := _COMPARISON.match(expr, i)):
            out.append(m.group(1) + " bool ")
            i = m.end()
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def grafana_queries(rate_interval: str = "5m", interval: str = "1m") -> list[tuple[str, str, str]]:
    """(panel title, legend, expr) of every target of the Grafana dashboard, its variables
    replaced as Grafana does for "All" ($model), the default ($application) and the intervals."""
    d = json.loads(GRAFANA_JSON.read_text())
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            expr = (t["expr"].replace("$__rate_interval", rate_interval).replace("$__interval", interval)
                    .replace('"$model"', '".*"').replace('"$application"', '"fleetlm"'))
            assert "$" not in expr, expr
            out.append((p["title"], t.get("legendFormat", ""), expr))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"] if "alert" in r]


# --- nginx -----------------------------------------------------------------------------------


@contextlib.contextmanager
def running_nginx(conf: str, tmp: Path) -> Iterator[subprocess.Popen]:
    """nginx in the foreground (``daemon off``) with ``conf`` as its whole configuration."""
    (tmp / "nginx").mkdir(exist_ok=True)
    path = tmp / "nginx" / "nginx.conf"
    path.write_text(conf)
    log = tmp / "nginx" / "stderr.log"
    check = subprocess.run([_binary("nginx"), "-t", "-p", str(tmp / "nginx"), "-c", str(path)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    with open(log, "wb") as out:
        proc = subprocess.Popen([_binary("nginx"), "-p", str(tmp / "nginx"), "-c", str(path)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(0.5)
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        _stop(proc)
