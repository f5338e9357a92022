"""Intruders: singular directions of each tuned weight matrix that the base matrix lacks, and lambda steering.

For every tuned model: the intruder analysis of every changed weight matrix; along the checkpoint series (when
the run has one) the same per step; and on the tuned model with the most intruders (or --steer), the lambda
sweep (its intruder singular values scaled by lambda) scored on the target set (accuracy) and the comparison set
(loss, the pre-training distribution). Results: results/<model>/ (IntruderResult), results/series/step-NNNNNN/
(IntruderResult) and results/lambda_sweep/ (LambdaSweep); tables intruders.csv (per matrix), intruder_counts.csv,
intruder_layers.csv, intruder_series.csv, intruder_lambda.csv; figures intruder_counts, intruder_layers_<model>,
intruder_spectra_<model>, intruder_lambda, intruder_series.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analyses import intruders
from interp.app.args import positive_int, finite_float, unit_interval
from interp.app.context import Context, Section, load_results, save_results, settings
from interp.errors import BadOption
from interp.models import Pair
from interp.results import Result

TITLE = "LoRA intruder dimensions"
HELP = "intruder dimensions: tuned singular directions the base lacks, full fine-tune vs LoRA, lambda steering"
MANY_TUNED = True

SWEEP, SERIES = "lambda_sweep", "series"


@dataclass(frozen=True)
class Settings:
    k: int = intruders.K
    epsilon: float = intruders.EPSILON
    epsilons: tuple[float, ...] = intruders.EPSILONS
    svd_dtype: str = "float32"
    embeddings: bool = False
    lams: tuple[float, ...] = intruders.LAMBDAS
    steer: str | None = None
    series: bool = True


FULL, QUICK = Settings(), Settings(lams=(0.0, 1.0), series=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=positive_int, help=f"top singular directions checked (default {FULL.k})")
    p.add_argument("--epsilon", type=unit_interval, help=f"intruder threshold for energy, heatmaps and steering "
                                                 f"(default {FULL.epsilon})")
    p.add_argument("--epsilons", type=unit_interval, nargs="+", help="the epsilon sweep (default "
                                                             f"{' '.join(map(str, FULL.epsilons))})")
    p.add_argument("--svd-dtype", choices=("float32", "float64"), help="dtype of the SVDs (default float32)")
    p.add_argument("--embeddings", action="store_true", default=None, help="also analyse the token embedding")
    p.add_argument("--lams", type=finite_float, nargs="+", help="lambdas of the steering sweep (default "
                                                         f"{' '.join(map(str, FULL.lams))})")
    p.add_argument("--steer", help="tuned model of the lambda sweep, by label or as given to --tuned (default: "
                                   "the one with most intruders)")


def run(ctx: Context) -> Section:
    s = settings(ctx, FULL, QUICK)
    kw = dict(k=s.k, epsilon=s.epsilon, epsilons=tuple(s.epsilons), dtype=s.svd_dtype, device=ctx.base.device,
              embeddings=s.embeddings)
    results: dict[str, Result] = {}
    for label, pair in ctx.pairs():
        ctx.step(f"{label}: spectra and similarities")
        results[label] = intruders.measure(pair, label=label, progress=False, **kw)
    if s.series and ctx.series:
        ctx.step(f"checkpoint series ({ctx.series})")
        for step, result in intruders.measure_series(ctx.base, ctx.series, **kw):
            results[f"{SERIES}/step-{step:06d}"] = result
    counts = {label: int(results[label].count().sum()) for label in ctx.tuned}
    steered = _steered(ctx, s.steer, counts)
    target, other = ctx.target, ctx.other
    why_not = _why_no_sweep(target, other, steered, counts)
    if why_not is None:
        ctx.step(f"{steered}: lambda sweep")
        results[SWEEP] = intruders.lambda_sweep(Pair(ctx.base, ctx.tuned[steered]), target, other,
                                                lams=tuple(s.lams), epsilon=s.epsilon, k=s.k, dtype=s.svd_dtype,
                                                device=ctx.base.device, embeddings=s.embeddings)
    save_results(ctx.out, results)
    redraw(ctx.out)
    headline = {f"intruders {label} (eps {s.epsilon:g})": counts[label] for label in ctx.tuned}
    headline |= {f"max ||dW||/s1 {label}": float(results[label].ratio(1).max()) for label in ctx.tuned
                 if results[label].names}
    figures = ["intruder_counts"] + [f"intruder_{kind}_{label}" for label in ctx.tuned if results[label].names
                                     for kind in ("layers", "spectra")]
    has_series = any(key.startswith(f"{SERIES}/") for key in results)
    figures += ["intruder_lambda"] * (SWEEP in results) + ["intruder_series"] * has_series
    tables = {"intruders per epsilon and model": ctx.table("intruder_counts"), "per matrix": ctx.table("intruders"),
              "per layer and matrix kind": ctx.table("intruder_layers")}
    if SWEEP in results:
        tables["lambda sweep"] = ctx.table("intruder_lambda")
    if has_series:
        tables["checkpoint series"] = ctx.table("intruder_series")
    return Section("intruders", TITLE, headline, ctx.figures(*figures), tables,
                   _steering_text(results.get(SWEEP), steered, target.label, other.label) if why_not is None
                   else f"No lambda sweep ({why_not}).",
                   notes=f"Top-{s.k} singular vectors of each tuned weight matrix whose best cosine with any base "
                         f"singular vector is below epsilon.")


def _steered(ctx: Context, choice: str | None, counts: dict[str, int]) -> str:
    """The label of the tuned model to steer: `choice` (a label or a spec given to --tuned), else the one with
    most intruders."""
    if choice is None:
        return max(counts, key=counts.get)
    for label, spec in ctx.specs.items():
        if choice in (label, spec):
            return label
    raise BadOption(f"--steer {choice}: not one of the tuned models ({', '.join(ctx.specs)}); pass one of their "
                    f"labels")


def _why_no_sweep(target, other, steered: str, counts: dict[str, int]) -> str | None:
    if target.answers is None:
        return f"the target prompts {target.label!r} have no answers; pass .jsonl prompts with 'answer'"
    if other is target:
        return "no comparison set to measure forgetting on; pass --prompts-b (pre-training-distribution prompts)"
    if counts[steered] == 0:
        return f"{steered} has no intruders at this epsilon"
    return None


def _steering_text(sweep: intruders.LambdaSweep, steered: str, target_label: str, other_label: str) -> str:
    return (f"Intruder singular values of {steered} ({sweep.n_intruders} intruders) scaled by lambda: "
            + ", ".join(f"lambda {lam:g}: {target_label} accuracy {acc:.2f}, {other_label} loss {loss:.3f}"
                        for lam, acc, loss in zip(sweep.lam, sweep.target_accuracy, sweep.pretrain_loss))
            + f" (base: accuracy {sweep.base['target_accuracy']:.2f}, loss {sweep.base['pretrain_loss']:.3f}).")


def redraw(folder: Path) -> list[Path]:
    """Tables and figures from the saved results: per model, across models, the series and the lambda sweep."""
    folder = Path(folder)
    loaded = load_results(folder, intruders.IntruderResult, intruders.LambdaSweep)
    tuned = [r for k, r in loaded.items() if k != SWEEP and not k.startswith(f"{SERIES}/")]
    series = [(int(k.rsplit("-", 1)[1]), r) for k, r in loaded.items() if k.startswith(f"{SERIES}/")]
    sweep = loaded.get(SWEEP)
    pd.concat([r.to_frame() for r in tuned]).to_csv(folder / "intruders.csv", index=False)
    pd.concat([r.counts_frame() for r in tuned]).to_csv(folder / "intruder_counts.csv", index=False)
    pd.concat([r.layer_frame().reset_index().assign(model=r.label) for r in tuned]).to_csv(
        folder / "intruder_layers.csv", index=False)
    if series:
        intruders.series_frame(series).to_csv(folder / "intruder_series.csv", index=False)
    if sweep is not None:
        sweep.to_frame().to_csv(folder / "intruder_lambda.csv", index=False)
    return intruders.save_figures(tuned, sweep, series, folder / "figures")
