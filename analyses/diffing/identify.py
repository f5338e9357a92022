"""Blind identification: a ranked short list of tokens and contexts that say what a fine-tune was trained to do,
from the pair alone (no metadata about the fine-tune; tests/test_organisms.py checks that none is read).

Three sources, each a ranking of the vocabulary:

    adl      the Activation Difference Lens' promoted tokens on unrelated text (`measure_adl`, last layer)
    reply    the mean change of log p(token) at the first position of a reply, over generic chat questions:
             log p_tuned(t | q) - log p_base(t | q) averaged over the questions q (skipped without questions)
    kl       diff mining over the unrelated text (`measure_kl`): the tokens whose log-probability rises most on
             average over its positions

interleaved: rank 1 of every source, then rank 2 of every source, and so on, each token kept at its first (best)
place; its score is 1 / that rank. Tokens that read the same after stripping spaces and case are merged.
Interleaving, not reciprocal-rank fusion: two sources read the same prose, so a sum over sources rewards agreeing
prose junk over the one source that sees replies (on the persona organism, RRF with constant 10 kept "Arr" and
"matey", the reply source's first two, out of the top 20). `contexts` are the unrelated text's positions of
largest KL(tuned || base).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from analyses.diffing.adl import measure_adl
from analyses.diffing.kl import measure_kl
from interp.capture import capture
from interp.models import Pair
from interp.prompts import PromptSet, as_tokens, prompt_texts
from interp.readout import token_strings
from interp.results import Result

DEPTH = 50
"""How far down each source's ranking is fused."""


@dataclass
class Identification(Result):
    """A fine-tune's characterising tokens, best first, with each source's own ranking and the top-KL contexts.

    tokens, scores   the interleaved ranking (normalised token strings) and each token's 1 / best rank
    sources          source name -> its ranking (normalised token strings, best first)
    contexts         rows of the unrelated text's largest-KL positions (context, KL, each model's next token)
    """

    ANALYSIS = "diffing"
    base: str
    tuned: str
    tokens: list[str]
    scores: list[float]
    sources: dict[str, list[str]]
    contexts: list[dict]

    def top(self, n: int = 20) -> list[str]:
        return self.tokens[:n]

    def to_frame(self):
        """One row per fused token: rank, token, score, and its rank in each source (None when absent)."""
        import pandas as pd

        return pd.DataFrame([{"rank": i + 1, "token": t, "score": s}
                             | {name: (ranked.index(t) + 1 if t in ranked else None)
                                for name, ranked in self.sources.items()}
                             for i, (t, s) in enumerate(zip(self.tokens, self.scores))])

    def plot(self, ax=None):
        from analyses.diffing.plots import plot_identification

        return plot_identification(self, ax)


def normalise(token: str) -> str:
    """A token string as compared across sources and with evidence words: spaces stripped, lower case."""
    return token.strip().lower()


def reply_change(pair: Pair, questions: Sequence[str], *, batch_size: int = 16,
                 backend: str | None = None) -> Tensor:
    """Mean log p_tuned(t) - log p_base(t) at the last position of each prompt (where a reply starts): [vocab]."""
    tokens = as_tokens(pair.tuned, list(questions))
    logp = [capture(m, tokens, [], positions="last", logits=True, batch_size=batch_size, backend=backend,
                    progress=False)["logits"].double().log_softmax(-1) for m in pair.models]
    return (logp[1] - logp[0]).mean(0).reshape(-1)


def identify(pair: Pair, corpus: PromptSet | Sequence[str], questions: Sequence[str] | None = None, *,
             n: int = 20, positions: int = 5, batch_size: int = 16, backend: str | None = None) -> Identification:
    """Identify what `pair.tuned` was fine-tuned to do (module docstring). `corpus`: unrelated text (prose);
    `questions`: generic prompts that end where a reply starts (chat questions through the chat template), or None."""
    adl = measure_adl(pair, corpus, positions=positions, top=DEPTH, batch_size=batch_size, backend=backend)
    kl = measure_kl(pair, corpus, batch_size=batch_size, backend=backend, names=DEPTH)
    sources = {"adl": adl.promoted(DEPTH), "kl": kl.mined(DEPTH)["token"].tolist()}
    if questions:
        change = reply_change(pair, questions, batch_size=batch_size, backend=backend)
        sources["reply"] = token_strings(pair.tuned, change.topk(DEPTH).indices)
    sources = {name: _unique(normalise(t) for t in ranked) for name, ranked in sources.items()}
    best: dict[str, int] = {}
    for rank in range(DEPTH):
        for ranked in sources.values():
            if rank < len(ranked):
                best.setdefault(ranked[rank], rank + 1)
    order = list(best)
    contexts = kl.top_positions(n).to_dict("records")
    return Identification(pair.base.name, pair.tuned.name, order, [1.0 / best[t] for t in order], sources, contexts,
                          settings={"positions": positions, "n_corpus": len(prompt_texts(corpus)),
                                    "n_questions": len(questions or ()), "depth": DEPTH})


def _unique(tokens) -> list[str]:
    return [t for t in dict.fromkeys(tokens) if t]


def hits(result: Identification, evidence: Sequence[str], n: int = 20) -> list[str]:
    """The evidence words found among the top `n` fused tokens (a token matches a word it equals, or a word of at
    least four letters that it is a prefix of at least three letters, after `normalise`)."""
    top = result.top(n)
    return [w for w in evidence if any(_matches(t, normalise(w)) for t in top)]


def _matches(token: str, word: str) -> bool:
    return token == word or (len(word) >= 4 and len(token) >= 3 and word.startswith(token))
