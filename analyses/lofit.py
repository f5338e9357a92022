"""LoFiT-style head steering (Yin, Ye, Durrett 2024): select heads, then learn one offset vector per head.

Stage 1 learns a scale (1 + s_h) on every head's output, minimising the answer cross-entropy plus
`l1 * sum_h |s_h|`; the K heads with the largest |s_h| are kept (K defaults to max(1, floor(0.1 * heads))).
Stage 2 learns an offset v_h [d_model] added to each kept head's output (head_out, i.e. after W_O; the paper
adds it before W_O), minimising the answer cross-entropy. Both train through ordinary edits: the scale and
offset tensors require grad, and `capture(..., metric=loss)` back-propagates into them (the weights stay
frozen). The result is saved (safetensors + JSON) and re-applied as `add` edits:

    with model.edit(*LoFiT.load(folder).edits()): ...
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from interp.capture import capture
from interp.intervene import Edit, add, scale
from interp.prompts import Tokens, tokenize
from interp.sites import Site


@dataclass
class LoFiT:
    """Kept `heads` [(layer, head)], their `offsets` [K, d_model] and the stage-1 scales `s` [layer, head]."""

    heads: list[tuple[int, int]]
    offsets: Float[Tensor, "k d_model"]
    s: Float[Tensor, "layer head"]

    def edits(self) -> list[Edit]:
        return [add(Site("head_out", layer, h), v) for (layer, h), v in zip(self.heads, self.offsets)]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"offsets": self.offsets.detach().contiguous(), "s": self.s.detach().contiguous()},
                  str(folder / "lofit.safetensors"))
        (folder / "lofit.json").write_text(json.dumps({"heads": self.heads}))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> LoFiT:
        folder = Path(folder)
        t = load_file(str(folder / "lofit.safetensors"))
        heads = [tuple(h) for h in json.loads((folder / "lofit.json").read_text())["heads"]]
        return cls(heads, t["offsets"], t["s"])


def answer_tokens(model, prompts: Sequence[str], answers: Sequence[str]) -> tuple[Tokens, Tensor]:
    """Prompt + answer tokens and the first answer position of each (as `interp.scoring.answer_scores`)."""
    full = [f"{p} {a}" for p, a in zip(prompts, answers)]
    start = torch.tensor([len(model.tokenizer(p)["input_ids"]) for p in prompts])
    return tokenize(model.tokenizer, full, max_length=model.n_ctx), start


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


def train(model, prompts: Sequence[str], answers: Sequence[str], *, k: int | None = None, l1: float = 1e-2,
          steps: tuple[int, int] = (100, 200), lr: tuple[float, float] = (1e-2, 1e-2), batch_size: int = 32,
          seed: int = 0, progress: bool = True) -> LoFiT:
    """Select K heads by L1-penalised scales, then train their offsets (module docstring)."""
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
    return LoFiT(heads, offsets.detach().cpu(), s.detach().cpu())
