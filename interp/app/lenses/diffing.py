"""Model diffing: per-token KL, diff mining, the Activation Difference Lens, steering, amplification, crosscoders.

For every tuned model: KL(tuned || base) and diff mining on every prompt set (full examples, prompt and answer,
where a set has answers); the ADL on the comparison set's even half (unrelated text) read by the logit lens and Patchscope;
the base steered by the ADL difference (strength sweep, coherence = loss on the comparison set's odd half,
generations on the target prompts); blind identification (`diffing.identify`) on the same unrelated text and
generic chat questions; model-diff and update amplification; and (full runs) a small BatchTopK
crosscoder at the middle layer with latent scaling. Results: results/<model>/{kl-<set>, adl, steering,
amplification, crosscoder, latents}; tables diffing_*.csv; figures diffing_*_<model>.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analyses import diffing
from interp.app import zoo_defaults
from interp.app.args import finite_float, positive_float, positive_int
from interp.app.context import Context, Section, load_results, save_results, settings
from interp.app.identify import chat_questions
from interp.models import model_label
from interp.plotting import figure, save_figure
from interp.prompts import PromptSet

TITLE = "Model diffing: KL, activation differences, crosscoders, amplification"
HELP = "model diffing: per-token KL, diff mining, activation-difference lens, steering, crosscoder, amplification"
MANY_TUNED = False
ALIASES = ("diff",)
IDENTITY_PROMPT = "man -> man\n1135 -> 1135\nhello -> hello\n?"
"""Patchscope's neutral prompt off the tiny zoo (an identity prompt, as in the ADL paper)."""
RESULT_CLASSES = (diffing.KLResult, diffing.ADLResult, diffing.SteeringSweep, diffing.Amplification,
                  diffing.CrosscoderResult, diffing.LatentScaling, diffing.Identification)


@dataclass(frozen=True)
class Settings:
    positions: int = diffing.POSITIONS
    readout: str = "tuned"
    adl_layer: int | str = "last"
    strengths: tuple[float, ...] = diffing.STRENGTHS
    tolerance: float = diffing.TOLERANCE
    alphas: tuple[float, ...] = diffing.ALPHAS
    generations: int = 4
    new_tokens: int = 8
    crosscoder: bool = True
    expansion: int = 4
    k: int = 8
    crosscoder_steps: int = 400


FULL = Settings()
QUICK = Settings(strengths=(0.0, 1.0), alphas=(-1.0, 0.0, 1.0), generations=2, new_tokens=4, crosscoder=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--positions", type=positive_int, help=f"ADL: first positions averaged (default {FULL.positions})")
    p.add_argument("--readout", choices=("tuned", "base"), help="ADL: whose final norm and unembedding read the "
                                                                "differences (default tuned)")
    p.add_argument("--adl-layer", type=_layer, help="ADL readout layer: last (default), score, or an index")
    p.add_argument("--strengths", type=finite_float, nargs="+", help="steering strengths, in units of a typical "
                                                              "activation norm")
    p.add_argument("--tolerance", type=positive_float, help=f"coherence: loss increase allowed (nats, default "
                                                   f"{FULL.tolerance})")
    p.add_argument("--alphas", type=finite_float, nargs="+", help="amplification alphas (0 tuned, -1 base)")
    p.add_argument("--crosscoder", action=argparse.BooleanOptionalAction, default=None,
                   help="train a crosscoder at the middle layer (default on, off with --quick)")
    p.add_argument("--crosscoder-steps", type=positive_int, help=f"crosscoder training steps (default {FULL.crosscoder_steps})")


def _layer(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _texts(prompts: PromptSet) -> PromptSet:
    """Full examples (prompt, a space, answer) where the set has answers, else the prompts."""
    if prompts.answers is None:
        return prompts
    return PromptSet([f"{p} {a}" for p, a in zip(prompts.prompts, prompts.answers)], None, prompts.label)


def run(ctx: Context) -> Section:
    s = settings(ctx, FULL, QUICK)
    neutral = zoo_defaults.diffing_neutral_prompt(ctx.base_spec) or IDENTITY_PROMPT
    other, target = _texts(ctx.other), ctx.target
    results = {}
    for label, pair in ctx.pairs():
        ctx.step(f"{label}: per-token KL on {', '.join(ctx.sets)}")
        for name, prompts in ctx.sets.items():
            results[f"{label}/kl-{name}"] = diffing.measure_kl(pair, _texts(prompts))
        ctx.step(f"{label}: activation-difference lens on {other.label}")
        train, heldout = other.split()
        adl = diffing.measure_adl(pair, train, positions=s.positions, readout=s.readout, layer=s.adl_layer,
                                  neutral=neutral)
        results[f"{label}/adl"] = adl
        ctx.step(f"{label}: blind identification")
        results[f"{label}/identify"] = diffing.identify(pair, train, chat_questions(pair.tuned.tokenizer),
                                                        positions=s.positions)
        results[f"{label}/steering"] = diffing.strength_sweep(
            pair.base, adl.steering_vector(), adl.layer, heldout, target.head(s.generations), strengths=s.strengths,
            tolerance=s.tolerance, max_new_tokens=s.new_tokens, source=f"ADL difference of {label}")
        ctx.step(f"{label}: amplification")
        results[f"{label}/amplification"] = diffing.amplification(pair, target.head(s.generations), s.alphas,
                                                                   max_new_tokens=s.new_tokens)
        if s.crosscoder:
            layer = pair.base.n_layers // 2
            ctx.step(f"{label}: crosscoder at layer {layer}")
            corpus = [t for prompts in ctx.sets.values() for t in _texts(prompts).prompts]
            data = diffing.paired_activations(pair, corpus, layer)
            cc = diffing.train_crosscoder(data, expansion=s.expansion, k=s.k, steps=s.crosscoder_steps)
            results[f"{label}/crosscoder"] = cc
            results[f"{label}/latents"] = diffing.latent_scaling(cc, data, pair.models)
    save_results(ctx.out, results)
    redraw(ctx.out)
    return _section(ctx, s, results)


def _section(ctx: Context, s: Settings, results: dict) -> Section:
    headline, steering = {}, []
    for m in ctx.tuned:
        for name in ctx.sets:
            headline[f"mean KL {m} ({name})"] = results[f"{m}/kl-{name}"].mean_kl()
        adl = results[f"{m}/adl"]
        headline[f"ADL top tokens {m} (layer {adl.layer})"] = " ".join(adl.promoted(5))
        headline[f"identified {m}"] = " ".join(results[f"{m}/identify"].top(5))
        sweep = results[f"{m}/steering"]
        steering.append(f"{m}: strongest coherent strength {sweep.chosen:g} (loss {sweep.loss[0]:.3g} -> "
                        f"{sweep.loss[sweep.strength.index(sweep.chosen)]:.3g}); steered: {sweep.steered[0]!r}")
        if f"{m}/latents" in results:
            headline[f"tuned-only latents {m}"] = results[f"{m}/latents"].count("tuned-only")
    figures = [f"diffing_{kind}_{m}" for m in ctx.tuned for kind in
               ("identify", "adl_tokens", "kl", "mined", "adl_norms", "steering", "amplification")]
    figures += [f"diffing_{kind}_{m}" for m in ctx.tuned for kind in ("crosscoder", "latents")
                if f"{m}/latents" in results]
    tables = {"mean KL per text": ctx.table("diffing_kl"), "largest-KL positions": ctx.table("diffing_kl_top"),
              "diff mining (tokens raised most)": ctx.table("diffing_mined"),
              "blind identification (fused ranking)": ctx.table("diffing_identify"),
              "ADL per layer and position": ctx.table("diffing_adl"), "steering sweep": ctx.table("diffing_steering"),
              "steered generations": ctx.table("diffing_generations"),
              "amplification": ctx.table("diffing_amplification")}
    if s.crosscoder:
        tables |= {"crosscoder training": ctx.table("diffing_crosscoder"),
                   "latent scaling": ctx.table("diffing_latents"),
                   "model-only latents, grounded": ctx.table("diffing_grounding")}
    return Section("diffing", TITLE, headline, figures=ctx.figures(*figures), tables=tables,
                   steering=f"The base steered by strength x the ADL difference (rescaled to a typical activation "
                            f"norm) at the readout layer, every position; coherent while the loss on held-out "
                            f"{ctx.other.label} text is within {s.tolerance:g} nats of the unsteered loss. "
                            + "; ".join(steering) + ".",
                   notes="KL(tuned || base) per token on each set; the ADL is the mean activation difference at the "
                         f"first {s.positions} positions of unrelated text ({ctx.other.label}), read by the logit "
                         f"lens at the last layer (exact there) and by Patchscope at the middle layer; "
                         "position 0 is shown apart. Amplification: logits (1 + alpha) l_tuned - alpha l_base, and "
                         "the weight update scaled by 1 + alpha.")


def redraw(folder: Path) -> list[Path]:
    """Tables and figures from the saved results, per model."""
    folder = Path(folder)
    loaded = load_results(folder, *RESULT_CLASSES)
    models = list(dict.fromkeys(key.split("/")[0] for key in loaded))
    by = {m: {k.split("/", 1)[1]: r for k, r in loaded.items() if k.startswith(f"{m}/")} for m in models}
    frames: dict[str, list] = {}

    def add(name: str, frame: pd.DataFrame, m: str, **extra) -> None:
        frames.setdefault(name, []).append(frame.assign(model=m, **extra))

    written = []
    for m, rs in by.items():
        kls = {k.removeprefix("kl-"): r for k, r in rs.items() if k.startswith("kl-")}
        for name, r in kls.items():
            add("diffing_kl", r.to_frame(), m)
            add("diffing_kl_top", r.top_positions(), m, label=name)
            add("diffing_mined", r.mined(), m, label=name)
        add("diffing_adl", rs["adl"].to_frame(), m)
        add("diffing_identify", rs["identify"].to_frame().head(20), m)
        add("diffing_steering", rs["steering"].to_frame(), m)
        add("diffing_generations", rs["steering"].generations(), m)
        add("diffing_amplification", rs["amplification"].to_frame(), m)
        if "latents" in rs:
            add("diffing_crosscoder", rs["crosscoder"].to_frame(), m)
            add("diffing_latents", rs["latents"].to_frame(), m)
            add("diffing_grounding", rs["latents"].grounding(), m)
        written += _figures(m, rs, next(iter(kls.values())), folder / "figures")
    for name, parts in frames.items():
        pd.concat(parts).to_csv(folder / f"{name}.csv", index=False)
    return written


def _figures(m: str, rs: dict, kl, out: Path) -> list[Path]:
    plots = {"kl": (lambda ax: diffing.plot_kl_tokens(kl, ax), "double", 3.0),
             "mined": (lambda ax: diffing.plot_mined(kl, ax), "single", 2.4),
             "adl_norms": (lambda ax: diffing.plot_adl_norms(rs["adl"], ax), "single", 2.4),
             "adl_tokens": (lambda ax: diffing.plot_adl_tokens(rs["adl"], ax), "single", 2.4),
             "identify": (lambda ax: diffing.plot_identification(rs["identify"], ax), "single", 3.2),
             "steering": (lambda ax: diffing.plot_steering_sweep(rs["steering"], ax), "single", 2.4),
             "amplification": (lambda ax: diffing.plot_amplification(rs["amplification"], ax), "single", 2.4)}
    if "latents" in rs:
        plots["crosscoder"] = (lambda ax: diffing.plot_training(rs["crosscoder"], ax), "single", 2.4)
        plots["latents"] = (lambda ax: diffing.plot_latent_scaling(rs["latents"], ax), "single", 2.4)
    written = []
    for kind, (draw, width, height) in plots.items():
        fig, ax = figure(width=width, height=height)
        draw(ax[0, 0])
        written += save_figure(fig, out / f"diffing_{kind}_{model_label(m)}")
    return written
