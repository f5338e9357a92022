"""One paper style for every figure: single-column width, readable fonts, fixed colours per model.

Plotting functions take a result and an `Axes` and return the `Axes`; `save_figure` writes vector PDF
and PNG side by side. Nothing here touches a model.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import matplotlib

if "MPLBACKEND" not in os.environ:  # headless by default; Jupyter kernels set MPLBACKEND to their inline backend
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMN_WIDTH_IN = 3.4
DOUBLE_WIDTH_IN = 7.0
WIDTHS = {"single": COLUMN_WIDTH_IN, "double": DOUBLE_WIDTH_IN}
"""The standard figure widths (inches): one column, or the full page of a two-column paper."""
STYLE = {
    "figure.figsize": (COLUMN_WIDTH_IN, 2.4),
    "figure.dpi": 150,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.2,
    "pdf.fonttype": 42,
    "svg.hashsalt": "interp",
}
PALETTE = ("#1b6ca8", "#d1495b", "#edae49", "#66a182", "#8d6a9f", "#2e4057", "#c0c0c0")
_FIXED = {"base": PALETTE[0], "full": PALETTE[1], "lora-r1": PALETTE[2], "lora-r8": PALETTE[3],
          "lora-r64": PALETTE[4], "safety": PALETTE[5]}


def model_color(name: str) -> str:
    """The same colour for the same model in every figure (zoo names fixed, others hashed stably)."""
    short = name.removeprefix("zoo:")
    if short in _FIXED:
        return _FIXED[short]
    return PALETTE[sum(map(ord, short)) % len(PALETTE)]


@contextmanager
def paper_style():
    with plt.rc_context(STYLE):
        yield


def figure(n_cols: int = 1, n_rows: int = 1, width: str = "single", height: float = 2.4):
    """A new figure in the paper style, `width` "single" (one column) or "double" (two): (fig, axes)."""
    if width not in WIDTHS:
        from interp.errors import BadOption

        raise BadOption(f"figure width {width!r}; use one of {', '.join(WIDTHS)}")
    with paper_style():
        return plt.subplots(n_rows, n_cols, figsize=(WIDTHS[width], height), squeeze=False, layout="constrained")


def integer_ticks(ax, *axes: str):
    """Tick `axes` ("x", "y") of `ax` at integers only (layers, heads, steps); returns `ax`."""
    from matplotlib.ticker import MaxNLocator

    for name in axes or ("x",):
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(integer=True))
    return ax


def grouped_bars(ax, groups: list[str], values: dict[str, list[float]], errors: dict[str, list[float]] | None = None):
    """One group of bars per entry of `groups`, one bar per model (in the model's colour); returns `ax`."""
    import numpy as np

    width = 0.8 / max(len(values), 1)
    x = np.arange(len(groups))
    for i, (model, ys) in enumerate(values.items()):
        ax.bar(x + (i - (len(values) - 1) / 2) * width, ys, width, color=model_color(model), label=model,
               yerr=None if errors is None else errors[model], capsize=2, error_kw={"lw": 0.6})
    ax.set_xticks(x, groups)
    ax.legend()
    return ax


def sweep_lines(ax, sweeps: dict[str, tuple[list[float], list[float]]]):
    """One line per model through its (x, y) sweep points, in the model's colour; returns `ax`."""
    for model, (xs, ys) in sweeps.items():
        ax.plot(xs, ys, marker="o", markersize=3, color=model_color(model), label=model)
    ax.legend()
    return ax


def _apply_style(fig) -> None:
    """Set every text of `fig` to the style's size for its role (titles, labels, ticks, legends), whatever the
    rcParams were when it was drawn."""
    for ax in fig.axes:
        ax.title.set_fontsize(STYLE["axes.titlesize"])
        for side in (ax._left_title, ax._right_title):
            side.set_fontsize(STYLE["axes.titlesize"])
        ax.xaxis.label.set_fontsize(STYLE["axes.labelsize"])
        ax.yaxis.label.set_fontsize(STYLE["axes.labelsize"])
        ax.tick_params(axis="x", labelsize=STYLE["xtick.labelsize"])
        ax.tick_params(axis="y", labelsize=STYLE["ytick.labelsize"])
        legend = ax.get_legend()
        if legend is not None:
            for text in legend.get_texts():
                text.set_fontsize(STYLE["legend.fontsize"])
            legend.get_title().set_fontsize(STYLE["legend.fontsize"])
    if fig._suptitle is not None:
        fig._suptitle.set_fontsize(STYLE["axes.titlesize"])


def save_figure(fig, path: str | Path) -> tuple[Path, Path]:
    """Write `path`.pdf (vector) and `path`.png in the paper style; returns both paths. Closes the figure.

    The PDF carries no creation date, so re-drawing the same result gives the same bytes.
    """
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf, png = path.with_suffix(".pdf"), path.with_suffix(".png")
    _apply_style(fig)
    with paper_style():
        fig.savefig(pdf, metadata={"CreationDate": None, "Producer": "interp"})
        fig.savefig(png, metadata={"Software": None})
    plt.close(fig)
    return pdf, png
