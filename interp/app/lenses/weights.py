"""Weight space: the anatomy of each update, LiNeS against uniform scaling, the reset map, task arithmetic.

For every tuned model: the anatomy of its update (per layer and module: norms, spectral ratio, effective rank, share
of the update's energy); along the checkpoint series (when the run has one) the same per step. On the tuned model
with most forgetting (or --steer): the LiNeS sweep over (alpha, beta) with uniform scaling as the baseline, and the
reset map, both scored on the target set and the comparison set (forgetting). With two or more tuned models: task
arithmetic (each alone, their sum and mean, the sum LiNeS-scaled, each negated) on both sets. Results:
results/anatomy/<model>/ (Anatomy), results/series/step-NNNNNN/ (Anatomy), results/lines_sweep/ (LinesSweep),
results/reset_map/ (ResetMap), results/task_arithmetic/ (TaskArithmetic); tables weights_anatomy.csv (per part),
weights_layers.csv, weights_series.csv, weights_lines.csv, weights_lines_compare.csv, weights_lines_paired.csv,
weights_reset.csv, weights_reset_cells.csv, weights_merge.csv; figures weights_anatomy_<model>, weights_series,
weights_lines, weights_reset, weights_reset_cells, weights_merge.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analyses import weights
from interp.app.args import finite_float, positive_int
from interp.app.context import Context, Section, load_results, save_results, settings
from interp.errors import BadOption
from interp.models import Pair
from interp.plotting import figure, save_figure
from interp.results import Result

TITLE = "Weight space: anatomy of the update, LiNeS, reset map, task arithmetic"
HELP = "weight space: where the update lives, LiNeS layer scaling vs uniform, reset map of forgetting, task arithmetic"
MANY_TUNED = True

ANATOMY, SERIES, SWEEP, RESETS, MERGE = "anatomy", "series", "lines_sweep", "reset_map", "task_arithmetic"


@dataclass(frozen=True)
class Settings:
    alphas: tuple[float, ...] = weights.ALPHAS
    betas: tuple[float, ...] = weights.BETAS
    sweep_prompts: int = 64
    cells: bool = True
    merge_lines: tuple[float, float] = (0.5, 0.5)
    steer: str | None = None
    svd_dtype: str = "float32"
    series: bool = True


FULL, QUICK = Settings(), Settings(alphas=(0.0, 1.0), betas=(0.0, 1.0), sweep_prompts=8, cells=False, series=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alphas", type=finite_float, nargs="+", help=f"LiNeS alphas (default {' '.join(map(str, FULL.alphas))})")
    p.add_argument("--betas", type=finite_float, nargs="+", help=f"LiNeS betas (default {' '.join(map(str, FULL.betas))}; "
                                                          f"beta 0, uniform scaling, is always run)")
    p.add_argument("--sweep-prompts", type=positive_int, help=f"prompts per set in the sweeps (default {FULL.sweep_prompts})")
    p.add_argument("--no-cells", dest="cells", action="store_false", default=None,
                   help="skip the reset map's layer x module cells (one reset per module of each layer)")
    p.add_argument("--merge-lines", type=finite_float, nargs=2, metavar=("ALPHA", "BETA"),
                   help="LiNeS scaling of the task-arithmetic sum (default 0.5 0.5)")
    p.add_argument("--steer", help="tuned model of the LiNeS sweep and the reset map, by label or as given to "
                                   "--tuned (default: the one that forgets most)")
    p.add_argument("--svd-dtype", choices=("float32", "float64"), help="dtype of the anatomy (default float32)")


def run(ctx: Context) -> Section:
    s = settings(ctx, FULL, QUICK)
    results: dict[str, Result] = {}
    for label, pair in ctx.pairs():
        ctx.step(f"{label}: anatomy of the update")
        results[f"{ANATOMY}/{label}"] = weights.measure(pair, dtype=s.svd_dtype, label=label)
    if s.series and ctx.series:
        ctx.step(f"checkpoint series ({ctx.series})")
        for step, result in weights.measure_series(ctx.base, ctx.series, dtype=s.svd_dtype):
            results[f"{SERIES}/step-{step:06d}"] = result
    target, other = ctx.target.head(s.sweep_prompts), ctx.other.head(s.sweep_prompts)
    steered = None
    if ctx.other is not ctx.target:
        steered = _steered(ctx, s.steer, other)
        pair = Pair(ctx.base, ctx.tuned[steered])
        ctx.step(f"{steered}: LiNeS sweep ({len(s.alphas)} alphas x {len(set(s.betas) | {0.0})} betas)")
        results[SWEEP] = weights.lines_sweep(pair, target, other, alphas=tuple(s.alphas), betas=tuple(s.betas))
        ctx.step(f"{steered}: reset map")
        results[RESETS] = weights.reset_map(pair, target, other, cells=s.cells)
    if len(ctx.tuned) > 1:
        ctx.step(f"task arithmetic of {', '.join(ctx.tuned)}")
        results[MERGE] = weights.task_arithmetic(ctx.base, ctx.tuned, {target.label: target, other.label: other}
                                                 if steered else {target.label: target},
                                                 lines=tuple(s.merge_lines))
    save_results(ctx.out, results)
    redraw(ctx.out)
    return _section(ctx, results, steered)


def _steered(ctx: Context, choice: str | None, other) -> str:
    """`choice` (a label or a spec given to --tuned), else the tuned model that does worst on the comparison set."""
    if choice is not None:
        for label, spec in ctx.specs.items():
            if choice in (label, spec):
                return label
        raise BadOption(f"--steer {choice}: not one of the tuned models ({', '.join(ctx.specs)}); pass a label")
    if len(ctx.tuned) == 1:
        return next(iter(ctx.tuned))
    so = weights.better(weights.metric_of(other))
    return min(ctx.tuned, key=lambda label: so * weights.score(ctx.tuned[label], other))


def _section(ctx: Context, results: dict[str, Result], steered: str | None) -> Section:
    headline: dict[str, float | int | str] = {}
    for label in ctx.tuned:
        anatomy = results[f"{ANATOMY}/{label}"]
        top = int(anatomy.layer_share().argmax())
        headline[f"||dtheta|| {label}"] = anatomy.total()
        headline[f"top layer {label}"] = f"{top} ({float(anatomy.layer_share()[top]):.0%} of the energy)"
    figures = [f"weights_anatomy_{label}" for label in ctx.tuned] + ["weights_series"] * any(
        k.startswith(f"{SERIES}/") for k in results)
    tables = {"anatomy per layer and model": ctx.table("weights_layers"), "anatomy per part":
              ctx.table("weights_anatomy")}
    steering, notes = "No LiNeS sweep or reset map (pass a comparison set, --prompts-b, to measure forgetting).", ""
    if steered is not None:
        sweep, resets = results[SWEEP], results[RESETS]
        at = sweep.compare().set_index("level")
        for level in (0.5, 0.9):
            headline[f"LiNeS - uniform {sweep.other_label} at {level:.0%} of the target gain"] = \
                float(at.loc[level, "lines_better"])
        paired = sweep.paired().dropna()
        paired = paired[paired.target >= at.loc[0.5, "target needed"]]
        if len(paired):
            headline[f"best LiNeS - uniform {sweep.other_label} at a LiNeS point's own target"] = \
                float(paired.lines_better.max())
        halves = {resets.units[i]: i for i in resets.of("half")}
        lost, recovered = resets.target_lost(True), resets.forgetting_recovered(True)
        for unit, i in halves.items():
            headline[f"reset {unit}: target lost / forgetting recovered"] = f"{lost[i]:.2f} / {recovered[i]:.2f}"
        figures += ["weights_lines", "weights_reset"] + ["weights_reset_cells"] * ("cell" in resets.kind)
        tables |= {"LiNeS sweep": ctx.table("weights_lines"), "LiNeS vs uniform at equal target":
                   ctx.table("weights_lines_compare"), "each LiNeS point vs uniform at its target":
                   ctx.table("weights_lines_paired"), "reset map": ctx.table("weights_reset")}
        if "cell" in resets.kind:
            tables["reset map, layer x module"] = ctx.table("weights_reset_cells")
        steering = _steering_text(sweep, at)
        notes = (f"Reset map of {steered}: each unit of its update set back to the base; fractions of the fine-tune's "
                 f"gain on {resets.target_label} and of its forgetting on {resets.other_label}.")
    if MERGE in results:
        figures.append("weights_merge")
        tables["task arithmetic"] = ctx.table("weights_merge")
    return Section("weights", TITLE, headline, ctx.figures(*figures), tables, steering, notes)


def _steering_text(sweep: weights.LinesSweep, at: pd.DataFrame) -> str:
    parts = []
    for level, row in at.iterrows():
        parts.append(f"at {level:.0%} of the gain ({sweep.target_label} {row['target needed']:.3g}): uniform "
                     f"{row['uniform other']:.3g}, LiNeS {row['LiNeS other']:.3g} (alpha {row['LiNeS alpha']:g}, "
                     f"beta {row['LiNeS beta']:g})")
    return (f"LiNeS on {sweep.tuned}: block l's update scaled by alpha + beta (l - 1) / (L - 1), against uniform "
            f"scaling; {sweep.other_label} {sweep.other_metric} at equal {sweep.target_label} {sweep.target_metric}: "
            + "; ".join(parts) + f" (base {sweep.base['other']:.3g}, tuned {sweep.tuned_scores['other']:.3g}).")


def redraw(folder: Path) -> list[Path]:
    """Tables and figures from the saved results."""
    folder = Path(folder)
    figures = folder / "figures"
    loaded = load_results(folder, weights.Anatomy, weights.LinesSweep, weights.ResetMap, weights.TaskArithmetic)
    anatomies = {k.split("/", 1)[1]: r for k, r in loaded.items() if k.startswith(f"{ANATOMY}/")}
    series = [(int(k.rsplit("-", 1)[1]), r) for k, r in loaded.items() if k.startswith(f"{SERIES}/")]
    pd.concat([r.to_frame() for r in anatomies.values()]).to_csv(folder / "weights_anatomy.csv", index=False)
    pd.concat([_layer_frame(r) for r in anatomies.values()]).to_csv(folder / "weights_layers.csv", index=False)
    written = []
    for label, r in anatomies.items():
        fig, ax = figure(2, 1, width="double", height=2.6)
        weights.plot_anatomy(r, ax[0, 0], "share")
        weights.plot_anatomy(r, ax[0, 1], "relative")
        written += save_figure(fig, figures / f"weights_anatomy_{label}")
    if series:
        pd.concat([_layer_frame(r).assign(step=step) for step, r in series]).to_csv(folder / "weights_series.csv",
                                                                                   index=False)
        fig, ax = figure()
        weights.plot_series(series, ax[0, 0])
        written += save_figure(fig, figures / "weights_series")
    if SWEEP in loaded:
        sweep, resets = loaded[SWEEP], loaded[RESETS]
        sweep.to_frame().to_csv(folder / "weights_lines.csv", index=False)
        sweep.compare().to_csv(folder / "weights_lines_compare.csv", index=False)
        sweep.paired().to_csv(folder / "weights_lines_paired.csv", index=False)
        resets.to_frame().to_csv(folder / "weights_reset.csv", index=False)
        fig, ax = figure(height=2.8)
        sweep.plot(ax[0, 0])
        written += save_figure(fig, figures / "weights_lines")
        fig, ax = figure(height=2.8)
        resets.plot(ax[0, 0])
        written += save_figure(fig, figures / "weights_reset")
        if "cell" in resets.kind:
            resets.cell_table("target_lost_fraction").to_csv(folder / "weights_reset_cells.csv")
            fig, ax = figure(2, 1, width="double", height=2.6)
            weights.plot_reset_cells(resets, ax[0])
            written += save_figure(fig, figures / "weights_reset_cells")
    if MERGE in loaded:
        loaded[MERGE].to_frame().to_csv(folder / "weights_merge.csv", index=False)
        n = len(loaded[MERGE].sets)
        fig, ax = figure(n, 1, width="double" if n > 1 else "single", height=2.8)
        weights.plot_task_arithmetic(loaded[MERGE], ax[0])
        written += save_figure(fig, figures / "weights_merge")
    return written


def _layer_frame(anatomy: weights.Anatomy) -> pd.DataFrame:
    """Per block: its share of the update's energy and ||dtheta_block|| / ||theta0_block||."""
    frame = anatomy.to_frame().dropna(subset=["layer"])
    frame = frame.assign(delta_sq=frame.delta_fro ** 2, base_sq=frame.base_fro ** 2)
    per = frame.groupby("layer")[["share", "delta_sq", "base_sq"]].sum()
    return pd.DataFrame({"model": anatomy.label, "layer": per.index.astype(int), "share": per.share.to_numpy(),
                         "relative": (per.delta_sq / per.base_sq).pow(0.5).to_numpy()})
