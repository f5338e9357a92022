"""LID along training: the local ID of every checkpoint of a series on the same prompts, with its task scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.lid.local_id import K, measure_models, summary
from interp.errors import BadPrompts
from interp.models import Model, check_compatible
from interp.prompts import PromptSet, as_prompt_set
from interp.results import Result


@dataclass
class SeriesResult(Result):
    """LID along a checkpoint series: summaries [step, site] of the local IDs (mean, median, quartiles of each
    checkpoint's finite local IDs), and each checkpoint's task scores, keyword-only (`accuracy` and `loss` [step];
    accuracy NaN without task answers)."""

    ANALYSIS = "lid"
    steps: list[int]
    sites: list[str]
    mean: Float[Tensor, "step site"]
    median: Float[Tensor, "step site"]
    q25: Float[Tensor, "step site"]
    q75: Float[Tensor, "step site"]
    label: str = "prompts"
    task: str = "task"
    estimator: str = "twonn"
    k: int = K
    accuracy: Float[Tensor, " step"] = field(kw_only=True)
    loss: Float[Tensor, " step"] = field(kw_only=True)

    def to_frame(self):
        """One row per checkpoint and site: step, site, mean, median, q25, q75, accuracy, loss."""
        import pandas as pd

        return pd.DataFrame([{"label": self.label, "step": step, "site": s, "mean": float(self.mean[i, j]),
                              "median": float(self.median[i, j]), "q25": float(self.q25[i, j]),
                              "q75": float(self.q75[i, j]), "accuracy": float(self.accuracy[i]),
                              "loss": float(self.loss[i])}
                             for i, step in enumerate(self.steps) for j, s in enumerate(self.sites)])

    def plot(self, ax=None):
        from analyses.lid.plots import plot_series

        return plot_series(self, ax)


def measure_series(base: Model | None, series, prompts: PromptSet | Sequence[str], layers=None, *,
                   task: PromptSet | None = None, device: str | None = None, **kwargs) -> SeriesResult:
    """LID of every checkpoint of `series` (an `interp.models.CheckpointSeries`, one checkpoint in memory at a
    time) on `prompts`, with its answer accuracy and loss on `task` (a PromptSet with answers, named by its
    label), or without a task its mean loss on `prompts`. `base`, when given, is checked to be compatible with
    every checkpoint. Keyword arguments as `measure_models`."""
    from interp.scoring import answer_scores, loss

    prompts = as_prompt_set(prompts, kwargs.pop("label", None))
    if task is not None and task.answers is None:
        raise BadPrompts(f"task prompt set {task.label!r} has no answers; pass a PromptSet with answers, or no task")
    rows, accuracy, losses, sites, estimator, k, settings = [], [], [], [], "twonn", K, {}
    for step, model in series.models(device=device or (str(base.device) if base is not None else "auto")):
        if base is not None:
            check_compatible(base, model)
        name = f"step {step}"
        result = measure_models({name: model}, prompts, layers, progress=False, **kwargs)
        sites, estimator, k, settings = result.sites, result.estimator, result.k, result.settings
        lid = result.lid
        rows.append([summary(lid[name, s]) for s in sites])
        if task is not None:
            scores = answer_scores(model, task.prompts, task.answers)
            accuracy.append(float(scores.accuracy.mean()))
            losses.append(float(scores.loss.mean()))
        else:
            accuracy.append(float("nan"))
            losses.append(float(loss(model, prompts.prompts).mean()))
        del model  # before the next checkpoint loads
    stat = {name: torch.tensor([[r[name] for r in row] for row in rows], dtype=torch.float64)
            for name in ("mean", "median", "q25", "q75")}
    return SeriesResult(list(series.steps), sites, **stat, accuracy=torch.tensor(accuracy, dtype=torch.float64),
                        loss=torch.tensor(losses, dtype=torch.float64), label=prompts.label,
                        task=task.label if task is not None else "task", estimator=estimator, k=k,
                        settings=settings)
