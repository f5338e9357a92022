"""Cross-model activation patching, CMAP (Prakash et al., ICLR 2024).

Base and tuned run on the same input; one component's (or a set's) activation in the base forward is
replaced by the tuned model's activation at every position. With m the mean log-probability of the answer
tokens (teacher-forced, nats per token),

    gain(C) = (m_base+C - m_base) / (m_tuned - m_base)      1 = the component set carries all of the gain.

Components: `embed`, each head (head_out.L.H) and each MLP (mlp_out.L). A greedy search adds, one at a
time, the component that raises the gain most, up to `max_set` components or until the gain reaches `goal`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.circuits.lofit import answer_tokens, prompts_and_answers
from interp.capture import capture
from interp.intervene import replace
from interp.models import Pair
from interp.prompts import PromptSet, Tokens
from interp.results import Result
from interp.sites import Site


@dataclass
class CMAPResult(Result):
    """Per-component `gain` [component] (same order as `components`), the greedy sets and their gains."""

    ANALYSIS = "circuits"
    components: list[str]
    gain: Float[Tensor, " component"]
    greedy: list[tuple[list[str], float]]
    m_base: float
    m_tuned: float

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"component": self.components, "gain": self.gain.numpy()})

    def plot(self, ax=None):
        from analyses.circuits.plots import cmap_bars

        return cmap_bars(self.components, self.gain, self.greedy, ax)


def answer_logprob(model, tokens: Tokens, start: Tensor, edits: Sequence = (), batch_size: int = 64) -> Tensor:
    """Mean log p(answer token) per prompt (teacher-forced over positions >= start)."""
    logits = capture(model, tokens, [], logits=True, edits=edits, batch_size=batch_size, progress=False)["logits"]
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, tokens.ids[:, 1:, None])[..., 0]
    cols = torch.arange(1, tokens.ids.shape[1])[None]
    keep = (cols >= start[:, None]) & (cols < tokens.lengths[:, None])
    return (logp * keep).sum(1) / keep.sum(1)


def cmap(pair: Pair, prompts: PromptSet | Sequence[str], answers: Sequence[str] | None = None, *,
         sites: Sequence[Site] | None = None, max_set: int = 3, goal: float = 1.0, batch_size: int = 64) -> CMAPResult:
    """Gains of single components and of a greedily grown set (module docstring), on `prompts` and their `answers`
    (a PromptSet's own by default)."""
    base, tuned = pair.base, pair.tuned
    prompts, answers = prompts_and_answers(prompts, answers)
    tokens, start = answer_tokens(base, prompts, answers)
    sites = list(sites) if sites is not None else (
        [Site("embed")] + [s for layer in range(base.n_layers) for s in
                           [*(Site("head_out", layer, h) for h in range(base.n_heads)), Site("mlp_out", layer)]])
    acts = capture(tuned, tokens, sites, batch_size=batch_size, progress=False)
    m_base = float(answer_logprob(base, tokens, start, batch_size=batch_size).mean())
    m_tuned = float(answer_logprob(tuned, tokens, start, batch_size=batch_size).mean())

    def gain(chosen: Sequence[Site]) -> float:
        m = answer_logprob(base, tokens, start, [replace(s, acts[s]) for s in chosen], batch_size).mean()
        return (float(m) - m_base) / (m_tuned - m_base)

    single = torch.tensor([gain([s]) for s in sites])
    chosen: list[Site] = []
    greedy = []
    while len(chosen) < min(max_set, len(sites)) and (not greedy or greedy[-1][1] < goal):
        rest = [s for s in sites if s not in chosen]
        gains = [gain(chosen + [s]) if chosen else float(single[sites.index(s)]) for s in rest]
        best = max(range(len(rest)), key=gains.__getitem__)
        chosen.append(rest[best])
        greedy.append(([str(s) for s in chosen], gains[best]))
    return CMAPResult([str(s) for s in sites], single, greedy, m_base, m_tuned,
                      settings={"max_set": max_set, "goal": goal, "prompts": len(prompts)})
