"""The reset map: where the new skill and the damage live in the update.

One part of the update at a time is reset to the base (`editing.reset`) and the tuned model scored again on the
target set and the other set. Units: each block (`layer 3`), each module type in every block (`module q`), the
attention and the MLP half of every block (`half attn`, as Half Fine-Tuning splits them), everything outside the
blocks (`outside`: embeddings, final norm, unembedding), everything (`all`: the base itself), and, for the layer x
module table, each module of each block (`3.q`). Per unit:

    target lost            = (tuned - reset) on the target metric, signed so that positive means worse
    forgetting recovered   = (reset - tuned) on the other metric, signed so that positive means better
and both as fractions of the fine-tune's whole gain (tuned - base) and whole forgetting (base - tuned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from analyses.weights.editing import _parts, reset
from analyses.weights.parts import ATTN, BLOCK_MODULES, MLP, Part, select
from analyses.weights.scores import TwoSets, better, score, two_sets
from interp.models import Pair
from interp.plotting import figure, integer_ticks, model_color
from interp.prompts import PromptSet, as_prompt_set

KINDS = ("all", "layer", "module", "half", "outside", "cell")


@dataclass
class ResetMap(TwoSets):
    """Scores of the tuned model with each unit reset: `target[i]`, `other[i]` for `units[i]` (its `kind`, `layer`
    and `module`, None where the unit spans them)."""

    n_layers: int
    units: list[str]
    kind: list[str]
    layer: list[int | None]
    module: list[str | None]
    target: list[float]
    other: list[float]

    def target_lost(self, fraction: bool = False) -> list[float]:
        """Target metric lost by each reset (positive: worse than tuned); as a fraction of the fine-tune's gain."""
        st, tuned = better(self.target_metric), self.tuned_scores["target"]
        return _scaled([st * (tuned - t) for t in self.target], st * (tuned - self.base["target"]), fraction)

    def forgetting_recovered(self, fraction: bool = False) -> list[float]:
        """Other metric recovered by each reset (positive: better than tuned); as a fraction of the forgetting."""
        so, tuned = better(self.other_metric), self.tuned_scores["other"]
        return _scaled([so * (o - tuned) for o in self.other], so * (self.base["other"] - tuned), fraction)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"tuned": self.tuned, "unit": self.units, "kind": self.kind,
                             "layer": pd.array(self.layer, dtype="Int64"), "module": self.module,
                             "target": self.target, "other": self.other, "target_lost": self.target_lost(),
                             "forgetting_recovered": self.forgetting_recovered(),
                             "target_lost_fraction": self.target_lost(True),
                             "forgetting_recovered_fraction": self.forgetting_recovered(True)})

    def cell_table(self, stat: str = "target_lost"):
        """`stat` of the per-module resets as a layer x module table."""
        frame = self.to_frame()
        cells = frame[frame.kind == "cell"]
        table = cells.pivot(index="layer", columns="module", values=stat)
        return table[[m for m in BLOCK_MODULES if m in table.columns]]

    def of(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kind) if k == kind]

    def plot(self, ax=None):
        return plot_reset_layers(self, ax)


def _scaled(values: list[float], total: float, fraction: bool) -> list[float]:
    if not fraction:
        return values
    return [v / total if total else math.nan for v in values]


def units(parts: Sequence[Part], n_layers: int, cells: bool = True,
          layers_per_unit: int = 1) -> list[tuple[str, str, int | None, str | None, list[Part]]]:
    """(unit, kind, layer, module, parts) of every reset unit; blocks are reset `layers_per_unit` at a time (`layer`
    is the first of them)."""
    out = [("all", "all", None, None, list(parts))]
    for first in range(0, n_layers, layers_per_unit):
        group = list(range(first, min(first + layers_per_unit, n_layers)))
        name = f"layer {first}" if len(group) == 1 else f"layers {first}-{group[-1]}"
        out.append((name, "layer", first, None, select(parts, layers=group)))
    modules = [m for m in BLOCK_MODULES if select(parts, modules=[m])]
    out += [(f"module {m}", "module", None, m, select(parts, modules=[m])) for m in modules]
    out += [(f"half {h}", "half", None, None, select(parts, half=h)) for h in (ATTN, MLP)]
    if any(p.layer is None for p in parts):
        out.append(("outside", "outside", None, None, [p for p in parts if p.layer is None]))
    if cells:
        out += [(p.name, "cell", p.layer, p.module, [p]) for p in parts if p.layer is not None]
    return out


def reset_map(pair: Pair, target: PromptSet | Sequence[str], other: PromptSet | Sequence[str], *, cells: bool = True,
              layers_per_unit: int = 1, skip_unchanged: bool = True, batch_size: int = 16) -> ResetMap:
    """Reset every unit of the update (module docstring) in turn and score the tuned model on `target` and `other`.
    `cells`: also each module of each block (the layer x module table); `layers_per_unit`: blocks reset together
    (deep models: fewer runs); `skip_unchanged`: a unit whose update is zero (e.g. a module a LoRA does not adapt)
    is not run, its scores are the tuned model's (which they are exactly)."""
    target, other = as_prompt_set(target), as_prompt_set(other)
    parts = _parts(pair.tuned)
    changed = set(pair.changed_parameters()) if skip_unchanged else None
    head = two_sets(pair, target, other, batch_size)
    rows = []
    for unit, kind, layer, module, chosen in units(parts, pair.tuned.n_layers, cells, layers_per_unit):
        if changed is not None and not any(p.param in changed for part in chosen for p in part.pieces):
            rows.append((unit, kind, layer, module, head["tuned_scores"]["target"], head["tuned_scores"]["other"]))
            continue
        with reset(pair, chosen) as model:
            rows.append((unit, kind, layer, module, score(model, target, batch_size), score(model, other, batch_size)))
    columns = dict(zip(("units", "kind", "layer", "module", "target", "other"), map(list, zip(*rows))))
    return ResetMap(**head, n_layers=pair.tuned.n_layers, **columns,
                    settings={"cells": cells, "layers_per_unit": layers_per_unit, "prompts": len(target),
                              "other_prompts": len(other)})


# ------------------------------------------------------------------------------------------------ figures

def plot_reset_layers(result: ResetMap, ax=None):
    """Per block, and for the two halves: the share of the target gain lost and of the forgetting recovered."""
    import numpy as np

    if ax is None:
        ax = figure(width="double" if result.n_layers > 12 else "single")[1][0, 0]
    rows = result.of("layer")
    lost, recovered = result.target_lost(True), result.forgetting_recovered(True)
    k = result.settings.get("layers_per_unit", 1)  # blocks per unit: a bar spans the blocks it reset
    x = np.array([result.layer[i] for i in rows]) + (k - 1) / 2
    ax.bar(x - 0.2 * k, [lost[i] for i in rows], 0.4 * k, color=model_color("full"),
           label=f"{result.target_label} lost")
    ax.bar(x + 0.2 * k, [recovered[i] for i in rows], 0.4 * k, color=model_color("base"),
           label=f"{result.other_label} recovered")
    ax.axhline(0, color="grey", lw=0.6)
    halves = {result.units[i]: (lost[i], recovered[i]) for i in result.of("half")}
    note = "; ".join(f"{u.removeprefix('half ')}: {a:.0%} lost, {b:.0%} recovered" for u, (a, b) in halves.items())
    ax.set(xlabel="layer reset to the base", ylabel="fraction of the fine-tune's effect",
           title=f"Reset map of {result.tuned}" + (f"\n(halves {note})" if note else ""))
    ax.legend()
    return integer_ticks(ax, "x")


def plot_reset_cells(result: ResetMap, axes=None):
    """Two layer x module heatmaps: the target gain lost and the forgetting recovered by resetting each cell."""
    if axes is None:
        axes = figure(2, 1, width="double")[1][0]
    for ax, stat, title in zip(axes, ("target_lost_fraction", "forgetting_recovered_fraction"),
                               (f"{result.target_label} lost", f"{result.other_label} recovered")):
        table = result.cell_table(stat)
        image = ax.imshow(table.to_numpy(dtype=float).T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1,
                          interpolation="nearest")
        ax.figure.colorbar(image, ax=ax, label="fraction of the fine-tune's effect")
        ax.set_yticks(range(len(table.columns)), list(table.columns))
        ax.grid(False)
        ax.set(xlabel="layer", title=f"{title} when the cell is reset")
        integer_ticks(ax, "x")
    return axes
