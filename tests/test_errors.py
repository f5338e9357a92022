"""Bad input is an `InterpError`: no module raises a bare ValueError/TypeError/IndexError/KeyError/MemoryError, and
the command line turns each kind into one line on stderr and exit code 2."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from interp.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = {"ValueError", "TypeError", "IndexError", "KeyError", "MemoryError", "FileNotFoundError"}


def _bare_raises(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            if node.exc.func.id in BUILTIN:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} raise {node.exc.func.id}")
    return found


def test_no_module_raises_a_builtin_error_for_bad_input():
    sources = [p for part in ("interp", "analyses") for p in sorted((ROOT / part).rglob("*.py"))]
    bare = [hit for p in sources for hit in _bare_raises(p)]
    allowed = {"interp/zoo/cache.py"}  # model_path's FileNotFoundError: ZooModelNotBuilt wraps it for users
    assert [hit for hit in bare if hit.split(":")[0] not in allowed] == []


@pytest.mark.parametrize("argv, message", [
    (["capture", "--sites", "resid_post.0", "--dtype", "float8", "--out", "x"], "argument --dtype: invalid choice"),
    (["capture", "--sites", "resid_post.0", "--batch-size", "0", "--out", "x"], "'0' is not a positive integer"),
    (["capture", "--sites", "resid_post.0", "--batch-size", "-1", "--out", "x"], "'-1' is not a positive integer"),
    (["capture", "--sites", "resid_post.0", "--device", "cuda:7", "--out", "x"], "'cuda:7'"),
    (["tuco", "--alphas", "nan", "--out", "x"], "'nan' is not a finite number"),
    (["intruders", "--epsilons", "2", "--out", "x"], "'2' is not in (0, 1]"),
    (["intruders", "--k", "0", "--out", "x"], "'0' is not a positive integer"),
    (["shift", "--k", "0", "--out", "x"], "--k"),
    (["lid", "--n-tokens", "0", "--out", "x"], "'0' is not a positive integer"),
    (["report", "--n-prompts", "-3"], "'-3' is not a positive integer"),
    (["weights", "--alphas", "inf", "--out", "x"], "'inf' is not a finite number"),
    (["weights", "--sweep-prompts", "0", "--out", "x"], "'0' is not a positive integer"),
    (["diffing", "--positions", "0", "--out", "x"], "'0' is not a positive integer"),
    (["diffing", "--tolerance", "-1", "--out", "x"], "'-1' is not a positive number"),
    (["capture", "--sites", "resid_post.0", "--memory-budget", "-1", "--out", "x"], "'-1' is not a positive number"),
])
def test_an_option_out_of_range_is_refused_when_parsed(argv, message, capsys):
    """Checked by the parser, before any model loads: one line, exit 2, nothing written."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("interp: error:") and message in err, err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["zoo", "build", "--only", "no-such-model"], "unknown zoo model"),
    (["capture", "--model", "zoo:base", "--sites", "resid_post.99", "--out", "{tmp}"], "resid_post.99"),
    (["tuco", "--base", "zoo:base", "--tuned", "zoo:no-such", "--out", "{tmp}"], "unknown zoo model"),
    (["figures", "{tmp}"], "summary.json missing"),
])
def test_bad_input_gives_one_line_and_exit_2(zoo_built, argv, message, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path / "out")) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # progress lines may come first
    assert last.startswith("interp: error:") and message in last and "Traceback" not in err, err
