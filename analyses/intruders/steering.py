"""Steering by intruders: W' = Wt - (1 - lambda) sum_{i in intruders} s_i u_i v_i^T in every tuned matrix.

lambda = 1 is the tuned model exactly, lambda = 0 removes the intruder directions. `steer` is a weight edit:
inside `with steer(pair, lam) as model:` the tuned model itself carries W' (through either backend), and its
weights are restored bit for bit on exit; `interp.weights.save_checkpoint` writes the steered model as a folder.
`lambda_sweep` scores forgetting (loss on the pre-training distribution) against the target skill over lambda.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from analyses.intruders.matrices import analysis_matrices, changed_matrices, layout, model_params
from analyses.intruders.spectra import EPSILON, K, intruder_directions
from interp.errors import BadOption, BadPrompts
from interp.models import Model, Pair, resolve_device, resolve_dtype
from interp.prompts import PromptSet, as_prompt_set
from interp.results import Result
from interp.weights import rewritten

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


def intruder_updates(pair: Pair, epsilon: float = EPSILON, k: int = K, *, dtype: torch.dtype | str = torch.float32,
                     device: str | torch.device = "auto", embeddings: bool = False) -> dict[str, Tensor]:
    """sum_{i in intruders} s_i u_i v_i^T for every tuned parameter that has intruders at `epsilon`, in the
    parameter's stored layout, in `dtype`, on the tuned model's device. Parameters without intruders are absent."""
    return _intruder_updates(pair, epsilon, k, dtype=dtype, device=device, embeddings=embeddings)[0]


def _intruder_updates(pair: Pair, epsilon: float, k: int, *, dtype, device, embeddings) -> tuple[dict, int]:
    """(`intruder_updates`, the number of intruders)."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    transposed, extra = layout(pair.base, embeddings)
    tuned_params = model_params(pair.tuned)
    updates: dict[str, Tensor] = {}
    n_intruders = 0
    for matrix, W0, Wt in changed_matrices(model_params(pair.base), tuned_params, transposed, extra, device):
        U, S, Vh = intruder_directions(W0, Wt, epsilon, k, dtype)
        if len(S) == 0:
            continue
        n_intruders += len(S)
        name = matrix.split(":")[0]
        if name not in updates:
            updates[name] = torch.zeros_like(tuned_params[name], dtype=dtype)
        views = dict(analysis_matrices(name, updates[name], fan_in_fan_out=name in transposed))
        views[matrix].copy_((U * S) @ Vh)  # a view into the stored layout (transposed, or a third of a fused q/k/v)
    return updates, n_intruders


def _reweighted(weights: Mapping[str, Tensor], updates: Mapping[str, Tensor], lam: float) -> dict[str, Tensor]:
    """W - (1 - lam) * update for every parameter W of `weights` that `updates` names."""
    return {name: (weights[name].to(u.dtype) - (1 - lam) * u.to(weights[name].device)).to(weights[name].dtype)
            for name, u in updates.items()}


def _weights(model: Model, names) -> dict[str, Tensor]:
    params = dict(model.hf.named_parameters())
    return {name: params[name].detach().clone() for name in names}


@contextmanager
def steer(pair: Pair, lam: float, epsilon: float = EPSILON, k: int = K, *,
          updates: Mapping[str, Tensor] | None = None, **kwargs) -> Iterator[Model]:
    """Within the block, `pair.tuned` has its intruder singular values scaled by `lam` (0 removes the intruders,
    1 is the tuned model exactly), for logits, loss and generation through either backend; yields it. On exit
    its weights are restored exactly. `updates` from `intruder_updates` skip the SVDs; `kwargs` go to
    `intruder_updates` (dtype, device, embeddings)."""
    updates = intruder_updates(pair, epsilon, k, **kwargs) if updates is None else updates
    values = _reweighted(_weights(pair.tuned, updates), updates, lam)
    with rewritten(pair.tuned) as write:
        write(values)
        yield pair.tuned


@dataclass
class LambdaSweep(Result):
    """Forgetting vs target skill of `tuned` with its intruders scaled by each of `lam` (the lists run over lam;
    `pretrain_accuracy` entries are None when the pre-training prompts have no answers); `base` holds the base
    model's four scores."""

    ANALYSIS = "intruders"
    tuned: str
    epsilon: float
    k: int
    n_intruders: int
    pretrain_metric: str
    lam: list[float]
    pretrain_loss: list[float]
    pretrain_accuracy: list[float | None]
    target_loss: list[float]
    target_accuracy: list[float]
    base: dict

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"tuned": self.tuned, "lam": self.lam, "pretrain_loss": self.pretrain_loss,
                             "pretrain_accuracy": self.pretrain_accuracy, "target_loss": self.target_loss,
                             "target_accuracy": self.target_accuracy})

    def plot(self, ax=None):
        from analyses.intruders.plots import plot_lambda

        return plot_lambda(self, ax)


def _scores(model: Model, pretrain: PromptSet, target: PromptSet, batch_size: int) -> dict:
    from interp.scoring import answer_scores, loss

    if pretrain.answers is None:
        scores = {"pretrain_loss": float(loss(model, pretrain.prompts, batch_size=batch_size).mean()),
                  "pretrain_accuracy": None}
    else:
        s = answer_scores(model, pretrain.prompts, pretrain.answers, batch_size=batch_size)
        scores = {"pretrain_loss": float(s.loss.mean()), "pretrain_accuracy": float(s.accuracy.mean())}
    t = answer_scores(model, target.prompts, target.answers, batch_size=batch_size)
    return {**scores, "target_loss": float(t.loss.mean()), "target_accuracy": float(t.accuracy.mean())}


def lambda_sweep(pair: Pair, target: PromptSet, pretrain: PromptSet | Sequence[str],
                 lams: Sequence[float] = LAMBDAS, *, epsilon: float = EPSILON, k: int = K, batch_size: int = 16,
                 **kwargs) -> LambdaSweep:
    """Forgetting vs target skill as the intruders are scaled by each lambda (the tuned model is re-weighted in
    place and restored at the end).

    target: prompts with answers (answer loss and accuracy). pretrain: the pre-training distribution, the mean
    answer loss (and accuracy) when it has answers, else the mean next-token loss over its text. Also scores the
    base model. `kwargs` go to `intruder_updates` (dtype, device, embeddings)."""
    target, pretrain = as_prompt_set(target), as_prompt_set(pretrain)
    if not lams:
        raise BadOption("lambda_sweep needs at least one lambda")
    if target.answers is None:
        raise BadPrompts(f"the target prompts {target.label!r} need answers; pass a PromptSet with answers (.jsonl "
                         f"lines with 'prompt' and 'answer')")
    updates, n_intruders = _intruder_updates(pair, epsilon, k, **{"dtype": torch.float32, "device": "auto",
                                                                  "embeddings": False, **kwargs})
    rows = []
    originals = _weights(pair.tuned, updates)
    with rewritten(pair.tuned) as write:
        for lam in lams:
            write(_reweighted(originals, updates, lam))
            rows.append(_scores(pair.tuned, pretrain, target, batch_size))
    return LambdaSweep(pair.tuned.name, epsilon, k, n_intruders,
                       "answer loss on pre-training skills" if pretrain.answers is not None
                       else "loss on pre-training text",
                       [float(lam) for lam in lams], **{key: [row[key] for row in rows] for key in rows[0]},
                       base=_scores(pair.base, pretrain, target, batch_size),
                       settings={"lams": [float(lam) for lam in lams], "epsilon": epsilon, "k": k,
                                 "target": target.label, "pretrain": pretrain.label, "prompts": len(target),
                                 "pretrain_prompts": len(pretrain)})
