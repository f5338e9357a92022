"""Task arithmetic across fine-tunes of one base: each task's metric in merged and negated models.

Variants (each a `editing.merge` of the base with coefficients c_i on the task vectors tau_i): `base` (all 0), each
fine-tune alone (`full`: its one-hot, the fine-tune itself), `sum` (all 1), `mean` (all 1/n), `sum, LiNeS` (all 1,
the merged vector LiNeS-scaled, when `lines` is given), and each negated (`-full`: -1 on it, `base - tau`). Every
variant is scored on every prompt set, so each task's metric in the merge sits beside its fine-tune's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.weights.editing import merge
from analyses.weights.scores import metric_of, score
from interp.errors import BadOption
from interp.models import Model, model_label
from interp.plotting import figure, model_color
from interp.prompts import PromptSet, as_prompt_set
from interp.results import Result


@dataclass
class TaskArithmetic(Result):
    """values[variant, set]: the metric (`metrics[set]`) of each variant (coefficients on `tuned`, in order; `lines`
    the (alpha, beta) it was LiNeS-scaled with, or None) on each prompt set."""

    ANALYSIS = "weights"
    base: str
    tuned: list[str]
    sets: list[str]
    metrics: list[str]
    variants: list[str]
    coefficients: list[list[float]]
    lines: list[list[float] | None]
    values: Float[Tensor, "variant set"]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"variant": v, "coefficients": " ".join(f"{c:g}" for c in self.coefficients[i]),
                              "lines": "" if self.lines[i] is None else " ".join(f"{x:g}" for x in self.lines[i]),
                              "set": s, "metric": self.metrics[j], "value": float(self.values[i, j])}
                             for i, v in enumerate(self.variants) for j, s in enumerate(self.sets)])

    def table(self):
        """variant x set table of the values."""
        return self.to_frame().pivot(index="variant", columns="set", values="value").loc[self.variants, self.sets]

    def value(self, variant: str, prompt_set: str) -> float:
        return float(self.values[self.variants.index(variant), self.sets.index(prompt_set)])

    def plot(self, ax=None):
        return plot_task_arithmetic(self, ax)


def default_variants(labels: Sequence[str], lines: tuple[float, float] | None = None,
                     negate: bool = True) -> dict[str, tuple[list[float], tuple[float, float] | None]]:
    """name -> (coefficients, lines) of the variants in the module docstring."""
    n = len(labels)
    out = {"base": ([0.0] * n, None)}
    out |= {label: ([float(i == j) for j in range(n)], None) for i, label in enumerate(labels)}
    if n > 1:
        out |= {"sum": ([1.0] * n, None), "mean": ([1.0 / n] * n, None)}
        if lines is not None:
            out[f"sum, LiNeS {lines[0]:g} {lines[1]:g}"] = ([1.0] * n, tuple(map(float, lines)))
    if negate:
        out |= {f"-{label}": ([-float(i == j) for j in range(n)], None) for i, label in enumerate(labels)}
    return out


def task_arithmetic(base: Model, tuned: Mapping[str, Model] | Sequence[Model],
                    sets: Mapping[str, PromptSet] | Sequence[PromptSet], *,
                    variants: Mapping[str, tuple[Sequence[float], tuple[float, float] | None]] | None = None,
                    lines: tuple[float, float] | None = None, negate: bool = True,
                    batch_size: int = 16) -> TaskArithmetic:
    """Score merges of the fine-tunes `tuned` (label -> Model, or Models labelled by their short names) of `base` on
    every prompt set. `variants`: name -> (coefficients, lines or None), default `default_variants(labels, lines,
    negate)`. The base variant is scored on `base` itself; every other is `merge(base, tuned, coefficients, lines)`."""
    tuned = dict(tuned) if isinstance(tuned, Mapping) else {model_label(m): m for m in tuned}
    sets = dict(sets) if isinstance(sets, Mapping) else {s.label: s for s in sets}
    sets = {name: as_prompt_set(s) for name, s in sets.items()}
    if not tuned or not sets:
        raise BadOption("task_arithmetic needs at least one tuned model and one prompt set")
    labels, models = list(tuned), list(tuned.values())
    variants = default_variants(labels, lines, negate) if variants is None else dict(variants)
    rows = []
    for name, (coefficients, scaling) in variants.items():
        if len(coefficients) != len(models):
            raise BadOption(f"variant {name!r} has {len(coefficients)} coefficients for {len(models)} fine-tunes")
        if not any(coefficients) and scaling is None:
            rows.append([score(base, s, batch_size) for s in sets.values()])
            continue
        with merge(base, models, coefficients, lines=scaling) as model:
            rows.append([score(model, s, batch_size) for s in sets.values()])
    return TaskArithmetic(base.name, labels, list(sets), [metric_of(s) for s in sets.values()], list(variants),
                          [[float(c) for c in v[0]] for v in variants.values()],
                          [None if v[1] is None else [float(x) for x in v[1]] for v in variants.values()],
                          torch.tensor(rows, dtype=torch.float64),
                          settings={"prompts": {k: len(s) for k, s in sets.items()}, "lines": lines,
                                    "negate": negate})


def plot_task_arithmetic(result: TaskArithmetic, axes=None):
    """One panel per prompt set: a bar per variant (the fine-tunes' own bars beside the merges')."""
    import numpy as np

    if axes is None:
        n = len(result.sets)
        axes = figure(n, 1, width="double" if n > 1 else "single", height=2.6)[1][0]
    x = np.arange(len(result.variants))
    colors = [model_color(v.lstrip("-")) for v in result.variants]
    for j, (ax, name) in enumerate(zip(axes, result.sets)):
        ax.bar(x, result.values[:, j].numpy(), color=colors)
        ax.set_xticks(x, result.variants, rotation=60, ha="right")
        ax.set(ylabel=result.metrics[j], title=name)
    axes[0].figure.suptitle(f"Task arithmetic on {model_label(result.base)}")
    return axes
