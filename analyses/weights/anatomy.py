"""The anatomy of an update: where in the model fine-tuning moved the weights, and how.

For every part (`analyses.weights.parts`: a module of a block, a norm, the embeddings, ...), with theta0 the base's
values and dtheta the update over all the part's pieces (weight and bias), and for the part's weight matrix W0, dW in
the (out, in) orientation:

    delta_fro = ||dtheta||_F      base_fro = ||theta0||_F        relative = delta_fro / base_fro
    spectral ratio = ||dW||_2 / ||W0||_2                          share = delta_fro^2 / sum over all parts
    effective rank of dW = exp(-sum_i p_i log p_i), p_i = s_i / sum_j s_j (Roy & Vetterli 2007; 0 for dW = 0)
        over the singular values a checkpoint can resolve: s_i > max(out, in) eps ||W0||_2, eps that of the dtype
        the base is stored in (the numerical-rank convention of numpy's matrix_rank). Below it lies the rounding of
        a merged float checkpoint, which would otherwise add hundreds of tiny directions.

Shares add up to 1 over the whole update (every parameter is in one part). Norms and vectors have no spectrum (NaN).
The update is read as `analyses.weights.sources` does: a PEFT LoRA folder (or a Model merged from one) from its
factors, a model folder from its safetensors, one parameter at a time on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.intruders.spectra import effective_rank, svdvals
from analyses.weights.parts import BLOCK_MODULES, Part, model_parts
from analyses.weights.sources import Update, update
from interp.models import CheckpointSeries, Model, Pair, load_series, model_label
from interp.plotting import figure, integer_ticks
from interp.results import Result

STATS = ("delta_fro", "base_fro", "relative", "spectral_ratio", "erank", "share")


@dataclass
class Anatomy(Result):
    """Per part (rows in model order; `layer` None outside the blocks): the Frobenius norms of the update and of the
    base, the spectral norms of dW and W0 (NaN without a matrix, base_spec also NaN where dW = 0), dW's effective
    rank."""

    ANALYSIS = "weights"
    base: str
    tuned: str
    label: str
    n_layers: int
    parts: list[str]
    layer: list[int | None]
    module: list[str]
    delta_fro: Float[Tensor, " part"]
    base_fro: Float[Tensor, " part"]
    delta_spec: Float[Tensor, " part"]
    base_spec: Float[Tensor, " part"]
    erank: Float[Tensor, " part"]

    def relative(self) -> Float[Tensor, " part"]:
        """||dtheta||_F / ||theta0||_F (NaN where the base part is zero)."""
        return self.delta_fro / self.base_fro.where(self.base_fro > 0, torch.nan)

    def spectral_ratio(self) -> Float[Tensor, " part"]:
        """||dW||_2 / ||W0||_2: 0 where dW = 0, NaN for parts without a matrix."""
        return torch.where(self.delta_spec == 0, 0.0, self.delta_spec / self.base_spec)

    def share(self) -> Float[Tensor, " part"]:
        """Each part's share of the whole update's energy ||dtheta||^2 (sums to 1; zeros for no update)."""
        energy = self.delta_fro.square()
        return energy / energy.sum() if energy.sum() > 0 else energy

    def stat(self, name: str) -> Float[Tensor, " part"]:
        """One of STATS (or a stored field) by name."""
        derived = {"relative": self.relative, "spectral_ratio": self.spectral_ratio, "share": self.share}
        return derived[name]() if name in derived else getattr(self, name)

    def to_frame(self):
        """One row per part: layer (empty outside the blocks), module and every statistic."""
        import pandas as pd

        frame = pd.DataFrame({"model": self.label, "part": self.parts,
                              "layer": pd.array(self.layer, dtype="Int64"), "module": self.module})
        for name in STATS:
            frame[name] = self.stat(name).numpy()
        return frame

    def grid(self, stat: str = "share"):
        """`stat` as a layer x module table over the blocks (modules the model has, in BLOCK_MODULES order)."""
        frame = self.to_frame().dropna(subset=["layer"])
        table = frame.pivot(index="layer", columns="module", values=stat)
        return table[[m for m in BLOCK_MODULES if m in table.columns]]

    def layer_share(self) -> Float[Tensor, " layer"]:
        """Share of the update's energy in each block (the rest is outside the blocks)."""
        share = self.share()
        return torch.stack([share[[i for i, l in enumerate(self.layer) if l == layer]].sum()
                            for layer in range(self.n_layers)])

    def total(self) -> float:
        """||dtheta||_F of the whole update."""
        return float(self.delta_fro.square().sum().sqrt())

    def plot(self, ax=None, stat: str = "share"):
        return plot_anatomy(self, ax, stat)


def measure(pair_or_base: Pair | Model | str | Path, tuned: Model | str | Path | None = None, *,
            dtype: torch.dtype | str = torch.float32, device: str | torch.device = "auto",
            label: str | None = None) -> Anatomy:
    """The anatomy of the update of a Pair, or of base and tuned (Models, model folders, or a tuned PEFT adapter
    folder, read as its factors). dtype: of the norms and SVDs (float32 or float64); label: default the tuned
    model's short name."""
    up = update(pair_or_base, tuned, dtype=dtype, device=device)
    parts = model_parts(up.base.hf, up.transposed)
    stats = torch.tensor([_part_stats(up, part) for part in parts], dtype=torch.float64)
    return Anatomy(up.base.name, up.tuned.name, label or model_label(up.tuned.name),
                   up.base.hf.config.num_hidden_layers, [p.name for p in parts], [p.layer for p in parts],
                   [p.module for p in parts], *stats.T.contiguous(),
                   settings={"dtype": str(up.dtype).removeprefix("torch.")})


def _part_stats(up: Update, part: Part) -> tuple[float, float, float, float, float]:
    """(delta_fro, base_fro, delta_spec, base_spec, erank) of one part."""
    delta_sq = base_sq = 0.0
    for piece in part.pieces:
        W0, dW = up(piece.param)
        base_sq += float(piece.view(W0).square().sum())
        if dW is not None:
            delta_sq += float(piece.view(dW).square().sum())
    if part.matrix is None:
        return math.sqrt(delta_sq), math.sqrt(base_sq), math.nan, math.nan, math.nan
    W0, dW = (None if t is None else part.matrix.view(t) for t in up(part.matrix.param))
    if dW is None or not dW.any():
        return math.sqrt(delta_sq), math.sqrt(base_sq), 0.0, math.nan, 0.0
    s, base_spec = svdvals(dW, up.dtype), float(svdvals(W0, up.dtype)[0])
    stored = up.base.params[part.matrix.param].dtype
    resolvable = s[s > max(dW.shape) * torch.finfo(stored).eps * base_spec]
    return math.sqrt(delta_sq), math.sqrt(base_sq), float(s[0]), base_spec, effective_rank(resolvable)


def measure_series(base: Model | str | Path, series: CheckpointSeries | str | Path | Sequence[str | Path], *,
                   dtype: torch.dtype | str = torch.float32,
                   device: str | torch.device = "auto") -> list[tuple[int, Anatomy]]:
    """The anatomy of every checkpoint of a series against `base`, each read from its folder (no model is built;
    adapter checkpoints from their factors); results labelled `step N`."""
    series = series if isinstance(series, CheckpointSeries) else load_series(series)
    return [(step, measure(base, path, dtype=dtype, device=device, label=f"step {step}")) for step, path in series]


# ------------------------------------------------------------------------------------------------ figures

STAT_LABELS = {"share": "share of the update's energy", "relative": r"$\|\Delta W\|_F / \|W_0\|_F$",
               "spectral_ratio": r"$\|\Delta W\|_2 / \|W_0\|_2$", "erank": r"effective rank of $\Delta W$",
               "delta_fro": r"$\|\Delta W\|_F$"}


def plot_anatomy(result: Anatomy, ax=None, stat: str = "share"):
    """`stat` as a layer x module heatmap (blocks only; what lies outside them is named in the title)."""
    if ax is None:
        ax = figure(width="double" if result.n_layers > 12 else "single")[1][0, 0]
    grid = result.grid(stat)  # rows are the layers 0..L-1, so the image's x positions are the layer numbers
    image = ax.imshow(grid.to_numpy(dtype=float).T, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label=STAT_LABELS.get(stat, stat))
    ax.set_yticks(range(len(grid.columns)), list(grid.columns))
    ax.grid(False)
    if stat == "share":
        title = f"Where {result.label}'s update lies ({1 - float(result.layer_share().sum()):.0%} outside the blocks)"
    else:
        title = f"{result.label}: {STAT_LABELS.get(stat, stat)}"
    ax.set(xlabel="layer", title=title)
    return integer_ticks(ax, "x")


def plot_series(series: Sequence[tuple[int, Anatomy]], ax=None, stat: str = "relative"):
    """Per block, the update's `stat` (relative: ||dtheta_block|| / ||theta0_block||; delta_fro) along the
    series."""
    if ax is None:
        ax = figure()[1][0, 0]
    steps = [step for step, _ in series]
    n_layers = series[0][1].n_layers
    for layer in range(n_layers):
        ys = [_block_value(r, layer, stat) for _, r in series]
        ax.plot(steps, ys, marker="o", markersize=3, label=f"layer {layer}",
                color=f"C{layer % 10}" if n_layers <= 10 else None)
    ylabel = r"$\|\Delta\theta_l\|_F$" if stat == "delta_fro" else r"$\|\Delta\theta_l\|_F / \|\theta_{0,l}\|_F$"
    ax.set(xlabel="step", ylabel=ylabel + " of block l", title="The update along the series")
    if n_layers <= 10:
        ax.legend()
    return integer_ticks(ax, "x")


def _block_value(result: Anatomy, layer: int, stat: str) -> float:
    rows = [i for i, l in enumerate(result.layer) if l == layer]
    delta = float(result.delta_fro[rows].square().sum().sqrt())
    if stat == "delta_fro":
        return delta
    return delta / float(result.base_fro[rows].square().sum().sqrt())
