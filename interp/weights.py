"""Weight edits: a model's own parameters rewritten inside a `with` block and restored bit for bit on exit, and
saving a (possibly edited) model as a Hugging Face folder. The lenses that steer by weights (intruder shrinking,
LiNeS, task arithmetic, resets) build on these, as forward-pass edits build on `interp.intervene`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from interp.models import Model

@contextmanager
def rewritten(model: Model) -> Iterator[Callable[[Mapping[str, torch.Tensor]], None]]:
    """A weight edit: yields `write(values)`, after which every parameter named in `values` holds that value and
    every parameter an earlier write changed and this one does not name is back at its original. On exit all are
    restored bit for bit, and so is `model.adapter` (cleared meanwhile: the weights are no longer that adapter's)."""
    params = dict(model.hf.named_parameters())
    originals: dict[str, torch.Tensor] = {}
    adapter, model.adapter = model.adapter, None

    def write(values: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in [n for n in originals if n not in values]:
                params[name].copy_(originals[name])
            for name, value in values.items():
                if name not in originals:
                    originals[name] = params[name].detach().clone()
                params[name].copy_(value)

    try:
        yield write
    finally:
        with torch.no_grad():
            for name, value in originals.items():
                params[name].copy_(value)
        model.adapter = adapter


def save_checkpoint(model: Model, folder: str | Path) -> Path:
    """`model` (with any weight edit in force) as a Hugging Face folder of safetensors weights, config and
    tokenizer, which `load_model` reads back."""
    folder = Path(folder)
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder
