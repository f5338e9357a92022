"""LoFiT-style head steering (Yin, Ye, Durrett 2024): select heads, then learn one offset vector per head.

Stage 1 learns a scale (1 + s_h) on every head's output, minimising the answer cross-entropy plus
`l1 * sum_h |s_h|`; the K heads with the largest |s_h| are kept (K defaults to max(1, floor(0.1 * heads))).
Stage 2 learns an offset v_h [d_model] added to each kept head's output (head_out, i.e. after W_O; the paper
adds it before W_O), minimising the answer cross-entropy. Both train through ordinary edits: the scale and
offset tensors require grad, and `capture(..., metric=loss)` back-propagates into them (the weights stay
frozen). The result is a `Result` (saved with `save`, read with `load`) re-applied as `add` edits:

    with model.edit(*LoFiT.load(folder).edits()): ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.capture import capture
from interp.errors import BadPrompts
from interp.intervene import Edit, add, scale
from interp.prompts import PromptSet, Tokens, as_tokens, prompt_texts
from interp.results import Result
from interp.sites import Site


@dataclass
class LoFiT(Result):
    """Kept `heads` [(layer, head)], their `offsets` [K, d_model] and the stage-1 scales `s` [layer, head]."""

    ANALYSIS = "circuits"
    heads: list[tuple[int, int]]
    offsets: Float[Tensor, "k d_model"]
    s: Float[Tensor, "layer head"]

    def __post_init__(self) -> None:
        self.heads = [tuple(h) for h in self.heads]

    def edits(self) -> list[Edit]:
        return [add(Site("head_out", layer, h), v) for (layer, h), v in zip(self.heads, self.offsets)]

    def to_frame(self):
        """One row per kept head: its stage-1 scale and the norm of its offset."""
        import pandas as pd

        return pd.DataFrame([{"layer": layer, "head": h, "s": float(self.s[layer, h]), "offset_norm": float(v.norm())}
                             for (layer, h), v in zip(self.heads, self.offsets)])


def answer_tokens(model, prompts: Sequence[str], answers: Sequence[str]) -> tuple[Tokens, Tensor]:
    """Prompt + answer tokens and the first answer position of each (as `interp.scoring.answer_scores`)."""
    full = [f"{p} {a}" for p, a in zip(prompts, answers)]
    start = torch.tensor([len(model.tokenizer(p)["input_ids"]) for p in prompts])
    return as_tokens(model, full), start


def answer_loss(start: Tensor, penalty: Callable[[], Tensor] | None = None):
    """metric(logits, batch): mean cross-entropy (nats) of the answer tokens in the batch, plus `penalty()`."""
    def fn(logits: Tensor, batch) -> Tensor:
        targets = batch.input_ids[:, 1:].to(logits.device)
        cols = torch.arange(1, batch.width, device=logits.device)[None]
        keep = (cols >= start[batch.index, None].to(logits.device)) & (cols < batch.lengths[:, None].to(logits.device))
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        value = (nll * keep).sum() / keep.sum()
        return value + penalty() if penalty is not None else value
    return fn


def _fit(model, tokens: Tokens, start: Tensor, param: Tensor, make_edits: Callable[[], list[Edit]],
         penalty, steps: int, lr: float, batch_size: int, seed: int, desc: str, progress: bool) -> None:
    """Adam on `param` for `steps` minibatches, with a progress bar named `desc`."""
    opt = torch.optim.Adam([param], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        rows = torch.randperm(len(tokens), generator=g)[:batch_size]
        sub = Tokens(tokens.ids[rows], tokens.lengths[rows], tokens.pad_id)
        opt.zero_grad()
        capture(model, sub, [], edits=make_edits(), metric=answer_loss(start[rows], penalty),
                batch_size=batch_size, progress=False)
        opt.step()


def train(model, prompts: PromptSet | Sequence[str], answers: Sequence[str] | None = None, *, k: int | None = None,
          l1: float = 1e-2, steps: tuple[int, int] = (100, 200), lr: tuple[float, float] = (1e-2, 1e-2),
          batch_size: int = 32, seed: int = 0, progress: bool = True) -> LoFiT:
    """Select K heads by L1-penalised scales, then train their offsets (module docstring), on `prompts` and their
    `answers` (a PromptSet's own answers by default)."""
    prompts, answers = prompts_and_answers(prompts, answers)
    tokens, start = answer_tokens(model, prompts, answers)
    L, H = model.n_layers, model.n_heads
    k = k or max(1, int(0.1 * L * H))
    device = model.device
    s = torch.zeros(L, H, device=device, requires_grad=True)
    _fit(model, tokens, start, s, lambda: [scale(Site("head_out", layer, h), 1 + s[layer, h])
                                           for layer in range(L) for h in range(H)],
         lambda: l1 * s.abs().sum(), steps[0], lr[0], batch_size, seed, "LoFiT head scales", progress)
    chosen = s.detach().abs().flatten().topk(k).indices.tolist()
    heads = [(i // H, i % H) for i in chosen]
    offsets = torch.zeros(k, model.d_model, device=device, requires_grad=True)
    _fit(model, tokens, start, offsets, lambda: [add(Site("head_out", layer, h), offsets[i])
                                                 for i, (layer, h) in enumerate(heads)],
         None, steps[1], lr[1], batch_size, seed + 1, "LoFiT offsets", progress)
    return LoFiT(heads, offsets.detach().cpu(), s.detach().cpu(), settings={
        "k": k, "l1": l1, "steps": list(steps), "lr": list(lr), "batch_size": batch_size, "seed": seed,
        "prompts": len(prompts)})


def prompts_and_answers(prompts: PromptSet | Sequence[str], answers: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The prompt texts and their answers: `answers`, or the prompt set's own; raises BadPrompts when neither."""
    if answers is None and isinstance(prompts, PromptSet):
        answers = prompts.answers
    if answers is None:
        raise BadPrompts("answers are needed here; pass answers, or a prompt set with answers (jsonl with 'answer')")
    return prompt_texts(prompts), list(answers)
