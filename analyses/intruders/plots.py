"""Intruder figures: each takes saved results and an Axes (one is made when none is given) and returns the Axes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from analyses.intruders.result import IntruderResult
from analyses.intruders.steering import LambdaSweep
from interp.models import model_label
from interp.plotting import PALETTE, figure, integer_ticks, model_color, save_figure


def plot_counts(results: Sequence[IntruderResult], ax=None):
    """Intruders summed over all matrices vs epsilon, one line per model (full fine-tune and LoRA ranks together)."""
    if ax is None:
        ax = figure()[1][0, 0]
    for r in results:
        ax.plot(r.epsilons.numpy(), r.totals().numpy(), marker="o", markersize=3, label=r.label,
                color=model_color(r.label))
    ax.set(xlabel=r"$\epsilon$ (similarity threshold)", ylabel=f"intruders (top {results[0].k}, all matrices)",
           title="Intruder dimensions")
    ax.legend()
    return integer_ticks(ax, "y")


def plot_layer_heatmap(result: IntruderResult, ax=None, epsilon: float | None = None):
    """Intruder counts per layer and matrix kind at `epsilon` (default the result's)."""
    if ax is None:
        ax = figure(width="double")[1][0, 0]
    table = result.layer_frame(epsilon)
    counts = table.to_numpy().T  # [kind, layer]
    image = ax.imshow(counts, aspect="auto", cmap="Reds", vmin=0, vmax=max(result.k, 1))
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, str(value), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(table.index)), [str(i) for i in table.index])
    ax.set_yticks(range(len(table.columns)), list(table.columns))
    ax.grid(False)
    eps = result.epsilon if epsilon is None else epsilon
    ax.set(xlabel="layer", title=f"Intruders of {result.label} ($\\epsilon$ = {eps:g})")
    ax.figure.colorbar(image, ax=ax, label="intruders")
    return ax


def _showcase(result: IntruderResult) -> int:
    """The matrix with the most intruders at the result's epsilon, ties broken by the largest ||delta W||_2 / s1."""
    counts, ratio = result.count().double(), result.ratio(1).nan_to_num(0).double()
    return int((counts * 1e6 + ratio).argmax())


def plot_spectra(result: IntruderResult, ax=None, matrix: str | int | None = None):
    """Singular values of W0, Wt and delta W of one matrix (default: the one with most intruders); intruders marked."""
    if ax is None:
        ax = figure()[1][0, 0]
    i = _showcase(result) if matrix is None else (result.names.index(matrix) if isinstance(matrix, str) else matrix)
    color = model_color(result.label)
    for values, name, style, c in ((result.base_s[i], "base", "-", model_color("base")),
                                   (result.tuned_s[i], result.label, "-", color),
                                   (result.delta_s[i], r"$\Delta W$", ":", color)):
        values = values[~values.isnan()]
        if style == ":":  # delta W: leave out the float round-off past its rank
            values = values[values > 1e-5 * values.max()]
        ax.plot(range(1, len(values) + 1), values.numpy(), style, label=name, color=c)
    hits = torch.nonzero(result.intruders()[i]).flatten()
    ax.scatter((hits + 1).numpy(), result.tuned_s[i, hits].numpy(), marker="x", color="black", zorder=3,
               label=f"intruders ($\\epsilon$ = {result.epsilon:g})")
    ax.set(xscale="log", yscale="log", xlabel="index", ylabel="singular value",
           title=f"Spectra of {result.names[i]}")
    ax.legend()
    return ax


def plot_lambda(sweep: LambdaSweep, ax=None):
    """Target accuracy against pre-training loss as the intruders are scaled by lambda; the base model as a star."""
    if ax is None:
        ax = figure()[1][0, 0]
    label = model_label(sweep.tuned)
    ax.plot(sweep.pretrain_loss, sweep.target_accuracy, marker="o", color=model_color(label), label=label)
    for lam, x, y in zip(sweep.lam, sweep.pretrain_loss, sweep.target_accuracy):
        ax.annotate(f"{lam:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.scatter([sweep.base["pretrain_loss"]], [sweep.base["target_accuracy"]], marker="*", s=40,
               color=model_color("base"), label="base", zorder=3)
    ax.set(xlabel=sweep.pretrain_metric + " (forgetting)", ylabel="target accuracy",
           title=rf"Scaling intruders by $\lambda$ ($\epsilon$ = {sweep.epsilon:g})")
    ax.legend()
    return ax


def plot_series(series: Sequence[tuple[int, IntruderResult]], ax=None, epsilons: Sequence[float] = (0.3, 0.5, 0.7)):
    """Intruders over all matrices vs training step, one line per epsilon."""
    if ax is None:
        ax = figure()[1][0, 0]
    steps = [step for step, _ in series]
    for eps, color in zip(epsilons, PALETTE):
        ax.plot(steps, [int(r.count(eps).sum()) for _, r in series], marker="o", markersize=3, color=color,
                label=f"$\\epsilon$ = {eps:g}")
    ax.set(xlabel="training step", ylabel=f"intruders (top {series[0][1].k})", title="Intruders during fine-tuning")
    ax.legend()
    return integer_ticks(ax, "x", "y")


def save_figures(results: Sequence[IntruderResult], sweep: LambdaSweep | None, series, out: str | Path) -> list[Path]:
    """Every intruder figure of saved results into `out` (PDF and PNG each): counts across models, per model the
    layer heatmap and the spectra of its showcase matrix, the lambda sweep and the series when given."""
    out = Path(out)
    fig, ax = figure()
    plot_counts(results, ax[0, 0])
    written = list(save_figure(fig, out / "intruder_counts"))
    for r in results:
        if not r.names:
            continue
        fig, ax = figure(width="double")
        plot_layer_heatmap(r, ax[0, 0])
        written += save_figure(fig, out / f"intruder_layers_{r.label}")
        fig, ax = figure()
        plot_spectra(r, ax[0, 0])
        written += save_figure(fig, out / f"intruder_spectra_{r.label}")
    if sweep is not None:
        fig, ax = figure()
        plot_lambda(sweep, ax[0, 0])
        written += save_figure(fig, out / "intruder_lambda")
    if series:
        fig, ax = figure()
        plot_series(series, ax[0, 0])
        written += save_figure(fig, out / "intruder_series")
    return written
