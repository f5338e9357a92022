"""The application layer: `interp <lens>` and `interp report` run the same workflow, so for the same pair and prompts
they save the same results, tensor for tensor; every Result a lens saves round-trips through save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from interp.app.cli import main
from interp.app.lenses import LENSES

PAIR = ["--base", "zoo:base", "--tuned", "zoo:lora-r8", "--n-prompts", "8", "--quick"]


def _saved(folder: Path) -> dict[str, tuple[dict, dict]]:
    """Every saved Result under folder/results: key -> (tensors, result.json)."""
    root = folder / "results"
    return {p.parent.relative_to(root).as_posix(): (load_file(str(p.parent / "tensors.safetensors")),
                                                    json.loads(p.read_text()))
            for p in sorted(root.rglob("result.json"))}


@pytest.fixture(scope="module")
def runs(zoo_built, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """lens -> (the folder `interp <lens>` wrote, the lens' folder in `interp report --only <lens>`)."""
    root = tmp_path_factory.mktemp("app")
    out = {}
    for name in LENSES:
        assert main([name, *PAIR, "--out", str(root / name)]) == 0, name
        assert main(["report", *PAIR, "--only", name, "--out", str(root / f"report-{name}")]) == 0, name
        out[name] = root / name, root / f"report-{name}" / name
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", LENSES)
def test_the_lens_command_and_the_report_save_the_same_results(runs, name):
    alone, in_report = (_saved(folder) for folder in runs[name])
    assert alone and sorted(alone) == sorted(in_report)
    for key, (tensors, meta) in alone.items():
        other_tensors, other_meta = in_report[key]
        assert meta == other_meta, key
        assert sorted(tensors) == sorted(other_tensors), key
        for t in tensors:  # equal element for element, NaN where the other has NaN
            torch.testing.assert_close(tensors[t], other_tensors[t], rtol=0, atol=0, equal_nan=True, msg=(key, t))
    alone_section = json.loads((runs[name][0] / "section.json").read_text())
    report_section = json.loads((runs[name][1] / "section.json").read_text())
    assert alone_section["headline"] == report_section["headline"] and alone_section["steering"] == \
        report_section["steering"]


@pytest.mark.slow
@pytest.mark.parametrize("name", LENSES)
def test_every_saved_result_round_trips(runs, name, tmp_path):
    import importlib

    folder = runs[name][0] / "results"
    for meta_file in sorted(folder.rglob("result.json")):
        meta = json.loads(meta_file.read_text())
        assert meta["version"] and isinstance(meta["fields"]["settings"], dict), meta_file
        cls = _result_class(importlib.import_module(f"analyses.{name}"), meta["class"])
        loaded = cls.load(meta_file.parent)
        again = cls.load(loaded.save(tmp_path / meta_file.parent.relative_to(folder)))
        for field in loaded.__dataclass_fields__:
            a, b = getattr(loaded, field), getattr(again, field)
            if isinstance(a, torch.Tensor):
                _identical(a, b, (meta_file, field))
            elif isinstance(a, dict) and a and all(isinstance(v, torch.Tensor) for v in a.values()):
                assert sorted(a) == sorted(b), (meta_file, field)
                for k in a:
                    _identical(a[k], b[k], (meta_file, field, k))
            else:
                assert a == b, (meta_file, field)


def _identical(a: torch.Tensor, b: torch.Tensor, where) -> None:
    """Same dtype, shape and values, NaN where the other has NaN."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, check_dtype=True, msg=str(where))


def _result_class(module, name: str):
    """The Result class `name` of an analysis package (exported at its top, or in one of its modules)."""
    import pkgutil

    if hasattr(module, name):
        return getattr(module, name)
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        sub = __import__(f"{module.__name__}.{info.name}", fromlist=[name])
        if hasattr(sub, name):
            return getattr(sub, name)
    raise AssertionError(f"{module.__name__} defines no {name}")
