"""`measure` runs the building blocks on a pair; `steer` ablates or scales heads (and applies LoFiT offsets).

On the `pairs` of the studied skill (clean/corrupt, e.g. a copy task: induction) for base and tuned: per-head and
per-MLP importance by activation patching and by attribution patching (noising; importance = m_clean - m_patched
in metric units), EAP-IG edges of the base and the faithfulness of its top-edge circuits, and (`ablation`) the
accuracy drop from ablating the base's top-3 heads vs random heads on `task`. On the `target_pairs` (the
fine-tuning target): the same importance maps, whose difference tuned - base names the heads that emerge with
fine-tuning, and CMAP gains on `target`. Detector scores of every head of both models, on repeated random
sequences and on the task's prompts followed by their answers; with `lofit`, LoFiT offsets trained on the base and
scored on `target`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from analyses.circuits import cmap as cmap_module
from analyses.circuits import lofit as lofit_module
from analyses.circuits.edges import edge_attribution, faithfulness_curve
from analyses.circuits.heads import detector_scores, head_edits, head_means
from analyses.circuits.patching import (
    PromptPairs, activation_patching, attribution_patching, component_sites, metric_values, pairs_from_answers,
    tokenize_pairs,
)
from analyses.circuits.result import MODELS, CircuitsResult, top_heads
from interp.models import Model, Pair
from interp.prompts import PromptSet

BASE_ONLY = ("edges", "upstream", "downstream", "faithfulness", "ablation", "lofit", "lofit_offsets", "lofit_s")
"""The parts of a result that depend on the base alone (`measure(..., reuse=...)` copies them)."""


def as_pairs(model: Model, prompts: PromptPairs | PromptSet, seed: int = 0) -> PromptPairs:
    """Clean/corrupt pairs: PromptPairs as given, or built from a prompt set with answers (`pairs_from_answers`)."""
    if isinstance(prompts, PromptPairs):
        return prompts
    texts, answers = lofit_module.prompts_and_answers(prompts, None)
    return pairs_from_answers(model, texts, answers, seed=seed)


def as_task(prompts: PromptPairs | PromptSet, label: str) -> PromptSet:
    """Prompts with answers to score: a prompt set as given, or the clean prompts of pairs and their answers."""
    if isinstance(prompts, PromptPairs):
        return PromptSet(list(prompts.clean), list(prompts.answer), label)
    lofit_module.prompts_and_answers(prompts, None)
    return prompts


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


def ablation_effect(model: Model, heads: Sequence[tuple[int, int]], prompts: PromptSet | Sequence[str],
                    answers: Sequence[str] | None = None, *, n_random: int = 5, mode: str = "mean",
                    seed: int = 0) -> dict:
    """Answer accuracy with `heads` ablated vs with as many random heads ablated (`n_random` draws)."""
    from interp.scoring import answer_scores

    prompts, answers = lofit_module.prompts_and_answers(prompts, answers)

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


def lofit_summary(model: Model, fitted: lofit_module.LoFiT, prompts: PromptSet | Sequence[str],
                  answers: Sequence[str] | None = None) -> dict:
    """Held-out answer accuracy of `model` without and with the LoFiT offsets."""
    from interp.scoring import answer_scores

    prompts, answers = lofit_module.prompts_and_answers(prompts, answers)
    before = float(answer_scores(model, prompts, answers, batch_size=64).accuracy.mean())
    with model.edit(*fitted.edits()):
        after = float(answer_scores(model, prompts, answers, batch_size=64).accuracy.mean())
    return {"heads": [list(h) for h in fitted.heads], "k": len(fitted.heads),
            "n_heads": model.n_layers * model.n_heads, "base_accuracy": before, "lofit_accuracy": after}


def measure(pair: Pair, pairs: PromptPairs | PromptSet, target_pairs: PromptPairs | PromptSet | None = None, *,
            task: PromptSet | None = None, target: PromptSet | None = None, lofit: PromptSet | None = None,
            metric: str = "logit_diff", ig_steps: int = 5, circuit_sizes: Sequence[int] = (5, 10, 20, 40),
            ablation: bool = True, cmap: bool = True, cmap_max_set: int = 3, seed: int = 0, patching: bool = True,
            n_random: int = 5, reuse: CircuitsResult | None = None) -> CircuitsResult:
    """Run the analyses of the module docstring on `pair`.

    pairs, target_pairs   clean/corrupt PromptPairs of the studied skill and of the target (default: `pairs`), or
                          prompt sets with answers, paired by `pairs_from_answers` on the base
    task, target          prompt sets with answers to score ablation, detectors and CMAP (default: the pairs'
                          prompt sets, or their clean prompts and answers)
    lofit                 a prompt set with answers to train LoFiT offsets on (None: no LoFiT)
    reuse                 a result of the same base on the same prompts: supplies the base-only parts (base maps,
                          edges, ablation, LoFiT) without rerunning
    patching=False skips activation patching (one forward per component): attribution patching ranks the heads.
    """
    target_pairs = pairs if target_pairs is None else target_pairs
    task = task or as_task(pairs, "skill")
    target = target or as_task(target_pairs, "target")
    pairs, target_pairs = as_pairs(pair.base, pairs, seed), as_pairs(pair.base, target_pairs, seed)
    importance, detectors, gaps, parts = {}, {}, {}, {}
    reusing = (reuse is not None and reuse.base == pair.base.name and reuse.skill == task.label
               and (reuse.method == "patching") == patching)
    if reusing:
        importance.update({k: v for k, v in reuse.importance.items() if k.endswith(".base")})
        detectors.update({k: v for k, v in reuse.detectors.items() if k.endswith(".base")})
        gaps.update({k: v for k, v in reuse.gaps.items() if k.endswith(".base")})
        parts.update({k: getattr(reuse, k) for k in BASE_ONLY if getattr(reuse, k) is not None})
    for name, model in zip(MODELS, pair.models):
        if name == "base" and reusing:
            continue
        for label, pp in (("skill", pairs), ("target", target_pairs)):
            tp = tokenize_pairs(model, pp)
            for k, v in _importance(model, tp, metric, patching).items():
                importance[f"{k}.{label}.{name}"] = v
            gaps[f"{label}.{name}"] = float(metric_values(model, tp.clean, tp, metric).mean()
                                            - metric_values(model, tp.corrupt, tp, metric).mean())
        for d, scores in detector_scores(model, seed=seed).items():
            detectors[f"detector.{d}.{name}"] = scores
        for d, scores in detector_scores(model, [f"{p} {a}" for p, a in zip(task.prompts, task.answers)]).items():
            detectors[f"detector_task.{d}.{name}"] = scores
    if "edges" not in parts:
        tp = tokenize_pairs(pair.base, pairs)
        edges = edge_attribution(pair.base, tp, ig_steps=ig_steps, metric=metric)
        curve = faithfulness_curve(pair.base, tp, edges, circuit_sizes, metric=metric)
        parts.update(edges=edges.scores, upstream=edges.upstream, downstream=edges.downstream,
                     faithfulness={str(k): f for k, f in curve.items()})
    if ablation and "ablation" not in parts:
        heads = top_heads(importance[f"{'patching' if patching else 'attribution'}.skill.base"])
        parts["ablation"] = ablation_effect(pair.base, heads, task, n_random=n_random, seed=seed)
    if cmap:
        res = cmap_module.cmap(pair, target, max_set=cmap_max_set)
        parts.update(cmap_gain=res.gain, cmap={"components": res.components, "m_base": res.m_base,
                                               "m_tuned": res.m_tuned,
                                               "greedy": [[names, g] for names, g in res.greedy]})
    if lofit is not None and "lofit" not in parts:
        fitted = lofit_module.train(pair.base, lofit, seed=seed)
        parts.update(lofit=lofit_summary(pair.base, fitted, target), lofit_offsets=fitted.offsets, lofit_s=fitted.s)
    settings = {"metric": metric, "ig_steps": ig_steps, "circuit_sizes": list(circuit_sizes), "ablation": ablation,
                "cmap": cmap, "cmap_max_set": cmap_max_set, "seed": seed, "patching": patching, "n_random": n_random,
                "pairs": len(pairs), "target_pairs": len(target_pairs), "lofit_prompts": lofit and len(lofit)}
    return CircuitsResult(pair.base.name, pair.tuned.name, task.label, target.label, metric, importance, detectors,
                          gaps, settings=settings, **parts)


@contextmanager
def steer(model: Model, heads: Sequence[tuple[int, int]] = (), *, mode: str = "zero", factor: float = 0.0,
          prompts: PromptSet | Sequence[str] | None = None, lofit: lofit_module.LoFiT | None = None):
    """Within the block, `model` runs with `heads` zero- or mean-ablated (means over `prompts`) or scaled by
    `factor`, and with LoFiT offsets when given. Yields the model."""
    means = head_means(model, prompts, heads) if mode == "mean" else None
    edits = head_edits(heads, mode, factor, means) if heads else []
    with model.edit(*edits, *(lofit.edits() if lofit is not None else [])):
        yield model
