"""Representations of chosen inputs, concept dictionaries learned on them (K-means, PCA, semi-NMF), matching two
dictionaries, and choosing K by the stability of the dictionaries across seeds."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.capture import capture
from interp.errors import BadOption
from interp.models import Model, model_label
from interp.plotting import figure, integer_ticks
from interp.prompts import PromptSet, Tokens, as_tokens, position_index
from interp.results import Result

METHODS = ("kmeans", "pca", "semi-nmf")
RESTARTS = 32  # K-means restarts: with fewer, at K = 20 the seed stays visible in the concepts
K_CANDIDATES = (8, 12, 16, 20, 24, 32, 40)

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
    if isinstance(positions, Tensor):
        where = positions[:, : tokens.ids.shape[1]].logical_and(tokens.mask).nonzero()
        return where[:, 0], where[:, 1]
    chosen = [positions] if isinstance(positions, (int, str)) else list(positions)
    cols = torch.stack([position_index(tokens.lengths, p) for p in chosen], 1)  # [prompt, chosen]
    return torch.arange(len(tokens)).repeat_interleave(len(chosen)), cols.reshape(-1)


def mean_difference(model: Model, target: PromptSet | Sequence[str], source: PromptSet | Sequence[str], site: str,
                    positions="last", **kw) -> Float[Tensor, " d_model"]:
    """mean h(target) - mean h(source) at `site` (e.g. `resid_post.2`): the paper's steering vector."""
    def mean(prompts):
        return representations(model, as_tokens(model, prompts), [site], positions, **kw)[site].mean(0)
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
        raise BadOption(f"k={k} concepts for {len(x)} inputs; pass 1 <= k <= the number of inputs")
    if method == "kmeans":
        centroids = kmeans(x, k, seed=seed, restarts=restarts, iters=iters)
        return Concepts(method, centroids.float(), -torch.cdist(x, centroids).float(), torch.zeros(x.shape[1]))
    if method == "pca":
        if k > min(x.shape):
            raise BadOption(f"k={k} principal directions of {len(x)} inputs in {x.shape[1]} dimensions; "
                            f"pass k <= {min(x.shape)}")
        mean = x.mean(0)
        components = torch.linalg.svd(x - mean, full_matrices=False).Vh[:k]
        # activation = |projection| (a direction's sign is arbitrary)
        return Concepts(method, components.float(), ((x - mean) @ components.T).abs().float(), mean.float())
    if method == "semi-nmf":
        g, f = semi_nmf(x, k, seed=seed, iters=iters)
        return Concepts(method, f.float(), g.float(), torch.zeros(x.shape[1]))
    raise BadOption(f"unknown concept method {method!r}; use one of {', '.join(METHODS)}")


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


# ------------------------------------------------------------------------------------------- choosing K

def stability(x: Float[Tensor, "item d"], k: int, seeds: Sequence[int] = (0, 1), method: str = "kmeans") -> float:
    """Mean cosine of matched concepts (`match_concepts`) between the dictionaries learned with each two of
    `seeds`, averaged over the pairs: 1 when every seed finds the same K concepts."""
    if len(seeds) < 2:
        raise BadOption(f"stability compares seeds; pass at least two, got {list(seeds)}")
    vectors = [learn_concepts(x, k, method, seed=s).vectors for s in seeds]
    pairs = list(itertools.combinations(vectors, 2))
    return sum(float(match_concepts(a, b, signed=method == "kmeans")[1].mean()) for a, b in pairs) / len(pairs)


@dataclass
class KStability(Result):
    """`stability[i, j]`: the seeds' mean matched cosine at K = `candidates[i]` on `sites[j]` of `model`; `k` the
    chosen K (the one whose least stable site is the most stable)."""

    ANALYSIS = "shift"
    model: str
    k: int
    candidates: list[int]
    sites: list[str]
    stability: Float[Tensor, "candidate site"]

    def table(self) -> dict[int, dict[str, float]]:
        """{K: {site: stability}}."""
        return {int(k): {s: float(v) for s, v in zip(self.sites, row)}
                for k, row in zip(self.candidates, self.stability)}

    def to_frame(self):
        """One row per K, one column per site."""
        import pandas as pd

        frame = pd.DataFrame(self.stability.numpy(), columns=list(self.sites))
        frame.insert(0, "k", list(self.candidates))
        return frame

    def plot(self, ax=None):
        """Stability against K, one line per site; the chosen K marked."""
        if ax is None:
            ax = figure()[1][0, 0]
        for j, s in enumerate(self.sites):
            ax.plot(self.candidates, self.stability[:, j].numpy(), marker="o", markersize=3, label=s)
        ax.axvline(self.k, ls=":", color="grey")
        ax.set(xlabel="K (concepts)", ylabel="matched cosine across seeds",
               title=f"Concept stability of {model_label(self.model)}")
        ax.legend()
        return integer_ticks(ax, "x")


def choose_k(model: Model, prompts: PromptSet | Sequence[str] | Tokens, candidates: Sequence[int] = K_CANDIDATES,
             *, seeds: Sequence[int] = (0, 1, 2), layers: Sequence[int] | None = None, site: str = "resid_post",
             positions="last", method: str = "kmeans", batch_size: int = 16, progress: bool = True) -> KStability:
    """K by stability (Ben-Hur et al. 2002): `stability` of `model`'s dictionaries at every layer for each
    candidate K; the chosen K is the one whose least stable layer is the most stable (the smaller K on ties)."""
    layers = list(range(model.n_layers)) if layers is None else [int(layer) for layer in layers]
    h = representations(model, as_tokens(model, prompts), sites_for(site, layers), positions, batch_size=batch_size)
    n_items = len(next(iter(h.values())))
    candidates = [k for k in candidates if k <= n_items]
    if not candidates:
        raise BadOption(f"every candidate K exceeds the {n_items} inputs; pass smaller candidates")
    steps = tqdm([(k, s) for k in candidates for s in h], desc="concept stability", disable=not progress,
                 leave=False)
    table: dict[int, dict[str, float]] = {k: {} for k in candidates}
    for k, s in steps:
        table[k][s] = stability(h[s], k, seeds, method)
    chosen = max(candidates, key=lambda k: (min(table[k].values()), -k))
    values = torch.tensor([[table[k][s] for s in h] for k in candidates], dtype=torch.float64)
    return KStability(model.name, chosen, list(candidates), list(h), values,
                      settings={"seeds": list(seeds), "layers": layers, "site": site, "method": method,
                                "positions": positions if isinstance(positions, (str, int)) else "custom"})
