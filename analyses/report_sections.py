"""Report sections of TuCo, intruders, concept shift and LID (the `interp.report` plug-in interface).

Each builder runs its analysis through the public API on every tuned model of the report, saves it with the
analysis' own `write` under ctx.out (one sub-folder per tuned model where the analysis compares two models), adds
cross-model figures, and returns the `Section`. `redraw_*` re-draw a section's figures from the saved files only.
The models are loaded once for the whole report; LID measures all of them on the same sampled tokens in one call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from interp.plotting import figure, model_color, save_figure
from interp.report import Context, Section


@dataclass(frozen=True)
class Settings:
    """Sizes of a report run; QUICK is a smoke test, FULL fits the zoo report in a few minutes on 2 cores."""

    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)
    sweep_prompts: int = 32
    strengths: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    lams: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    concepts: int = 20
    lid_k: int = 64
    lid_effects: tuple[float, ...] = (0.1,)
    series: bool = True


FULL = Settings()
QUICK = Settings(alphas=(0.0, 1.0), sweep_prompts=8, strengths=(0.0, 1.0), lams=(0.0, 1.0), concepts=4, lid_k=12,
                 series=False)


def settings(ctx: Context) -> Settings:
    return QUICK if ctx.quick else FULL


def _models_file(folder: Path) -> list[str]:
    return json.loads((folder / "models.json").read_text())


def _figures(ctx: Context, folder: Path, names: list[str]) -> list[str]:
    return [ctx.rel(folder / f"{name}.png") for name in names]


def _bars(ax, groups: list[str], values: dict[str, list[float]], errors: dict[str, list[float]] | None = None):
    """Grouped bars: one group per entry of `groups`, one bar per model (in the model's colour)."""
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(groups))
    for i, (model, ys) in enumerate(values.items()):
        ax.bar(x + (i - (len(values) - 1) / 2) * width, ys, width, color=model_color(model), label=model,
               yerr=None if errors is None else errors[model], capsize=2, error_kw={"lw": 0.6})
    ax.set_xticks(x, groups)
    ax.legend()
    return ax


def _sweeps(ax, sweeps: dict[str, dict], x: str, y: str):
    for model, sweep in sweeps.items():
        ax.plot(sweep[x], sweep[y], marker="o", markersize=3, color=model_color(model), label=model)
    ax.legend()
    return ax


# ------------------------------------------------------------------------------------------------------ TuCo

def tuco_section(ctx: Context) -> Section:
    from analyses import tuco

    s = settings(ctx)
    target_label, target = ctx.target
    for label, pair in ctx.pairs():
        ctx.step(f"{label}: decomposition on {', '.join(ctx.sets)}")
        results = [tuco.measure(pair, ps.prompts, label=name) for name, ps in ctx.sets.items()]
        ctx.step(f"{label}: alpha sweep")
        n = s.sweep_prompts
        sweep = tuco.alpha_sweep(pair, target.prompts[:n], target.answers and target.answers[:n], alphas=s.alphas)
        tuco.write(results, sweep, ctx.out / label)
    (ctx.out / "models.json").write_text(json.dumps(list(ctx.tuned)))
    _tuco_models(ctx.out)
    frame = pd.read_csv(ctx.out / "tuco_models.csv")
    sweeps = {m: json.loads((ctx.out / m / "alpha_sweep.json").read_text()) for m in ctx.tuned}
    headline = {f"TuCo {r.model} ({r.label})": float(r.mean) for r in frame.itertuples()}
    metric = next(iter(sweeps.values()))["metric"]
    steer = "; ".join(f"{m}: {metric} {_at(sw, 'alpha', 0.0, 'value')} at alpha 0 (base), "
                      f"{_at(sw, 'alpha', 1.0, 'value')} at 1 (tuned), {max(sw['value']):.3g} at best alpha "
                      f"{sw['alpha'][int(np.argmax(sw['value']))]:g}" for m, sw in sweeps.items())
    return Section("tuco", "TuCo: fine-tuning component of the forward pass", headline,
                   figures=_figures(ctx, ctx.out, ["tuco_models", "tuco_alpha_models"])
                   + [ctx.rel(ctx.out / m / "figures" / "tuco_layer_norms.png") for m in ctx.tuned],
                   tables={"mean TuCo (last token) per model and prompt set": ctx.rel(ctx.out / "tuco_models.csv"),
                           **{f"{m}: component norms per layer": ctx.rel(ctx.out / m / "tuco_layers.csv")
                              for m in ctx.tuned}},
                   steering=f"The fine-tuning component scaled by alpha on {s.sweep_prompts} {target_label} prompts "
                            f"(alpha 0 is the base model, 1 the tuned model). {steer}.",
                   notes="TuCo = ||sum FTC|| / (||sum PTC|| + ||sum FTC||) at each prompt's last token: the share of "
                         "the tuned model's residual update that fine-tuning contributes.",
                   redraw=[("analyses.report_sections:redraw_tuco", ctx.rel(ctx.out))])


def _at(sweep: dict, key: str, x: float, value: str) -> str:
    return f"{sweep[value][sweep[key].index(x)]:.3g}" if x in sweep[key] else "n/a"


def redraw_tuco(folder: Path) -> list[Path]:
    """Each model's TuCo figures, and the cross-model ones."""
    from analyses import tuco

    return [p for m in _models_file(Path(folder)) for p in tuco.redraw(Path(folder) / m)] + _tuco_models(folder)


def _tuco_models(folder: Path) -> list[Path]:
    """Cross-model TuCo table and figures: mean TuCo per model and prompt set; the alpha sweeps."""
    from analyses import tuco

    folder = Path(folder)
    models = _models_file(folder)
    results = {m: [tuco.TuCoResult.load(folder / m / "results" / label)
                   for label in json.loads((folder / m / "results" / "order.json").read_text())] for m in models}
    rows = [{"model": m, "label": r.label, "mean": float(r.tuco().mean()), "std": float(r.tuco().std()),
             "n": len(r.prompts)} for m, rs in results.items() for r in rs]
    frame = pd.DataFrame(rows)
    frame.to_csv(folder / "tuco_models.csv", index=False)
    groups = list(dict.fromkeys(frame.label))
    fig, ax = figure()
    _bars(ax[0, 0], groups, {m: [float(frame[(frame.model == m) & (frame.label == g)]["mean"].iloc[0]) for g in groups]
                             for m in models},
          {m: [float(frame[(frame.model == m) & (frame.label == g)]["std"].iloc[0]) for g in groups] for m in models})
    ax[0, 0].set(ylabel="mean TuCo (last token)", ylim=(0, 1), title="How much of each forward pass is fine-tuning")
    written = list(save_figure(fig, folder / "tuco_models"))
    fig, ax = figure()
    sweeps = {m: json.loads((folder / m / "alpha_sweep.json").read_text()) for m in models}
    _sweeps(ax[0, 0], sweeps, "alpha", "value")
    ax[0, 0].set(xlabel=r"$\alpha$ (scale of the fine-tuning component)",
                 ylabel=next(iter(sweeps.values()))["metric"], title="Steering with TuCo")
    written += save_figure(fig, folder / "tuco_alpha_models")
    return written


# ------------------------------------------------------------------------------------------------- intruders

def intruders_section(ctx: Context) -> Section:
    from analyses import intruders
    from interp.models import Pair

    s = settings(ctx)
    kw = dict(device=ctx.base.device)
    results = []
    for label, spec in ctx.specs.items():
        ctx.step(f"{label}: spectra and similarities")
        results.append(intruders.measure(ctx.base, spec, label=label, **kw))
    series = None
    if s.series and ctx.series:
        ctx.step(f"checkpoint series ({ctx.series})")
        series = intruders.measure_series(ctx.base, ctx.series, **kw)
    counts = {r.label: int(r.count().sum()) for r in results}
    steered = max(counts, key=counts.get)
    (target_label, target), (other_label, other) = _two_sets(ctx)
    sweep = None
    if target.answers is not None and counts[steered] > 0:
        ctx.step(f"{steered}: lambda sweep")
        sweep = intruders.lambda_sweep(Pair(ctx.base, ctx.tuned[steered]), s.lams, other.prompts, target.prompts,
                                       target.answers, pretrain_answers=other.answers, **kw)
    intruders.write(results, sweep, series, ctx.out)
    eps = results[0].epsilon
    headline = {f"intruders {r.label} (eps {eps:g})": counts[r.label] for r in results}
    headline |= {f"max ||dW||/s1 {r.label}": float(r.ratio(1).max()) for r in results if r.names}
    steer = "No lambda sweep (no model with intruders, or no target answers)."
    if sweep is not None:
        steer = (f"Intruder singular values of {steered} ({sweep['n_intruders']} intruders) scaled by lambda: "
                 + ", ".join(f"lambda {lam:g}: {target_label} accuracy {acc:.2f}, {other_label} loss {loss:.3f}"
                             for lam, acc, loss in zip(sweep["lam"], sweep["target_accuracy"], sweep["pretrain_loss"]))
                 + f" (base: accuracy {sweep['base']['target_accuracy']:.2f}, "
                   f"loss {sweep['base']['pretrain_loss']:.3f}).")
    names = ["intruder_counts"] + [f"intruder_{kind}_{r.label}" for r in results if r.names
                                   for kind in ("layers", "spectra")]
    names += ["intruder_lambda"] * (sweep is not None) + ["intruder_series"] * bool(series)
    tables = {"intruders per epsilon and model": ctx.rel(ctx.out / "intruder_counts.csv"),
              "per matrix": ctx.rel(ctx.out / "intruders.csv")}
    if series:
        tables["checkpoint series"] = ctx.rel(ctx.out / "intruder_series.csv")
    return Section("intruders", "LoRA intruder dimensions", headline, _figures(ctx, ctx.out / "figures", names),
                   tables, steer, notes=f"Top-{results[0].k} singular vectors of each tuned weight matrix whose best "
                                        f"cosine with any base singular vector is below epsilon.",
                   redraw=[("analyses.intruders:redraw", ctx.rel(ctx.out))])


def _two_sets(ctx: Context):
    items = list(ctx.sets.items())
    return items[0], items[1] if len(items) > 1 else items[0]


# ----------------------------------------------------------------------------------------------------- shift

def shift_section(ctx: Context) -> Section:
    from analyses import shift

    s = settings(ctx)
    (target_label, target), (other_label, other) = _two_sets(ctx)
    held_out = (other.prompts, other.answers) if other.answers is not None and other is not target else None
    for label, pair in ctx.pairs():
        ctx.step(f"{label}: concepts and shifts on {target_label}")
        result = shift.measure(pair, target.prompts, k=min(s.concepts, len(target.prompts)))
        layer = shift.best_layer(pair, target.prompts, result)
        ctx.step(f"{label}: steering the base with the global shift at layer {layer}")
        sweep = shift.strength_sweep(pair.base, pair.tuned, target.prompts, result.shift(layer), layer, s.strengths,
                                     held_out=held_out, label="global shift")
        shift.write(result, sweep, ctx.out / label)
    (ctx.out / "models.json").write_text(json.dumps(list(ctx.tuned)))
    _shift_models(ctx.out)
    frame = pd.read_csv(ctx.out / "shift_models.csv")
    headline = {}
    for r in frame.itertuples():
        headline[f"{r.model}: rel. error base / +global / +concept"] = (
            f"{r.rel_error_base:.3f} / {r.rel_error_global:.3f} / {r.rel_error_concept:.3f}")
    sweeps = {m: json.loads((ctx.out / m / "steering.json").read_text()) for m in ctx.tuned}
    steer = "; ".join(f"{m} (layer {sw['layer']}): KL {sw['kl_unsteered']:.3f} unsteered, "
                      f"{_at(sw, 'strength', 1.0, 'kl')} at strength 1"
                      + (f", {other_label} accuracy {sw['accuracy'][0]:.2f} -> {_at(sw, 'strength', 1.0, 'accuracy')}"
                         if sw.get("accuracy") else "") for m, sw in sweeps.items())
    return Section("shift", "Concept shift vectors", headline,
                   figures=_figures(ctx, ctx.out, ["shift_models", "shift_steering_models"])
                   + [ctx.rel(ctx.out / m / "figures" / f"{n}.png") for m in ctx.tuned
                      for n in ("shift_norms", "shift_concepts")],
                   tables={"recovery per model (mean over layers and concepts)": ctx.rel(ctx.out / "shift_models.csv"),
                           **{f"{m}: concepts": ctx.rel(ctx.out / m / "shift.csv") for m in ctx.tuned}},
                   steering=f"The base steered toward each tuned model by adding the global shift at the layer where "
                            f"it closes the most KL to the tuned model (KL at the last token of the {target_label} "
                            f"prompts). {steer}.",
                   notes=f"K-means concepts of the base's last-token representations on {target_label}; each "
                         f"concept's shift is the mean tuned minus base representation over its inputs. Relative "
                         f"error ||h + shift - h_tuned|| / ||h_tuned|| measures how much of the change the shifts "
                         f"recover.",
                   redraw=[("analyses.report_sections:redraw_shift", ctx.rel(ctx.out))])


def redraw_shift(folder: Path) -> list[Path]:
    """Each model's concept-shift figures, and the cross-model ones."""
    from analyses import shift

    return [p for m in _models_file(Path(folder)) for p in shift.redraw(Path(folder) / m)] + _shift_models(folder)


def _shift_models(folder: Path) -> list[Path]:
    """Cross-model concept-shift table and figures: recovery per model; the strength sweeps."""
    folder = Path(folder)
    models = _models_file(folder)
    cols = ["rel_error_base", "rel_error_global", "rel_error_concept"]
    frame = pd.DataFrame([{"model": m, **pd.read_csv(folder / m / "shift.csv")[cols].mean().to_dict()}
                          for m in models])
    frame.to_csv(folder / "shift_models.csv", index=False)
    fig, ax = figure()
    _bars(ax[0, 0], [r"$h_{base}$", "+ global", "+ concept"], {r.model: [getattr(r, c) for c in cols]
                                                                  for r in frame.itertuples()})
    ax[0, 0].set(ylabel="relative error to $h_{tuned}$", title="How much of the change the shifts recover")
    written = list(save_figure(fig, folder / "shift_models"))
    fig, ax = figure()
    _sweeps(ax[0, 0], {m: json.loads((folder / m / "steering.json").read_text()) for m in models}, "strength", "kl")
    ax[0, 0].set(xlabel="steering strength (global shift added to the base)", ylabel="KL(steered || tuned)",
                 title="Steering the base toward each tuned model")
    written += save_figure(fig, folder / "shift_steering_models")
    return written


# ------------------------------------------------------------------------------------------------------- LID

def lid_section(ctx: Context) -> Section:
    from analyses import lid
    from interp.models import load_series

    s = settings(ctx)
    models = {"base": ctx.base, **ctx.tuned}
    layers = list(range(ctx.base.n_layers))
    results = []
    for name, ps in ctx.sets.items():
        ctx.step(f"point clouds and local ID on {name} ({len(models)} models, same tokens)")
        results.append(lid.measure(models, ps.prompts, layers, k=s.lid_k, label=name))
    series = None
    target_label, target = ctx.target
    if s.series and ctx.series:
        ctx.step(f"checkpoint series ({ctx.series}) on {target_label}")
        task = (target.prompts, target.answers) if target.answers is not None else None
        sites = [len(layers) // 2, len(layers) - 1]
        series = lid.measure_series(ctx.base, load_series(ctx.series), target.prompts, sites, k=s.lid_k, task=task,
                                    task_name=target_label, label=target_label)
    steered_label = next(iter(ctx.tuned))
    ctx.step(f"on-manifold steering of the base toward {steered_label}")
    steering = _lid_steering(ctx, steered_label, s)
    lid.write(results, series, steering, ctx.out)
    last = results[0].sites[-1]
    headline = {f"mean LID {m} ({results[0].label}, {last})": results[0].mean(m, last) for m in results[0].models}
    table = steering.to_frame()
    rows = table[(table.site == steering.site) & (table.method != "none")]
    steer = "; ".join(f"{r.method}: scale {r.scale:.3g} for KL {r.effect:.3f}, distance to the base cloud "
                      f"{r.nn_distance:.2f}, LID {r.lid:.2f}" for r in rows.itertuples())
    base_row = table[(table.site == steering.site) & (table.method == "none")].iloc[0]
    tables = {"LID per model, layer and prompt set": ctx.rel(ctx.out / "lid.csv"),
              "steering": ctx.rel(ctx.out / "lid_steering.csv")}
    if series is not None:
        tables[f"along the checkpoint series ({ctx.series}), with {target_label} accuracy"] = ctx.rel(
            ctx.out / "lid_series.csv")
        for i in (0, -1):  # the first and the last checkpoint
            key = (f"mean LID step {series.steps[i]} ({series.sites[-1]}), {target_label} accuracy "
                   f"{float(series.accuracy[i]):.2f}")
            headline[key] = float(series.mean[i, -1])
    names = ["lid_layers", "lid_distribution", "lid_steering"] + ["lid_series"] * (series is not None)
    return Section("lid", "Local intrinsic dimension", headline, _figures(ctx, ctx.out / "figures", names), tables,
                   steering=f"The base steered at {steering.site} with the mean shift toward {steered_label}, raw "
                            f"and projected onto the local tangent space of the base's cloud, each scaled to the same "
                            f"KL: {steer} (unsteered: distance {base_row.nn_distance:.2f}, LID {base_row.lid:.2f}).",
                   notes=f"Pointwise TwoNN on each token's {results[0].k} nearest neighbours, per layer (resid_post), "
                         f"on the same sampled tokens in every model.",
                   redraw=[("analyses.lid:redraw", ctx.rel(ctx.out))])


def _lid_steering(ctx: Context, label: str, s: Settings):
    """Raw vs tangent steering of the base with the mean (tuned - base) shift at the middle layer, on half of the
    target prompts; the reference cloud is the base's on the other half and on the other prompt sets."""
    from analyses import lid

    site = lid.layer_site(ctx.base, ctx.base.n_layers // 2)
    sets = list(ctx.sets.values())
    steered, reference = sets[0].prompts[::2], sets[0].prompts[1::2] + [p for ps in sets[1:] for p in ps.prompts]
    clouds = [lid.point_cloud(m, steered, site, progress=False) for m in (ctx.base, ctx.tuned[label])]
    vector = clouds[1].points.mean(0) - clouds[0].points.mean(0)
    return lid.compare_steering(ctx.base, site, vector, steered, reference, effects=s.lid_effects, k=s.lid_k)


BUILDERS = {"tuco": tuco_section, "intruders": intruders_section, "shift": shift_section, "lid": lid_section}
