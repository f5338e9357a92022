"""Circuits and heads: patching, attribution, edge circuits, cross-model patching, emergent heads, head steering.

Building blocks (one module each): `circuit_patching` (clean/corrupt pairs, metrics, activation and attribution
patching), `circuit_edges` (EAP / EAP-IG edges, circuits and their faithfulness), `cmap` (cross-model
activation patching), `head_detectors` (previous-token / duplicate-token / induction scores, head ablation and
scaling edits) and `lofit` (learned per-head offsets). `measure` runs them on a pair:

- on `skill` pairs (default: the zoo's copy task, i.e. induction) for base and tuned: per-head and per-MLP
  importance by activation patching and by attribution patching (noising; importance = m_clean - m_patched
  in metric units, divide by `gaps` for the normalised effect), EAP-IG edges of the base and the faithfulness
  of its top-edge circuits, and (`ablation`) the accuracy drop from ablating the top-3 heads vs random heads;
- on `target` pairs (default: the zoo's fine-tuning target, reverse): the same importance maps, whose
  difference tuned - base names the heads that emerge with fine-tuning, and CMAP gains;
- detector scores of every head of both models, on repeated random sequences (`detector.*`) and on the skill's
  prompts followed by their answers (`detector_task.*`), and (`lofit`) LoFiT offsets trained on the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from analyses import cmap as cmap_module
from analyses import lofit as lofit_module
from analyses.circuit_edges import edge_attribution, faithfulness_curve
from analyses.circuit_patching import (PromptPairs, activation_patching, attribution_patching, component_sites,
                                       metric_values, pairs_from_answers, tokenize_pairs, zoo_pairs)
from analyses.head_detectors import DETECTORS, detector_scores, head_edits, head_means
from interp.models import Model, Pair
from interp.results import load_result, save_result
from interp.zoo import in_real_zoo, in_tiny_zoo

MODELS = ("base", "tuned")


@dataclass
class CircuitsResult:
    """Tensors keyed `"{method}.{task}.{model}"` ([layer, head] for heads, [layer] for `mlp_*`), detector
    scores `"detector.{name}.{model}"` and `"detector_task.{name}.{model}"` [layer, head], `"edges"`
    [upstream, downstream], `"cmap.gain"` [component]; everything else (names, gaps, circuit faithfulness,
    ablation, LoFiT accuracies) in `meta`."""

    tensors: dict[str, Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The importance measure the maps, emergent heads and ablation use: activation patching when it was run,
        else attribution patching."""
        return "patching" if "patching.skill.base" in self.tensors else "attribution"

    def heads(self, method: str, task: str, model: str) -> Tensor:
        return self.tensors[f"{method}.{task}.{model}"]

    def emergent(self, n: int = 5, task: str | None = None) -> list[dict]:
        """Heads whose importance on `task` (default: target) grows most from base to tuned, with detector scores."""
        task = task or "target"
        base, tuned = self.heads(self.method, task, "base"), self.heads(self.method, task, "tuned")
        diff = tuned - base
        n_heads = diff.shape[1]
        rows = []
        for i in diff.flatten().topk(min(n, diff.numel())).indices.tolist():
            layer, h = divmod(i, n_heads)
            rows.append({"layer": layer, "head": h, "base": float(base[layer, h]), "tuned": float(tuned[layer, h]),
                         "difference": float(diff[layer, h]),
                         **{f"{kind}.{d}": float(self.tensors[f"{kind}.{d}.tuned"][layer, h])
                            for kind in ("detector", "detector_task") for d in DETECTORS}})
        return rows

    def to_frame(self):
        """One row per model, layer and head: importances (patching and attribution, both tasks) and detectors."""
        import pandas as pd

        rows = []
        for model in MODELS:
            n_layers, n_heads = self.tensors["detector.induction.base"].shape
            for layer, h in ((layer, h) for layer in range(n_layers) for h in range(n_heads)):
                row = {"model": model, "layer": layer, "head": h}
                for key, t in self.tensors.items():
                    if key.endswith("." + model) and t.dim() == 2:
                        row[key.removesuffix("." + model)] = float(t[layer, h])
                rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Target-skill head importance maps: base, tuned, tuned - base (needs three axes or none)."""
        from analyses.circuit_plots import plot_head_maps

        return plot_head_maps(self, "target", ax)

    def save(self, folder: str | Path) -> Path:
        return save_result(folder, self.tensors, {"analysis": "circuits", **self.meta})

    @classmethod
    def load(cls, folder: str | Path) -> CircuitsResult:
        tensors, meta = load_result(folder)
        meta.pop("analysis", None)
        return cls(tensors, meta)


def _importance(model: Model, tp, metric: str, patching: bool = True) -> dict[str, Tensor]:
    """-(noising effect) in metric units, by activation (when `patching`) and by attribution patching:
    heads [L, H], MLPs [L]."""
    sites = component_sites(model, ("head", "mlp"))
    L, H = model.n_layers, model.n_heads
    out = {}
    methods = (("patching", activation_patching),) if patching else ()
    for method, fn in methods + (("attribution", attribution_patching),):
        effect = -fn(model, tp, sites, metric=metric, normalise=False)
        per_layer = effect.reshape(L, H + 1)
        out[method], out["mlp_" + method] = per_layer[:, :H], per_layer[:, H]
    return out


def ablation_effect(model: Model, heads: Sequence[tuple[int, int]], prompts: Sequence[str], answers: Sequence[str],
                    *, n_random: int = 5, mode: str = "mean", seed: int = 0) -> dict:
    """Answer accuracy with `heads` ablated vs with as many random heads ablated (`n_random` draws)."""
    from interp.scoring import answer_scores

    def accuracy(chosen) -> float:
        means = head_means(model, prompts, chosen) if mode == "mean" else None
        with model.edit(*head_edits(chosen, mode, means=means)):
            return float(answer_scores(model, prompts, answers, batch_size=64).accuracy.mean())

    clean = float(answer_scores(model, prompts, answers, batch_size=64).accuracy.mean())
    g = torch.Generator().manual_seed(seed)
    every = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]
    draws = [[every[i] for i in torch.randperm(len(every), generator=g)[:len(heads)].tolist()] for _ in range(n_random)]
    random_acc = [accuracy(d) for d in draws]
    top = accuracy(list(heads))
    return {"heads": [list(h) for h in heads], "mode": mode, "clean_accuracy": clean, "top_accuracy": top,
            "top_drop": clean - top, "random_heads": [[list(h) for h in d] for d in draws],
            "random_accuracy": random_acc, "random_drop": clean - sum(random_acc) / len(random_acc)}


def top_heads(importance: Tensor, n: int = 3) -> list[tuple[int, int]]:
    n_heads = importance.shape[1]
    return [divmod(i, n_heads) for i in importance.flatten().topk(n).indices.tolist()]


def measure(pair: Pair, *, pairs: PromptPairs | None = None, target_pairs: PromptPairs | None = None,
            task: tuple[list[str], list[str]] | None = None, target: tuple[list[str], list[str]] | None = None,
            skill: str = "copy", n: int = 64, metric: str = "logit_diff", ig_steps: int = 5,
            circuit_sizes: Sequence[int] = (5, 10, 20, 40), ablation: bool = True, cmap: bool = True,
            cmap_max_set: int = 3, lofit: tuple[list[str], list[str]] | None = None, seed: int = 0,
            patching: bool = True, n_random: int = 5, reuse: CircuitsResult | None = None) -> CircuitsResult:
    """Run the analyses listed in the module docstring. On zoo models every prompt set defaults to the zoo's
    tasks; otherwise pass `pairs` and `target_pairs` (clean/corrupt), `task` and `target` (prompts, answers
    to score accuracy and CMAP) and `lofit` (training prompts, answers) as needed. `reuse`, a result of the
    same base on the same prompts, supplies the base-only parts (base maps, edges, ablation) without rerunning.
    `patching=False` skips activation patching (one forward per component): attribution patching ranks the heads.
    """
    from interp.zoo import TARGET_SKILL, task_prompts

    def zoo_task(name, split="test", count=n):
        ex = task_prompts(name, count, seed=seed, split=split)
        return [e.prompt for e in ex], [e.answer for e in ex]

    pairs = pairs or zoo_pairs(skill, n, seed=seed)
    target_pairs = target_pairs or zoo_pairs(TARGET_SKILL, n, seed=seed)
    task = task or zoo_task(skill)
    target = target or zoo_task(TARGET_SKILL)
    tensors: dict[str, Tensor] = {}
    meta: dict = {"base": pair.base.name, "tuned": pair.tuned.name, "skill": skill, "metric": metric, "gaps": {}}
    reusing = (reuse is not None and reuse.meta["base"] == pair.base.name and reuse.meta["skill"] == skill
               and (reuse.method == "patching") == patching)
    if reusing:
        tensors.update({k: v for k, v in reuse.tensors.items() if k.endswith(".base") or k == "edges"})
        meta["gaps"].update({k: v for k, v in reuse.meta["gaps"].items() if k.endswith(".base")})
        meta.update({k: reuse.meta[k] for k in ("edges", "ablation") if k in reuse.meta})
    for name, model in zip(MODELS, pair.models):
        if name == "base" and reusing:
            continue
        for label, pp in (("skill", pairs), ("target", target_pairs)):
            tp = tokenize_pairs(model, pp)
            for k, v in _importance(model, tp, metric, patching).items():
                tensors[f"{k}.{label}.{name}"] = v
            meta["gaps"][f"{label}.{name}"] = float(metric_values(model, tp.clean, tp, metric).mean()
                                                    - metric_values(model, tp.corrupt, tp, metric).mean())
        for d, scores in detector_scores(model, seed=seed).items():
            tensors[f"detector.{d}.{name}"] = scores
        for d, scores in detector_scores(model, [f"{p} {a}" for p, a in zip(*task)]).items():
            tensors[f"detector_task.{d}.{name}"] = scores
    if not reusing:
        tp = tokenize_pairs(pair.base, pairs)
        edges = edge_attribution(pair.base, tp, ig_steps=ig_steps, metric=metric)
        tensors["edges"] = edges.scores
        curve = faithfulness_curve(pair.base, tp, edges, circuit_sizes, metric=metric)
        meta["edges"] = {"upstream": edges.upstream, "downstream": edges.downstream, "ig_steps": ig_steps,
                         "faithfulness": {str(k): f for k, f in curve.items()}}
    if ablation and "ablation" not in meta:
        heads = top_heads(tensors[f"{'patching' if patching else 'attribution'}.skill.base"])
        meta["ablation"] = ablation_effect(pair.base, heads, *task, n_random=n_random, seed=seed)
    if cmap:
        res = cmap_module.cmap(pair, *target, max_set=cmap_max_set)
        tensors["cmap.gain"] = res.gain
        meta["cmap"] = {"components": res.components, "greedy": [[names, g] for names, g in res.greedy],
                        "m_base": res.m_base, "m_tuned": res.m_tuned}
    if lofit is not None:
        fitted = lofit_module.train(pair.base, *lofit, seed=seed)
        meta["lofit"] = lofit_summary(pair.base, fitted, *target)
        tensors["lofit.offsets"], tensors["lofit.s"] = fitted.offsets, fitted.s
    return CircuitsResult(tensors, meta)


def lofit_summary(model: Model, fitted: lofit_module.LoFiT, prompts: Sequence[str], answers: Sequence[str]) -> dict:
    """Held-out answer accuracy of `model` without and with the LoFiT offsets."""
    from interp.scoring import answer_scores

    before = float(answer_scores(model, prompts, answers, batch_size=64).accuracy.mean())
    with model.edit(*fitted.edits()):
        after = float(answer_scores(model, prompts, answers, batch_size=64).accuracy.mean())
    return {"heads": [list(h) for h in fitted.heads], "k": len(fitted.heads),
            "n_heads": model.n_layers * model.n_heads, "base_accuracy": before, "lofit_accuracy": after}


@contextmanager
def steer(model: Model, heads: Sequence[tuple[int, int]] = (), *, mode: str = "zero", factor: float = 0.0,
          prompts: Sequence[str] | None = None, lofit: lofit_module.LoFiT | None = None):
    """Within the block, `model` runs with `heads` zero- or mean-ablated (means over `prompts`) or scaled by
    `factor`, and with LoFiT offsets when given. Yields the model."""
    means = head_means(model, prompts, heads) if mode == "mean" else None
    edits = head_edits(heads, mode, factor, means) if heads else []
    with model.edit(*edits, *(lofit.edits() if lofit is not None else [])):
        yield model


# ------------------------------------------------------------------------------------------------- report

def report_section(ctx):
    """The circuits section of `interp report` (see `interp.report`): `measure` on each tuned model, on the zoo's
    copy and reverse pairs for zoo models, else on pairs built from the report's prompt sets with answers
    (`pairs_from_answers`; the second set, when it has answers, is the studied skill). LoFiT is not trained here
    (minutes of training); `interp circuits --lofit` does."""
    from scipy.stats import spearmanr

    from interp.report import Section

    n = 16 if ctx.quick else 64
    kwargs = dict(n=n, ig_steps=1 if ctx.quick else 5, circuit_sizes=(5,) if ctx.quick else (5, 10, 20, 40),
                  cmap_max_set=1 if ctx.quick else 3, patching=not ctx.quick, n_random=2 if ctx.quick else 5)
    if not in_tiny_zoo(ctx.base.name):
        (_, target), *rest = ctx.sets.items()
        skill = next((ps for _, ps in rest if ps.answers), target)
        if target.answers is None:
            from interp.errors import BadPrompts

            raise BadPrompts("the circuits section needs answers in the target prompt set (jsonl with 'answer')")
        kwargs.update(pairs=pairs_from_answers(ctx.base, skill.prompts, skill.answers),
                      target_pairs=pairs_from_answers(ctx.base, target.prompts, target.answers),
                      task=(skill.prompts, skill.answers), target=(target.prompts, target.answers))
    headline, figures, redraw_calls, result = {}, [], [], None
    for label, pair in ctx.pairs():
        ctx.step(f"{label}: patching, attribution, CMAP" + ("" if result else ", base edges (EAP-IG) and ablation"))
        result = measure(pair, reuse=result, **kwargs)
        write(result, ctx.out / label)
        if result.method == "patching":
            act, att = (result.heads(m, "skill", "base").flatten().numpy() for m in ("patching", "attribution"))
            headline["Spearman(attribution, patching), base"] = round(float(spearmanr(act, att).statistic), 3)
        best_set, gain = result.meta["cmap"]["greedy"][-1]
        headline[f"CMAP gain of {len(best_set)} components, {label}"] = round(gain, 3)
        faith = result.meta["edges"]["faithfulness"]
        headline[f"faithfulness of the top-{max(map(int, faith))}-edge circuit"] = round(faith[max(faith, key=int)], 3)
        emergent = result.emergent(1)[0]
        headline[f"top emergent head, {label}"] = f"L{emergent['layer']}H{emergent['head']}"
        figures += [ctx.rel(ctx.out / label / "figures" / f"{name}.png") for name in ("heads_target", "cmap")]
        redraw_calls.append(("analyses.circuits:redraw", ctx.rel(ctx.out / label)))
    first = next(iter(ctx.tuned))
    names = ("circuit", "attribution_vs_patching", "ablation", "heads_skill")
    figures = [ctx.rel(ctx.out / first / "figures" / f"{name}.png") for name in names
               if (ctx.out / first / "figures" / f"{name}.png").is_file()] + figures
    a = result.meta["ablation"]
    headline["top-3 ablation drop (base)"] = round(a["top_drop"], 3)
    headline["random-3 ablation drop (base)"] = round(a["random_drop"], 3)
    return Section("circuits", "Circuits and heads", headline, figures=figures,
                   tables={f"{label}: head importances and detector scores": ctx.rel(ctx.out / label / "heads.csv")
                           for label in ctx.tuned},
                   steering=f"Mean-ablating the base's top-3 heads for {result.meta['skill']} {a['heads']} drops its "
                            f"accuracy from {a['clean_accuracy']:.2f} by {a['top_drop']:.2f}; 3 random heads drop it by "
                            f"{a['random_drop']:.2f} on average ({len(a['random_accuracy'])} draws).",
                   notes="Importance = metric drop when a head is patched to its corrupt activation (logit difference). "
                         "Emergent heads gain importance on the target task from base to tuned. CMAP gain = share of "
                         "the tuned model's advantage recovered by patching tuned activations into the base.",
                   redraw=redraw_calls)


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    from interp.cli import add_model_arguments

    parser.add_argument("--base", default="zoo:base", help="pre-trained model: hub id, local folder or zoo name")
    parser.add_argument("--tuned", default="zoo:full", help="fine-tuned model: hub id, folder, PEFT adapter or zoo name")
    parser.add_argument("--pairs", type=Path, help='jsonl {"clean","corrupt","answer","wrong"} for the studied skill '
                                                   "(zoo default: copy pairs)")
    parser.add_argument("--target-pairs", type=Path, help="jsonl pairs for the fine-tuning target (zoo default: reverse; "
                                                          "real zoo: zorbish, also the studied skill)")
    parser.add_argument("--skill", default="copy", help="tiny-zoo skill for the default pairs")
    parser.add_argument("--n-prompts", type=int, default=64, help="zoo pairs per task")
    parser.add_argument("--metric", default="logit_diff", choices=("logit_diff", "prob", "loss"))
    parser.add_argument("--ig-steps", type=int, default=5, help="EAP-IG steps (0: plain EAP)")
    parser.add_argument("--lofit", action="store_true", help="train LoFiT offsets on the base (zoo: on the target "
                        "task's train prompts, reverse or zorbish, scored on test prompts; otherwise on the target "
                        "pairs' clean prompts, in-sample)")
    parser.add_argument("--no-cmap", action="store_true")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    add_model_arguments(parser)


def run_cli(args) -> None:
    from analyses.circuit_patching import read_pairs
    from interp.errors import BadPrompts
    from interp.models import load_pair

    tiny = in_tiny_zoo(args.base) and in_tiny_zoo(args.tuned)
    real = in_real_zoo(args.base) and in_real_zoo(args.tuned)
    if not (tiny or real) and (args.pairs is None or args.target_pairs is None):
        raise BadPrompts("--pairs and --target-pairs are required for models outside the zoo")
    pair = load_pair(args.base, args.tuned, device=args.device, dtype=args.dtype, backend=args.backend)
    pairs = read_pairs(args.pairs) if args.pairs else None
    target_pairs = read_pairs(args.target_pairs) if args.target_pairs else None
    kwargs = {}
    if real:  # the real zoo's one task, zorbish (held-out prompts), is both the studied skill and the target
        from interp.zoo import default_prompts

        examples = next(iter(default_prompts(args.tuned, args.n_prompts).values()))
        zorbish = pairs_from_answers(pair.base, *examples)
        kwargs = {"task": examples, "target": examples}
        pairs, target_pairs = pairs or zorbish, target_pairs or zorbish
    if not (tiny or real):
        kwargs = {"task": (pairs.clean, pairs.answer), "target": (target_pairs.clean, target_pairs.answer)}
    lofit_data = None
    if args.lofit:
        lofit_data = lofit_examples(pair.base, args.tuned) if tiny or real else kwargs["target"]
    skill = "zorbish" if real and args.pairs is None else args.skill
    result = measure(pair, pairs=pairs, target_pairs=target_pairs, skill=skill, n=args.n_prompts,
                     metric=args.metric, ig_steps=args.ig_steps, cmap=not args.no_cmap, lofit=lofit_data, **kwargs)
    write(result, args.out)
    print(f"circuits written to {args.out}: " + summary(result))


def lofit_examples(model: Model, spec: str, n: int = 512) -> tuple[list[str], list[str]]:
    """LoFiT training data on a zoo model: `n` train-split (prompt, answer) examples of its target task."""
    from interp.zoo import TARGET_SKILL, task_prompts

    if in_real_zoo(spec):
        from interp.zoo.smol_task import task_examples

        examples = task_examples(model.tokenizer, n, split="train")
    else:
        examples = task_prompts(TARGET_SKILL, n, split="train")
    return [e.prompt for e in examples], [e.answer for e in examples]


def summary(result: CircuitsResult) -> str:
    parts = [f"top heads {top_heads(result.heads(result.method, 'skill', 'base'))}"]
    if "ablation" in result.meta:
        a = result.meta["ablation"]
        parts.append(f"ablating them drops accuracy by {a['top_drop']:.2f} (random heads {a['random_drop']:.2f})")
    if "cmap" in result.meta:
        parts.append(f"CMAP best set {result.meta['cmap']['greedy'][-1]}")
    if "lofit" in result.meta:
        lf = result.meta["lofit"]
        parts.append(f"LoFiT on {lf['k']} heads: accuracy {lf['base_accuracy']:.2f} -> {lf['lofit_accuracy']:.2f}")
    return "; ".join(parts)


def write(result: CircuitsResult, out: str | Path) -> None:
    """Result, CSV table and figures into `out`; `redraw(out)` re-draws the figures from the saved result."""
    from analyses.circuit_plots import save_figures

    out = Path(out)
    result.save(out / "results")
    result.to_frame().to_csv(out / "heads.csv", index=False)
    if "lofit.offsets" in result.tensors:
        lofit_module.LoFiT([tuple(h) for h in result.meta["lofit"]["heads"]], result.tensors["lofit.offsets"],
                           result.tensors["lofit.s"]).save(out / "lofit")
    save_figures(result, out / "figures")


def redraw(out: str | Path) -> list[Path]:
    from analyses.circuit_plots import save_figures

    return save_figures(CircuitsResult.load(Path(out) / "results"), Path(out) / "figures")
