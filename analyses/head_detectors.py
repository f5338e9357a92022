"""Head detectors from attention patterns, and head steering edits (zero-, mean- or scale-ablation).

Detectors run on `n` sequences [bos] + x + x, x being `length` random non-special tokens (repeated random
sequences, as in Olsson et al. 2022). With x at canonical positions 1..n and its copy at n+1..2n:

    previous-token  mean attention from every position q >= 1 to q - 1
    duplicate-token mean attention from q in the copy to q - n          (the same token, earlier)
    induction       mean attention from q in the copy to q - n + 1      (the token after the earlier copy)

Each score is the mean attention weight, in [0, 1], per layer and head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp.capture import capture
from interp.intervene import Edit, ablate, scale
from interp.prompts import Tokens
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


def detector_scores(model, n: int = 32, length: int | None = None, seed: int = 0,
                    batch_size: int = 32) -> dict[str, Float[Tensor, "layer head"]]:
    """{detector: [layer, head]} mean attention scores (see the module docstring)."""
    tokens = repeated_tokens(model, n, length, seed)
    sites = [Site("attn_pattern", layer) for layer in range(model.n_layers)]
    acts = capture(model, tokens, sites, batch_size=batch_size, progress=False)
    return scores_from_patterns(torch.stack([acts[s] for s in sites], dim=1))


def scores_from_patterns(pattern: Float[Tensor, "prompt layer head query key"]) -> dict[str, Tensor]:
    """Detector scores [layer, head] from the patterns of repeated sequences (with a bos iff the width is odd)."""
    width = pattern.shape[-1]
    offset = width % 2
    half = (width - offset) // 2
    q_all = torch.arange(1, width)
    q_copy = torch.arange(offset + half, width)
    return {"previous_token": pattern[..., q_all, q_all - 1].mean((0, -1)),
            "duplicate_token": pattern[..., q_copy, q_copy - half].mean((0, -1)),
            "induction": pattern[..., q_copy, q_copy - half + 1].mean((0, -1))}


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
    raise ValueError(f"unknown head edit {mode!r}; use zero, mean or scale")


def head_means(model, prompts, heads: Sequence[tuple[int, int]], batch_size: int = 64) -> dict[tuple[int, int], Tensor]:
    """Mean output [d_model] of each head over the real tokens of `prompts` (for mean ablation)."""
    layers = sorted({layer for layer, _ in heads})
    acts = capture(model, prompts, [Site("head_out", layer) for layer in layers], batch_size=batch_size, progress=False)
    return {(layer, h): acts.tokens_of(f"head_out.{layer}")[:, h].mean(0) for layer, h in heads}
