"""Concept shifts of a pair on a prompt set: `measure` learns a dictionary per layer, takes each concept's shift and
scores how well the shifts recover the tuned representations (`ShiftResult`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from analyses.shift.concepts import items, learn_concepts, match_concepts, representations, sites_for
from interp.errors import BadOption
from interp.models import Pair
from interp.prompts import PromptSet, Tokens, as_tokens, prompt_texts
from interp.results import Result

TOP = 5
RECOVERY = ("base", "global", "concept")
"""The guesses of h_tuned scored by `recovery`: h_base alone, h_base + global shift, h_base + concept shift."""


def concept_shifts(h_base: Float[Tensor, "item d"], h_tuned: Float[Tensor, "item d"], assign: Int[Tensor, " item"],
                   k: int) -> tuple[Float[Tensor, "k d"], Int[Tensor, " k"]]:
    """Delta_k = mean over A_k of (h_tuned - h_base) (zeros for an empty concept), and |A_k|."""
    one_hot = torch.nn.functional.one_hot(assign, k).double()
    counts = one_hot.sum(0)
    shifts = (one_hot.T @ (h_tuned - h_base).double()) / counts.clamp_min(1)[:, None]
    return shifts.float(), counts.long()


def recovery(h_base: Tensor, h_tuned: Tensor, shift: Float[Tensor, "item d"]) -> dict[str, Tensor]:
    """Per input: cosine and relative error ||h_base + shift - h_tuned|| / ||h_tuned||."""
    guess = h_base + shift
    return {"cos": torch.nn.functional.cosine_similarity(guess, h_tuned, dim=-1),
            "rel_error": (guess - h_tuned).norm(dim=-1) / h_tuned.norm(dim=-1).clamp_min(1e-12)}


def _per_concept(values: Tensor, assign: Tensor, k: int) -> Tensor:
    one_hot = torch.nn.functional.one_hot(assign, k).double()
    return ((one_hot.T @ values.double()) / one_hot.sum(0).clamp_min(1)).float()


@dataclass
class ShiftResult(Result):
    """Concepts and their shifts per layer (`site` names the representation, `layers` its layers).

    concepts, tuned_concepts  [layer, concept, d_model]   dictionaries on the fitted / the other model
    shifts                    [layer, concept, d_model]   Delta_k;  global_shift [layer, d_model]
    assign                    [layer, item]               concept of each input;  counts [layer, concept]
    activations               [layer, item, concept]
    match, match_cos          [layer, concept]            matched other-model concept and its cosine
    cos, rel_error            [layer, concept, 3]         mean recovery over A_k for h_base, + global, + Delta_k
    top_items                 [layer, concept, top]       top-activating inputs (-1 where fewer)
    item_prompt, item_pos     [item]                      prompt index and canonical position of each input
    tokens                    per prompt, its token strings; top_tokens / shift_tokens [layer][concept][top]
    """

    ANALYSIS = "shift"
    base: str
    tuned: str
    method: str
    site: str
    layers: list[int]
    fit_on: str
    prompts: list[str]
    tokens: list[list[str]]
    item_prompt: Int[Tensor, " item"]
    item_pos: Int[Tensor, " item"]
    concepts: Float[Tensor, "layer concept d_model"]
    tuned_concepts: Float[Tensor, "layer concept d_model"]
    shifts: Float[Tensor, "layer concept d_model"]
    global_shift: Float[Tensor, "layer d_model"]
    assign: Int[Tensor, "layer item"]
    activations: Float[Tensor, "layer item concept"]
    counts: Int[Tensor, "layer concept"]
    match: Int[Tensor, "layer concept"]
    match_cos: Float[Tensor, "layer concept"]
    cos: Float[Tensor, "layer concept 3"]
    rel_error: Float[Tensor, "layer concept 3"]
    top_items: Int[Tensor, "layer concept top"]
    top_tokens: list = field(default_factory=list)
    shift_tokens: list = field(default_factory=list)
    label: str = "prompts"

    @property
    def k(self) -> int:
        return self.concepts.shape[1]

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise BadOption(f"layer {layer} was not measured; measured layers: {self.layers}")
        return self.layers.index(layer)

    def shift(self, layer: int, concept: int | None = None) -> Float[Tensor, " d_model"]:
        """Delta_concept at `layer` (the global shift when `concept` is None)."""
        i = self.layer_index(layer)
        return self.global_shift[i] if concept is None else self.shifts[i, concept]

    def highlighted(self, item: int) -> str:
        """The prompt of an input with its token in [brackets]."""
        words = list(self.tokens[int(self.item_prompt[item])])
        pos = int(self.item_pos[item])
        words[pos] = f"[{words[pos]}]"
        return " ".join(words)

    def to_frame(self):
        """One row per layer and concept: size, shift norm, matching cosine, recovery (cosine and relative
        error for h_base alone, + global shift, + concept shift), grounding tokens and top prompt."""
        import pandas as pd

        rows = []
        for i, layer in enumerate(self.layers):
            for c in range(self.k):
                top = int(self.top_items[i, c, 0])
                row = {"layer": layer, "concept": c, "n": int(self.counts[i, c]),
                       "shift_norm": float(self.shifts[i, c].norm()), "match_cos": float(self.match_cos[i, c])}
                for j, name in enumerate(RECOVERY):
                    row[f"cos_{name}"] = float(self.cos[i, c, j])
                    row[f"rel_error_{name}"] = float(self.rel_error[i, c, j])
                row["top_tokens"] = " ".join(self.top_tokens[i][c]) if self.top_tokens else ""
                row["shift_tokens"] = " ".join(self.shift_tokens[i][c]) if self.shift_tokens else ""
                row["top_prompt"] = self.highlighted(top) if top >= 0 else ""
                rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        from analyses.shift.plots import plot_shift_norms

        return plot_shift_norms(self, ax)


def measure(pair: Pair, prompts: PromptSet | Sequence[str] | Tokens, *, layers: Sequence[int] | None = None,
            site: str = "resid_post", positions="last", method: str = "kmeans", k: int = 20, seed: int = 0,
            fit_on: str = "base", top: int = TOP, batch_size: int = 16, progress: bool = True) -> ShiftResult:
    """Concept dictionaries of the `fit_on` model's representations and their shifts (see the package docstring).
    `positions`: "last" (the last prompt token), canonical int(s), or a boolean mask [prompt, pos]."""
    if fit_on not in ("base", "tuned"):
        raise BadOption(f"fit_on={fit_on!r}; use 'base' or 'tuned'")
    base, tuned = pair.base, pair.tuned
    layers = list(range(base.n_layers)) if layers is None else [int(layer) for layer in layers]
    tokens = as_tokens(base, prompts)
    sites = sites_for(site, layers)
    settings = {"layers": layers, "site": site, "method": method, "k": k, "seed": seed, "fit_on": fit_on, "top": top,
                "positions": positions if isinstance(positions, (str, int)) else "custom"}
    layers = layers if site != "final" else [base.n_layers - 1]
    kw = {"batch_size": batch_size, "progress": progress}
    h_base = representations(base, tokens, sites, positions, **kw)
    h_tuned = representations(tuned, tokens, sites, positions, **kw)
    w_u = base.hf.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d_model]
    per_layer = [_one_layer(h_base[s], h_tuned[s], method, k, seed, fit_on, top, w_u, base.tokenizer)
                 for s in tqdm(sites, desc="concepts per layer", disable=not progress, leave=False)]
    words = {key: [p.pop(key) for p in per_layer] for key in ("top_tokens", "shift_tokens")}
    stacked = {key: torch.stack([p[key] for p in per_layer]) for key in per_layer[0]}
    token_strings = [base.tokenizer.convert_ids_to_tokens(row[:n].tolist())
                     for row, n in zip(tokens.ids, tokens.lengths)]
    item_prompt, item_pos = items(tokens, positions)
    return ShiftResult(base.name, tuned.name, method, site, layers, fit_on, prompt_texts(prompts), token_strings,
                       item_prompt, item_pos, **stacked, **words,
                       label=prompts.label if isinstance(prompts, PromptSet) else "prompts", settings=settings)


def _one_layer(h_base: Tensor, h_tuned: Tensor, method: str, k: int, seed: int, fit_on: str, top: int,
               w_u: Tensor, tokenizer) -> dict:
    fit, other = (h_base, h_tuned) if fit_on == "base" else (h_tuned, h_base)
    concepts = learn_concepts(fit, k, method, seed=seed)
    other_concepts = learn_concepts(other, k, method, seed=seed)
    assign = concepts.assign
    shifts, counts = concept_shifts(h_base, h_tuned, assign, k)
    global_shift = (h_tuned - h_base).double().mean(0).float()
    sign = 1 if fit_on == "base" else -1  # the dictionary lives in the fitted model's space
    if method == "kmeans":
        match, match_cos = match_concepts(concepts.vectors + sign * shifts, other_concepts.vectors)
    else:
        match, match_cos = match_concepts(concepts.vectors, other_concepts.vectors, signed=False)
    guesses = {"base": torch.zeros_like(h_base), "global": global_shift.expand_as(h_base), "concept": shifts[assign]}
    scores = {name: recovery(h_base, h_tuned, g) for name, g in guesses.items()}
    order = concepts.activations.masked_fill(assign[:, None] != torch.arange(k)[None], float("-inf"))
    n_top = min(top, len(fit))
    top_val, top_idx = order.topk(n_top, dim=0)  # [top, k]
    top_items = torch.where(torch.isfinite(top_val), top_idx, -1).T.contiguous()
    return {"concepts": concepts.vectors, "tuned_concepts": other_concepts.vectors, "shifts": shifts,
            "global_shift": global_shift, "assign": assign, "activations": concepts.activations, "counts": counts,
            "match": match, "match_cos": match_cos,
            "cos": torch.stack([_per_concept(scores[n]["cos"], assign, k) for n in RECOVERY], -1),
            "rel_error": torch.stack([_per_concept(scores[n]["rel_error"], assign, k) for n in RECOVERY], -1),
            "top_items": top_items, "top_tokens": decode(concepts.vectors, w_u, tokenizer, top),
            "shift_tokens": decode(shifts, w_u, tokenizer, top)}


def decode(vectors: Float[Tensor, "n d_model"], w_u: Float[Tensor, "vocab d_model"], tokenizer, top: int = TOP
           ) -> list[list[str]]:
    """The `top` tokens each vector promotes through the unembedding (W_U v, no final norm)."""
    return [tokenizer.convert_ids_to_tokens((w_u @ v).topk(top).indices.tolist()) for v in vectors]
