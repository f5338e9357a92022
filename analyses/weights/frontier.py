"""The LiNeS trade-off: the target skill against forgetting over a grid of (alpha, beta), uniform scaling beside it.

Every grid point is the tuned model under `editing.lines(pair, alpha, beta)`, scored on the target set (the
fine-tune's task) and on the other set (what it may forget: the pre-training skills, or prose). The points with
beta = 0 are uniform scaling theta0 + lambda tau, lambda = alpha: the baseline. `compare` reads both at equal target
metric: for a level f of the fine-tune's gain, the target value t = base + f (tuned - base); uniform scaling's other
metric there is read off its piecewise-linear curve (the best wherever the curve reaches t), LiNeS's is the best
grid point with beta > 0 that reaches t; `paired` reads uniform scaling at each LiNeS point's own target value (no
grid coarseness against LiNeS). The paper's claim (Wang et al. 2024): at equal target accuracy, LiNeS
forgets less.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from analyses.weights.editing import lines
from analyses.weights.scores import TwoSets, better, score, two_sets
from interp.errors import BadOption
from interp.models import Pair
from interp.plotting import figure, model_color
from interp.prompts import PromptSet, as_prompt_set

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
LEVELS = (0.5, 0.75, 0.9)


@dataclass
class LinesSweep(TwoSets):
    """Scores over the (alpha, beta) grid: `target[i]`, `other[i]` at (`alpha[i]`, `beta[i]`)."""

    alpha: list[float]
    beta: list[float]
    target: list[float]
    other: list[float]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"tuned": self.tuned, "alpha": self.alpha, "beta": self.beta,
                             "method": ["uniform" if b == 0 else "LiNeS" for b in self.beta],
                             f"target ({self.target_label}, {self.target_metric})": self.target,
                             f"other ({self.other_label}, {self.other_metric})": self.other})

    def uniform(self) -> list[tuple[float, float, float]]:
        """(lambda, target, other) of the beta = 0 points, by lambda."""
        return sorted((a, t, o) for a, b, t, o in zip(self.alpha, self.beta, self.target, self.other) if b == 0)

    def lines_points(self) -> list[tuple[float, float, float, float]]:
        """(alpha, beta, target, other) of the beta != 0 points."""
        return [(a, b, t, o) for a, b, t, o in zip(self.alpha, self.beta, self.target, self.other) if b != 0]

    def compare(self, levels: Sequence[float] = LEVELS):
        """At each level f of the target gain: the target value needed, uniform's and LiNeS's best other metric
        there (NaN where none reaches it), the LiNeS point, and `lines_better` = how much less LiNeS forgets (in the
        other metric's units, positive when LiNeS is better)."""
        import pandas as pd

        st, so = better(self.target_metric), better(self.other_metric)
        rows = []
        for f in levels:
            need = self.base["target"] + f * (self.tuned_scores["target"] - self.base["target"])
            uni = _best_on_curve(self.uniform(), need, st, so)
            reach = [(a, b, o) for a, b, t, o in self.lines_points() if st * (t - need) >= -1e-12]
            a, b, lin = max(reach, key=lambda r: so * r[2]) if reach else (math.nan, math.nan, math.nan)
            rows.append({"level": f, "target needed": need, "uniform other": uni, "LiNeS other": lin,
                         "LiNeS alpha": a, "LiNeS beta": b, "lines_better": so * (lin - uni)})
        return pd.DataFrame(rows)

    def paired(self):
        """Each LiNeS point against uniform scaling at its own target value: `uniform other` is the best of the
        uniform curve where it reaches that value, `lines_better` as in `compare`."""
        import pandas as pd

        st, so = better(self.target_metric), better(self.other_metric)
        rows = [{"alpha": a, "beta": b, "target": t, "LiNeS other": o,
                 "uniform other": (u := _best_on_curve(self.uniform(), t, st, so)), "lines_better": so * (o - u)}
                for a, b, t, o in self.lines_points()]
        return pd.DataFrame(rows, columns=["alpha", "beta", "target", "LiNeS other", "uniform other", "lines_better"])

    def plot(self, ax=None):
        return plot_frontier(self, ax)


def _best_on_curve(curve: Sequence[tuple[float, float, float]], need: float, st: float, so: float) -> float:
    """The best other metric on the piecewise-linear (target, other) curve where target reaches `need`."""
    candidates = [o for _, t, o in curve if st * (t - need) >= -1e-12]
    for (_, t0, o0), (_, t1, o1) in pairwise(curve):
        if (st * (t0 - need)) * (st * (t1 - need)) < 0:  # the segment crosses the level
            candidates.append(o0 + (need - t0) / (t1 - t0) * (o1 - o0))
    return max(candidates, key=lambda o: so * o) if candidates else math.nan


def lines_sweep(pair: Pair, target: PromptSet | Sequence[str], other: PromptSet | Sequence[str], *,
                alphas: Sequence[float] = ALPHAS, betas: Sequence[float] = BETAS, batch_size: int = 16,
                **kwargs) -> LinesSweep:
    """Target and other metric of the tuned model LiNeS-scaled at every (alpha, beta) of alphas x betas (beta = 0,
    uniform scaling, always included), and of the base and tuned models. `kwargs` go to `lines` (embed_scale,
    head_scale)."""
    target, other = as_prompt_set(target, None), as_prompt_set(other, None)
    if not alphas:
        raise BadOption("lines_sweep needs at least one alpha")
    grid = [(float(a), float(b)) for b in dict.fromkeys([0.0, *map(float, betas)]) for a in alphas]
    points = []
    for a, b in grid:
        with lines(pair, a, b, **kwargs) as model:
            points.append((score(model, target, batch_size), score(model, other, batch_size)))
    return LinesSweep(**two_sets(pair, target, other, batch_size), alpha=[a for a, _ in grid],
                      beta=[b for _, b in grid], target=[t for t, _ in points], other=[o for _, o in points],
                      settings={"alphas": [float(a) for a in alphas], "betas": [float(b) for b in betas],
                                "prompts": len(target), "other_prompts": len(other), **kwargs})


def pareto(points: Sequence[tuple[float, float]], st: float, so: float) -> list[tuple[float, float]]:
    """The (target, other) points no other point beats on both, by target."""
    keep = [p for p in points if not any(st * q[0] >= st * p[0] and so * q[1] >= so * p[1] and q != p
                                         for q in points)]
    return sorted(set(keep))


def plot_frontier(sweep: LinesSweep, ax=None):
    """Other metric (forgetting) against target metric: uniform scaling as a line through its lambdas, LiNeS grid
    points coloured by beta with their Pareto front, base and tuned marked."""
    if ax is None:
        ax = figure()[1][0, 0]
    uni = sweep.uniform()
    ax.plot([t for _, t, _ in uni], [o for _, _, o in uni], marker="o", markersize=3, color=model_color("base"),
            label=r"uniform $\lambda$")
    pts = sweep.lines_points()
    if pts:
        import matplotlib as mpl

        cmap, top = mpl.colormaps["plasma"], max(b for _, b, _, _ in pts)
        ax.scatter([t for _, _, t, _ in pts], [o for _, _, _, o in pts], s=9,
                   c=[cmap(0.85 * b / top) for _, b, _, _ in pts], zorder=3, label=r"LiNeS (colour: $\beta$)")
        front = pareto([(t, o) for _, _, t, o in pts], better(sweep.target_metric), better(sweep.other_metric))
        ax.plot([t for t, _ in front], [o for _, o in front], ls="--", lw=0.8, color=model_color("full"),
                label="LiNeS front")
    for name, scores, marker in (("base", sweep.base, "s"), ("tuned", sweep.tuned_scores, "*")):
        ax.scatter([scores["target"]], [scores["other"]], marker=marker, s=30, color="black", zorder=4)
        ax.annotate(name, (scores["target"], scores["other"]), textcoords="offset points", xytext=(4, 2),
                    fontsize=6)
    ax.set(xlabel=f"{sweep.target_label} ({sweep.target_metric})", ylabel=f"{sweep.other_label} "
           f"({sweep.other_metric})", title=f"LiNeS vs uniform scaling of {sweep.tuned}")
    ax.legend()
    return ax
