"""LID: local intrinsic dimension of token vectors per layer, along a checkpoint series, and on-manifold steering.

The base and every tuned model on the same sampled tokens of each prompt set, at every layer's resid_post (or
--layers); the checkpoint series (when there is one) at the middle and last layer (or --layers), with its task
accuracy on the target set; and raw vs tangent steering of the base with the mean shift toward the first tuned
model. Results: results/lid/<set>/ (LIDResult), results/series/ (SeriesResult), results/steering/
(SteeringResult); tables lid.csv, lid_points.csv, lid_series.csv, lid_steering.csv; figures lid_layers,
lid_distribution, lid_steering, lid_series.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from analyses import lid
from interp.app.args import finite_float, nonneg_int, positive_int
from interp.app.context import Context, Section, load_results, save_results, settings
from interp.models import Model, Pair, load_series

TITLE = "Local intrinsic dimension"
HELP = "LID: local intrinsic dimension of token vectors per layer, along a series, and on-manifold steering"
MANY_TUNED = True


@dataclass(frozen=True)
class Settings:
    layers: tuple[int | str, ...] | None = None  # None: every layer's resid_post
    k: int = 64
    n_tokens: int = lid.N_TOKENS
    estimator: str = "twonn"
    float64: bool = False
    deduplicate: bool = True
    seed: int = 0
    series: bool = True
    steer: bool = True
    steer_layer: int | str | None = None  # None: the middle layer
    effects: tuple[float, ...] = (0.05, 0.1, 0.2)


FULL, QUICK = Settings(), Settings(k=12, effects=(0.1,), series=False)


def layer_arg(value: str) -> int | str:
    """A layer (an int, negative from the end) or a site name such as 'final'."""
    try:
        return int(value)
    except ValueError:
        return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", nargs="+", type=layer_arg, help="layers (ints, negative from the end) or sites such "
                                                               "as 'final' (default: every layer's resid_post)")
    p.add_argument("--k", type=positive_int, help=f"neighbours per local estimate (default {FULL.k})")
    p.add_argument("--n-tokens", type=positive_int, help=f"tokens sampled per cloud (default {FULL.n_tokens})")
    p.add_argument("--estimator", choices=lid.ESTIMATORS, help="pointwise TwoNN (default) or Levina-Bickel")
    p.add_argument("--float64", action="store_true", default=None, help="k-NN and estimates in float64")
    p.add_argument("--no-dedup", dest="deduplicate", action="store_false", default=None,
                   help="keep repeated contexts and equal vectors")
    p.add_argument("--seed", type=nonneg_int, help="token sampling seed (default 0)")
    p.add_argument("--steer-layer", type=layer_arg, help="layer of the steering comparison (default: the middle "
                                                         "layer)")
    p.add_argument("--no-steer", dest="steer", action="store_false", default=None,
                   help="skip the steering comparison")
    p.add_argument("--effects", type=finite_float, nargs="+", help="effects (KL, nats) at which raw and tangent steering "
                                                            f"are compared (default {' '.join(map(str, FULL.effects))})")


def run(ctx: Context) -> Section:
    s = settings(ctx, FULL, QUICK)
    models = {"base": ctx.base, **ctx.tuned}
    layers = list(s.layers) if s.layers else list(range(ctx.base.n_layers))
    kw = dict(k=s.k, n_tokens=s.n_tokens, estimator=s.estimator, seed=s.seed, deduplicate=s.deduplicate,
              dtype=torch.float64 if s.float64 else torch.float32,
              shard_dir=ctx.out / "shards")  # used only by captures over the memory budget
    results = {}
    for name, prompts in ctx.sets.items():
        ctx.step(f"point clouds and local ID on {name} ({len(models)} models, same tokens)")
        results[f"lid/{name}"] = lid.measure_models(models, prompts, layers, progress=False, **kw)
    if s.series and ctx.series:
        ctx.step(f"checkpoint series ({ctx.series}) on {ctx.target.label}")
        task = ctx.target if ctx.target.answers is not None else None
        series_layers = layers if s.layers else [len(layers) // 2, len(layers) - 1]
        results["series"] = lid.measure_series(ctx.base, load_series(ctx.series), ctx.target, series_layers,
                                               task=task, **kw)
    steered = next(iter(ctx.tuned))
    if s.steer:
        ctx.step(f"on-manifold steering of the base toward {steered}")
        results["steering"] = steering(ctx.base, ctx.tuned[steered], ctx, s)
    save_results(ctx.out, results)
    redraw(ctx.out)
    return _section(ctx, results, steered)


def steering(base: Model, tuned: Model, ctx: Context, s: Settings) -> lid.SteeringResult:
    """Raw vs tangent steering of the base with the mean (tuned - base) shift at the steering layer, on half of
    the target prompts; the reference cloud is the base's on the other half and on the other prompt sets."""
    site = lid.layer_site(base, s.steer_layer if s.steer_layer is not None else base.n_layers // 2)
    sets = list(ctx.sets.values())
    steered = sets[0].prompts[::2]
    reference = sets[0].prompts[1::2] + [p for ps in sets[1:] for p in ps.prompts]
    vector = lid.mean_shift(Pair(base, tuned), steered, site, n_tokens=s.n_tokens, seed=s.seed)
    return lid.compare_steering(base, site, vector, steered, reference, effects=s.effects, k=s.k,
                                n_tokens=s.n_tokens, seed=s.seed)


def _section(ctx: Context, results: dict, steered: str) -> Section:
    measured = [r for key, r in results.items() if key.startswith("lid/")]
    first, last = measured[0], measured[0].sites[-1]
    headline = {f"mean LID {m} ({first.label}, {last})": first.mean(m, last) for m in first.models}
    tables = {"LID per model, layer and prompt set": ctx.table("lid")}
    names = ["lid_layers", "lid_distribution"]
    steer_text = "Steering was not run (--no-steer)."
    if "steering" in results:
        steering_result = results["steering"]
        table = steering_result.to_frame()
        here = table[table.site == steering_result.site]
        rows = here[here.method != "none"]
        steer = "; ".join(f"{r.method}: scale {r.scale:.3g} for KL {r.effect:.3f}, distance to the base cloud "
                          f"{r.nn_distance:.2f}, LID {r.lid:.2f}" for r in rows.itertuples())
        unsteered = here[here.method == "none"].iloc[0]
        steer_text = (f"The base steered at {steering_result.site} with the mean shift toward {steered}, raw and "
                      f"projected onto the local tangent space of the base's cloud, each scaled to the same KL: "
                      f"{steer} (unsteered: distance {unsteered.nn_distance:.2f}, LID {unsteered.lid:.2f}).")
        tables["steering"] = ctx.table("lid_steering")
        names.append("lid_steering")
    if "series" in results:
        series = results["series"]
        tables[f"along the checkpoint series ({ctx.series}), with {series.task} accuracy"] = ctx.table("lid_series")
        for i in (0, -1):  # the first and the last checkpoint
            key = (f"mean LID step {series.steps[i]} ({series.sites[-1]}), {series.task} accuracy "
                   f"{float(series.accuracy[i]):.2f}")
            headline[key] = float(series.mean[i, -1])
        names.append("lid_series")
    return Section("lid", TITLE, headline, ctx.figures(*names), tables, steering=steer_text,
                   notes=f"Pointwise TwoNN on each token's {first.k} nearest neighbours, per layer (resid_post), "
                         f"on the same sampled tokens in every model.")


def redraw(folder: Path) -> list[Path]:
    """Tables and figures from the saved results."""
    folder = Path(folder)
    loaded = load_results(folder, lid.LIDResult, lid.SeriesResult, lid.SteeringResult)
    measured = [r for key, r in loaded.items() if key.startswith("lid/")]
    series, steering_result = loaded.get("series"), loaded.get("steering")
    pd.concat([r.to_frame() for r in measured]).to_csv(folder / "lid.csv", index=False)
    pd.concat([r.points_frame() for r in measured]).to_csv(folder / "lid_points.csv", index=False)
    if series is not None:
        series.to_frame().to_csv(folder / "lid_series.csv", index=False)
    if steering_result is not None:
        steering_result.to_frame().to_csv(folder / "lid_steering.csv", index=False)
    return lid.save_figures(measured, series, steering_result, folder / "figures")
