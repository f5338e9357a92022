"""Backends run a model on a batch with hooks at canonical sites. Each maps sites to its own hooks in one
function and offers the same `run(model, batch, read, edits, metric, past) -> RunOutput`; with `past` (a Hugging Face
KV cache and the masks that go with it) the batch holds only the new tokens, for incremental decoding."""

from __future__ import annotations

import inspect
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


@dataclass
class Past:
    """What a batch of new tokens attends to: `cache`, a Hugging Face KV cache of the earlier tokens (extended in
    place by the run), `attention_mask` [batch, earlier + new] over both, `position_ids` [batch, new] of the new ones.
    The run's `batch` then holds the new tokens only, and edits see them as its positions."""

    cache: object
    attention_mask: Tensor
    position_ids: Tensor

    def forward_kwargs(self, hf, device) -> dict:
        """Keyword arguments of `hf`'s forward that feed it this past (the cache's name changed within
        transformers 5.x: `past_key_values`, later `cache`)."""
        base = hf.get_base_model() if hasattr(hf, "get_base_model") else hf
        name = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        return {name: self.cache, "use_cache": True, "attention_mask": self.attention_mask.to(device),
                "position_ids": self.position_ids.to(device)}


BACKENDS = ("bridge", "nnsight")


def run(model, batch: Batch, read, edits, metric: Metric | None = None, backend: str | None = None,
        past: Past | None = None) -> RunOutput:
    """Dispatch to the chosen backend (default: the model's)."""
    from interp.backends import bridge, nnsight_backend
    from interp.errors import UnsupportedEdit

    name = backend or model.backend
    if name not in BACKENDS:
        raise UnsupportedEdit(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    module = bridge if name == "bridge" else nnsight_backend
    return module.run(model, batch, list(read), list(edits), metric, past)
