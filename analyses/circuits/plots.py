"""Figures of a `CircuitsResult`: head maps, the circuit graph, CMAP gains, ablation effects, and attribution vs
activation patching. Each takes the result (never a model) and axes, and returns the axes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from interp.models import model_label
from interp.plotting import PALETTE, figure, integer_ticks, model_color, save_figure


def plot_head_maps(result, task: str = "target", axes=None):
    """Layer x head importance (activation patching) for base, tuned and tuned - base, side by side."""
    if axes is None:
        axes = figure(3, 1, width="double", height=2.0)[1][0]
    base, tuned = result.heads(result.method, task, "base"), result.heads(result.method, task, "tuned")
    lim = float(torch.cat([base, tuned]).abs().max()) or 1.0
    diff_lim = float((tuned - base).abs().max()) or 1.0
    titles = (f"base ({model_label(result.base)})", f"tuned ({model_label(result.tuned)})", "tuned - base")
    for ax, data, title, vmax in zip(axes, (base, tuned, tuned - base), titles, (lim, lim, diff_lim)):
        im = ax.imshow(data.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set(xlabel="head", ylabel="layer", title=f"{title}, {result.method}")
        integer_ticks(ax, "x", "y")
        ax.grid(False)
        ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return axes


def _node_positions(up: list[str], down: list[str]) -> dict[str, tuple[float, float]]:
    """Layer columns: embed, then per layer its heads (stacked), attention and MLP readers, its MLP; logits last."""
    n_heads = sum(1 for u in up if u.startswith("a0."))
    n_layers = sum(1 for d in down if d.startswith("mlp"))
    pos = {}
    for name in up + down:
        if name == "embed":
            pos[name] = (0.0, (n_heads - 1) / 2)
        elif name == "logits":
            pos[name] = (2 * n_layers + 1.0, (n_heads - 1) / 2)
        elif name.startswith("attn"):
            pos[name] = (2 * int(name[4:]) + 0.6, -1.2)
        elif name.startswith("mlp"):
            pos[name] = (2 * int(name[3:]) + 1.6, -1.2)
        elif name.startswith("a"):
            layer, h = name[1:].split(".")
            pos[name] = (2 * int(layer) + 1.0, float(h))
        else:
            pos[name] = (2 * int(name[1:]) + 2.0, (n_heads - 1) / 2)
    return pos


def plot_circuit(result, n_edges: int = 20, ax=None):
    """The top edges of the base circuit, nodes laid out by layer (heads stacked, MLPs beside them); blue
    edges help the clean answer when kept clean (negative noising score), red ones hurt it."""
    if ax is None:
        ax = figure(width="double", height=3.0)[1][0, 0]
    up, down, scores = result.upstream, result.downstream, result.edges
    pos = _node_positions(up, down)
    flat = scores.abs().flatten()
    kept = flat.topk(min(n_edges, int((flat > 0).sum()))).indices.tolist()
    width = float(flat.max()) or 1.0
    used = set()
    for i in kept:
        u, v = divmod(i, len(down))
        (x0, y0), (x1, y1) = pos[up[u]], pos[down[v]]
        s = float(scores[u, v])
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(
            arrowstyle="-|>", lw=0.3 + 2.5 * abs(s) / width, alpha=0.7,
            color=model_color("base") if s < 0 else model_color("full"), connectionstyle="arc3,rad=0.15"))
        used |= {up[u], down[v]}
    for name, (x, y) in pos.items():
        on = name in used
        ax.scatter([x], [y], s=40 if on else 10, color="black" if on else "lightgrey", zorder=3)
        if on:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    note = ", ".join(f"{k}: {v:.2f}" for k, v in result.faithfulness.items())
    n_layers = sum(1 for d in down if d.startswith("mlp"))
    ax.set_xticks([2 * layer + 1.0 for layer in range(n_layers)], [str(layer) for layer in range(n_layers)])
    ax.set(title=f"top {len(kept)} edges (EAP-IG, {model_label(result.base)}); faithfulness by size {note}",
           xlabel="layer (embed left, heads stacked, MLP right of each layer, logits right)")
    ax.set_yticks([])
    ax.grid(False)
    return ax


def cmap_bars(components: list[str], gain, greedy, ax=None, n: int = 10):
    """The `n` components of largest CMAP gain, and the greedy set's gain marked as a line."""
    if ax is None:
        ax = figure()[1][0, 0]
    order = gain.argsort(descending=True)[:n].tolist()
    ax.bar(range(len(order)), gain[order].numpy(), color=model_color("full"))
    ax.set_xticks(range(len(order)), [components[i] for i in order], rotation=60, ha="right")
    best_set, best = greedy[-1]
    ax.axhline(best, ls="--", color="grey", label=f"greedy set of {len(best_set)}: {best:.2f}")
    ax.axhline(0.5, ls=":", color="black", lw=0.8)
    ax.set(ylabel="CMAP gain", title="tuned activation patched into base")
    ax.legend()
    return ax


def plot_cmap(result, n: int = 10, ax=None):
    """The result's CMAP gains (see `cmap_bars`)."""
    return cmap_bars(result.cmap["components"], result.cmap_gain, result.cmap["greedy"], ax, n)


def plot_ablation(result, ax=None):
    """Task accuracy: clean, top-3 heads ablated, random heads ablated (mean and each draw)."""
    if ax is None:
        ax = figure()[1][0, 0]
    a = result.ablation
    ax.bar([0, 1, 2], [a["clean_accuracy"], a["top_accuracy"], float(np.mean(a["random_accuracy"]))],
           color=[model_color("base"), model_color("full"), PALETTE[-1]])
    ax.scatter([2] * len(a["random_accuracy"]), a["random_accuracy"], color="black", s=6, zorder=3)
    ax.set_xticks([0, 1, 2], ["none", f"top {len(a['heads'])}", f"random {len(a['heads'])}"])
    ax.set(ylabel="answer accuracy", ylim=(0, 1.05), title=f"{a['mode']}-ablating heads ({result.skill})")
    return ax


def plot_agreement(result, ax=None):
    """Attribution vs activation patching per head on the skill, base model."""
    from scipy.stats import spearmanr

    if ax is None:
        ax = figure()[1][0, 0]
    x = result.heads("patching", "skill", "base").flatten().numpy()
    y = result.heads("attribution", "skill", "base").flatten().numpy()
    ax.scatter(x, y, s=10, color=model_color("base"))
    ax.set(xlabel="activation patching", ylabel="attribution patching",
           title=f"head importance, Spearman {spearmanr(x, y).statistic:.2f}")
    return ax


def save_base_figures(result, out: str | Path, suffix: str = "") -> list[Path]:
    """The figures of the base alone (circuit, agreement, ablation) the result has data for, PDF and PNG each."""
    out = Path(out)
    fig, ax = figure(width="double", height=3.0)
    plot_circuit(result, ax=ax[0, 0])
    written = list(save_figure(fig, out / f"circuit{suffix}"))
    if result.method == "patching":
        fig, ax = figure()
        plot_agreement(result, ax[0, 0])
        written += save_figure(fig, out / f"attribution_vs_patching{suffix}")
    if result.ablation is not None:
        fig, ax = figure()
        plot_ablation(result, ax[0, 0])
        written += save_figure(fig, out / f"ablation{suffix}")
    return written


def save_model_figures(result, out: str | Path, suffix: str = "") -> list[Path]:
    """The figures of the pair (head maps on skill and target, CMAP gains when measured), PDF and PNG each."""
    out = Path(out)
    written = []
    for task in ("target", "skill"):
        fig, axes = figure(3, 1, width="double", height=2.0)
        plot_head_maps(result, task, axes[0])
        written += save_figure(fig, out / f"heads_{task}{suffix}")
    if result.cmap is not None:
        fig, ax = figure()
        plot_cmap(result, ax=ax[0, 0])
        written += save_figure(fig, out / f"cmap{suffix}")
    return written


def save_figures(result, out: str | Path, suffix: str = "") -> list[Path]:
    """Every circuits figure the result has data for (`save_model_figures`, then `save_base_figures`)."""
    return save_model_figures(result, out, suffix) + save_base_figures(result, out, suffix)
