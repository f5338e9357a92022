"""Amplification: generating with the fine-tuning's effect scaled up, to surface rare fine-tuned behaviour.

    model-diff amplification   next token = argmax of (1 + alpha) logits^FT - alpha logits^PT
                               = logits^FT + alpha (logits^FT - logits^PT): two forwards per token; alpha = 0 is the
                               tuned model's greedy generation exactly and alpha = -1 the base's (written this way,
                               both ends are exact in floating point)
    update scaling             the tuned model's weights theta^PT + alpha (theta^FT - theta^PT) (for a LoRA: its
                               adapter scaled by alpha); alpha = 1 is the tuned model, 0 the base. This is LiNeS with
                               beta = 0, so the weights lens' `lines` context does it.

Both are steering contexts: `with amplify(pair, alpha) as m: m.generate(prompts)` and
`with scale_update(pair, alpha) as model: interp.generate(model, prompts)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from interp.generation import generate, generate_combined
from interp.models import Pair
from interp.prompts import PromptSet, as_prompt_set
from interp.results import Result

ALPHAS = (-1.0, 0.0, 1.0, 2.0)


def amplified_logits(alpha: float | Float[Tensor, " batch"], plausible: float = 0.0):
    """combine(logits) for `generate_combined([base, tuned], ...)`: (1 + alpha) l_tuned - alpha l_base, over the
    tokens with p_tuned(t) >= plausible * max p_tuned (contrastive decoding's plausibility constraint, Li et al.
    2023; 0 keeps every token), the others at -inf. The tuned model's own argmax is always kept. `alpha`: one
    strength, or one per prompt (several strengths in one batch)."""
    if isinstance(alpha, Tensor):
        alpha = alpha.float()[:, None]

    def combine(logits):
        base, tuned = logits
        out = (1 + alpha) * tuned - alpha * base
        if plausible > 0:
            logp = tuned.log_softmax(-1)
            out = out.masked_fill(logp < logp.max(-1, keepdim=True).values + math.log(plausible), -math.inf)
        return out
    return combine


@dataclass
class Amplified:
    """A pair read through model-diff amplification at `alpha` (see `amplify`)."""

    pair: Pair
    alpha: float
    plausible: float = 0.0

    def generate(self, prompts, max_new_tokens: int = 20):
        """Greedy continuations [max_new_tokens] ids each."""
        return generate_combined(list(self.pair.models), amplified_logits(self.alpha, self.plausible), prompts,
                                 max_new_tokens)


@contextmanager
def amplify(pair: Pair, alpha: float, plausible: float = 0.0):
    """Yields the pair under model-diff amplification at `alpha` (an `Amplified`: `.generate(prompts)`), choosing
    among the tokens the tuned model finds `plausible` (`amplified_logits`)."""
    yield Amplified(pair, float(alpha), float(plausible))


@contextmanager
def scale_update(pair: Pair, alpha: float):
    """Within the block, `pair.tuned` carries theta^PT + alpha (theta^FT - theta^PT); yields it, restored exactly on
    exit (the weights lens' LiNeS with beta = 0)."""
    from analyses.weights import lines

    with lines(pair, float(alpha), 0.0) as model:
        yield model


@dataclass
class Amplification(Result):
    """Greedy generations for `prompts` at each alpha: `logit_texts[i][p]` by model-diff amplification at
    `alpha[i]` (0 the tuned model, -1 the base), `update_texts[i][p]` with the update scaled by 1 + alpha[i] (the
    same two ends: 1 + alpha = 1 is the tuned model, 0 the base)."""

    ANALYSIS = "diffing"
    base: str
    tuned: str
    prompts: list[str]
    alpha: list[float]
    logit_texts: list[list[str]]
    update_texts: list[list[str]]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"alpha": a, "prompt": p, "logit_amplified": lt, "update_scaled": ut}
                             for a, lts, uts in zip(self.alpha, self.logit_texts, self.update_texts)
                             for p, lt, ut in zip(self.prompts, lts, uts)])

    def plot(self, ax=None):
        from analyses.diffing.plots import plot_amplification

        return plot_amplification(self, ax)


def amplification(pair: Pair, prompts: PromptSet | Sequence[str], alphas: Sequence[float] = ALPHAS, *,
                  max_new_tokens: int = 8, update: bool = True) -> Amplification:
    """Generations at each alpha by both kinds of amplification (module docstring; `update=False` skips the
    weight scaling, leaving its texts empty)."""
    prompts = as_prompt_set(prompts)
    decode = pair.tuned.tokenizer.decode
    logit_texts, update_texts = [], []
    for a in alphas:
        with amplify(pair, a) as amp:
            logit_texts.append([decode(ids.tolist()) for ids in amp.generate(prompts.prompts, max_new_tokens)])
        if update:
            with scale_update(pair, 1 + a) as model:
                update_texts.append([decode(ids.tolist()) for ids in generate(model, prompts.prompts,
                                                                               max_new_tokens)])
        else:
            update_texts.append([])
    return Amplification(pair.base.name, pair.tuned.name, prompts.prompts, [float(a) for a in alphas], logit_texts,
                         update_texts, settings={"max_new_tokens": max_new_tokens, "update": update})
