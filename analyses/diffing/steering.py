"""Steering with a difference vector (an ADL difference, a crosscoder latent's decoder direction): `steer` adds
strength * vector at every position of one layer's residual output of either model; `strength_sweep` raises the
strength and keeps the strongest one at which the steered model stays coherent.

Coherence (**ours**, where the paper grades with an LLM): the steered model's mean next-token loss on held-out text
(prose, or the comparison set) is within `tolerance` nats of its unsteered loss. Greedy generations are kept at the
strongest coherent strength, next to the unsteered ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from interp.errors import BadOption
from interp.generation import generate
from interp.intervene import add
from interp.models import Model
from interp.prompts import PromptSet, as_prompt_set
from interp.results import Result
from interp.scoring import loss
from interp.sites import resid_post

STRENGTHS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
TOLERANCE = 0.5


@contextmanager
def steer(model: Model, vector: Float[Tensor, " d_model"], layer: int, strength: float = 1.0, positions=None):
    """Within the block, `model` runs with `strength * vector` added to resid_post of `layer` at `positions`
    (canonical; default every position), for logits, loss and generation. Yields the steered model."""
    with model.edit(add(resid_post(layer), vector, scale=strength, positions=positions)):
        yield model


@dataclass
class SteeringSweep(Result):
    """`model` steered by `source` at `layer`: `loss[i]` the mean loss on the held-out set `heldout` at
    `strength[i]`, `coherent[i]` whether it is within `tolerance` of the unsteered loss; `chosen` the strongest
    coherent strength, at which `steered` are the greedy generations for `prompts` (`unsteered` without steering)."""

    ANALYSIS = "diffing"
    model: str
    source: str
    layer: int
    heldout: str
    strength: list[float]
    loss: list[float]
    tolerance: float
    coherent: list[bool]
    chosen: float
    prompts: list[str]
    unsteered: list[str]
    steered: list[str]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"model": self.model, "source": self.source, "layer": self.layer,
                             "strength": self.strength, "loss": self.loss, "coherent": self.coherent})

    def generations(self):
        import pandas as pd

        return pd.DataFrame({"prompt": self.prompts, "unsteered": self.unsteered,
                             f"steered ({self.chosen:g})": self.steered})

    def plot(self, ax=None):
        from analyses.diffing.plots import plot_steering_sweep

        return plot_steering_sweep(self, ax)


def strength_sweep(model: Model, vector: Float[Tensor, " d_model"], layer: int,
                   heldout: PromptSet | Sequence[str], prompts: PromptSet | Sequence[str], *,
                   strengths: Sequence[float] = STRENGTHS, tolerance: float = TOLERANCE, max_new_tokens: int = 8,
                   source: str = "difference", batch_size: int = 16) -> SteeringSweep:
    """Loss on `heldout` at each strength (module docstring), and greedy generations for `prompts` at the
    strongest coherent strength."""
    strengths = sorted({0.0, *map(float, strengths)})
    if tolerance < 0:
        raise BadOption(f"tolerance={tolerance}; give a non-negative loss increase in nats")
    heldout, prompts = as_prompt_set(heldout), as_prompt_set(prompts)
    losses = []
    for s in strengths:
        with steer(model, vector, layer, s):
            losses.append(float(loss(model, heldout.prompts, batch_size=batch_size).mean()))
    unsteered_loss = losses[strengths.index(0.0)]
    coherent = [value <= unsteered_loss + tolerance for value in losses]
    chosen = max(s for s, ok in zip(strengths, coherent) if ok)
    texts = [_decode(model, generate(model, prompts.prompts, max_new_tokens))]
    with steer(model, vector, layer, chosen):
        texts.append(_decode(model, generate(model, prompts.prompts, max_new_tokens)))
    return SteeringSweep(model.name, source, layer, heldout.label, strengths, losses, tolerance, coherent, chosen,
                         prompts.prompts, *texts,
                         settings={"strengths": strengths, "tolerance": tolerance, "max_new_tokens": max_new_tokens})


def _decode(model: Model, generated: list[Tensor]) -> list[str]:
    return [model.tokenizer.decode(ids.tolist()) for ids in generated]
