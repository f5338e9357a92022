"""LID: local intrinsic dimension of contextual token embeddings (Ruppik et al., 2025, "Less is More").

    cloud = point_cloud(model, prompts, layer=-1, n_tokens=60_000)         # one site's token vectors
    result = measure(pair, prompts, layers=range(4))                         # local ID of every point
    series = measure_series(base, load_series("zoo:series"), prompts, task=(prompts, answers))
    with steer(model, "resid_post.2", v, reference=cloud): ...               # on-manifold steering

Point cloud: the vectors at a site (`resid_post.l`, or "final", the final norm's output) of N non-pad tokens
sampled with a seeded generator, each with the prompt and position it came from. With `deduplicate`, a token
whose whole prefix repeats an earlier token's is dropped before the forward (in a causal model it has the same
vector, and deciding on token ids is immune to batch-dependent round-off), and exactly equal vectors left
after it are dropped too, as the reference code does.

Local ID of each point: TwoNN on its k nearest neighbours (scikit-dimension's pointwise TwoNN, 10% of the
ratios discarded: the reference code's estimator) or the Levina-Bickel MLE on them; the global TwoNN of the
cloud comes from the same k-NN pass. The numerics, chunked on the device, are in `analyses.lid_estimators`.

Steering (ours, METHODS.md section 5): a steering vector v at a site is replaced, at each position x, by its
projection onto the local tangent space of a reference cloud: the top principal directions of x's k nearest
reference points, as many as the rounded local ID at x. `compare_steering` scales the raw and the projected
vector to equal effect (KL of the next-token distribution, or a target token's probability) and reports how
far the steered points land from the reference cloud and the LID of the steered cloud.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from analyses.lid_estimators import (
    MEMORY_BUDGET, distinct_rows, knn, levina_bickel_from_distances, neighbourhood_twonn, twonn_from_distances,
)
from interp.capture import DEFAULT_BUDGET, capture
from interp.errors import BadPrompts
from interp.intervene import Edit, add, replace
from interp.models import Model, Pair
from interp.plotting import PALETTE, figure, model_color, paper_style, save_figure
from interp.prompts import Batch, Tokens, tokenize
from interp.results import load_result, save_result
from interp.sites import Site, site as parse_site

K = 128
"""Neighbours per local estimate (the reference code's L)."""
N_TOKENS = 60_000
"""Points per cloud (the paper's N)."""
ESTIMATORS = ("twonn", "mle")


# ------------------------------------------------------------------------------------------- point clouds

@dataclass
class PointCloud:
    """Token vectors at one site: `points` [point, d_model], and for each the prompt (row in the prompt set)
    and canonical position it came from."""

    site: str
    points: Float[Tensor, "point d_model"]
    prompt: Int[Tensor, " point"]
    position: Int[Tensor, " point"]

    def __len__(self) -> int:
        return len(self.points)


def layer_site(model: Model, layer: int | str | Site | None = None) -> Site:
    """None: the last layer's resid_post (the paper's default); an int: resid_post of that layer (negative counts
    from the end); "final": the final norm's output; any other site name as `interp.sites.site` reads it."""
    if layer is None:
        layer = -1
    if isinstance(layer, int):
        return Site("resid_post", model.n_layers + layer if layer < 0 else layer).check(model.n_layers, model.n_heads)
    return parse_site(layer).check(model.n_layers, model.n_heads)


def sample_tokens(tokens: Tokens, n_tokens: int | None = N_TOKENS, seed: int = 0,
                  deduplicate: bool = True) -> Bool[Tensor, "prompt pos"]:
    """Mask of the sampled tokens: `n_tokens` real tokens (all when None or fewer) drawn without replacement by a
    generator seeded with `seed`; with `deduplicate`, only the first token of every distinct prefix can be drawn."""
    candidates = tokens.mask & _first_of_each_prefix(tokens) if deduplicate else tokens.mask
    where = candidates.nonzero()
    if n_tokens is not None and n_tokens < len(where):
        draw = torch.randperm(len(where), generator=torch.Generator().manual_seed(seed))[:n_tokens]
        where = where[draw.sort().values]
    chosen = torch.zeros_like(candidates)
    chosen[where[:, 0], where[:, 1]] = True
    return chosen


def _first_of_each_prefix(tokens: Tokens) -> Bool[Tensor, "prompt pos"]:
    """True at every token whose prefix (itself and everything before it) is seen for the first time,
    in prompt order."""
    prefixes: dict[tuple[int, int], int] = {}  # a trie: (parent prefix, token) -> prefix
    new = []
    for r, (row, length) in enumerate(zip(tokens.ids.tolist(), tokens.lengths.tolist())):
        parent = -1
        for p in range(length):
            key = (parent, row[p])
            if key not in prefixes:
                prefixes[key] = len(prefixes)
                new.append((r, p))
            parent = prefixes[key]
    first = torch.zeros(tokens.ids.shape, dtype=torch.bool)
    first[tuple(torch.tensor(new).reshape(-1, 2).T)] = True
    return first


def point_clouds(model: Model, prompts, layers=None, *, n_tokens: int | None = N_TOKENS, seed: int = 0,
                 deduplicate: bool = True, edits: Sequence = (), batch_size: int = 16, backend: str | None = None,
                 memory_budget: int = DEFAULT_BUDGET, shard_dir: str | Path | None = None,
                 progress: bool = True) -> dict[str, PointCloud]:
    """Point clouds of the same sampled tokens at each of `layers` (see `layer_site`; None: the last layer),
    keyed by site name. `edits` apply during the forward (e.g. a steering edit)."""
    return dict(_clouds(model, prompts, layers, n_tokens=n_tokens, seed=seed, deduplicate=deduplicate, edits=edits,
                        batch_size=batch_size, backend=backend, memory_budget=memory_budget, shard_dir=shard_dir,
                        progress=progress))


def point_cloud(model: Model, prompts, layer: int | str | Site | None = None, **kwargs) -> PointCloud:
    """The point cloud at one site; keyword arguments as `point_clouds`."""
    (cloud,) = point_clouds(model, prompts, [layer], **kwargs).values()
    return cloud


def _clouds(model: Model, prompts, layers, *, n_tokens, seed, deduplicate, edits=(), batch_size=16, backend=None,
            memory_budget=DEFAULT_BUDGET, shard_dir=None, progress=True) -> Iterator[tuple[str, PointCloud]]:
    """One capture of the sampled tokens at every site, then the clouds one site at a time."""
    tokens = _tokens(model, prompts)
    sites = [layer_site(model, layer) for layer in _as_list(layers)]
    chosen = sample_tokens(tokens, n_tokens, seed, deduplicate)
    acts = capture(model, tokens, sites, positions=chosen, edits=edits, batch_size=batch_size, backend=backend,
                   memory_budget=memory_budget, shard_dir=shard_dir, progress=progress)
    where = acts.selected
    for s in sites:
        points = acts[s]
        keep = distinct_rows(points) if deduplicate else torch.arange(len(points))
        yield str(s), PointCloud(str(s), points[keep], where[keep, 0], where[keep, 1])


def _tokens(model: Model, prompts) -> Tokens:
    return prompts if isinstance(prompts, Tokens) else tokenize(model.tokenizer, prompts, max_length=model.n_ctx)


def _as_list(layers) -> list:
    if layers is None or isinstance(layers, (int, str, Site)):
        return [layers]
    return list(layers)


# ------------------------------------------------------------------------------------------------ estimates

def estimate(points: Float[Tensor, "point d_model"], k: int = K, estimator: str = "twonn", *,
             discard_fraction: float = 0.1, dtype: torch.dtype = torch.float32, device=None,
             memory_budget: int = MEMORY_BUDGET) -> tuple[Float[Tensor, " point"], float]:
    """Local ID of every point ("twonn": pointwise TwoNN on its k nearest neighbours; "mle": Levina-Bickel on
    them) and the global TwoNN of the cloud, from one k-NN pass."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if len(points) <= k:
        raise BadPrompts(f"the cloud has {len(points)} distinct tokens, not more than k={k} neighbours; "
                         f"pass more prompts or a smaller k")
    x = points.to(device=device or points.device, dtype=dtype)
    distances, neighbours = knn(x, k, dtype=dtype, memory_budget=memory_budget)
    if estimator == "twonn":
        local = neighbourhood_twonn(x, distances, neighbours, neighbours, discard_fraction,
                                    memory_budget=memory_budget)
    else:
        local = levina_bickel_from_distances(distances)
    return local.cpu(), twonn_from_distances(distances, discard_fraction)


def _finite(t: Tensor) -> Tensor:
    return t[t.isfinite()]


def summary(lid: Float[Tensor, " point"]) -> dict[str, float]:
    """n, mean, median, std and quartiles of the finite local IDs."""
    v = _finite(lid).double()
    if len(v) == 0:
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "std": float("nan"), "q25": float("nan"),
                "q75": float("nan")}
    q25, median, q75 = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype)).tolist()
    return {"n": len(v), "mean": float(v.mean()), "median": median, "std": float(v.std()) if len(v) > 1 else 0.0,
            "q25": q25, "q75": q75}


@dataclass
class LIDResult:
    """Local ID of every sampled token, per model and site, on one prompt set.

    lid[model, site]             [point]  local ID (dimensionless; NaN where the estimator is undefined)
    prompt, position[model, site] [point]  which token each point is (row in `prompts`, canonical position)
    global_id[model, site]       float    global TwoNN of the cloud
    """

    models: list[str]
    sites: list[str]
    prompts: list[str]
    lid: dict[tuple[str, str], Tensor]
    prompt: dict[tuple[str, str], Tensor]
    position: dict[tuple[str, str], Tensor]
    global_id: dict[tuple[str, str], float]
    estimator: str = "twonn"
    k: int = K
    label: str = "prompts"
    settings: dict = field(default_factory=dict)

    def mean(self, model: str, site: str) -> float:
        return summary(self.lid[model, site])["mean"]

    def to_frame(self):
        """One row per model and site: label, model, site, n, mean, median, std, q25, q75, global_twonn."""
        import pandas as pd

        rows = [{"label": self.label, "model": m, "site": s, **summary(self.lid[m, s]),
                 "global_twonn": self.global_id[m, s], "estimator": self.estimator, "k": self.k}
                for m in self.models for s in self.sites]
        return pd.DataFrame(rows)

    def points_frame(self):
        """One row per point: label, model, site, prompt, position, lid."""
        import pandas as pd

        return pd.concat([pd.DataFrame({"label": self.label, "model": m, "site": s, "prompt": self.prompt[m, s].numpy(),
                                        "position": self.position[m, s].numpy(), "lid": self.lid[m, s].numpy()})
                          for m in self.models for s in self.sites], ignore_index=True)

    def plot(self, ax=None):
        """Mean LID per layer, one line per model."""
        return plot_layers([self], ax)

    def save(self, folder: str | Path) -> Path:
        tensors = {}
        for i, m in enumerate(self.models):
            for j, s in enumerate(self.sites):
                for name in ("lid", "prompt", "position"):
                    tensors[f"{name}.{i}.{j}"] = getattr(self, name)[m, s]
        meta = {"analysis": "lid", "models": self.models, "sites": self.sites, "prompts": self.prompts,
                "global_id": [[self.global_id[m, s] for s in self.sites] for m in self.models],
                "estimator": self.estimator, "k": self.k, "label": self.label, "settings": self.settings}
        return save_result(folder, tensors, meta)

    @classmethod
    def load(cls, folder: str | Path) -> LIDResult:
        tensors, meta = load_result(folder)
        models, sites = meta["models"], meta["sites"]
        per = {name: {(m, s): tensors[f"{name}.{i}.{j}"] for i, m in enumerate(models) for j, s in enumerate(sites)}
               for name in ("lid", "prompt", "position")}
        global_id = {(m, s): meta["global_id"][i][j] for i, m in enumerate(models) for j, s in enumerate(sites)}
        return cls(models, sites, meta["prompts"], per["lid"], per["prompt"], per["position"], global_id,
                   meta["estimator"], meta["k"], meta["label"], meta["settings"])


def measure(models: Pair | Model | dict[str, Model], prompts: Sequence[str] | Tokens, layers=None, *, k: int = K,
            n_tokens: int | None = N_TOKENS, estimator: str = "twonn", discard_fraction: float = 0.1, seed: int = 0,
            deduplicate: bool = True, dtype: torch.dtype = torch.float32, device=None,
            memory_budget: int = MEMORY_BUDGET, label: str = "prompts", batch_size: int = 16,
            backend: str | None = None, shard_dir: str | Path | None = None, progress: bool = True) -> LIDResult:
    """Local ID of the same sampled tokens' vectors in every model at every one of `layers` (see `layer_site`).

    `models`: a Pair (base and tuned), one Model, or {name: Model}. k-NN runs on `device` (default: each model's)
    in `dtype` (torch.float64 for reference-grade numbers), in chunks of `memory_budget` bytes.
    """
    named = _named(models)
    texts = _texts(prompts)
    lid, prompt, position, global_id = {}, {}, {}, {}
    sites = []
    for name, model in named.items():
        for s, cloud in _clouds(model, prompts, layers, n_tokens=n_tokens, seed=seed, deduplicate=deduplicate,
                                batch_size=batch_size, backend=backend, shard_dir=shard_dir, progress=progress):
            local, global_id[name, s] = estimate(cloud.points, k, estimator, discard_fraction=discard_fraction,
                                                 dtype=dtype, device=device or model.device,
                                                 memory_budget=memory_budget)
            lid[name, s], prompt[name, s], position[name, s] = local, cloud.prompt, cloud.position
            if s not in sites:
                sites.append(s)
    settings = {"n_tokens": n_tokens, "seed": seed, "deduplicate": deduplicate, "discard_fraction": discard_fraction,
                "dtype": str(dtype).removeprefix("torch.")}
    return LIDResult(list(named), sites, texts, lid, prompt, position, global_id, estimator, k, label, settings)


def _named(models) -> dict[str, Model]:
    if isinstance(models, Pair):
        names = [short_name(m.name) for m in models.models]
        names = names if names[0] != names[1] else ["base", "tuned"]
        return dict(zip(names, models.models))
    if isinstance(models, Model):
        return {short_name(models.name): models}
    return dict(models)


def short_name(name: str) -> str:
    """A model's name for tables and legends: zoo names as they are, folders by their last part."""
    return name if name.startswith("zoo:") or "/" not in name else Path(name).name


def _texts(prompts) -> list[str]:
    if isinstance(prompts, Tokens):
        return [str(r[:n].tolist()) for r, n in zip(prompts.ids, prompts.lengths)]
    return [p if isinstance(p, str) else str(list(p)) for p in prompts]


# ------------------------------------------------------------------------------------------ training dynamics

@dataclass
class SeriesResult:
    """LID along a checkpoint series: summaries [step, site] of the local IDs, and each checkpoint's task scores
    (`accuracy` and `loss` [step]; accuracy NaN without task answers)."""

    steps: list[int]
    sites: list[str]
    mean: Float[Tensor, "step site"]
    median: Float[Tensor, "step site"]
    q25: Float[Tensor, "step site"]
    q75: Float[Tensor, "step site"]
    accuracy: Float[Tensor, " step"]
    loss: Float[Tensor, " step"]
    label: str = "prompts"
    task: str = "task"
    estimator: str = "twonn"
    k: int = K

    def to_frame(self):
        """One row per checkpoint and site: step, site, mean, median, q25, q75, accuracy, loss."""
        import pandas as pd

        return pd.DataFrame([{"label": self.label, "step": step, "site": s, "mean": float(self.mean[i, j]),
                              "median": float(self.median[i, j]), "q25": float(self.q25[i, j]),
                              "q75": float(self.q75[i, j]), "accuracy": float(self.accuracy[i]),
                              "loss": float(self.loss[i])}
                             for i, step in enumerate(self.steps) for j, s in enumerate(self.sites)])

    def plot(self, ax=None):
        return plot_series(self, ax)

    def save(self, folder: str | Path) -> Path:
        tensors = {k: getattr(self, k) for k in ("mean", "median", "q25", "q75", "accuracy", "loss")}
        return save_result(folder, tensors, {"analysis": "lid-series", "steps": self.steps, "sites": self.sites,
                                             "label": self.label, "task": self.task, "estimator": self.estimator,
                                             "k": self.k})

    @classmethod
    def load(cls, folder: str | Path) -> SeriesResult:
        t, meta = load_result(folder)
        return cls(meta["steps"], meta["sites"], t["mean"], t["median"], t["q25"], t["q75"], t["accuracy"], t["loss"],
                   meta["label"], meta["task"], meta["estimator"], meta["k"])


def measure_series(base: Model | None, series, prompts, layers=None, *,
                   task: tuple[Sequence[str], Sequence[str]] | None = None, task_name: str = "task",
                   label: str = "prompts", device: str | None = None, **kwargs) -> SeriesResult:
    """LID of every checkpoint of `series` (an `interp.models.CheckpointSeries`, one checkpoint in memory at a
    time) on `prompts`, with its answer accuracy and loss on `task` = (prompts, answers), or without answers
    its mean loss on `prompts`. `base`, when given, is checked to be compatible with every checkpoint."""
    from interp.models import check_compatible
    from interp.scoring import answer_scores, loss

    rows, accuracy, losses, sites, estimator, k = [], [], [], [], "twonn", K
    for step, model in series.models(device=device or (str(base.device) if base is not None else "auto")):
        if base is not None:
            check_compatible(base, model)
        result = measure({f"step {step}": model}, prompts, layers, label=label, progress=False, **kwargs)
        sites, estimator, k = result.sites, result.estimator, result.k
        rows.append([summary(result.lid[f"step {step}", s]) for s in sites])
        if task is not None:
            scores = answer_scores(model, list(task[0]), list(task[1]))
            accuracy.append(float(scores.accuracy.mean()))
            losses.append(float(scores.loss.mean()))
        else:
            accuracy.append(float("nan"))
            losses.append(float(loss(model, prompts).mean()))
        del model  # before the next checkpoint loads
    stat = {name: torch.tensor([[r[name] for r in row] for row in rows], dtype=torch.float64)
            for name in ("mean", "median", "q25", "q75")}
    return SeriesResult(list(series.steps), sites, **stat, accuracy=torch.tensor(accuracy, dtype=torch.float64),
                        loss=torch.tensor(losses, dtype=torch.float64), label=label, task=task_name,
                        estimator=estimator, k=k)


# ------------------------------------------------------------------------------------- on-manifold steering

@dataclass(frozen=True, eq=False)
class Reference:
    """A reference cloud prepared for tangent spaces at new points: `points` [point, d_model] with their own
    k nearest neighbours (`distances`, `neighbours` [point, k], as `analyses.lid_estimators.knn` gives) and their
    pointwise TwoNN estimates `lid` [point]."""

    points: Float[Tensor, "point d_model"]
    distances: Float[Tensor, "point k"]
    neighbours: Int[Tensor, "point k"]
    lid: Float[Tensor, " point"]
    k: int

    def __repr__(self) -> str:
        return f"Reference({len(self.points)} points, d_model {self.points.shape[1]}, k={self.k})"


def prepare_reference(cloud: PointCloud | Tensor, k: int = K, *, dtype: torch.dtype = torch.float32, device=None,
                      discard_fraction: float = 0.1, memory_budget: int = MEMORY_BUDGET) -> Reference:
    """A reference cloud (a PointCloud or a [point, d_model] tensor) with its k-NN lists and local IDs, on `device`."""
    points = cloud.points if isinstance(cloud, PointCloud) else cloud
    if len(points) <= k:
        raise BadPrompts(f"the reference cloud has {len(points)} points, not more than k={k}; "
                         f"pass more reference prompts or a smaller k")
    x = points.to(device=device or points.device, dtype=dtype)
    distances, neighbours = knn(x, k, dtype=dtype, memory_budget=memory_budget)
    lid = neighbourhood_twonn(x, distances, neighbours, neighbours, discard_fraction, memory_budget=memory_budget)
    return Reference(x, distances, neighbours, lid, k)


def tangent_basis(reference: Reference | PointCloud | Tensor, points: Float[Tensor, "point d_model"], k: int = K, *,
                  dimension: int | None = None, memory_budget: int = MEMORY_BUDGET
                  ) -> tuple[Float[Tensor, "point r d_model"], Int[Tensor, " point"]]:
    """Local tangent space of the reference cloud at each of `points`: orthonormal rows [point, r, d_model], the
    top principal directions of the point's k nearest reference points (centred on their mean), as many as the
    rounded local ID there (or `dimension`); rows past a point's own dimension are zero. The local ID at a point
    is the mean pointwise TwoNN estimate of its k nearest reference points (scikit-dimension's smoothed `fit_pw`):
    one neighbourhood's estimate alone varies by about d / sqrt(k) from point to point.
    Returns the bases and the dimensions [point]."""
    ref = reference if isinstance(reference, Reference) else prepare_reference(reference, k)
    x = ref.points
    queries = points.to(x.device, x.dtype)
    _, hoods = knn(x, ref.k, queries=queries, dtype=x.dtype, memory_budget=memory_budget)
    most = min(ref.k - 1, x.shape[1])
    if dimension is None:
        dims = ref.lid[hoods].nanmean(dim=1).nan_to_num(1.0, posinf=most).round().clamp(1, most).long()
    else:
        dims = torch.full((len(queries),), min(int(dimension), most), dtype=torch.long, device=x.device)
    r = int(dims.max())
    chunk = max(1, memory_budget // (x.element_size() * ref.k * (x.shape[1] + ref.k)))
    bases = []
    for start in range(0, len(queries), chunk):
        hood = x[hoods[start : start + chunk]]
        directions = _principal_directions(hood - hood.mean(dim=1, keepdim=True), r)
        bases.append(directions * (torch.arange(r, device=x.device) < dims[start : start + chunk, None])[..., None])
    return torch.cat(bases), dims


def _principal_directions(centred: Float[Tensor, "n k d"], r: int) -> Float[Tensor, "n r d"]:
    """The top r right singular vectors of each centred neighbourhood, as rows (zero where degenerate)."""
    k, d = centred.shape[1:]
    if d <= k:
        _, vectors = torch.linalg.eigh(centred.mT @ centred)
        return vectors[..., -r:].flip(-1).mT
    values, vectors = torch.linalg.eigh(centred @ centred.mT)  # the k x k Gram: cheaper when k < d
    values, vectors = values[..., -r:].flip(-1), vectors[..., -r:].flip(-1)
    scale = values.clamp_min(0).sqrt()
    alive = scale > scale[..., :1] * torch.finfo(scale.dtype).eps * k
    return ((centred.mT @ vectors) / scale.clamp_min(torch.finfo(scale.dtype).tiny)[:, None, :] * alive[:, None, :]).mT


def tangent_projection(reference: Reference | PointCloud | Tensor, points: Float[Tensor, "point d_model"],
                       vector: Float[Tensor, " d_model"], k: int = K, *, dimension: int | None = None,
                       memory_budget: int = MEMORY_BUDGET) -> Float[Tensor, "point d_model"]:
    """`vector` projected onto the reference cloud's local tangent space at each of `points` (see `tangent_basis`)."""
    basis, _ = tangent_basis(reference, points, k, dimension=dimension, memory_budget=memory_budget)
    v = vector.to(basis.device, basis.dtype)
    return torch.einsum("nrd,nr->nd", basis, torch.einsum("nrd,...d->nr", basis, v)).to(points.device, points.dtype)


@dataclass(frozen=True, repr=False)
class TangentAdd(Edit):
    """x + scale * P_x v, with P_x the projection onto the reference cloud's tangent space at x (per position)."""

    vector: Tensor = None
    reference: Reference = None
    scale: float = 1.0
    dimension: int | None = None

    def transform(self, x: Tensor, batch: Batch) -> Tensor:
        steered = batch.from_canonical(batch.positions_mask(self.positions)).to(x.device)
        if not steered.any():
            return x
        out = x.clone()
        rows = x[steered]
        moved = tangent_projection(self.reference, rows, self.vector, dimension=self.dimension)
        out[steered] = rows + self.scale * moved.to(x.device, x.dtype)
        return out

    def __repr__(self) -> str:
        return (f"TangentAdd({self.site}, |v|={float(self.vector.norm()):.6g}, scale={self.scale}, "
                f"{self.reference!r}, dimension={self.dimension}, positions={self.positions!r})")


def tangent_add(s: Site | str, vector: Float[Tensor, " d_model"], reference: Reference, scale: float = 1.0,
                positions=None, dimension: int | None = None) -> TangentAdd:
    """The on-manifold counterpart of `interp.add`: add `vector` projected onto the local tangent space."""
    return TangentAdd(add(s, vector).site, vector=vector, reference=reference, scale=scale, positions=positions,
                      dimension=dimension)


@contextmanager
def steer(model: Model, site: int | str | Site, vector: Float[Tensor, " d_model"],
          reference: Reference | PointCloud | Tensor, *, scale: float = 1.0, positions=None, k: int = K,
          dimension: int | None = None):
    """Within the block, `model` runs with `scale * vector` added at `site`, projected at each position onto the
    tangent space of `reference` (activations at the same site). Yields the steered model."""
    ref = reference if isinstance(reference, Reference) else prepare_reference(reference, k, device=model.device)
    with model.edit(tangent_add(layer_site(model, site), vector, ref, scale, positions, dimension)):
        yield model


@dataclass
class SteeringResult:
    """Raw vs tangent-projected steering at equal effect. `table` has one row per method ("none": unsteered,
    "raw", "tangent"), target effect and measured site: the scale found, the effect reached, the mean norm of
    what was added, the mean distance of the steered points to their nearest reference point and the mean LID
    of the steered cloud."""

    site: str
    metric: str
    table: list[dict]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.table)

    def plot(self, ax=None):
        return plot_steering(self, ax)

    def save(self, folder: str | Path) -> Path:
        return save_result(folder, {}, {"analysis": "lid-steering", "site": self.site, "metric": self.metric,
                                        "table": self.table})

    @classmethod
    def load(cls, folder: str | Path) -> SteeringResult:
        _, meta = load_result(folder)
        return cls(meta["site"], meta["metric"], meta["table"])


def compare_steering(model: Model, site: int | str | Site, vector: Float[Tensor, " d_model"], prompts,
                     reference_prompts, *, effects: Sequence[float] = (0.1,), metric: str = "kl",
                     target: str | int | None = None, measure_layers=None, k: int = K,
                     n_tokens: int | None = N_TOKENS, seed: int = 0, positions=None, dimension: int | None = None,
                     tolerance: float = 0.02, batch_size: int = 16, progress: bool = False) -> SteeringResult:
    """Steer `model` on `prompts` with `vector` at `site`, raw (`interp.add`) and projected onto the tangent space
    of the reference cloud (`reference_prompts`' activations at `site`), each scaled (by a bracketed search) to every
    effect in `effects`: the mean KL(unsteered || steered) of the next-token distribution at each prompt's last token
    (metric="kl"), or the mean rise in probability of token `target` there (metric="target"). For each, measures
    the steered tokens at `measure_layers` (default: the steered site and the last layer) against the reference
    cloud there: distance to the nearest reference point, and the steered cloud's own LID."""
    steer_site = layer_site(model, site)
    measured = [layer_site(model, m) for m in _as_list(measure_layers)] if measure_layers is not None else \
        list(dict.fromkeys([steer_site, layer_site(model, None)]))
    kw = dict(n_tokens=n_tokens, seed=seed, batch_size=batch_size, progress=progress)
    references = point_clouds(model, reference_prompts, measured, **kw)
    ref = prepare_reference(references[str(steer_site)], k, device=model.device)
    tokens = _tokens(model, prompts)
    effect = _effect(model, tokens, metric, target, batch_size)
    # The projection at a position depends only on the unsteered activation there, so the search can use it
    # precomputed (x + s P(x), an `interp.replace`); the measured clouds use the TangentAdd edit itself.
    x = capture(model, tokens, [steer_site], batch_size=batch_size, progress=False)[steer_site]
    where = tokens.batch(torch.arange(len(tokens))).positions_mask(positions)
    moved = torch.zeros_like(x)
    moved[where] = tangent_projection(ref, x[where], vector, dimension=dimension)
    norms = {"raw": float(vector.norm()), "tangent": float(moved[where].norm(dim=-1).mean())}
    typical = float(x[where].norm(dim=-1).mean())  # searches start where |added| is 10% of a typical |x|

    def edit(method: str, s: float, exact: bool = False) -> Edit:
        if method == "raw":
            return add(steer_site, vector, scale=s, positions=positions)
        if exact:
            return tangent_add(steer_site, vector, ref, scale=s, positions=positions, dimension=dimension)
        return replace(steer_site, x + s * moved)

    table = [{"method": "none", "target_effect": 0.0, "scale": 0.0, "effect": 0.0, "added_norm": 0.0, **row}
             for row in _landing(point_clouds(model, tokens, measured, **kw), references, k)]
    for wanted in effects:
        for method in ("raw", "tangent"):
            s, reached = _scale_for_effect(lambda s: effect([edit(method, s)]), wanted, tolerance,
                                           start=0.1 * typical / max(norms[method], 1e-12))
            head = {"method": method, "target_effect": wanted, "scale": s, "effect": reached,
                    "added_norm": s * norms[method]}
            if math.isnan(s):  # not reachable
                table += [{**head, "site": str(m), "nn_distance": float("nan"), "lid": float("nan")} for m in measured]
                continue
            steered = point_clouds(model, tokens, measured, edits=[edit(method, s, exact=True)], **kw)
            table += [{**head, **row} for row in _landing(steered, references, k)]
    return SteeringResult(str(steer_site), metric, table)


def _landing(clouds: dict[str, PointCloud], references: dict[str, PointCloud], k: int) -> list[dict]:
    """Per site: mean distance of the cloud's points to their nearest reference point, and the cloud's mean LID."""
    rows = []
    for s, cloud in clouds.items():
        nearest, _ = knn(references[s].points, 1, queries=cloud.points)
        lid, _ = estimate(cloud.points, min(k, len(cloud) - 1))
        rows.append({"site": s, "nn_distance": float(nearest[:, 0].mean()), "lid": summary(lid)["mean"]})
    return rows


def _effect(model: Model, tokens: Tokens, metric: str, target, batch_size: int):
    """edits -> effect on the next-token distribution at each prompt's last token, against the unedited model."""
    def logprobs(edits) -> Tensor:
        acts = capture(model, tokens, [], positions="last", logits=True, edits=edits, batch_size=batch_size,
                       progress=False)
        return acts["logits"].double().log_softmax(-1)

    base = logprobs([])
    if metric == "kl":
        return lambda edits: float((base.exp() * (base - logprobs(edits))).sum(-1).mean())
    if metric == "target":
        if target is None:
            raise ValueError("metric='target' needs target= (a token or token id)")
        t = target if isinstance(target, int) else model.tokenizer.convert_tokens_to_ids(target)
        return lambda edits: float(logprobs(edits)[:, t].exp().mean() - base[:, t].exp().mean())
    raise ValueError(f"unknown metric {metric!r}; use 'kl' or 'target'")


def _scale_for_effect(effect, wanted: float, tolerance: float, start: float = 1.0, steps: int = 40,
                      largest: float = 2.0**16) -> tuple[float, float]:
    """(scale, effect reached) with effect(scale) within `tolerance` (relative) of `wanted`, searched from `start`;
    NaN scale if no scale up to `largest` reaches it. Effects grow like scale^2 near 0 (a KL; a probability rise
    grows slower), so each guess is scale * sqrt(wanted / reached), kept inside the bracket found so far (else its
    midpoint), and at least doubling the scale while no scale has overshot."""
    lo, hi, s = 0.0, math.inf, start
    last = s
    for _ in range(steps):
        reached = effect(s)
        if abs(reached - wanted) <= tolerance * wanted:
            return s, reached
        lo, hi = (s, hi) if reached < wanted else (lo, s)
        guess = s * math.sqrt(wanted / reached) if reached > 0 else 2 * s
        if hi == math.inf:
            guess = max(guess, 2 * s)
        elif not lo < guess < hi:
            guess = (lo + hi) / 2
        if guess > largest:
            break
        s, last = guess, s
    return (float("nan") if hi == math.inf else last), reached


# ------------------------------------------------------------------------------------------------ figures

LINESTYLES = ("-", "--", ":", "-.")


def _site_label(s: str) -> str:
    site = parse_site(s)
    return str(site.layer) if site.kind == "resid_post" else s


def _ordered_sites(results: Sequence[LIDResult]) -> list[str]:
    sites = dict.fromkeys(s for r in results for s in r.sites)
    return sorted(sites, key=lambda s: parse_site(s).order_key())


def plot_layers(results: Sequence[LIDResult], ax=None):
    """Mean local ID per layer: one line per model (colour) and prompt set (line style), IQR shaded."""
    with paper_style():  # titles, legends and twin axes made here take the paper style too
        if ax is None:
            ax = figure()[1][0, 0]
        sites = _ordered_sites(results)
        for i, r in enumerate(results):
            for m in r.models:
                x = [sites.index(s) for s in r.sites]
                stats = [summary(r.lid[m, s]) for s in r.sites]
                name = m if len(results) == 1 else f"{m}, {r.label}"
                ax.plot(x, [st["mean"] for st in stats], marker="o", ls=LINESTYLES[i % len(LINESTYLES)],
                        color=model_color(m), label=name)
                ax.fill_between(x, [st["q25"] for st in stats], [st["q75"] for st in stats], color=model_color(m),
                                alpha=0.12, lw=0)
        ax.set_xticks(range(len(sites)), [_site_label(s) for s in sites])
        ax.set(xlabel="layer", ylabel=f"mean local ID ({results[0].estimator}, k={results[0].k})",
               title="Local intrinsic dimension per layer")
        ax.legend()
        return ax


def plot_distribution(results: Sequence[LIDResult], ax=None, site: str | None = None):
    """Distribution of the local IDs at one site (default: the deepest measured) per prompt set and model."""
    with paper_style():  # titles, legends and twin axes made here take the paper style too
        if ax is None:
            ax = figure()[1][0, 0]
        site = site or _ordered_sites(results)[-1]
        groups = [(r, m) for r in results for m in r.models if (m, site) in r.lid]
        data = [_finite(r.lid[m, site]).numpy() for r, m in groups]
        parts = ax.violinplot(data, showmeans=True, showextrema=False)
        for body, (_, m) in zip(parts["bodies"], groups):
            body.set_facecolor(model_color(m))
            body.set_alpha(0.6)
        ax.set_xticks(range(1, len(groups) + 1), [f"{m}\n{r.label}" if len(results) > 1 else m for r, m in groups])
        ax.set(ylabel="local ID", title=f"Local ID distribution at {site}")
        return ax


def plot_series(series: SeriesResult, ax=None):
    """Mean local ID per checkpoint (IQR shaded), with the task accuracy (or loss) on a second axis."""
    with paper_style():  # titles, legends and twin axes made here take the paper style too
        if ax is None:
            ax = figure()[1][0, 0]
        for j, s in enumerate(series.sites):
            colour = PALETTE[j % len(PALETTE)]
            ax.plot(series.steps, series.mean[:, j].numpy(), marker="o", color=colour, label=f"mean LID, {s}")
            ax.fill_between(series.steps, series.q25[:, j].numpy(), series.q75[:, j].numpy(), color=colour,
                            alpha=0.15, lw=0)
        ax.set(xlabel="fine-tuning step", ylabel=f"mean local ID ({series.estimator})",
               title=f"LID along training ({series.label} prompts)")
        right = ax.twinx()
        has_accuracy = bool(series.accuracy.isfinite().any())
        metric = series.accuracy if has_accuracy else series.loss
        right.plot(series.steps, metric.numpy(), marker="s", ls="--", color="grey",
                   label=f"{series.task} {'accuracy' if has_accuracy else 'loss'}")
        right.set_ylabel(f"{series.task} {'accuracy' if has_accuracy else 'loss'}")
        right.grid(False)
        right.spines["right"].set_visible(True)
        handles = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        right.legend(handles[0] + more[0], handles[1] + more[1])
        return ax


def plot_steering(result: SteeringResult, ax=None, quantity: str = "nn_distance", site: str | None = None):
    """Raw vs tangent steering against the effect reached: `quantity` ("nn_distance" or "lid") of the steered
    points at `site` (default: the deepest measured); the unsteered value dotted."""
    with paper_style():  # titles, legends and twin axes made here take the paper style too
        if ax is None:
            ax = figure()[1][0, 0]
        rows = result.table
        site = site or sorted({r["site"] for r in rows}, key=lambda s: parse_site(s).order_key())[-1]
        colours = {"raw": PALETTE[1], "tangent": PALETTE[3]}
        for method, colour in colours.items():
            mine = sorted((r for r in rows if r["method"] == method and r["site"] == site), key=lambda r: r["effect"])
            ax.plot([r["effect"] for r in mine], [r[quantity] for r in mine], marker="o", color=colour, label=method)
        for r in rows:
            if r["method"] == "none" and r["site"] == site:
                ax.axhline(r[quantity], ls=":", color="grey", label="unsteered")
        what = {"nn_distance": "distance to nearest reference point", "lid": "mean LID of steered cloud"}[quantity]
        ax.set(xlabel="effect (" + ("KL, nats" if result.metric == "kl" else "rise in p(target)") + ")",
               ylabel=what, title=f"Steering at {result.site}, measured at {site}")
        ax.legend()
        return ax


def save_figures(results: Sequence[LIDResult], series: SeriesResult | None, steering: SteeringResult | None,
                 out: str | Path) -> list[Path]:
    """Every LID figure for saved results into `out` (PDF and PNG each)."""
    out = Path(out)
    written = []
    if results:
        fig, ax = figure()
        plot_layers(results, ax[0, 0])
        written += save_figure(fig, out / "lid_layers")
        fig, ax = figure()
        plot_distribution(results, ax[0, 0])
        written += save_figure(fig, out / "lid_distribution")
    if series is not None:
        fig, ax = figure()
        plot_series(series, ax[0, 0])
        written += save_figure(fig, out / "lid_series")
    if steering is not None:
        sites = sorted({r["site"] for r in steering.table}, key=lambda s: parse_site(s).order_key())
        fig, ax = figure(n_cols=2, n_rows=len(sites), width=6.8, height=2.4 * len(sites))
        for i, s in enumerate(sites):
            plot_steering(steering, ax[i, 0], "nn_distance", s)
            plot_steering(steering, ax[i, 1], "lid", s)
        written += save_figure(fig, out / "lid_steering")
    return written


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    from interp.cli import add_pair_arguments

    add_pair_arguments(parser)
    parser.set_defaults(n_prompts=512)
    parser.add_argument("--prompts-b", type=Path, help="a second prompt set (zoo default: the pre-training skills)")
    parser.add_argument("--layers", nargs="+", help="layers (ints, negative from the end) or sites such as 'final' "
                                                    "(default: every layer's resid_post)")
    parser.add_argument("--k", type=int, default=K, help=f"neighbours per local estimate (default {K})")
    parser.add_argument("--n-tokens", type=int, default=N_TOKENS, help=f"tokens sampled per cloud (default {N_TOKENS})")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="twonn", help="pointwise TwoNN or Levina-Bickel")
    parser.add_argument("--float64", action="store_true", help="k-NN and estimates in float64")
    parser.add_argument("--no-dedup", action="store_true", help="keep repeated contexts and equal vectors")
    parser.add_argument("--seed", type=int, default=0, help="token sampling seed")
    parser.add_argument("--series", help="a checkpoint series (folder or zoo:series): mean LID per checkpoint with its "
                                         "accuracy on the first prompt set (zoo) or its loss")
    parser.add_argument("--steer-layer", help="layer of the steering comparison (default: the middle layer)")
    parser.add_argument("--no-steer", action="store_true", help="skip the steering comparison")
    parser.add_argument("--effects", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                        help="effects (KL, nats) at which raw and tangent steering are compared")


def run_cli(args) -> None:
    from interp.cli import prompt_sets
    from interp.models import load_pair, load_series

    sets = prompt_sets(args)
    pair = load_pair(args.base, args.tuned, device=args.device, dtype=args.dtype, backend=args.backend)
    layers = [_layer_arg(v) for v in args.layers] if args.layers else list(range(pair.base.n_layers))
    kw = dict(k=args.k, n_tokens=args.n_tokens, estimator=args.estimator, seed=args.seed,
              deduplicate=not args.no_dedup, dtype=torch.float64 if args.float64 else torch.float32,
              shard_dir=args.out / "shards")  # used only by captures over the memory budget
    results = [measure(pair, texts, layers, label=label, **kw) for label, (texts, _) in sets.items()]
    label, (texts, answers) = next(iter(sets.items()))
    series = None
    if args.series:
        task = (texts, answers) if answers is not None else None
        series = measure_series(pair.base, load_series(args.series), texts, layers if args.layers else [-1],
                                task=task, task_name=label, label=label, **kw)
    steering = None if args.no_steer else _cli_steering(pair, sets, args)
    write(results, series, steering, args.out)
    print(f"LID written to {args.out}: " + "; ".join(
        f"{r.label}: " + ", ".join(f"{m} {r.mean(m, r.sites[-1]):.2f}" for m in r.models) for r in results)
        + f" (mean at {results[0].sites[-1]})")


def _layer_arg(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


def _cli_steering(pair: Pair, sets: dict, args) -> SteeringResult:
    """Steer the base with the mean fine-tuning shift (tuned - base) at the steering layer on half of the first
    prompt set; the reference cloud is the base's on the other half and the other sets."""
    site = layer_site(pair.base, _layer_arg(args.steer_layer) if args.steer_layer else pair.base.n_layers // 2)
    texts = next(iter(sets.values()))[0]
    steered, reference = texts[::2], texts[1::2] + [t for texts_b, _ in list(sets.values())[1:] for t in texts_b]
    clouds = [point_cloud(m, steered, site, n_tokens=args.n_tokens, seed=args.seed, progress=False)
              for m in pair.models]
    vector = clouds[1].points.mean(0) - clouds[0].points.mean(0)
    return compare_steering(pair.base, site, vector, steered, reference, effects=args.effects, k=args.k,
                            n_tokens=args.n_tokens, seed=args.seed)


def write(results: Sequence[LIDResult], series: SeriesResult | None, steering: SteeringResult | None,
          out: str | Path) -> None:
    """Results (tensors + CSV tables) and figures into `out`; `redraw(out)` re-draws the figures from these files."""
    import pandas as pd

    import json

    out = Path(out)
    for r in results:
        r.save(out / "results" / "lid" / r.label)
    (out / "results" / "lid" / "order.json").write_text(json.dumps([r.label for r in results]))
    pd.concat([r.to_frame() for r in results]).to_csv(out / "lid.csv", index=False)
    pd.concat([r.points_frame() for r in results]).to_csv(out / "lid_points.csv", index=False)
    if series is not None:
        series.save(out / "results" / "series")
        series.to_frame().to_csv(out / "lid_series.csv", index=False)
    if steering is not None:
        steering.save(out / "results" / "steering")
        steering.to_frame().to_csv(out / "lid_steering.csv", index=False)
    save_figures(results, series, steering, out / "figures")


def redraw(out: str | Path) -> list[Path]:
    """Re-draw every figure from the results saved by `write` (no model is run)."""
    import json

    out = Path(out)
    labels = json.loads((out / "results" / "lid" / "order.json").read_text())
    results = [LIDResult.load(out / "results" / "lid" / label) for label in labels]
    series = SeriesResult.load(out / "results" / "series") if (out / "results" / "series").is_dir() else None
    steering = SteeringResult.load(out / "results" / "steering") if (out / "results" / "steering").is_dir() else None
    return save_figures(results, series, steering, out / "figures")
