"""Steering with concept shifts: `steer` adds a vector (or concept-wise shifts) to a residual site, `strength_sweep`
scores a range of strengths (`StrengthSweep`), and `steering_curve` takes the shifts and the layer from train
prompts and the curve from test prompts (`SteeringCurve`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.shift.result import ShiftResult, measure
from interp.capture import capture
from interp.errors import BadOption
from interp.intervene import add, add_nearest
from interp.models import Model, Pair
from interp.prompts import PromptSet, as_tokens, position_index, prompt_texts
from interp.results import Result

STEER_MODES = ("global", "concept")
STEER_POSITIONS = ("all", "last", "from-last")
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def steering_edit(vector: Float[Tensor, "*concept d_model"], layer: int | str, strength: float = 1.0,
                  positions=None, centroids: Float[Tensor, "concept d_model"] | None = None):
    """The edit adding `strength * vector` at `resid_post.layer` (or at `final` for layer='final'). With
    `centroids`, `vector` holds one shift per concept and each position gets the shift of the concept nearest
    to its own representation there (concept-wise steering)."""
    where = "final" if layer == "final" else f"resid_post.{int(layer)}"
    if centroids is None:
        return add(where, vector, scale=strength, positions=positions)
    return add_nearest(where, centroids, vector, scale=strength, positions=positions)


@contextmanager
def steer(model: Model, vector: Float[Tensor, "*concept d_model"], layer: int | str, strength: float = 1.0,
          positions=None, centroids: Tensor | None = None):
    """Within the block, `model` (base or tuned) runs with `strength * vector` added at layer `layer`'s
    residual output (concept-wise with `centroids`, see `steering_edit`), at `positions` (canonical, default
    every position), for logits, loss and generation. Yields the steered model."""
    with model.edit(steering_edit(vector, layer, strength, positions, centroids)):
        yield model


def prompt_positions(where: str, prompt_lengths: Sequence[int] | Tensor, width: int):
    """Canonical positions for a STEER_POSITIONS name, given each input's prompt length in tokens (the input may
    go on with an answer or generated tokens, up to `width`): None for "all", else a mask [input, width] of
    the last prompt token ("last") or of every position from it on ("from-last")."""
    if where == "all":
        return None
    if where not in STEER_POSITIONS:
        raise BadOption(f"steering positions {where!r}; use one of {', '.join(STEER_POSITIONS)}")
    last = position_index(torch.as_tensor(prompt_lengths), "last")[:, None]
    cols = torch.arange(width)[None]
    return cols == last if where == "last" else cols >= last


def _where(model: Model, prompts, positions):
    """A STEER_POSITIONS name as canonical positions for `prompts`; other positions pass through."""
    if not isinstance(positions, str) or positions not in STEER_POSITIONS:
        return positions
    return prompt_positions(positions, as_tokens(model, prompt_texts(prompts)).lengths, model.n_ctx)


def next_token_kl(model: Model, target: Model, prompts, *, target_logprobs: Tensor | None = None,
                  batch_size: int = 16) -> Float[Tensor, " prompt"]:
    """KL(model || target) of the next-token distributions at each prompt's last token (nats)."""
    p = _last_logprobs(model, prompts, batch_size)
    q = _last_logprobs(target, prompts, batch_size) if target_logprobs is None else target_logprobs
    return (p.exp() * (p - q)).sum(-1)


def _last_logprobs(model: Model, prompts, batch_size: int = 16) -> Tensor:
    logits = capture(model, prompts, [], positions="last", logits=True, batch_size=batch_size, progress=False)
    return logits["logits"].double().log_softmax(-1)


@dataclass
class StrengthSweep(Result):
    """`model` steered toward `target` with `label` at `layer`: `kl[i]` = mean KL(steered || target) at the last
    prompt token at `strength[i]`, `closure[i]` = 1 - kl[i] / kl_unsteered, `accuracy[i]` the held-out accuracy
    (None without a held-out set)."""

    ANALYSIS = "shift"
    label: str
    model: str
    target: str
    layer: int | str
    positions: str | None
    strength: list[float]
    kl: list[float]
    kl_unsteered: float
    closure: list[float]
    accuracy: list[float] | None

    def at(self, strength: float, column: str = "kl") -> float | None:
        """`column` ("kl", "closure", "accuracy") at `strength`, or None when it was not swept."""
        values = getattr(self, column)
        return values[self.strength.index(strength)] if values and strength in self.strength else None

    def to_frame(self):
        """One row per strength."""
        import pandas as pd

        return pd.DataFrame({"label": self.label, "layer": str(self.layer), "strength": self.strength, "kl": self.kl,
                             "closure": self.closure,
                             "accuracy": self.accuracy if self.accuracy else [float("nan")] * len(self.kl)})

    def plot(self, ax=None):
        from analyses.shift.plots import plot_strength_sweep

        return plot_strength_sweep(self, ax)


def _held_out_pair(held_out) -> tuple[list[str], list[str]] | None:
    if held_out is None or not isinstance(held_out, PromptSet):
        return held_out
    if held_out.answers is None:
        raise BadOption(f"held-out prompt set {held_out.label!r} has no answers; pass one with answers")
    return held_out.prompts, held_out.answers


def strength_sweep(model: Model, target: Model, prompts: PromptSet | Sequence[str], vector: Tensor,
                   layer: int | str, strengths: Sequence[float] = STRENGTHS, *, positions=None,
                   held_out: PromptSet | tuple[Sequence[str], Sequence[str]] | None = None, label: str = "shift",
                   centroids: Tensor | None = None) -> StrengthSweep:
    """KL(steered || target) on `prompts` and held-out accuracy (`held_out` = (prompts, answers) or a PromptSet
    with answers, teacher-forced) for each strength. `positions`: a STEER_POSITIONS name (for the held-out
    answers "last" / "from-last" mean the prompt's last token / from it on) or canonical positions used as
    they are."""
    from interp.scoring import answer_scores

    prompts, held_out = prompt_texts(prompts), _held_out_pair(held_out)
    where = _where(model, prompts, positions)
    held_where = _where(model, held_out[0], positions) if held_out is not None else None
    target_lp = _last_logprobs(target, prompts)
    start = float(next_token_kl(model, target, prompts, target_logprobs=target_lp).mean())
    kl, acc = [], []
    for s in strengths:
        with steer(model, vector, layer, s, where, centroids):
            kl.append(float(next_token_kl(model, target, prompts, target_logprobs=target_lp).mean()))
        if held_out is not None:
            with steer(model, vector, layer, s, held_where, centroids):
                acc.append(float(answer_scores(model, *held_out).accuracy.mean()))
    return StrengthSweep(label, model.name, target.name, layer,
                         positions if isinstance(positions, str) or positions is None else "custom",
                         [float(s) for s in strengths], kl, start, _closure(kl, start),
                         acc if held_out else None, settings={"prompts": len(prompts)})


def _closure(kls: list[float], start: float) -> list[float]:
    return [1 - v / start if start > 0 else 0.0 for v in kls]


def steering_vectors(result: ShiftResult, layer: int | str, mode: str = "global"
                     ) -> tuple[Tensor, Tensor | None]:
    """(vector, centroids) to steer the base with at `layer`: the global shift and None, or ("concept") the
    concept shifts [concept, d_model] and the base K-means centroids they belong to."""
    i = 0 if layer == "final" else result.layer_index(int(layer))
    if mode == "global":
        return result.global_shift[i], None
    if mode != "concept":
        raise BadOption(f"steering mode {mode!r}; use one of {', '.join(STEER_MODES)}")
    if result.method != "kmeans" or result.fit_on != "base":
        raise BadOption("concept-wise steering of the base assigns inputs to the nearest base centroid: "
                        f"measure with method='kmeans', fit_on='base' (got {result.method!r}, {result.fit_on!r})")
    return result.shifts[i], result.concepts[i]


def layer_kls(pair: Pair, prompts: PromptSet | Sequence[str], result: ShiftResult, mode: str = "global",
              positions=None) -> dict:
    """{layer: mean KL(base steered at strength 1 || tuned)} over `prompts` for each layer of `result`
    ("final" for a final-norm result)."""
    prompts = prompt_texts(prompts)
    target = _last_logprobs(pair.tuned, prompts)
    where = _where(pair.base, prompts, positions)
    kls = {}
    for layer in (["final"] if result.site == "final" else result.layers):
        vector, centroids = steering_vectors(result, layer, mode)
        with steer(pair.base, vector, layer, 1.0, where, centroids):
            kls[layer] = float(next_token_kl(pair.base, pair.tuned, prompts, target_logprobs=target).mean())
    return kls


def best_layer(pair: Pair, prompts: PromptSet | Sequence[str], result: ShiftResult, mode: str = "global",
               positions=None) -> int | str:
    """The measured layer at which steering the base (strength 1, `mode`, `positions`) gives the lowest KL to
    the tuned model on `prompts`."""
    kls = layer_kls(pair, prompts, result, mode, positions)
    return min(kls, key=kls.get)


@dataclass
class SteeringCurve(StrengthSweep):
    """A `StrengthSweep` on test prompts at the layer chosen on train prompts: `layer_kl` / `layer_closure` are
    the train KL and closure at strength 1 of every candidate layer (keys "0", "1", ..., "final")."""

    mode: str
    layer_kl: dict[str, float]
    layer_closure: dict[str, float]

    def layer_frame(self):
        """One row per candidate layer: its train KL and closure at strength 1, and whether it was chosen."""
        import pandas as pd

        return pd.DataFrame({"layer": list(self.layer_kl), "kl": list(self.layer_kl.values()),
                             "closure": [self.layer_closure[k] for k in self.layer_kl],
                             "chosen": [k == str(self.layer) for k in self.layer_kl]})


def steering_curve(pair: Pair, train: PromptSet | Sequence[str], test: PromptSet | Sequence[str], *,
                   mode: str = "concept", positions: str = "last", layers: Sequence[int | str] | None = None,
                   k: int = 20, seed: int = 0, strengths: Sequence[float] = STRENGTHS,
                   held_out: PromptSet | tuple[Sequence[str], Sequence[str]] | None = None) -> SteeringCurve:
    """Steer the base toward the tuned model: shifts (and K-means concepts) from the `train` prompts at the
    positions steered (every position for "all", else the last prompt token), the layer among `layers` (ints
    for `resid_post`, "final"; default every layer and "final") with the lowest KL on `train` at strength 1,
    then `strength_sweep` on `test`."""
    train = prompt_texts(train)
    tokens = as_tokens(pair.base, train)
    at = torch.ones(len(train), pair.base.n_ctx, dtype=torch.bool) if positions == "all" else "last"
    n_items = int(tokens.lengths.sum()) if positions == "all" else len(train)
    kw = {"positions": at, "k": min(k, n_items) if mode == "concept" else 1, "seed": seed, "progress": False}
    layers = [*range(pair.base.n_layers), "final"] if layers is None else list(layers)
    blocks = [layer for layer in layers if layer != "final"]
    results = {}
    if blocks:
        results["resid_post"] = measure(pair, tokens, layers=blocks, **kw)
    if "final" in layers:
        results["final"] = measure(pair, tokens, site="final", **kw)
    kls = {}
    for result in results.values():
        kls |= layer_kls(pair, train, result, mode, positions)
    layer = min(kls, key=kls.get)
    vector, centroids = steering_vectors(results["final" if layer == "final" else "resid_post"], layer, mode)
    sweep = strength_sweep(pair.base, pair.tuned, test, vector, layer, strengths, positions=positions,
                           held_out=held_out, label=f"{mode} shift ({positions})", centroids=centroids)
    start = float(next_token_kl(pair.base, pair.tuned, train).mean())
    return SteeringCurve(**{f: getattr(sweep, f) for f in _SWEEP_FIELDS}, mode=mode,
                         layer_kl={str(key): v for key, v in kls.items()},
                         layer_closure={str(key): c for key, c in zip(kls, _closure(list(kls.values()), start))},
                         settings={"train": len(train), "test": len(prompt_texts(test)), "k": k, "seed": seed,
                                   "layers": [str(layer) for layer in layers]})


_SWEEP_FIELDS = ("label", "model", "target", "layer", "positions", "strength", "kl", "kl_unsteered", "closure",
                 "accuracy")
