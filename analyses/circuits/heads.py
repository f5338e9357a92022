"""Head detectors from attention patterns, and head steering edits (zero-, mean- or scale-ablation).

For a query token at position q whose token occurred before, most recently at position j < q:

    previous-token  attention from q to q - 1        (every real query q >= 1)
    duplicate-token attention from q to j            (the same token, earlier)
    induction       attention from q to j + 1        (the token after the earlier occurrence; j + 1 < q)

Each score is the mean attention weight over the queries it applies to, in [0, 1], per layer and head. By
default the prompts are repeated random sequences [bos] + x + x of distinct tokens (Olsson et al. 2022);
any prompt set with repeated tokens works too, e.g. a copy task's prompts followed by their answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.capture import capture
from interp.errors import BadOption
from interp.intervene import Edit, ablate, scale
from interp.prompts import Tokens, as_tokens
from interp.sites import Site

DETECTORS = ("previous_token", "duplicate_token", "induction")


def repeated_tokens(model, n: int = 32, length: int | None = None, seed: int = 0) -> Tokens:
    """[bos] + x + x for `n` random sequences x of `length` tokens (default: as long as the context allows, <= 20)."""
    tok = model.tokenizer
    special = set(tok.all_special_ids)
    pool = torch.tensor([i for i in range(len(tok)) if i not in special])
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    length = length or min(20, ((model.n_ctx or 41) - len(bos)) // 2)
    g = torch.Generator().manual_seed(seed)
    x = pool[torch.stack([torch.randperm(len(pool), generator=g)[:length] for _ in range(n)])]
    ids = torch.cat([torch.tensor(bos).long().expand(n, len(bos)), x, x], dim=1)
    return Tokens(ids, torch.full((n,), ids.shape[1]), tok.pad_token_id or 0)


def detector_scores(model, prompts=None, *, n: int = 32, length: int | None = None, seed: int = 0,
                    batch_size: int = 32) -> dict[str, Float[Tensor, "layer head"]]:
    """{detector: [layer, head]} on `prompts` (strings, id lists or Tokens; default `repeated_tokens`)."""
    tokens = repeated_tokens(model, n, length, seed) if prompts is None else as_tokens(model, prompts)
    sites = [Site("attn_pattern", layer) for layer in range(model.n_layers)]
    acts = capture(model, tokens, sites, batch_size=batch_size, progress=False)
    return scores_from_patterns(torch.stack([acts[s] for s in sites], dim=1), tokens.ids, tokens.mask)


def scores_from_patterns(pattern: Float[Tensor, "prompt layer head query key"], ids: Int[Tensor, "prompt pos"],
                         mask: Bool[Tensor, "prompt pos"]) -> dict[str, Tensor]:
    """Detector scores [layer, head] from attention patterns and the token ids they were computed on."""
    width = ids.shape[1]
    pos = torch.arange(width)
    same = (ids[:, :, None] == ids[:, None, :]) & (pos[None, None, :] < pos[None, :, None]) & mask[:, :, None]
    earlier = torch.where(same, pos, -1).amax(-1)  # [prompt, query]: most recent earlier occurrence, or -1
    queries = {"previous_token": (mask & (pos >= 1), pos - 1),
               "duplicate_token": (earlier >= 0, earlier),
               "induction": ((earlier >= 0) & (earlier + 1 < pos), earlier + 1)}
    out = {}
    for name, (where, key) in queries.items():
        prompt, query = where.nonzero(as_tuple=True)
        weights = pattern[prompt, :, :, query, key.expand_as(where)[prompt, query].clamp(min=0)]  # [n, layer, head]
        out[name] = weights.mean(0) if len(prompt) else pattern.new_zeros(pattern.shape[1:3])
    return out


def head_edits(heads: Sequence[tuple[int, int]], mode: str = "zero", factor: float = 0.0,
               means: dict[tuple[int, int], Tensor] | None = None) -> list[Edit]:
    """Edits on head_out.L.H for each (layer, head): 'zero' ablation, 'mean' ablation (to `means[(L, H)]`,
    [d_model], e.g. from `head_means`) or 'scale' by `factor`."""
    if mode == "zero":
        return [ablate(Site("head_out", layer, h)) for layer, h in heads]
    if mode == "mean":
        return [ablate(Site("head_out", layer, h), mean=means[(layer, h)]) for layer, h in heads]
    if mode == "scale":
        return [scale(Site("head_out", layer, h), factor) for layer, h in heads]
    raise BadOption(f"unknown head edit {mode!r}; use zero, mean or scale")


def head_means(model, prompts, heads: Sequence[tuple[int, int]], batch_size: int = 64) -> dict[tuple[int, int], Tensor]:
    """Mean output [d_model] of each head over the real tokens of `prompts` (for mean ablation)."""
    layers = sorted({layer for layer, _ in heads})
    acts = capture(model, prompts, [Site("head_out", layer) for layer in layers], batch_size=batch_size, progress=False)
    return {(layer, h): acts.tokens_of(f"head_out.{layer}")[:, h].mean(0) for layer, h in heads}
