"""A checkout on sys.path must not shadow real packages with the repository's folders.

The repository root is the `fleetlm` package, so `python -m pytest` (or a Ray
worker, which gets its driver's working directory on sys.path) would otherwise
see kernels/, engine/, workers/ ... as top-level modules; Hugging Face's
`kernels` package, which transformers imports, was shadowed that way.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)


def test_importing_fleetlm_takes_the_checkout_off_sys_path():
    # Ray inserts its driver's working directory at index 1 of a worker's path.
    r = _run(f"import sys, importlib.util; sys.path.insert(1, {str(ROOT)!r}); import fleetlm; "
             "print(importlib.util.find_spec('engine'), importlib.util.find_spec('workers'))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "None"]


def test_transformers_tokenizers_import_from_a_checkout():
    r = _run(f"import sys; sys.path.insert(1, {str(ROOT)!r}); import fleetlm; "
             "import transformers.integrations.hub_kernels; from transformers import AutoTokenizer; print('ok')")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok"
