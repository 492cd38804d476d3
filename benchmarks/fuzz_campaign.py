"""The full hostile-input campaign (issue 7), bounded, with its numbers committed.

    python benchmarks/fuzz_campaign.py                 # >= 1,000 cases per generation endpoint
    python benchmarks/fuzz_campaign.py --examples 300 --canary-every 1 --budget-s 3600

Runs ``tests/integration/test_fuzz_schemathesis.py`` (the CI test, same server
config, same checks) with many more Hypothesis draws per operation and the
canary completion after *every* case, keeping going past a failing case so
the report counts them all, then writes
``benchmarks/results/fuzz-campaign-<date>.json``: cases per operation and
phase/mode, status codes, 5xx count with samples, hangs, negative cases the
server accepted, canary count and failures, the regression corpus outcome,
wall time, the commit and the machine.

CPU only: it needs no GPU (the server runs the embedded model on CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fleetlm.benchmarks.records import git_commit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEST = REPO / "tests" / "integration" / "test_fuzz_schemathesis.py"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=700,
                   help="Hypothesis draws per operation in the fuzzing phase (the coverage and examples "
                        "phases add their own, about 400 per generation endpoint)")
    p.add_argument("--canary-every", type=int, default=1, help="canary completion after every N cases")
    p.add_argument("--min-cases", type=int, default=1000, help="fewest cases per generation endpoint to pass")
    p.add_argument("--budget-s", type=int, default=5400, help="wall-clock limit of the whole run")
    p.add_argument("--out", default=str(HERE / "results"), help="directory of the result JSON")
    ns = p.parse_args(argv)

    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        report = Path(tmp) / "campaign.json"
        junit = Path(tmp) / "junit.xml"
        env = {**os.environ,
               "FLEETLM_FUZZ_EXAMPLES": str(ns.examples),
               "FLEETLM_FUZZ_CANARY_EVERY": str(ns.canary_every),
               "FLEETLM_FUZZ_MIN_CASES": str(ns.min_cases),
               "FLEETLM_FUZZ_KEEP_GOING": "1",
               "FLEETLM_FUZZ_REPORT": str(report)}
        cmd = [sys.executable, "-m", "pytest", str(TEST), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={junit}", "--timeout", str(ns.budget_s)]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=ns.budget_s)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-6000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = 124, ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                             else (e.stdout or ""))[-6000:]
        wall = time.monotonic() - t0
        campaign = json.loads(report.read_text()) if report.exists() else None
        corpus = _corpus_outcome(junit)

    record = {
        "benchmark": "fuzz_campaign",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "device": "cpu",
        "settings": {"fuzzing_examples_per_operation": ns.examples, "canary_every": ns.canary_every,
                     "min_cases_per_generation_endpoint": ns.min_cases},
        "pytest_exit_code": rc,
        "passed": rc == 0,
        "wall_seconds": round(wall, 1),
        "campaign": campaign,
        "regression_corpus": corpus,
        "pytest_tail": tail if rc != 0 else None,
    }
    path = out_dir / f"fuzz-campaign-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("passed", "wall_seconds")}, indent=1))
    if campaign:
        print(json.dumps({k: campaign[k] for k in ("cases_per_operation", "server_errors_5xx", "hangs",
                                                    "canary_requests", "negative_cases_accepted_2xx")}, indent=1))
    print(f"wrote {path}")
    return 0 if rc == 0 else 1


def _corpus_outcome(junit: Path) -> dict[str, object] | None:
    """Passed/failed corpus cases from the JUnit XML pytest wrote."""
    if not junit.exists():
        return None
    import xml.etree.ElementTree as ET

    passed, failed = 0, []
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "")
        if not name.startswith("test_regression_corpus"):
            continue
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is None:
            passed += 1
    return {"passed": passed, "failed": failed}


if __name__ == "__main__":
    sys.exit(main())
