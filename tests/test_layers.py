"""The three layers: import-linter's contracts (pyproject.toml) hold, cover every core module, and break when a
core module imports an analysis or an analysis imports the application."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import interp

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True)


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_layer_contracts_are_kept():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


def test_core_contract_names_every_core_module():
    core = {f"interp.{m.name}" for m in pkgutil.iter_modules(interp.__path__)} - {"interp.app"}
    assert set(_contracts()[0]["source_modules"]) == core


def test_package_root_imports_only_the_core():
    import grimp

    graph = grimp.build_graph("interp", "analyses")
    imported = graph.find_modules_directly_imported_by("interp")
    assert imported and not {m for m in imported if m.startswith(("analyses", "interp.app"))}


@pytest.mark.parametrize("module, line", [("interp/sites.py", "import analyses.tuco"),
                                          ("interp/zoo/tasks.py", "from interp.app import report"),
                                          ("analyses/tuco.py", "from interp.app.context import Section")])
def test_an_import_against_the_layers_breaks_the_contracts(tmp_path, module, line):
    for part in ("interp", "analyses"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{line}  # a deliberate violation\n")
    done = _lint(tmp_path)
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout
    assert "deliberate" not in done.stdout and f"(l.{len((tmp_path / module).read_text().splitlines())})" in done.stdout
