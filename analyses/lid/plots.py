"""The LID figures: mean local ID per layer, its distribution at one site, along a checkpoint series, and raw vs
tangent steering. Each takes results and an Axes and returns the Axes; `save_figures` writes them all."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from analyses.lid.local_id import LIDResult, finite, summary
from analyses.lid.series import SeriesResult
from analyses.lid.steering import SteeringResult
from interp.plotting import PALETTE, figure, integer_ticks, model_color, paper_style, save_figure
from interp.sites import site as parse_site

LINESTYLES = ("-", "--", ":", "-.")


def _site_label(s: str) -> str:
    site = parse_site(s)
    return str(site.layer) if site.kind == "resid_post" else s


def _ordered_sites(results: Sequence[LIDResult]) -> list[str]:
    sites = dict.fromkeys(s for r in results for s in r.sites)
    return sorted(sites, key=lambda s: parse_site(s).order_key())


def plot_layers(results: Sequence[LIDResult], ax=None):
    """Mean local ID per layer: one line per model (colour) and prompt set (line style), IQR shaded."""
    with paper_style():  # titles, legends and twin axes made here take the paper style too
        if ax is None:
            ax = figure()[1][0, 0]
        sites = _ordered_sites(results)
        for i, r in enumerate(results):
            lid = r.lid
            for m in r.models:
                x = [sites.index(s) for s in r.sites]
                stats = [summary(lid[m, s]) for s in r.sites]
                name = m if len(results) == 1 else f"{m}, {r.label}"
                ax.plot(x, [st["mean"] for st in stats], marker="o", ls=LINESTYLES[i % len(LINESTYLES)],
                        color=model_color(m), label=name)
                ax.fill_between(x, [st["q25"] for st in stats], [st["q75"] for st in stats], color=model_color(m),
                                alpha=0.12, lw=0)
        ax.set_xticks(range(len(sites)), [_site_label(s) for s in sites])
        ax.set(xlabel="layer", ylabel=f"mean local ID ({results[0].estimator}, k={results[0].k})",
               title="Local intrinsic dimension per layer")
        ax.legend()
        return ax


def plot_distribution(results: Sequence[LIDResult], ax=None, site: str | None = None):
    """Distribution of the local IDs at one site (default: the deepest measured) per prompt set and model."""
    with paper_style():  # titles, legends and twin axes made here take the paper style too
        if ax is None:
            ax = figure()[1][0, 0]
        site = site or _ordered_sites(results)[-1]
        groups = [(r, m) for r in results for m in r.models if site in r.sites]
        data = [finite(r.lid[m, site]).numpy() for r, m in groups]
        parts = ax.violinplot(data, showmeans=True, showextrema=False)
        for body, (_, m) in zip(parts["bodies"], groups):
            body.set_facecolor(model_color(m))
            body.set_alpha(0.6)
        ax.set_xticks(range(1, len(groups) + 1), [f"{m}\n{r.label}" if len(results) > 1 else m for r, m in groups])
        ax.set(ylabel="local ID", title=f"Local ID distribution at {site}")
        return ax


def plot_series(series: SeriesResult, ax=None):
    """Mean local ID per checkpoint (IQR shaded), with the task accuracy (or loss) on a second axis."""
    with paper_style():  # titles, legends and twin axes made here take the paper style too
        if ax is None:
            ax = figure()[1][0, 0]
        for j, s in enumerate(series.sites):
            colour = PALETTE[j % len(PALETTE)]
            ax.plot(series.steps, series.mean[:, j].numpy(), marker="o", color=colour, label=f"mean LID, {s}")
            ax.fill_between(series.steps, series.q25[:, j].numpy(), series.q75[:, j].numpy(), color=colour,
                            alpha=0.15, lw=0)
        ax.set(xlabel="fine-tuning step", ylabel=f"mean local ID ({series.estimator})",
               title=f"LID along training ({series.label} prompts)")
        integer_ticks(ax, "x")
        right = ax.twinx()
        has_accuracy = bool(series.accuracy.isfinite().any())
        metric = series.accuracy if has_accuracy else series.loss
        right.plot(series.steps, metric.numpy(), marker="s", ls="--", color="grey",
                   label=f"{series.task} {'accuracy' if has_accuracy else 'loss'}")
        right.set_ylabel(f"{series.task} {'accuracy' if has_accuracy else 'loss'}")
        right.grid(False)
        right.spines["right"].set_visible(True)
        handles = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        right.legend(handles[0] + more[0], handles[1] + more[1])
        return ax


def plot_steering(result: SteeringResult, ax=None, quantity: str = "nn_distance", site: str | None = None):
    """Raw vs tangent steering against the effect reached: `quantity` ("nn_distance" or "lid") of the steered
    points at `site` (default: the deepest measured); the unsteered value dotted."""
    with paper_style():  # titles, legends and twin axes made here take the paper style too
        if ax is None:
            ax = figure()[1][0, 0]
        rows = [{k: math.nan if v is None else v for k, v in r.items()} for r in result.table]  # None: NaN saved
        site = site or sorted({r["site"] for r in rows}, key=lambda s: parse_site(s).order_key())[-1]
        colours = {"raw": PALETTE[1], "tangent": PALETTE[3]}
        for method, colour in colours.items():
            mine = sorted((r for r in rows if r["method"] == method and r["site"] == site), key=lambda r: r["effect"])
            ax.plot([r["effect"] for r in mine], [r[quantity] for r in mine], marker="o", color=colour, label=method)
        for r in rows:
            if r["method"] == "none" and r["site"] == site:
                ax.axhline(r[quantity], ls=":", color="grey", label="unsteered")
        what = {"nn_distance": "distance to nearest reference point", "lid": "mean LID of steered cloud"}[quantity]
        ax.set(xlabel="effect (" + ("KL, nats" if result.metric == "kl" else "rise in p(target)") + ")",
               ylabel=what, title=f"Steering at {result.site}, measured at {site}")
        ax.legend()
        return ax


def save_figures(results: Sequence[LIDResult], series: SeriesResult | None, steering: SteeringResult | None,
                 out: str | Path) -> list[Path]:
    """Every LID figure for saved results into `out` (PDF and PNG each)."""
    out = Path(out)
    written = []
    if results:
        fig, ax = figure()
        plot_layers(results, ax[0, 0])
        written += save_figure(fig, out / "lid_layers")
        fig, ax = figure()
        plot_distribution(results, ax[0, 0])
        written += save_figure(fig, out / "lid_distribution")
    if series is not None:
        fig, ax = figure()
        plot_series(series, ax[0, 0])
        written += save_figure(fig, out / "lid_series")
    if steering is not None:
        sites = sorted({r["site"] for r in steering.table}, key=lambda s: parse_site(s).order_key())
        fig, ax = figure(n_cols=2, n_rows=len(sites), width="double", height=2.4 * len(sites))
        for i, s in enumerate(sites):
            plot_steering(steering, ax[i, 0], "nn_distance", s)
            plot_steering(steering, ax[i, 1], "lid", s)
        written += save_figure(fig, out / "lid_steering")
    return written
