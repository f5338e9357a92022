"""Concept shift vectors: how fine-tuning moves the concepts of the representation space (Khayatan et al., 2025).

For inputs x (chosen token positions of a prompt set) at a layer, h_base(x) and h_tuned(x) are the two
models' representations (`resid_post.l`, or `final`, the output of the final norm as in the reference code).

    concepts     a dictionary of K vectors u_k learned on h_base (or h_tuned): K-means (centroids), PCA
                 (principal directions) or semi-NMF (Ding et al.: H ~ G F, G >= 0, F free); input x belongs
                 to the concept with the highest activation (for K-means the nearest centroid), A_k
    shift        Delta_k = mean_{x in A_k} h_tuned(x) - mean_{x in A_k} h_base(x);  global: mean over all x
    recovery     h_base(x) + Delta_{k(x)} vs h_tuned(x) (cosine, relative error), against h_base(x) alone and
                 h_base(x) + Delta_global
    matching     a dictionary learned the same way on the other model, matched one-to-one by cosine
                 (Hungarian): for K-means u_k + Delta_k against the tuned centroids, else |cos(u_k, v_j)|
    grounding    each concept's top-activating inputs and the tokens u_k (and Delta_k) decode to through
                 the unembedding W_U (no final norm applied)
    stability    mean cosine of the concepts of two seeds, matched as above; `choose_k` picks the K whose
                 least stable layer is the most stable (the paper's default is K = 20)

Steering (`steer`): add a vector (a concept shift, the global shift, or `mean_difference` of two prompt
groups) with a strength to `resid_post.l` (or `final`) of either model, at all positions by default (the
paper's setting), at the last prompt token, or from it on (generation). Concept-wise steering adds to each
position the shift of the base concept nearest to its representation there (`add_nearest`).
`strength_sweep` reports KL(steered || target) of the next-token distribution at the last prompt token and
the accuracy on a held-out skill (the side effect); `steering_curve` takes shifts and the layer from train
prompts and the curve from test prompts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.capture import capture
from interp.intervene import add, add_nearest
from interp.models import Model, Pair
from interp.plotting import figure, model_color, save_figure
from interp.prompts import Tokens, tokenize
from interp.results import load_result, save_result

METHODS = ("kmeans", "pca", "semi-nmf")
TOP = 5
RESTARTS = 32  # K-means restarts: at K = 20 on the zoo fewer leave the seed visible in the concepts

# ---------------------------------------------------------------------------------------- representations


def sites_for(site: str, layers: Sequence[int]) -> list[str]:
    """Capture sites: `resid_post.l` for each layer, or the single `final` (final-norm output)."""
    if site == "final":
        return ["final"]
    return [f"{site}.{layer}" for layer in layers]


def representations(model: Model, tokens: Tokens, sites: Sequence[str], positions="last", *,
                    batch_size: int = 16, progress: bool = False) -> dict[str, Float[Tensor, "item d_model"]]:
    """Activations at `sites` for the chosen positions, one row per input (prompt x position), float32."""
    acts = capture(model, tokens, list(sites), positions=positions, batch_size=batch_size, progress=progress)
    return {s: acts[s].reshape(-1, acts[s].shape[-1]).float() for s in sites}


def items(tokens: Tokens, positions) -> tuple[Int[Tensor, " item"], Int[Tensor, " item"]]:
    """(prompt index, canonical position) of each input, in the row order of `representations`."""
    n = len(tokens)
    if positions == "last":
        return torch.arange(n), tokens.lengths - 1
    if isinstance(positions, Tensor):
        where = positions[:, : tokens.ids.shape[1]].logical_and(tokens.mask).nonzero()
        return where[:, 0], where[:, 1]
    cols = torch.as_tensor([positions] if isinstance(positions, int) else list(positions))
    absolute = torch.where(cols[None] < 0, tokens.lengths[:, None] + cols[None], cols[None])
    return torch.arange(n).repeat_interleave(len(cols)), absolute.reshape(-1)


def mean_difference(model: Model, target: Sequence[str], source: Sequence[str], site: str,
                    positions="last", **kw) -> Float[Tensor, " d_model"]:
    """mean h(target) - mean h(source) at `site` (e.g. `resid_post.2`): the paper's steering vector."""
    def mean(prompts):
        return representations(model, tokenize(model.tokenizer, prompts, max_length=model.n_ctx), [site],
                               positions, **kw)[site].mean(0)
    return mean(target) - mean(source)


# ------------------------------------------------------------------------------------- concept dictionaries

@dataclass
class Concepts:
    """A dictionary: `vectors` [concept, d_model], `activations` [item, concept] of the inputs it was learned
    on, `assign` [item] (the concept with the highest activation), `mean` (PCA's centre, else zeros)."""

    method: str
    vectors: Float[Tensor, "concept d_model"]
    activations: Float[Tensor, "item concept"]
    mean: Float[Tensor, " d_model"]

    @property
    def assign(self) -> Int[Tensor, " item"]:
        return self.activations.argmax(-1)


def learn_concepts(x: Float[Tensor, "item d_model"], k: int, method: str = "kmeans", *, seed: int = 0,
                   restarts: int = RESTARTS, iters: int = 300) -> Concepts:
    """K concepts of `x` with `method` (one of METHODS); seeded and deterministic."""
    x = x.double()
    if not 1 <= k <= len(x):
        raise ValueError(f"k={k} concepts for {len(x)} inputs; pass 1 <= k <= the number of inputs")
    if method == "kmeans":
        centroids = kmeans(x, k, seed=seed, restarts=restarts, iters=iters)
        return Concepts(method, centroids.float(), -torch.cdist(x, centroids).float(), torch.zeros(x.shape[1]))
    if method == "pca":
        if k > min(x.shape):
            raise ValueError(f"k={k} principal directions of {len(x)} inputs in {x.shape[1]} dimensions; "
                             f"pass k <= {min(x.shape)}")
        mean = x.mean(0)
        components = torch.linalg.svd(x - mean, full_matrices=False).Vh[:k]
        # activation = |projection| (a direction's sign is arbitrary)
        return Concepts(method, components.float(), ((x - mean) @ components.T).abs().float(), mean.float())
    if method == "semi-nmf":
        g, f = semi_nmf(x, k, seed=seed, iters=iters)
        return Concepts(method, f.float(), g.float(), torch.zeros(x.shape[1]))
    raise ValueError(f"unknown concept method {method!r}; use one of {', '.join(METHODS)}")


def kmeans(x: Float[Tensor, "item d"], k: int, *, seed: int = 0, restarts: int = RESTARTS,
           iters: int = 300) -> Float[Tensor, "k d"]:
    """Lloyd's K-means from greedy k-means++ starts, run to convergence (no assignment changes, at most
    `iters` steps); of `restarts` runs the one with the lowest inertia (sum of squared distances) wins."""
    g = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centroids, previous = _kmeans_pp(x, k, g), None
        for _ in range(iters):
            assign = torch.cdist(x, centroids).argmin(1)
            if previous is not None and torch.equal(assign, previous):
                break
            one_hot = torch.nn.functional.one_hot(assign, k).to(x.dtype)  # [item, k]
            counts = one_hot.sum(0)
            centroids = torch.where(counts[:, None] > 0, (one_hot.T @ x) / counts.clamp_min(1)[:, None], centroids)
            previous = assign
        inertia = float(torch.cdist(x, centroids).min(1).values.square().sum())
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return best


def _kmeans_pp(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii 2007): each new centre is the best (lowest total squared
    distance) of 2 + ln k candidates drawn with probability proportional to the squared distance."""
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(len(x), (1,), generator=g))]
    d2 = (x - x[chosen[0]]).square().sum(1)
    for _ in range(1, k):
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        candidates = torch.multinomial(weights, trials, replacement=True, generator=g)
        new = torch.minimum(d2[None], torch.cdist(x[candidates], x).square())  # [trial, item]
        pick = int(new.sum(1).argmin())
        chosen.append(int(candidates[pick]))
        d2 = new[pick]
    return x[chosen].clone()


def semi_nmf(x: Float[Tensor, "item d"], k: int, *, seed: int = 0, iters: int = 200,
             eps: float = 1e-12) -> tuple[Float[Tensor, "item k"], Float[Tensor, "k d"]]:
    """Semi-NMF (Ding, Li & Jordan 2010): x ~ G F with G >= 0 and F unconstrained. G starts from K-means
    (one-hot + 0.2); then F = (G^T G)^-1 G^T x, and G <- G sqrt((A+ + G B-) / (A- + G B+)) with A = x F^T
    and B = F F^T (X+ / X- the positive / negative parts)."""
    assign = torch.cdist(x, kmeans(x, k, seed=seed, restarts=1, iters=50)).argmin(1)
    g = torch.nn.functional.one_hot(assign, k).to(x.dtype) + 0.2
    for _ in range(iters):
        f = torch.linalg.lstsq(g, x).solution  # [k, d]
        a, b = x @ f.T, f @ f.T
        pos, neg = (a.abs() + a) / 2, (a.abs() - a) / 2
        bpos, bneg = (b.abs() + b) / 2, (b.abs() - b) / 2
        g = g * ((pos + g @ bneg) / (neg + g @ bpos + eps)).sqrt()
    return g, torch.linalg.lstsq(g, x).solution


def match_concepts(a: Float[Tensor, "k d"], b: Float[Tensor, "k d"], *, signed: bool = True
                   ) -> tuple[Int[Tensor, " k"], Float[Tensor, " k"]]:
    """One-to-one matching of two dictionaries maximising total cosine (|cosine| if not `signed`):
    (index into b for each row of a, the matched cosines)."""
    from scipy.optimize import linear_sum_assignment

    cos = _unit(a.double()) @ _unit(b.double()).T
    score = cos if signed else cos.abs()
    _, cols = linear_sum_assignment(score.numpy(), maximize=True)
    cols = torch.as_tensor(cols)
    return cols, score[torch.arange(len(a)), cols].float()


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


K_CANDIDATES = (8, 12, 16, 20, 24, 32, 40)


def stability(x: Float[Tensor, "item d"], k: int, seeds: Sequence[int] = (0, 1), method: str = "kmeans") -> float:
    """Mean cosine of matched concepts (`match_concepts`) between the dictionaries learned with each two of
    `seeds`, averaged over the pairs: 1 when every seed finds the same K concepts."""
    if len(seeds) < 2:
        raise ValueError(f"stability compares seeds; pass at least two, got {list(seeds)}")
    vectors = [learn_concepts(x, k, method, seed=s).vectors for s in seeds]
    pairs = list(itertools.combinations(vectors, 2))
    return sum(float(match_concepts(a, b, signed=method == "kmeans")[1].mean()) for a, b in pairs) / len(pairs)


def choose_k(model: Model, prompts: Sequence[str] | Tokens, candidates: Sequence[int] = K_CANDIDATES, *,
             seeds: Sequence[int] = (0, 1, 2), layers: Sequence[int] | None = None, site: str = "resid_post",
             positions="last", method: str = "kmeans", batch_size: int = 16, progress: bool = True
             ) -> tuple[int, dict[int, dict[str, float]]]:
    """K by stability (Ben-Hur et al. 2002): `stability` of `model`'s dictionaries at every layer for each
    candidate K; the chosen K is the one whose least stable layer is the most stable (the smaller K on ties).
    Returns (K, {K: {site: stability}})."""
    layers = list(range(model.n_layers)) if layers is None else [int(layer) for layer in layers]
    tokens = prompts if isinstance(prompts, Tokens) else tokenize(model.tokenizer, prompts, max_length=model.n_ctx)
    h = representations(model, tokens, sites_for(site, layers), positions, batch_size=batch_size)
    n_items = len(next(iter(h.values())))
    candidates = [k for k in candidates if k <= n_items]
    if not candidates:
        raise ValueError(f"every candidate K exceeds the {n_items} inputs; pass smaller candidates")
    steps = tqdm([(k, s) for k in candidates for s in h], desc="concept stability", disable=not progress,
                 leave=False)
    table: dict[int, dict[str, float]] = {k: {} for k in candidates}
    for k, s in steps:
        table[k][s] = stability(h[s], k, seeds, method)
    return max(candidates, key=lambda k: (min(table[k].values()), -k)), table


# ---------------------------------------------------------------------------------------------- shifts

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


RECOVERY = ("base", "global", "concept")


def _per_concept(values: Tensor, assign: Tensor, k: int) -> Tensor:
    one_hot = torch.nn.functional.one_hot(assign, k).double()
    return ((one_hot.T @ values.double()) / one_hot.sum(0).clamp_min(1)).float()


# ---------------------------------------------------------------------------------------------- result

@dataclass
class ShiftResult:
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

    @property
    def k(self) -> int:
        return self.concepts.shape[1]

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not measured; measured layers: {self.layers}")
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
        return plot_shift_norms(self, ax)

    def save(self, folder: str | Path) -> Path:
        names = ("item_prompt", "item_pos", "concepts", "tuned_concepts", "shifts", "global_shift", "assign",
                 "activations", "counts", "match", "match_cos", "cos", "rel_error", "top_items")
        meta = {"analysis": "shift", **{k: getattr(self, k) for k in ("base", "tuned", "method", "site", "layers",
                                                                     "fit_on", "prompts", "tokens", "top_tokens",
                                                                     "shift_tokens")}}
        return save_result(folder, {k: getattr(self, k) for k in names}, meta)

    @classmethod
    def load(cls, folder: str | Path) -> ShiftResult:
        tensors, meta = load_result(folder)
        meta.pop("analysis")
        return cls(**meta, **tensors)


def measure(pair: Pair, prompts: Sequence[str] | Tokens, *, layers: Sequence[int] | None = None,
            site: str = "resid_post", positions="last", method: str = "kmeans", k: int = 20, seed: int = 0,
            fit_on: str = "base", top: int = TOP, batch_size: int = 16, progress: bool = True) -> ShiftResult:
    """Concept dictionaries of the `fit_on` model's representations and their shifts (module docstring).
    `positions`: "last" (the last prompt token), canonical int(s), or a boolean mask [prompt, pos]."""
    if fit_on not in ("base", "tuned"):
        raise ValueError(f"fit_on={fit_on!r}; use 'base' or 'tuned'")
    base, tuned = pair.base, pair.tuned
    layers = list(range(base.n_layers)) if layers is None else [int(layer) for layer in layers]
    tokens = prompts if isinstance(prompts, Tokens) else tokenize(base.tokenizer, prompts, max_length=base.n_ctx)
    texts = _texts(prompts, tokens)
    sites = sites_for(site, layers)
    layers = layers if site != "final" else [base.n_layers - 1]
    kw = dict(batch_size=batch_size, progress=progress)
    h_base = representations(base, tokens, sites, positions, **kw)
    h_tuned = representations(tuned, tokens, sites, positions, **kw)
    w_u = base.hf.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d_model]
    per_layer = [_one_layer(h_base[s], h_tuned[s], method, k, seed, fit_on, top, w_u, base.tokenizer)
                 for s in tqdm(sites, desc="concepts per layer", disable=not progress, leave=False)]
    words = {key: [p.pop(key) for p in per_layer] for key in ("top_tokens", "shift_tokens")}
    stacked = {key: torch.stack([p[key] for p in per_layer]) for key in per_layer[0]}
    token_strings = [base.tokenizer.convert_ids_to_tokens(row[:n].tolist())
                     for row, n in zip(tokens.ids, tokens.lengths)]
    return ShiftResult(base.name, tuned.name, method, site, layers, fit_on, texts, token_strings,
                       *items(tokens, positions), **words, **stacked)


def _texts(prompts, tokens: Tokens) -> list[str]:
    if isinstance(prompts, Tokens):
        return [str(r[:n].tolist()) for r, n in zip(tokens.ids, tokens.lengths)]
    return [p if isinstance(p, str) else str(list(p)) for p in prompts]


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


# ---------------------------------------------------------------------------------------------- steering

STEER_MODES = ("global", "concept")
STEER_POSITIONS = ("all", "last", "from-last")


def steering_edit(vector: Float[Tensor, "*concept d_model"], layer: int | str, strength: float = 1.0,
                  positions=None, centroids: Float[Tensor, "concept d_model"] | None = None):
    """The edit adding `strength * vector` at `resid_post.layer` (or at `final` for layer='final'). With
    `centroids`, `vector` holds one shift per concept and each position gets the shift of the concept nearest
    to its own representation there (concept-wise steering)."""
    where = "final" if layer == "final" else f"resid_post.{int(layer)}"
    if centroids is None:
        return add(where, vector, scale=strength, positions=positions)
    return add_nearest(where, centroids, vector, scale=strength, positions=positions)


@contextmanager
def steer(model: Model, vector: Float[Tensor, "*concept d_model"], layer: int | str, strength: float = 1.0,
          positions=None, centroids: Tensor | None = None):
    """Within the block, `model` (base or tuned) runs with `strength * vector` added at layer `layer`'s
    residual output (concept-wise with `centroids`, see `steering_edit`), at `positions` (canonical, default
    every position), for logits, loss and generation."""
    with model.edit(steering_edit(vector, layer, strength, positions, centroids)):
        yield model


def prompt_positions(where: str, prompt_lengths: Sequence[int], width: int):
    """Canonical positions for a STEER_POSITIONS name, given each input's prompt length in tokens (the input may
    go on with an answer or generated tokens, up to `width`): None for "all", else a mask [input, width] of
    the last prompt token ("last") or of every position from it on ("from-last")."""
    if where == "all":
        return None
    if where not in STEER_POSITIONS:
        raise ValueError(f"steering positions {where!r}; use one of {', '.join(STEER_POSITIONS)}")
    last = torch.as_tensor(list(prompt_lengths))[:, None] - 1
    cols = torch.arange(width)[None]
    return cols == last if where == "last" else cols >= last


def next_token_kl(model: Model, target: Model, prompts, *, target_logprobs: Tensor | None = None,
                  batch_size: int = 16) -> Float[Tensor, " prompt"]:
    """KL(model || target) of the next-token distributions at each prompt's last token (nats)."""
    p = _last_logprobs(model, prompts, batch_size)
    q = _last_logprobs(target, prompts, batch_size) if target_logprobs is None else target_logprobs
    return (p.exp() * (p - q)).sum(-1)


def _last_logprobs(model: Model, prompts, batch_size: int) -> Tensor:
    logits = capture(model, prompts, [], positions="last", logits=True, batch_size=batch_size, progress=False)
    return logits["logits"].double().log_softmax(-1)


def strength_sweep(model: Model, target: Model, prompts: Sequence[str], vector: Tensor, layer: int | str,
                   strengths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), *, positions=None,
                   held_out: tuple[Sequence[str], Sequence[str]] | None = None, label: str = "shift",
                   centroids: Tensor | None = None) -> dict:
    """KL(steered || target) on `prompts` and held-out accuracy (`held_out` = (prompts, answers), teacher-forced)
    for each strength. `positions`: a STEER_POSITIONS name (for the held-out answers "last" / "from-last" mean
    the prompt's last token / from it on) or canonical positions used as they are. Returns {"strength", "kl",
    "accuracy" (or None), "closure" (1 - KL / KL unsteered), ...}."""
    from interp.scoring import answer_scores

    where = _where(model, prompts, positions)
    held_where = _where(model, held_out[0], positions) if held_out is not None else None
    target_lp = _last_logprobs(target, prompts, 16)
    start = float(next_token_kl(model, target, prompts, target_logprobs=target_lp).mean())
    kl, acc = [], []
    for s in strengths:
        with steer(model, vector, layer, s, where, centroids):
            kl.append(float(next_token_kl(model, target, prompts, target_logprobs=target_lp).mean()))
        if held_out is not None:
            with steer(model, vector, layer, s, held_where, centroids):
                acc.append(float(answer_scores(model, *held_out).accuracy.mean()))
    return {"label": label, "model": model.name, "target": target.name, "layer": layer,
            "positions": positions if isinstance(positions, str) or positions is None else "custom",
            "strength": [float(s) for s in strengths], "kl": kl, "kl_unsteered": start,
            "closure": [1 - v / start if start > 0 else 0.0 for v in kl], "accuracy": acc if held_out else None}


def _where(model: Model, prompts: Sequence[str], positions):
    if not isinstance(positions, str) or positions not in STEER_POSITIONS:
        return positions
    lengths = [len(model.tokenizer(p)["input_ids"]) for p in prompts]
    return prompt_positions(positions, lengths, model.n_ctx)


def steering_vectors(result: ShiftResult, layer: int | str, mode: str = "global"
                     ) -> tuple[Tensor, Tensor | None]:
    """(vector, centroids) to steer the base with at `layer`: the global shift and None, or ("concept") the
    concept shifts [concept, d_model] and the base K-means centroids they belong to."""
    i = 0 if layer == "final" else result.layer_index(int(layer))
    if mode == "global":
        return result.global_shift[i], None
    if mode != "concept":
        raise ValueError(f"steering mode {mode!r}; use one of {', '.join(STEER_MODES)}")
    if result.method != "kmeans" or result.fit_on != "base":
        raise ValueError("concept-wise steering of the base assigns inputs to the nearest base centroid: "
                         f"measure with method='kmeans', fit_on='base' (got {result.method!r}, {result.fit_on!r})")
    return result.shifts[i], result.concepts[i]


def best_layer(pair: Pair, prompts: Sequence[str], result: ShiftResult, mode: str = "global",
               positions=None) -> int | str:
    """The measured layer at which steering the base (strength 1, `mode`, `positions`) gives the lowest KL to
    the tuned model on `prompts`."""
    kls = layer_kls(pair, prompts, result, mode, positions)
    return min(kls, key=kls.get)


def layer_kls(pair: Pair, prompts: Sequence[str], result: ShiftResult, mode: str = "global",
              positions=None) -> dict:
    """{layer: mean KL(base steered at strength 1 || tuned)} over `prompts` for each layer of `result`
    ("final" for a final-norm result)."""
    target = _last_logprobs(pair.tuned, prompts, 16)
    where = _where(pair.base, prompts, positions)
    kls = {}
    for layer in (["final"] if result.site == "final" else result.layers):
        with steer(pair.base, *_at(result, layer, mode, where)):
            kls[layer] = float(next_token_kl(pair.base, pair.tuned, prompts, target_logprobs=target).mean())
    return kls


def _at(result: ShiftResult, layer, mode: str, where) -> tuple:
    vector, centroids = steering_vectors(result, layer, mode)
    return vector, layer, 1.0, where, centroids


def steering_curve(pair: Pair, train: Sequence[str], test: Sequence[str], *, mode: str = "concept",
                   positions: str = "last", layers: Sequence[int | str] | None = None, k: int = 20, seed: int = 0,
                   strengths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
                   held_out: tuple[Sequence[str], Sequence[str]] | None = None) -> dict:
    """Steer the base toward the tuned model: shifts (and K-means concepts) from the `train` prompts at the
    positions steered (every position for "all", else the last prompt token), the layer among `layers` (ints
    for `resid_post`, "final"; default every layer and "final") with the lowest KL on `train` at strength 1,
    then `strength_sweep` on `test`.
    The sweep dict gains "mode", "layer_kl" and "layer_closure" (train, per candidate layer)."""
    tokens = tokenize(pair.base.tokenizer, train, max_length=pair.base.n_ctx)
    at = torch.ones(len(train), pair.base.n_ctx, dtype=torch.bool) if positions == "all" else "last"
    n_items = int(tokens.lengths.sum()) if positions == "all" else len(train)
    kw = dict(positions=at, k=min(k, n_items) if mode == "concept" else 1, seed=seed, progress=False)
    layers = [*range(pair.base.n_layers), "final"] if layers is None else list(layers)
    blocks = [layer for layer in layers if layer != "final"]
    results = {}
    if blocks:
        results["resid_post"] = measure(pair, tokens, layers=blocks, **kw)
    if "final" in layers:
        results["final"] = measure(pair, tokens, site="final", **kw)
    kls = {}
    for result in results.values():
        kls |= layer_kls(pair, train, result, mode, positions)
    layer = min(kls, key=kls.get)
    vector, centroids = steering_vectors(results["final" if layer == "final" else "resid_post"], layer, mode)
    sweep = strength_sweep(pair.base, pair.tuned, test, vector, layer, strengths, positions=positions,
                           held_out=held_out, label=f"{mode} shift ({positions})", centroids=centroids)
    start = float(next_token_kl(pair.base, pair.tuned, train).mean())
    return sweep | {"mode": mode, "layer_kl": {str(key): v for key, v in kls.items()},
                    "layer_closure": {str(key): 1 - v / start if start > 0 else 0.0 for key, v in kls.items()}}


# ------------------------------------------------------------------------------------------------ figures

def plot_concept_table(result: ShiftResult, ax=None, layer: int | None = None, rows: int = 10):
    """Concepts at `layer` (default the last measured): size, shift norm, top tokens, top prompt."""
    if ax is None:
        ax = figure(height=3.0)[1][0, 0]
    i = result.layer_index(result.layers[-1] if layer is None else layer)
    order = result.counts[i].argsort(descending=True)[:rows].tolist()
    cells = []
    for c in order:
        top = int(result.top_items[i, c, 0])
        prompt = result.highlighted(top) if top >= 0 else ""
        cells.append([str(c), str(int(result.counts[i, c])), f"{float(result.shifts[i, c].norm()):.2f}",
                      " ".join(result.top_tokens[i][c][:3]), prompt[-40:]])
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=["k", "n", "|shift|", "top tokens", "top prompt"], loc="center",
                     cellLoc="left", colWidths=[0.06, 0.08, 0.1, 0.28, 0.48])
    table.auto_set_font_size(False)
    table.set_fontsize(5)
    ax.set_title(f"{result.method} concepts, {result.site} layer {result.layers[i]}")
    return ax


def plot_shift_norms(result: ShiftResult, ax=None):
    """||Delta_k|| per concept (columns) and layer (rows)."""
    if ax is None:
        ax = figure()[1][0, 0]
    norms = result.shifts.norm(dim=-1).numpy()
    image = ax.imshow(norms, aspect="auto", cmap="viridis")
    ax.figure.colorbar(image, ax=ax, label=r"$\|\Delta_k\|$")
    ax.set_yticks(range(len(result.layers)), [str(layer) for layer in result.layers])
    step = max(1, result.k // 10)
    ax.set_xticks(range(0, result.k, step), [str(c) for c in range(0, result.k, step)])
    ax.set(xlabel="concept (each layer has its own dictionary)", ylabel="layer",
           title=f"Concept shift norms ({_short(result.tuned)} vs {_short(result.base)})")
    ax.grid(False)
    return ax


def plot_recovery(result: ShiftResult, ax=None, layer: int | None = None):
    """Relative error ||h + shift - h_tuned|| / ||h_tuned|| per concept: h_base alone, + global, + concept."""
    if ax is None:
        ax = figure()[1][0, 0]
    i = result.layer_index(result.layers[-1] if layer is None else layer)
    x = torch.arange(result.k).numpy()
    colors = (model_color("base"), "#c0c0c0", model_color("full"))
    for j, (name, color) in enumerate(zip(RECOVERY, colors)):
        label = {"base": r"$h_{base}$", "global": "+ global shift", "concept": "+ concept shift"}[name]
        ax.bar(x + (j - 1) * 0.27, result.rel_error[i, :, j].numpy(), width=0.27, color=color, label=label)
    step = max(1, result.k // 10)
    ax.set_xticks(x[::step], [str(c) for c in x[::step]])
    ax.set(xlabel="concept", ylabel="relative error to $h_{tuned}$", title=f"Recovery at layer {result.layers[i]}")
    ax.set_ylim(0, 1.3 * float(result.rel_error[i].max()))
    ax.legend(ncol=3, loc="upper center", frameon=False, fontsize=6)
    return ax


def plot_strength_sweep(sweep: dict, ax=None):
    """KL(steered || target) against strength, and held-out accuracy (the side effect) on a twin axis."""
    if ax is None:
        ax = figure()[1][0, 0]
    ax.plot(sweep["strength"], sweep["kl"], marker="o", color=model_color("full"), label="KL to target")
    ax.set(xlabel="steering strength", ylabel="KL(steered || target)",
           title=f"Steering {_short(sweep['model'])} with {sweep['label']} at layer {sweep['layer']}")
    if sweep.get("accuracy"):
        twin = ax.twinx()
        twin.plot(sweep["strength"], sweep["accuracy"], marker="s", color=model_color("base"), ls="--",
                  label="held-out accuracy")
        twin.set(ylabel="held-out accuracy", ylim=(0, 1.05))
        twin.grid(False)
    return ax


def _short(name: str) -> str:
    return Path(name).name or name


def save_figures(result: ShiftResult, sweep: dict | None, out: str | Path) -> list[Path]:
    """Every shift figure for a saved result (and sweep) into `out` (PDF and PNG each)."""
    out = Path(out)
    written = []
    for name, draw, height in (("shift_concepts", plot_concept_table, 3.0), ("shift_norms", plot_shift_norms, 2.4),
                               ("shift_recovery", plot_recovery, 2.4)):
        fig, ax = figure(height=height)
        draw(result, ax[0, 0])
        written += save_figure(fig, out / name)
    if sweep is not None:
        fig, ax = figure()
        plot_strength_sweep(sweep, ax[0, 0])
        written += save_figure(fig, out / "shift_steering")
    return written


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    from interp.cli import add_pair_arguments

    add_pair_arguments(parser)
    parser.add_argument("--layers", type=int, nargs="+", help="layers to analyse (default: all)")
    parser.add_argument("--site", default="resid_post", choices=("resid_post", "final"),
                        help="representation: residual stream after each layer, or the final-norm output")
    parser.add_argument("--method", default="kmeans", choices=METHODS)
    parser.add_argument("--k", type=_k_argument, default=20,
                        help="number of concepts, or 'auto': the most stable across three seeds of "
                             + ", ".join(map(str, K_CANDIDATES)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-on", default="base", choices=("base", "tuned"))
    parser.add_argument("--steer", default="concept", choices=STEER_MODES,
                        help="steer the base with the global shift or concept-wise (each position gets the shift "
                             "of its nearest base concept)")
    parser.add_argument("--steer-positions", default="last", choices=STEER_POSITIONS,
                        help="positions steered: every one, the last prompt token, or from it on (generation)")
    parser.add_argument("--steer-layer", help="layer to steer at, or 'final' (default: the lowest KL at strength 1 "
                                              "on every other prompt; the curve is measured on the rest)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])


def _k_argument(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"--k {text!r}: pass a positive number of concepts or 'auto'")


def run_cli(args) -> None:
    from interp.cli import prompts_from_args
    from interp.models import load_pair

    prompts = prompts_from_args(args, args.tuned)
    pair = load_pair(args.base, args.tuned, device=args.device, dtype=args.dtype, backend=args.backend)
    if args.k == "auto":
        fitted = pair.base if args.fit_on == "base" else pair.tuned
        args.k, table = choose_k(fitted, prompts, seeds=(args.seed, args.seed + 1, args.seed + 2), layers=args.layers,
                                 site=args.site, method=args.method)
        _write_stability(table, args.out)
        print(f"K = {args.k} (most stable of {', '.join(map(str, table))}: worst-layer matched cosine "
              f"{min(table[args.k].values()):.3f})")
    result = measure(pair, prompts, layers=args.layers, site=args.site, method=args.method, k=min(args.k, len(prompts)),
                     seed=args.seed, fit_on=args.fit_on)
    train, test = prompts[::2], prompts[1::2]  # shifts, concepts and the layer / the steering curve
    if args.steer_layer is not None:
        layers = ["final" if args.steer_layer == "final" else int(args.steer_layer)]
    else:
        layers = [*(args.layers or range(pair.base.n_layers)), "final"]
    sweep = steering_curve(pair, train, test, mode=args.steer, positions=args.steer_positions, layers=layers,
                           k=args.k, seed=args.seed, strengths=args.strengths, held_out=_held_out(args))
    write(result, sweep, args.out)
    frame = result.to_frame()
    print(f"shift written to {args.out}: {len(frame)} concept rows; mean relative error base "
          f"{frame.rel_error_base.mean():.3f}, global {frame.rel_error_global.mean():.3f}, concept "
          f"{frame.rel_error_concept.mean():.3f}; {sweep['label']} steering at layer {sweep['layer']}: KL "
          f"{sweep['kl_unsteered']:.3f} -> {min(sweep['kl']):.3f} (best closure {max(sweep['closure']):.1%})")


def _held_out(args) -> tuple[list[str], list[str]] | None:
    """On tiny-zoo models: the first pre-training skill's test prompts and answers; otherwise none."""
    from interp import zoo

    if args.prompts is not None or not zoo.in_tiny_zoo(args.tuned):
        return None

    examples = zoo.task_prompts(zoo.SKILLS[0], args.n_prompts, split="test")
    return [e.prompt for e in examples], [e.answer for e in examples]


def _write_stability(table: dict[int, dict[str, float]], out: str | Path) -> None:
    """`choose_k`'s table as `k_stability.csv`: one row per K, one column per site."""
    import pandas as pd

    Path(out).mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame.from_dict(table, orient="index").rename_axis("k").reset_index()
    frame.to_csv(Path(out) / "k_stability.csv", index=False, float_format="%.4f")


def write(result: ShiftResult, sweep: dict | None, out: str | Path) -> None:
    """Result (tensors + CSV) and figures into `out`; `redraw(out)` re-draws the figures from these files."""
    out = Path(out)
    result.save(out / "result")
    result.to_frame().to_csv(out / "shift.csv", index=False)
    if sweep is not None:
        (out / "steering.json").write_text(json.dumps(sweep, indent=1))
    save_figures(result, sweep, out / "figures")


def redraw(out: str | Path) -> list[Path]:
    """Re-draw every figure from the files saved by `write` (no model is run)."""
    out = Path(out)
    sweep = json.loads((out / "steering.json").read_text()) if (out / "steering.json").is_file() else None
    return save_figures(ShiftResult.load(out / "result"), sweep, out / "figures")
