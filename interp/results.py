"""One Result protocol for every analysis: a dataclass whose fields say how it is saved.

    @dataclass
    class MyResult(Result):
        ANALYSIS = "mine"
        lengths: Tensor              # -> tensors.safetensors["lengths"]
        parts: dict[str, Tensor]     # -> tensors.safetensors["parts.<key>"]
        prompts: list[str]           # -> result.json["fields"]["prompts"]

    result.save(folder); MyResult.load(folder) == result (tensors equal, settings equal)

A saved result is one folder: `tensors.safetensors` (every Tensor field, and every dict of Tensors, flattened as
`field.key`) and `result.json` (the analysis, the class, the library version, the settings that produced it and
every other field, as strict JSON: a non-finite float is written as null). `to_frame()` is the tidy table and
`plot(ax=None)` the main figure; subclasses define both.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file

from interp.errors import ResultNotFound

TENSORS, META = "tensors.safetensors", "result.json"
R = TypeVar("R", bound="Result")


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None and tuples by lists (what strict JSON readers take)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> Path:
    """Write `value` as strict, indented JSON (see `strict_json`)."""
    path = Path(path)
    path.write_text(json.dumps(strict_json(value), indent=1, allow_nan=False))
    return path


@dataclass
class Result:
    """Base of every analysis result. `settings` records the options that produced it (saved with it)."""

    ANALYSIS: ClassVar[str] = "result"
    settings: dict = field(default_factory=dict, kw_only=True)

    def to_frame(self):
        raise NotImplementedError(f"{type(self).__name__} has no table")

    def plot(self, ax=None):
        raise NotImplementedError(f"{type(self).__name__} has no figure")

    def save(self, folder: str | Path) -> Path:
        """Write the result into `folder` (created); returns it."""
        from interp import __version__

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, fields, tensor_dicts = {}, {}, []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f.name] = value
            elif _is_tensor_dict(f, value):
                tensor_dicts.append(f.name)
                tensors.update({f"{f.name}.{k}": v for k, v in value.items()})
            else:
                fields[f.name] = value
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / TENSORS))
        write_json(folder / META, {"analysis": self.ANALYSIS, "class": type(self).__name__, "version": __version__,
                                   "tensor_dicts": tensor_dicts, "fields": fields})
        return folder

    @classmethod
    def load(cls: type[R], folder: str | Path) -> R:
        """The result saved in `folder` by `save`."""
        folder = Path(folder)
        if not (folder / META).is_file():
            raise ResultNotFound(f"{folder} holds no saved result ({META} missing); pass a folder written by save()")
        meta = json.loads((folder / META).read_text())
        if meta.get("class") != cls.__name__:
            raise ResultNotFound(f"{folder} holds a {meta.get('class')} result, not a {cls.__name__}")
        tensors = load_file(str(folder / TENSORS))
        values = dict(meta["fields"])
        for name in meta["tensor_dicts"]:
            prefix = f"{name}."
            values[name] = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        values.update({k: v for k, v in tensors.items() if "." not in k})
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ResultNotFound(f"{folder} holds a {cls.__name__} saved by interp {meta.get('version')} without "
                                 f"{', '.join(missing)}; run the analysis again to save it with this version")
        names = {f.name for f in fields}
        return cls(**{k: v for k, v in values.items() if k in names})


def _is_tensor_dict(f: dataclasses.Field, value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    if value:
        return all(isinstance(v, torch.Tensor) for v in value.values())
    return "Tensor" in str(f.type)

