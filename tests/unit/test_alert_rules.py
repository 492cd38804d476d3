"""configs/prometheus/alerts.yml checked and unit-tested by Prometheus's own promtool.

promtool comes from Debian's ``prometheus`` package (.ci/run installs it).
``promtool test rules`` runs tests/data/prometheus/alerts_test.yml: synthetic
series on which each alert must fire, and look-alikes on which it must not.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "configs" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "tests" / "data" / "prometheus" / "alerts_test.yml"
PROMETHEUS_YML = REPO / "configs" / "prometheus" / "prometheus.yml"
README = REPO / "README.md"


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: install Debian's prometheus package (.ci/run does)"
    return path


def _alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_promtool_check_rules():
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in out.stdout, out.stdout


def test_promtool_test_rules():
    out = subprocess.run([_promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout


def test_prometheus_config_loads_the_rules():
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert [str((PROMETHEUS_YML.parent / f).resolve()) for f in cfg["rule_files"]] == [str(RULES)]
    out = subprocess.run([_promtool(), "check", "config", "--syntax-only", str(PROMETHEUS_YML)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("alert", _alerts(), ids=lambda a: a["alert"])
def test_alert_is_complete(alert):
    """Severity, a summary naming the model, a runbook line in the README, and a promtool
    test in which it fires."""
    name = alert["alert"]
    assert alert["labels"]["severity"] in ("critical", "warning"), name
    assert "{{ $labels.model }}" in alert["annotations"]["summary"], name
    assert alert["annotations"]["runbook"] == f"README.md, Run on a cluster > Alerts > {name}"
    readme = README.read_text()
    assert re.search(rf"^- `{name}` \((critical|warning)\): \S", readme, re.M), f"no runbook line for {name}"
    assert f"({alert['labels']['severity']})" in re.search(rf"^- `{name}` \(\w+\)", readme, re.M).group(0)
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = [c for t in tests for c in t.get("alert_rule_test", []) if c["alertname"] == name and c["exp_alerts"]]
    assert fired, f"{name} never fires in {RULE_TESTS.name}"
