"""Loss and answer accuracy under the model's active edits, through either backend.

`loss` is the mean next-token cross-entropy (nats) over each prompt's real tokens; `answer_scores` scores
an answer given its prompt with teacher forcing: the cross-entropy and the fraction of answer tokens that are
the argmax prediction. Both run batch by batch and never keep logits of more than one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.backends import run
from interp.prompts import Tokens, as_tokens, tokenize


@dataclass
class AnswerScores:
    """Per example: `loss` [example] (nats per answer token) and `accuracy` [example] (fraction in [0, 1])."""

    loss: Float[Tensor, " example"]
    accuracy: Float[Tensor, " example"]


def _scored(model, tokens: Tokens, start: Tensor, batch_size: int, backend, progress: bool) -> AnswerScores:
    """Score positions p >= start[i] of each sequence (predicted from p - 1)."""
    losses, accs = [], []
    for batch in tqdm(list(tokens.batches(batch_size)), desc="score", disable=not progress, leave=False):
        with torch.no_grad():
            logits = run(model, batch, [], model.edits, None, backend).logits.float().cpu()
        targets = batch.input_ids[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        cols = torch.arange(1, batch.width)[None]
        keep = (cols >= start[batch.index, None]) & (cols < batch.lengths[:, None])
        hits = (logits[:, :-1].argmax(-1) == targets) & keep
        n = keep.sum(1).clamp_min(1)
        losses.append((nll * keep).sum(1) / n)
        accs.append(hits.sum(1) / n)
    return AnswerScores(torch.cat(losses), torch.cat(accs))


def loss(model, prompts, *, batch_size: int = 16, backend: str | None = None,
         progress: bool = False) -> Float[Tensor, " prompt"]:
    """Mean next-token cross-entropy of each prompt over its real tokens (nats)."""
    tokens = as_tokens(model, prompts)
    return _scored(model, tokens, torch.ones(len(tokens), dtype=torch.long), batch_size, backend, progress).loss


def answer_scores(model, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 16,
                  backend: str | None = None, progress: bool = False) -> AnswerScores:
    """Teacher-forced loss and token accuracy of `answers[i]` following `prompts[i]` (joined by a space)."""
    prompt_ids = [model.tokenizer(p)["input_ids"] for p in prompts]
    full = [model.tokenizer(f"{p} {a}")["input_ids"] for p, a in zip(prompts, answers)]
    tokens = tokenize(model.tokenizer, full, max_length=model.n_ctx)
    start = torch.tensor([len(p) for p in prompt_ids])
    return _scored(model, tokens, start, batch_size, backend, progress)
