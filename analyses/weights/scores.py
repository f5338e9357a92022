"""The metric of a prompt set, the same for every weight-space sweep: answer-token accuracy (`interp.scoring.
answer_scores`) when the set has answers, else the mean next-token loss over its text (`interp.scoring.loss`)."""

from __future__ import annotations

from dataclasses import dataclass

from interp.models import Model, Pair, model_label
from interp.prompts import PromptSet
from interp.results import Result

ACCURACY, LOSS = "answer accuracy", "loss"


def metric_of(prompts: PromptSet) -> str:
    return ACCURACY if prompts.answers is not None else LOSS


def better(metric: str) -> float:
    """+1 when a higher value of `metric` is better (accuracy), -1 when lower is (loss)."""
    return 1.0 if metric == ACCURACY else -1.0


def score(model: Model, prompts: PromptSet, batch_size: int = 16) -> float:
    """`metric_of(prompts)` of `model` (under its active weights and edits) on `prompts`."""
    from interp.scoring import answer_scores, loss

    if prompts.answers is None:
        return float(loss(model, prompts.prompts, batch_size=batch_size).mean())
    return float(answer_scores(model, prompts.prompts, prompts.answers, batch_size=batch_size).accuracy.mean())


def scores(model: Model, sets: dict[str, PromptSet], batch_size: int = 16) -> dict[str, float]:
    """`score` on each named set."""
    return {name: score(model, prompts, batch_size) for name, prompts in sets.items()}


@dataclass
class TwoSets(Result):
    """What every weight-space sweep shares: the tuned model it edits, its target set (the fine-tune's task) and other
    set (what it may forget), their metrics, and the base's and the tuned model's own {"target", "other"}."""

    ANALYSIS = "weights"
    tuned: str
    target_label: str
    other_label: str
    target_metric: str
    other_metric: str
    base: dict
    tuned_scores: dict


def two_sets(pair: Pair, target: PromptSet, other: PromptSet, batch_size: int = 16) -> dict:
    """The `TwoSets` fields of a sweep of `pair` on `target` and `other`."""
    own = {name: {"target": score(m, target, batch_size), "other": score(m, other, batch_size)}
           for name, m in (("base", pair.base), ("tuned", pair.tuned))}
    return {"tuned": model_label(pair.tuned), "target_label": target.label, "other_label": other.label,
            "target_metric": metric_of(target), "other_metric": metric_of(other), "base": own["base"],
            "tuned_scores": own["tuned"]}
