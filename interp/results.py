"""Saving and loading analysis results: tensors in safetensors, everything else in JSON, one folder each."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSORS, META = "tensors.safetensors", "result.json"


def save_result(folder: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / TENSORS))
    (folder / META).write_text(json.dumps(meta, indent=1))
    return folder


def load_result(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    if not (folder / META).is_file():
        from interp.errors import ResultNotFound

        raise ResultNotFound(f"{folder} holds no saved result ({META} missing)")
    return load_file(str(folder / TENSORS)), json.loads((folder / META).read_text())
