"""Per-token KL and diff mining: where on a corpus the tuned model's next-token distribution leaves the base's,
and which tokens it raises.

At every real position t of every text: KL(p_tuned(. | x_<=t) || p_base(. | x_<=t)) (nats), and the change of the
log-probability of the text's own next token. Aggregated over all positions, for every token v of the vocabulary:
the mean change of its log-probability (log-probabilities, not logits, so that the per-position constant of the
logits cancels), the mean change of its logit, and how often it is among the `top` tokens of the change at a
position (diff mining). Both models run once over the same tokens, batch by batch; logits never outlive a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.capture import capture
from interp.models import Pair, model_label
from interp.prompts import PromptSet, Tokens, as_tokens, prompt_texts
from interp.readout import token_strings
from interp.results import Result

ROWS = 4096
"""Positions per block of the float64 KL computation (bounds its memory at ROWS x vocab x 8 bytes x 4)."""


@dataclass
class KLResult(Result):
    """Per-token KL(tuned || base) on a corpus and the aggregated change of every token's probability.

    kl, logprob_change        [prompt, pos]  KL at each position; change of log p(next token of the text), 0 at
                                             each text's last position; pads are 0
    tuned_top, base_top       [prompt, pos]  each model's argmax next token
    mean_logprob, mean_logit  [vocab]        mean change of each token's log-probability / logit over positions
    base_logprob              [vocab]        mean log-probability of each token under the base over positions
    top_rate                  [vocab]        fraction of positions where the token is among the `top` largest
                                             log-probability changes
    tokens                    per prompt, its token strings (for contexts and figures)
    """

    ANALYSIS = "diffing"
    base: str
    tuned: str
    label: str
    prompts: list[str]
    ids: Int[Tensor, "prompt pos"]
    lengths: Int[Tensor, " prompt"]
    kl: Float[Tensor, "prompt pos"]
    logprob_change: Float[Tensor, "prompt pos"]
    tuned_top: Int[Tensor, "prompt pos"]
    base_top: Int[Tensor, "prompt pos"]
    mean_logprob: Float[Tensor, " vocab"]
    mean_logit: Float[Tensor, " vocab"]
    base_logprob: Float[Tensor, " vocab"]
    top_rate: Float[Tensor, " vocab"]
    tokens: list[list[str]]
    vocab: dict[str, str]
    """token id (as a string) -> token string, for the tokens any table of this result names"""

    @property
    def mask(self) -> Tensor:
        return torch.arange(self.kl.shape[1]) < self.lengths[:, None]

    def mean_kl(self) -> float:
        return float(self.kl[self.mask].mean())

    def top_positions(self, n: int = 20, context: int = 6):
        """The `n` positions of largest KL: prompt, position, the context up to the token (`context` tokens),
        KL, and each model's next token."""
        import pandas as pd

        flat = self.kl.masked_fill(~self.mask, -1).flatten()
        order = flat.topk(min(n, int(self.mask.sum()))).indices
        rows = []
        for i in order.tolist():
            p, t = divmod(i, self.kl.shape[1])
            rows.append({"prompt": p, "position": t, "context": " ".join(self.tokens[p][max(0, t - context): t + 1]),
                         "kl": float(self.kl[p, t]), "tuned_next": self.vocab[str(int(self.tuned_top[p, t]))],
                         "base_next": self.vocab[str(int(self.base_top[p, t]))]})
        return pd.DataFrame(rows)

    def mined(self, n: int = 20, by: str = "mean_logprob"):
        """The `n` tokens whose probability rises most (`by`: "mean_logprob", "mean_logit" or "top_rate")."""
        import pandas as pd

        order = getattr(self, by).topk(min(n, len(self.mean_logprob))).indices.tolist()
        return pd.DataFrame({"token": [self.vocab[str(i)] for i in order], "id": order,
                             "mean_logprob": self.mean_logprob[order].numpy(),
                             "mean_logit": self.mean_logit[order].numpy(), "top_rate": self.top_rate[order].numpy()})

    def to_frame(self):
        """One row per prompt: mean and max KL over its positions."""
        import pandas as pd

        kl = self.kl.masked_fill(~self.mask, float("nan"))
        return pd.DataFrame({"label": self.label, "prompt": self.prompts, "tokens": self.lengths.numpy(),
                             "mean_kl": kl.nanmean(1).numpy(), "max_kl": kl.nan_to_num(-1).amax(1).numpy()})

    def plot(self, ax=None):
        from analyses.diffing.plots import plot_kl_tokens

        return plot_kl_tokens(self, ax)


def measure_kl(pair: Pair, prompts: PromptSet | Sequence[str] | Tokens, *, top: int = 20, label: str | None = None,
               batch_size: int = 16, backend: str | None = None, names: int = 50) -> KLResult:
    """KL(tuned || base) at every position of `prompts` and the aggregated change of every token (module
    docstring). `top`: the size of the per-position top list behind `top_rate`; `names`: how many tokens of each
    ranking get their strings stored."""
    tokens = as_tokens(pair.tuned, prompts)
    label = label or (prompts.label if isinstance(prompts, PromptSet) else "prompts")
    shape = tokens.ids.shape
    kl, change = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    tuned_top, base_top = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    vocab = pair.tuned.config.vocab_size
    sums = {k: torch.zeros(vocab, dtype=torch.float64) for k in ("logprob", "logit", "base", "top")}
    for start in range(0, len(tokens), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(tokens)))
        piece = Tokens(tokens.ids[rows], tokens.lengths[rows], tokens.pad_id)
        lb, lt = (capture(m, piece, [], logits=True, batch_size=batch_size, backend=backend,
                          progress=False)["logits"] for m in pair.models)
        mask = piece.mask[:, : lt.shape[1]]
        out = _position_stats(lt[mask], lb[mask], _next_ids(piece)[:, : lt.shape[1]][mask], top, sums)
        for target, value in zip((kl, change, tuned_top, base_top), out):
            target[rows[0]: rows[-1] + 1, : lt.shape[1]][mask] = value.to(target.dtype)
    n = float(tokens.mask.sum())
    mean_logprob, mean_logit, base_logprob, top_rate = (sums[k] / n for k in ("logprob", "logit", "base", "top"))
    named = {int(i) for t in (mean_logprob, mean_logit, top_rate) for i in t.topk(min(names, vocab)).indices}
    named |= set(tuned_top[tokens.mask].tolist()) | set(base_top[tokens.mask].tolist())
    strings = [token_strings(pair.tuned, row[:length]) for row, length in zip(tokens.ids, tokens.lengths)]
    names_of = {str(i): token_strings(pair.tuned, torch.tensor(i)) for i in sorted(named)}
    return KLResult(pair.base.name, pair.tuned.name, label, prompt_texts(prompts), tokens.ids, tokens.lengths,
                    kl.float(), change.float(), tuned_top, base_top, mean_logprob.float(), mean_logit.float(),
                    base_logprob.float(), top_rate.float(), strings, names_of,
                    settings={"top": top, "tuned_label": model_label(pair.tuned)})


def _next_ids(tokens: Tokens) -> Tensor:
    """The next token of each position (-1 at each text's last position and at pads)."""
    nxt = torch.full_like(tokens.ids, -1)
    nxt[:, :-1] = tokens.ids[:, 1:]
    cols = torch.arange(tokens.ids.shape[1])[None]
    return nxt.masked_fill(cols >= tokens.lengths[:, None] - 1, -1)


def _position_stats(lt: Float[Tensor, "n vocab"], lb: Float[Tensor, "n vocab"], nxt: Int[Tensor, " n"], top: int,
                    sums: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KL, next-token log-prob change and both argmaxes at n positions; adds the per-token sums into `sums`."""
    parts = []
    for s in range(0, len(lt), ROWS):
        t, b, n = lt[s: s + ROWS].double(), lb[s: s + ROWS].double(), nxt[s: s + ROWS]
        log_t, log_b = t.log_softmax(-1), b.log_softmax(-1)
        diff = log_t - log_b
        kl = (log_t.exp() * diff).sum(-1)
        change = torch.where(n >= 0, diff.gather(1, n.clamp_min(0)[:, None])[:, 0], torch.zeros_like(kl))
        sums["logprob"] += diff.sum(0)
        sums["logit"] += (t - b).sum(0)
        sums["base"] += log_b.sum(0)
        sums["top"] += torch.zeros_like(diff).scatter_(1, diff.topk(min(top, diff.shape[1])).indices, 1.0).sum(0)
        parts.append((kl, change, t.argmax(-1), b.argmax(-1)))
    return tuple(torch.cat(p) for p in zip(*parts))
