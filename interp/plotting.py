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


def figure(n_cols: int = 1, n_rows: int = 1, width: float = COLUMN_WIDTH_IN, height: float = 2.4):
    """A new figure in the paper style: (fig, axes)."""
    with paper_style():
        return plt.subplots(n_rows, n_cols, figsize=(width, height), squeeze=False, layout="constrained")


def save_figure(fig, path: str | Path) -> tuple[Path, Path]:
    """Write `path`.pdf (vector) and `path`.png; returns both paths. Closes the figure.

    The PDF carries no creation date, so re-drawing the same result gives the same bytes.
    """
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf, png = path.with_suffix(".pdf"), path.with_suffix(".png")
    with paper_style():
        fig.savefig(pdf, metadata={"CreationDate": None, "Producer": "interp"})
        fig.savefig(png, metadata={"Software": None})
    plt.close(fig)
    return pdf, png
