"""Backends run a model on a batch with hooks at canonical sites. Each maps sites to its own hooks in one
function and offers the same `run(model, batch, read, edits, metric) -> RunOutput`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from interp.prompts import Batch
from interp.sites import Site

Metric = Callable[[Tensor, Batch], Tensor]
"""metric(logits [batch, pos, vocab] in model layout, batch) -> scalar tensor to differentiate."""


@dataclass
class RunOutput:
    """Logits [batch, pos, vocab] and activations / gradients keyed by hooked site, all in model layout."""

    logits: Tensor
    acts: dict[Site, Tensor] = field(default_factory=dict)
    grads: dict[Site, Tensor] = field(default_factory=dict)
    metric: Tensor | None = None


BACKENDS = ("bridge", "nnsight")


def run(model, batch: Batch, read, edits, metric: Metric | None = None, backend: str | None = None) -> RunOutput:
    """Dispatch to the chosen backend (default: the model's)."""
    from interp.backends import bridge, nnsight_backend
    from interp.errors import UnsupportedEdit

    name = backend or model.backend
    if name not in BACKENDS:
        raise UnsupportedEdit(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    module = bridge if name == "bridge" else nnsight_backend
    return module.run(model, batch, list(read), list(edits), metric)
