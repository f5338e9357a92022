"""Concept dictionaries and shifts streamed from activation stores (`interp.store`), for corpora whose
representations do not fit in memory: what `learn_concepts` and `measure` compute, from batches read one at a time.

    concepts = learn_concepts_streamed(lambda: base_store.batches("resid_post.2", 8192), k=20)
    result = measure_stores(base_store, tuned_store, "resid_post.2", k=20)        # a StreamedShifts

K-means: the start is `kmeans` (greedy k-means++, restarts) on a seeded sample of `sample` rows, then exact Lloyd
passes over the whole stream (sums in float64) until at most a fraction `tol` of the rows changes concept (0: none),
at most `iters` passes. PCA: the mean
and covariance accumulated in one pass (float64) and their top-k eigenvectors. Semi-NMF needs every row in memory:
fit it with `learn_concepts` on a sample. A stream must give the same rows in the same order at every pass (a
store's `batches` without a shuffle seed, or with a fixed one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses.shift.concepts import RESTARTS, Concepts, kmeans
from analyses.shift.result import RECOVERY, recovery
from interp.errors import BadOption
from interp.plotting import figure
from interp.results import Result
from interp.store import ActivationStore

Batches = Callable[[], Iterable[Tensor]]
"""Starts a pass over the rows: an iterable of [batch, d_model] tensors, the same rows in the same order each call."""
SAMPLE = 20_000


def concept_activations(concepts: Concepts, x: Float[Tensor, "item d_model"]) -> Float[Tensor, "item concept"]:
    """Activations of rows `x` for a K-means or PCA dictionary, as `learn_concepts` defines them (K-means: minus the
    distance to each centroid; PCA: |projection| of x - mean), float64."""
    x = x.double()
    if concepts.method == "kmeans":
        return -torch.cdist(x, concepts.vectors.double())
    if concepts.method == "pca":
        return ((x - concepts.mean.double()) @ concepts.vectors.double().T).abs()
    raise BadOption(f"concept activations of new rows need a kmeans or pca dictionary, not {concepts.method}")


def learn_concepts_streamed(batches: Batches, k: int, method: str = "kmeans", *, seed: int = 0,
                            restarts: int = RESTARTS, iters: int = 100, sample: int = SAMPLE,
                            tol: float = 1e-4) -> Concepts:
    """K concepts of the streamed rows with `method` ("kmeans" or "pca"; module docstring), seeded. The
    per-item `activations` are not kept (an empty [0, concept]): `concept_activations` gives them for any rows."""
    if method == "kmeans":
        centroids = _kmeans(batches, k, seed, restarts, iters, sample, tol)
        return Concepts(method, centroids.float(), torch.empty(0, k), torch.zeros(centroids.shape[1]))
    if method == "pca":
        n, total, outer = 0, 0.0, 0.0
        for x in batches():
            x = x.double()
            n, total, outer = n + len(x), total + x.sum(0), outer + x.T @ x
        mean = total / n
        if not 1 <= k <= min(n, len(mean)):
            raise BadOption(f"k={k} principal directions of {n} inputs in {len(mean)} dimensions")
        values, vectors = torch.linalg.eigh(outer / n - mean[:, None] * mean[None])
        return Concepts(method, vectors[:, -k:].flip(-1).T.float(), torch.empty(0, k), mean.float())
    raise BadOption(f"concept method {method!r} cannot learn from a stream; use kmeans or pca (or learn_concepts on "
                    f"a sample)")


def _kmeans(batches: Batches, k: int, seed: int, restarts: int, iters: int, sample: int,
            tol: float) -> Float[Tensor, "k d"]:
    n = sum(len(x) for x in batches())
    if not 1 <= k <= n:
        raise BadOption(f"k={k} concepts for {n} inputs; pass 1 <= k <= the number of inputs")
    picked = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample].sort().values
    centroids = kmeans(_rows(batches, picked), k, seed=seed, restarts=restarts)
    previous = None
    for _ in range(iters):
        sums, counts, assign = torch.zeros_like(centroids), torch.zeros(k, dtype=torch.float64), []
        for x in batches():
            x = x.double()
            a = torch.cdist(x, centroids).argmin(1)
            sums.index_add_(0, a, x)
            counts += a.bincount(minlength=k)
            assign.append(a.int())
        assign = torch.cat(assign)
        if previous is not None and int((assign != previous).sum()) <= tol * n:
            break
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        previous = assign
    return centroids


def _rows(batches: Batches, index: Int[Tensor, " n"]) -> Float[Tensor, "n d"]:
    """The streamed rows at ascending indices `index`, float64, in one pass."""
    out, start = [], 0
    for x in batches():
        lo, hi = (int(torch.searchsorted(index, v)) for v in (start, start + len(x)))
        out.append(x[index[lo:hi] - start].double())
        start += len(x)
    return torch.cat(out)


@dataclass
class StreamedShifts(Result):
    """Concept shifts at one site from streamed pairs (`concept_shifts_streamed`), as `ShiftResult` holds them for one
    layer: `concepts`, `shifts` [concept, d_model] (Delta_k), `global_shift` [d_model], `counts` [concept] (|A_k|),
    and `cos`, `rel_error` [concept, 3]: mean recovery over A_k for h_base, + global shift, + Delta_k (RECOVERY)."""

    ANALYSIS = "shift"
    site: str
    method: str
    fit_on: str
    concepts: Float[Tensor, "concept d_model"]
    shifts: Float[Tensor, "concept d_model"]
    global_shift: Float[Tensor, " d_model"]
    counts: Int[Tensor, " concept"]
    cos: Float[Tensor, "concept 3"]
    rel_error: Float[Tensor, "concept 3"]
    label: str = "corpus"

    @property
    def k(self) -> int:
        return self.concepts.shape[0]

    def to_frame(self):
        """One row per concept: size, shift norm, recovery (cosine and relative error of each guess)."""
        import pandas as pd

        rows = []
        for c in range(self.k):
            row = {"site": self.site, "concept": c, "n": int(self.counts[c]),
                   "shift_norm": float(self.shifts[c].norm())}
            for j, name in enumerate(RECOVERY):
                row[f"cos_{name}"], row[f"rel_error_{name}"] = float(self.cos[c, j]), float(self.rel_error[c, j])
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """||Delta_k|| per concept, with the global shift's norm as a line."""
        if ax is None:
            ax = figure()[1][0, 0]
        ax.bar(range(self.k), self.shifts.norm(dim=-1).numpy())
        ax.axhline(float(self.global_shift.norm()), ls=":", color="grey", label="global shift")
        ax.set(xlabel="concept", ylabel=r"$\|\Delta_k\|$", title=f"Concept shift norms at {self.site} ({self.label})")
        ax.legend()
        return ax


def concept_shifts_streamed(pairs: Callable[[], Iterable[tuple[Tensor, Tensor]]], concepts: Concepts, *,
                            site: str = "", fit_on: str = "base", label: str = "corpus") -> StreamedShifts:
    """Delta_k, |A_k|, the global shift and the recovery of each concept over streamed (h_base, h_tuned) batch pairs
    (two passes), each input assigned to the concept of its `fit_on` representation."""
    if fit_on not in ("base", "tuned"):
        raise BadOption(f"fit_on={fit_on!r}; use 'base' or 'tuned'")
    k, d = concepts.vectors.shape
    n, counts, sums, total = 0, torch.zeros(k, dtype=torch.float64), torch.zeros(k, d, dtype=torch.float64), 0.0
    for hb, ht in pairs():
        a = _assign(concepts, hb, ht, fit_on)
        diff = (ht - hb).double()
        n, total = n + len(hb), total + diff.sum(0)
        counts += a.bincount(minlength=k)
        sums.index_add_(0, a, diff)
    shifts, global_shift = (sums / counts.clamp_min(1)[:, None]).float(), (total / n).float()
    scores = torch.zeros(2, k, len(RECOVERY), dtype=torch.float64)  # [cos or rel_error, concept, guess]
    for hb, ht in pairs():
        a = _assign(concepts, hb, ht, fit_on)
        guesses = (torch.zeros_like(hb), global_shift.expand_as(hb), shifts[a])
        for j, guess in enumerate(guesses):
            r = recovery(hb.float(), ht.float(), guess)
            scores[0, :, j].index_add_(0, a, r["cos"].double())
            scores[1, :, j].index_add_(0, a, r["rel_error"].double())
    scores = (scores / counts.clamp_min(1)[None, :, None]).float()
    return StreamedShifts(site, concepts.method, fit_on, concepts.vectors, shifts, global_shift, counts.long(),
                          scores[0], scores[1], label, settings={"k": k, "method": concepts.method, "fit_on": fit_on})


def _assign(concepts: Concepts, hb: Tensor, ht: Tensor, fit_on: str) -> Int[Tensor, " item"]:
    return concept_activations(concepts, hb if fit_on == "base" else ht).argmax(-1)


def measure_stores(base: ActivationStore, tuned: ActivationStore, site: str, *, k: int = 20, method: str = "kmeans",
                   seed: int = 0, fit_on: str = "base", batch_size: int = 8192, restarts: int = RESTARTS,
                   iters: int = 100, sample: int = SAMPLE, tol: float = 1e-4,
                   label: str | None = None) -> StreamedShifts:
    """Concepts of the `fit_on` store's rows at `site` and their shifts between two stores of the same corpus
    (every token an input), streamed."""
    base.check_aligned(tuned)
    fit = base if fit_on == "base" else tuned
    concepts = learn_concepts_streamed(lambda: fit.batches(site, batch_size), k, method, seed=seed,
                                       restarts=restarts, iters=iters, sample=sample, tol=tol)
    result = concept_shifts_streamed(lambda: base.paired_batches(tuned, site, batch_size), concepts,
                                     site=base.key(site), fit_on=fit_on, label=label or "corpus")
    result.settings.update({"seed": seed, "iters": iters, "sample": sample, "tol": tol,
                            "stores": [str(base.path), str(tuned.path)]})
    return result
