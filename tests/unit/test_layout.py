"""The layout rules of DESIGN.md that a reviewer would otherwise check by eye.

- no module of the engine core (engine/, workers/, parallel/) over 400 lines,
  none of the Serve application (cluster/) over 450: past that a module holds
  more than one concept;
- workers/ and parallel/ take from engine/ only the configs, SamplingParams and
  the step contract, so the engine can import workers without a cycle;
- every package folder is listed in pyproject's packages (a wheel would miss it).
- no two test files share a basename (pytest imports them by basename).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMITS = {"engine": 400, "workers": 400, "parallel": 400, "cluster": 450}
ENGINE_MODULES_WORKERS_MAY_USE = {"fleetlm.engine.config", "fleetlm.engine.sampling_params", "fleetlm.engine.step"}


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(LIMITS))
def test_no_module_over_its_folders_line_limit(folder):
    limit = LIMITS[folder]
    too_long = {str(p.relative_to(ROOT)): n for p in _modules(folder)
                if (n := len(p.read_text().splitlines())) > limit}
    assert not too_long, f"over {limit} lines: {too_long}"


def _engine_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fleetlm.engine"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fleetlm.engine"))
    return found


@pytest.mark.parametrize("folder", ["workers", "parallel", "kernels"])
def test_device_side_imports_only_the_engines_contract(folder):
    bad = {str(p.relative_to(ROOT)): sorted(mods - ENGINE_MODULES_WORKERS_MAY_USE)
           for p in _modules(folder) if (mods := _engine_imports(p)) - ENGINE_MODULES_WORKERS_MAY_USE}
    assert not bad, f"device-side modules importing engine internals: {bad}"


def test_the_import_rule_sees_a_violation(tmp_path):
    """The check above must be able to fail: a scheduler import is caught."""
    f = tmp_path / "m.py"
    f.write_text("from fleetlm.engine.scheduler import Scheduler\nimport fleetlm.engine.step\n")
    assert _engine_imports(f) - ENGINE_MODULES_WORKERS_MAY_USE == {"fleetlm.engine.scheduler"}


def test_every_package_folder_is_packaged():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {p.parent for p in ROOT.rglob("__init__.py")
               if not any(part.startswith(".") or part in ("tests", "build") for part in p.relative_to(ROOT).parts)}
    names = {".".join(("fleetlm",) + f.relative_to(ROOT).parts) if f != ROOT else "fleetlm" for f in folders}
    assert names <= listed, f"packages missing from pyproject: {sorted(names - listed)}"


def test_test_files_have_unique_basenames():
    # tests/ has no __init__.py files: pytest's default import mode imports each test file by
    # its basename, so two files of one name in different tiers stop collection of the suite.
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
