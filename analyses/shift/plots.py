"""Figures of a `ShiftResult` and a `StrengthSweep`: each takes the result and an Axes and returns the Axes."""

from __future__ import annotations

from pathlib import Path

import torch

from analyses.shift.result import RECOVERY, ShiftResult
from analyses.shift.steering import StrengthSweep
from interp.models import model_label
from interp.plotting import figure, model_color, save_figure


def plot_concept_table(result: ShiftResult, ax=None, layer: int | None = None, rows: int = 10):
    """Concepts at `layer` (default the last measured): size, shift norm, top tokens, top prompt."""
    if ax is None:
        ax = figure(height=3.0)[1][0, 0]
    i = result.layer_index(result.layers[-1] if layer is None else layer)
    order = result.counts[i].argsort(descending=True)[:rows].tolist()
    cells = []
    for c in order:
        top = int(result.top_items[i, c, 0])
        prompt = result.highlighted(top) if top >= 0 else ""
        cells.append([str(c), str(int(result.counts[i, c])), f"{float(result.shifts[i, c].norm()):.2f}",
                      " ".join(result.top_tokens[i][c][:3]), prompt[-40:]])
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=["k", "n", "|shift|", "top tokens", "top prompt"], loc="center",
                     cellLoc="left", colWidths=[0.06, 0.08, 0.1, 0.28, 0.48])
    table.auto_set_font_size(False)
    table.set_fontsize(5)
    ax.set_title(f"{result.method} concepts, {result.site} layer {result.layers[i]}")
    return ax


def plot_shift_norms(result: ShiftResult, ax=None):
    """||Delta_k|| per concept (columns) and layer (rows)."""
    if ax is None:
        ax = figure()[1][0, 0]
    norms = result.shifts.norm(dim=-1).numpy()
    image = ax.imshow(norms, aspect="auto", cmap="viridis")
    ax.figure.colorbar(image, ax=ax, label=r"$\|\Delta_k\|$")
    ax.set_yticks(range(len(result.layers)), [str(layer) for layer in result.layers])
    step = max(1, result.k // 10)
    ax.set_xticks(range(0, result.k, step), [str(c) for c in range(0, result.k, step)])
    ax.set(xlabel="concept (each layer has its own dictionary)", ylabel="layer",
           title=f"Concept shift norms ({model_label(result.tuned)} vs {model_label(result.base)})")
    ax.grid(False)
    return ax


def plot_recovery(result: ShiftResult, ax=None, layer: int | None = None):
    """Relative error ||h + shift - h_tuned|| / ||h_tuned|| per concept: h_base alone, + global, + concept."""
    if ax is None:
        ax = figure()[1][0, 0]
    i = result.layer_index(result.layers[-1] if layer is None else layer)
    x = torch.arange(result.k).numpy()
    colors = (model_color("base"), "#c0c0c0", model_color("full"))
    for j, (name, color) in enumerate(zip(RECOVERY, colors)):
        label = {"base": r"$h_{base}$", "global": "+ global shift", "concept": "+ concept shift"}[name]
        ax.bar(x + (j - 1) * 0.27, result.rel_error[i, :, j].numpy(), width=0.27, color=color, label=label)
    step = max(1, result.k // 10)
    ax.set_xticks(x[::step], [str(c) for c in x[::step]])
    ax.set(xlabel="concept", ylabel="relative error to $h_{tuned}$", title=f"Recovery at layer {result.layers[i]}")
    ax.set_ylim(0, 1.3 * float(result.rel_error[i].max()))
    ax.legend(ncol=3, loc="upper center", frameon=False)
    return ax


def plot_strength_sweep(sweep: StrengthSweep, ax=None):
    """KL(steered || target) against strength, and held-out accuracy (the side effect) on a twin axis."""
    if ax is None:
        ax = figure()[1][0, 0]
    ax.plot(sweep.strength, sweep.kl, marker="o", color=model_color("full"), label="KL to target")
    ax.set(xlabel="steering strength", ylabel="KL(steered || target)",
           title=f"Steering {model_label(sweep.model)} with {sweep.label} at layer {sweep.layer}")
    if sweep.accuracy:
        twin = ax.twinx()
        twin.plot(sweep.strength, sweep.accuracy, marker="s", color=model_color("base"), ls="--",
                  label="held-out accuracy")
        twin.set(ylabel="held-out accuracy", ylim=(0, 1.05))
        twin.grid(False)
    return ax


def save_figures(result: ShiftResult, sweep: StrengthSweep | None, out: str | Path, suffix: str = "") -> list[Path]:
    """Every shift figure of one tuned model into `out` (PDF and PNG each): the concept table, the shift norms,
    the recovery and (with `sweep`) the steering curve; file names end in `suffix`."""
    out = Path(out)
    drawings = [("shift_concepts", plot_concept_table, result, 3.0), ("shift_norms", plot_shift_norms, result, 2.4),
                ("shift_recovery", plot_recovery, result, 2.4)]
    if sweep is not None:
        drawings.append(("shift_steering", plot_strength_sweep, sweep, 2.4))
    written = []
    for name, draw, drawn, height in drawings:
        fig, ax = figure(height=height)
        draw(drawn, ax[0, 0])
        written += save_figure(fig, out / f"{name}{suffix}")
    return written
