"""TuCo: pre-training vs fine-tuning components per layer, Tuning Contribution per prompt, alpha steering.

For every tuned model: the decomposition on each prompt set, and the alpha sweep (the fine-tuning component scaled
by alpha) on the target set. Results: results/<model>/<set>/ (TuCoResult) and results/<model>/alpha_sweep/
(AlphaSweep); tables tuco.csv (per prompt), tuco_layers.csv, tuco_models.csv; figures per model and across models.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analyses import tuco
from interp.app.args import positive_int, finite_float
from interp.app.context import Context, Section, load_results, save_results, settings
from interp.plotting import figure, grouped_bars, save_figure, sweep_lines

TITLE = "TuCo: fine-tuning component of the forward pass"
HELP = "TuCo: pre-training vs fine-tuning components, Tuning Contribution, alpha steering"
MANY_TUNED = False


@dataclass(frozen=True)
class Settings:
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)
    sweep_prompts: int = 32
    sublayers: bool = False


FULL, QUICK = Settings(), Settings(alphas=(0.0, 1.0), sweep_prompts=8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alphas", type=finite_float, nargs="+", help=f"alphas of the sweep (default {' '.join(map(str, FULL.alphas))})")
    p.add_argument("--sweep-prompts", type=positive_int, help=f"target prompts of the sweep (default {FULL.sweep_prompts})")
    p.add_argument("--sublayers", action="store_true", default=None, help="also split each layer into attention "
                                                                          "and MLP")


def run(ctx: Context) -> Section:
    s = settings(ctx, FULL, QUICK)
    results = {}
    for label, pair in ctx.pairs():
        ctx.step(f"{label}: decomposition on {', '.join(ctx.sets)}")
        for name, prompts in ctx.sets.items():
            results[f"{label}/{name}"] = tuco.measure(pair, prompts, sublayers=s.sublayers, progress=False)
        ctx.step(f"{label}: alpha sweep")
        results[f"{label}/alpha_sweep"] = tuco.alpha_sweep(pair, ctx.target.head(s.sweep_prompts),
                                                           alphas=tuple(s.alphas))
    save_results(ctx.out, results)
    redraw(ctx.out)
    frame = pd.read_csv(ctx.out / "tuco_models.csv")
    headline = {f"TuCo {r.model} ({r.label})": float(r.mean) for r in frame.itertuples()}
    sweeps = {m: results[f"{m}/alpha_sweep"] for m in ctx.tuned}
    steer = "; ".join(f"{m}: {sw.metric} {_fmt(sw.at(0.0))} at alpha 0 (base), {_fmt(sw.at(1.0))} at 1 (tuned), "
                      f"{max(sw.value):.3g} at best alpha {sw.alpha[sw.value.index(max(sw.value))]:g}"
                      for m, sw in sweeps.items())
    return Section("tuco", TITLE, headline,
                   figures=ctx.figures("tuco_models", "tuco_alpha_models",
                                       *[f"tuco_layer_norms_{m}" for m in ctx.tuned]),
                   tables={"mean TuCo (last token) per model and prompt set": ctx.table("tuco_models"),
                           "component norms per layer": ctx.table("tuco_layers"),
                           "TuCo per prompt": ctx.table("tuco")},
                   steering=f"The fine-tuning component scaled by alpha on {s.sweep_prompts} {ctx.target.label} "
                            f"prompts (alpha 0 is the base model, 1 the tuned model). {steer}.",
                   notes="TuCo = ||sum FTC|| / (||sum PTC|| + ||sum FTC||) at each prompt's last token: the share of "
                         "the tuned model's residual update that fine-tuning contributes.")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def redraw(folder: Path) -> list[Path]:
    """Tables and figures from the saved results: per model, and across models."""
    folder = Path(folder)
    loaded = load_results(folder, tuco.TuCoResult, tuco.AlphaSweep)
    models = list(dict.fromkeys(key.split("/")[0] for key in loaded))
    decomposed = {m: [r for k, r in loaded.items() if k.startswith(f"{m}/") and isinstance(r, tuco.TuCoResult)]
                  for m in models}
    sweeps = {m: loaded[f"{m}/alpha_sweep"] for m in models}
    pd.concat([r.to_frame().assign(model=m) for m, rs in decomposed.items() for r in rs]).to_csv(
        folder / "tuco.csv", index=False)
    pd.concat([r.layer_frame().assign(model=m, label=r.label) for m, rs in decomposed.items() for r in rs]).to_csv(
        folder / "tuco_layers.csv", index=False)
    rows = [{"model": m, "label": r.label, "mean": float(r.tuco().mean()), "std": float(r.tuco().std()),
             "n": len(r.prompts)} for m, rs in decomposed.items() for r in rs]
    frame = pd.DataFrame(rows)
    frame.to_csv(folder / "tuco_models.csv", index=False)
    written = [p for m in models for p in tuco.save_figures(decomposed[m], sweeps[m], folder / "figures", f"_{m}")]
    groups = list(dict.fromkeys(frame.label))
    cell = {(r.model, r.label): r for r in frame.itertuples()}
    fig, ax = figure()
    grouped_bars(ax[0, 0], groups, {m: [cell[m, g].mean for g in groups] for m in models},
                 {m: [cell[m, g].std for g in groups] for m in models})
    ax[0, 0].set(ylabel="mean TuCo (last token)", ylim=(0, 1), title="How much of each forward pass is fine-tuning")
    written += save_figure(fig, folder / "figures" / "tuco_models")
    fig, ax = figure()
    sweep_lines(ax[0, 0], {m: (sw.alpha, sw.value) for m, sw in sweeps.items()})
    ax[0, 0].set(xlabel=r"$\alpha$ (scale of the fine-tuning component)", ylabel=next(iter(sweeps.values())).metric,
                 title="Steering with TuCo")
    written += save_figure(fig, folder / "figures" / "tuco_alpha_models")
    return written
