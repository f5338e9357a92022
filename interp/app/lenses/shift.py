"""Concept shift vectors: concept dictionaries, per-concept shifts, recovery, shift steering.

For every tuned model: concepts and their shifts on the target set (`shift.measure`), and the steering curve of
the base toward the tuned model (`shift.steering_curve`): shifts, concepts and the steering layer from the even
target prompts, the curve on the odd ones, the side effect on the comparison set when it has answers. With
`--k auto` K is chosen by stability first (`shift.choose_k`). Results: results/<model>/shift (ShiftResult),
results/<model>/steering (SteeringCurve), results/k_stability (KStability, with --k auto); tables shift.csv (per
concept), shift_models.csv, steering.csv, steering_layers.csv, k_stability.csv; figures per model and across
models.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analyses import shift
from interp.app.args import finite_float, nonneg_int
from interp.app.context import Context, Section, load_results, save_results, settings
from interp.plotting import figure, grouped_bars, save_figure, sweep_lines
from interp.prompts import PromptSet

TITLE = "Concept shift vectors"
HELP = "Concept shift vectors: concept dictionaries, per-concept shifts, recovery, shift steering"
MANY_TUNED = False


@dataclass(frozen=True)
class Settings:
    layers: tuple[int, ...] | None = None
    site: str = "resid_post"
    method: str = "kmeans"
    k: int | str = 20
    seed: int = 0
    fit_on: str = "base"
    steer: str = "concept"
    steer_positions: str = "last"
    steer_layer: int | str | None = None
    strengths: tuple[float, ...] = shift.STRENGTHS


FULL, QUICK = Settings(), Settings(k=4, strengths=(0.0, 1.0))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=nonneg_int, nargs="+", help="layers to analyse (default: all)")
    p.add_argument("--site", choices=("resid_post", "final"),
                   help="representation: residual stream after each layer (default), or the final-norm output")
    p.add_argument("--method", choices=shift.METHODS, help=f"concept dictionary (default {FULL.method})")
    p.add_argument("--k", type=_k_argument, help=f"number of concepts (default {FULL.k}), or 'auto': the most "
                                                 "stable across three seeds of "
                                                 + ", ".join(map(str, shift.K_CANDIDATES)))
    p.add_argument("--seed", type=nonneg_int, help="seed of the dictionaries (default 0)")
    p.add_argument("--fit-on", choices=("base", "tuned"), help="model the dictionary is learned on (default base)")
    p.add_argument("--steer", choices=shift.STEER_MODES,
                   help="steer the base with the global shift or concept-wise (default: each position gets the "
                        "shift of its nearest base concept)")
    p.add_argument("--steer-positions", choices=shift.STEER_POSITIONS,
                   help="positions steered: every one, the last prompt token (default), or from it on (generation)")
    p.add_argument("--steer-layer", type=_layer_argument,
                   help="layer to steer at, or 'final' (default: the lowest KL at strength 1 on the even target "
                        "prompts; the curve is measured on the odd ones)")
    p.add_argument("--strengths", type=finite_float, nargs="+",
                   help=f"steering strengths (default {' '.join(map(str, FULL.strengths))})")


def _k_argument(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"--k {text!r}: pass a positive number of concepts or 'auto'")


def _layer_argument(text: str) -> int | str:
    if text == "final":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steer-layer {text!r}: pass a layer number or 'final'") from None


def held_out(sets: dict[str, PromptSet]) -> PromptSet | None:
    """The side-effect set of the steering curve: the comparison set (the second) when it has answers."""
    others = list(sets.values())[1:]
    return others[0] if others and others[0].answers is not None else None


def run(ctx: Context) -> Section:
    s = settings(ctx, FULL, QUICK)
    train, test = ctx.target.split()
    side = held_out(ctx.sets)
    layers = None if s.layers is None else list(s.layers)
    results = {}
    for label, pair in ctx.pairs():
        k = s.k
        if k == "auto":
            fitted, key = (pair.base, "k_stability") if s.fit_on == "base" else (pair.tuned, f"{label}/k_stability")
            if key not in results:
                ctx.step(f"{label}: choosing K by stability on {ctx.target.label}")
                results[key] = shift.choose_k(fitted, ctx.target, seeds=(s.seed, s.seed + 1, s.seed + 2),
                                              layers=layers, site=s.site, method=s.method, progress=False)
            k = results[key].k
        ctx.step(f"{label}: concepts and shifts on {ctx.target.label} (K = {k})")
        results[f"{label}/shift"] = shift.measure(pair, ctx.target, layers=layers, site=s.site, method=s.method,
                                                  k=min(k, len(ctx.target)), seed=s.seed, fit_on=s.fit_on,
                                                  progress=False)
        candidates = [s.steer_layer] if s.steer_layer is not None else [*(layers or range(pair.base.n_layers)),
                                                                          "final"]
        ctx.step(f"{label}: steering the base with the {s.steer} shift, layer chosen on {len(train)} prompts")
        results[f"{label}/steering"] = shift.steering_curve(
            pair, train, test, mode=s.steer, positions=s.steer_positions, layers=candidates, k=k, seed=s.seed,
            strengths=tuple(s.strengths), held_out=side)
    save_results(ctx.out, results)
    redraw(ctx.out)
    return _section(ctx, s, {m: results[f"{m}/steering"] for m in ctx.tuned}, side)


def _section(ctx: Context, s: Settings, curves: dict[str, shift.SteeringCurve], side: PromptSet | None) -> Section:
    frame = pd.read_csv(ctx.out / "shift_models.csv")
    headline = {}
    for r in frame.itertuples():
        headline[f"{r.model}: rel. error base / +global / +concept"] = (
            f"{r.rel_error_base:.3f} / {r.rel_error_global:.3f} / {r.rel_error_concept:.3f}")
        headline[f"{r.model}: KL gap closed at best strength"] = float(max(curves[r.model].closure))
    steer = "; ".join(f"{m} (layer {c.layer}): KL {c.kl_unsteered:.3f} unsteered, {_fmt(c.at(1.0))} at strength 1"
                      + (f", {side.label} accuracy {c.accuracy[0]:.2f} -> {_fmt(c.at(1.0, 'accuracy'))}"
                         if c.accuracy else "") for m, c in curves.items())
    first = next(iter(curves.values()))
    tables = {"recovery per model (mean over layers and concepts)": ctx.table("shift_models"),
              "concepts per model and layer": ctx.table("shift"),
              "steering curve per model (test prompts)": ctx.table("steering"),
              "steering layer choice per model (train prompts, strength 1)": ctx.table("steering_layers")}
    if (ctx.out / "k_stability.csv").is_file():
        tables["concept stability across seeds per K"] = ctx.table("k_stability")
    return Section("shift", TITLE, headline,
                   figures=ctx.figures("shift_models", "shift_steering_models",
                                       *[f"{n}_{m}" for m in ctx.tuned for n in ("shift_norms", "shift_concepts")]),
                   tables=tables,
                   steering=f"The base steered toward each tuned model with the {first.label}: shifts, concepts and "
                            f"the layer (lowest KL at strength 1) from the even {ctx.target.label} prompts, the curve "
                            f"(KL at the last token) on the odd ones. {steer}.",
                   notes=f"{s.method} concepts of the {s.fit_on} model's last-token representations ({s.site}) on "
                         f"{ctx.target.label}; each concept's shift is the mean tuned minus base representation over "
                         f"its inputs. Relative error ||h + shift - h_tuned|| / ||h_tuned|| measures how much of the "
                         f"change the shifts recover.")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def redraw(folder: Path) -> list[Path]:
    """Tables and figures from the saved results: per model, and across models."""
    folder = Path(folder)
    loaded = load_results(folder, shift.ShiftResult, shift.SteeringCurve, shift.KStability)
    models = [key.removesuffix("/shift") for key in loaded if key.endswith("/shift")]
    results = {m: loaded[f"{m}/shift"] for m in models}
    curves = {m: loaded[f"{m}/steering"] for m in models}
    pd.concat([r.to_frame().assign(model=m) for m, r in results.items()]).to_csv(folder / "shift.csv", index=False)
    pd.concat([c.to_frame().assign(model=m) for m, c in curves.items()]).to_csv(folder / "steering.csv", index=False)
    pd.concat([c.layer_frame().assign(model=m) for m, c in curves.items()]).to_csv(
        folder / "steering_layers.csv", index=False)
    for key, r in loaded.items():
        if isinstance(r, shift.KStability):
            stem = "k_stability" if key == "k_stability" else f"k_stability_{key.split('/')[0]}"
            r.to_frame().to_csv(folder / f"{stem}.csv", index=False, float_format="%.4f")
    cols = ["rel_error_base", "rel_error_global", "rel_error_concept"]
    frame = pd.DataFrame([{"model": m, **r.to_frame()[cols].mean().to_dict()} for m, r in results.items()])
    frame.to_csv(folder / "shift_models.csv", index=False)
    written = [p for m in models for p in shift.save_figures(results[m], curves[m], folder / "figures", f"_{m}")]
    fig, ax = figure()
    grouped_bars(ax[0, 0], [r"$h_{base}$", "+ global", "+ concept"],
                 {r.model: [getattr(r, c) for c in cols] for r in frame.itertuples()})
    ax[0, 0].set(ylabel="relative error to $h_{tuned}$", title="How much of the change the shifts recover")
    written += save_figure(fig, folder / "figures" / "shift_models")
    fig, ax = figure()
    sweep_lines(ax[0, 0], {m: (c.strength, c.kl) for m, c in curves.items()})
    ax[0, 0].set(xlabel=f"steering strength ({next(iter(curves.values())).label} added to the base)",
                 ylabel="KL(steered || tuned)", title="Steering the base toward each tuned model")
    written += save_figure(fig, folder / "figures" / "shift_steering_models")
    return written
