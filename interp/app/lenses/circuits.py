"""Circuits and heads: activation and attribution patching, EAP-IG circuits, CMAP, emergent heads, LoFiT.

For every tuned model: head and MLP importance on the studied skill's clean/corrupt pairs and on the target's, for
base and tuned (their difference names the emergent heads), head detectors, CMAP gains, and (base only, measured
once) the EAP-IG circuit, its faithfulness and the top-3 head ablation; with --lofit, LoFiT offsets trained on the
base. Prompts: --pairs / --target-pairs when given; on tiny-zoo bases the zoo's copy and reverse pairs; otherwise
pairs built from the prompt sets' answers (the target set, and the second set as the skill when it has answers).
Results: results/<model>/ (CircuitsResult); tables heads.csv, circuits_models.csv; figures circuit,
attribution_vs_patching, ablation, and heads_skill_<model>, heads_target_<model>, cmap_<model> per model.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analyses import circuits
from interp.app import zoo_defaults
from interp.app.args import nonneg_int, positive_int
from interp.app.context import Context, Section, load_results, save_results, settings
from interp.errors import BadPrompts
from interp.prompts import PromptSet

TITLE = "Circuits and heads"
HELP = "Circuits and heads: activation/attribution patching, EAP-IG circuits, CMAP, emergent heads, LoFiT"
MANY_TUNED = False


@dataclass(frozen=True)
class Settings:
    skill: str = "copy"
    metric: str = "logit_diff"
    ig_steps: int = 5
    circuit_sizes: tuple[int, ...] = (5, 10, 20, 40)
    cmap: bool = True
    cmap_max_set: int = 3
    patching: bool = True
    n_random: int = 5
    lofit: bool = False


FULL = Settings()
QUICK = Settings(ig_steps=1, circuit_sizes=(5,), cmap_max_set=1, patching=False, n_random=2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=Path, help='jsonl {"clean","corrupt","answer","wrong"} for the studied skill '
                                              "(default: tiny zoo copy pairs, else pairs from the prompt sets)")
    p.add_argument("--target-pairs", type=Path, help="jsonl pairs for the fine-tuning target (default: tiny zoo "
                                                     "reverse pairs, else pairs from --prompts with answers)")
    p.add_argument("--skill", help=f"tiny-zoo skill of the default pairs (default {FULL.skill})")
    p.add_argument("--metric", choices=("logit_diff", "prob", "loss"), help=f"patching metric (default {FULL.metric})")
    p.add_argument("--ig-steps", type=nonneg_int, help=f"EAP-IG steps, 0 for plain EAP (default {FULL.ig_steps})")
    p.add_argument("--circuit-sizes", type=positive_int, nargs="+", help="edge counts of the circuits whose faithfulness is "
                                                                f"measured (default {' '.join(map(str, FULL.circuit_sizes))})")
    p.add_argument("--cmap-max-set", type=positive_int, help=f"largest greedy CMAP set (default {FULL.cmap_max_set})")
    p.add_argument("--no-cmap", dest="cmap", action="store_false", default=None, help="skip CMAP")
    p.add_argument("--no-patching", dest="patching", action="store_false", default=None,
                   help="skip activation patching (attribution patching ranks the heads)")
    p.add_argument("--n-random", type=positive_int, help=f"random head draws of the ablation control (default {FULL.n_random})")
    p.add_argument("--lofit", action="store_true", default=None,
                   help="train LoFiT offsets on the base (zoo: on the target task's train prompts, scored on the "
                        "held-out target; otherwise on the target prompts, in-sample)")


def run(ctx: Context) -> Section:
    s = settings(ctx, FULL, QUICK)
    prompts = _prompts(ctx, s)
    lofit = _lofit_prompts(ctx, prompts) if s.lofit else None
    results, result = {}, None
    for label, pair in ctx.pairs():
        ctx.step(f"{label}: patching, attribution, CMAP" + ("" if result else ", base edges (EAP-IG) and ablation")
                 + (", LoFiT" if lofit and not result else ""))
        result = circuits.measure(pair, **prompts, lofit=lofit, metric=s.metric, ig_steps=s.ig_steps,
                                  circuit_sizes=tuple(s.circuit_sizes), cmap=s.cmap, cmap_max_set=s.cmap_max_set,
                                  patching=s.patching, n_random=s.n_random, reuse=result)
        results[label] = result
    save_results(ctx.out, results)
    redraw(ctx.out)
    return _section(ctx, results)


def _prompts(ctx: Context, s: Settings) -> dict:
    """pairs, target_pairs, task and target for `circuits.measure`: the pair files given, else on tiny-zoo bases
    the zoo's own, else the prompt sets (see the module docstring)."""
    files = {key: circuits.read_pairs(ctx.options[key]) for key in ("pairs", "target_pairs") if ctx.options.get(key)}
    prompts = {}
    if len(files) < 2:
        prompts = zoo_defaults.circuit_prompts(ctx.base_spec, len(ctx.target), s.skill) or _from_sets(ctx)
    for key, task in (("pairs", "task"), ("target_pairs", "target")):
        if key in files:
            prompts.update({key: files[key], task: None})
    return prompts


def _from_sets(ctx: Context) -> dict:
    """The target set (with answers) as the target, and the second set as the skill when it has answers."""
    target, *rest = ctx.sets.values()
    if target.answers is None:
        raise BadPrompts(f"the circuits lens needs answers in the target prompt set {target.label!r} (jsonl with "
                         "'answer'), or --pairs and --target-pairs")
    return {"pairs": next((ps for ps in rest if ps.answers), target), "target_pairs": target}


def _lofit_prompts(ctx: Context, prompts: dict) -> PromptSet:
    """LoFiT's training prompts: the zoo's train split of its target task, else the target prompts (in-sample)."""
    zoo = zoo_defaults.lofit_examples(ctx.base_spec, ctx.base.tokenizer)
    return zoo or prompts.get("target") or circuits.as_task(prompts.get("target_pairs", prompts["pairs"]), "target")


def _section(ctx: Context, results: dict[str, circuits.CircuitsResult]) -> Section:
    from scipy.stats import spearmanr

    headline = {}
    first = next(iter(results.values()))
    if first.method == "patching":
        act, att = (first.heads(m, "skill", "base").flatten().numpy() for m in ("patching", "attribution"))
        headline["Spearman(attribution, patching), base"] = round(float(spearmanr(act, att).statistic), 3)
    faith = first.faithfulness
    headline[f"faithfulness of the top-{max(map(int, faith))}-edge circuit"] = round(faith[max(faith, key=int)], 3)
    for label, result in results.items():
        if result.cmap is not None:
            best_set, gain = result.cmap["greedy"][-1]
            headline[f"CMAP gain of {len(best_set)} components, {label}"] = round(gain, 3)
        emergent = result.emergent(1)[0]
        headline[f"top emergent head, {label}"] = f"L{emergent['layer']}H{emergent['head']}"
    if first.lofit is not None:
        headline["LoFiT accuracy (base -> offsets)"] = (f"{first.lofit['base_accuracy']:.2f} -> "
                                                        f"{first.lofit['lofit_accuracy']:.2f}")
    steering = ""
    if first.ablation is not None:
        a = first.ablation
        headline["top-3 ablation drop (base)"] = round(a["top_drop"], 3)
        headline["random-3 ablation drop (base)"] = round(a["random_drop"], 3)
        steering = (f"Mean-ablating the base's top-3 heads for {first.skill} {a['heads']} drops its accuracy from "
                    f"{a['clean_accuracy']:.2f} by {a['top_drop']:.2f}; 3 random heads drop it by "
                    f"{a['random_drop']:.2f} on average ({len(a['random_accuracy'])} draws).")
    names = [n for n in ("circuit", "attribution_vs_patching", "ablation")
             if (ctx.out / "figures" / f"{n}.png").is_file()]
    names += [f"heads_skill_{next(iter(results))}"]
    names += [f"{n}_{m}" for m in results for n in ("heads_target", "cmap")
              if (ctx.out / "figures" / f"{n}_{m}.png").is_file()]
    return Section("circuits", TITLE, headline, figures=ctx.figures(*names),
                   tables={"head importances and detector scores": ctx.table("heads"),
                           "circuit, CMAP, ablation and LoFiT per model": ctx.table("circuits_models")},
                   steering=steering,
                   notes="Importance = metric drop when a head is patched to its corrupt activation (logit "
                         "difference). Emergent heads gain importance on the target task from base to tuned. CMAP "
                         "gain = share of the tuned model's advantage recovered by patching tuned activations into "
                         "the base.")


def redraw(folder: Path) -> list[Path]:
    """Tables and figures from the saved results: the base's circuit, ablation and agreement (from the first
    model's result), and the head maps and CMAP gains of every model."""
    folder = Path(folder)
    loaded = load_results(folder, circuits.CircuitsResult)
    pd.concat([r.to_frame().assign(fine_tune=m) for m, r in loaded.items()]).to_csv(folder / "heads.csv", index=False)
    pd.DataFrame([{"fine_tune": m, **circuits.summary_row(r)} for m, r in loaded.items()]).to_csv(
        folder / "circuits_models.csv", index=False)
    out = folder / "figures"
    written = circuits.save_base_figures(next(iter(loaded.values())), out)
    for m, r in loaded.items():
        written += circuits.save_model_figures(r, out, f"_{m}")
    return written
