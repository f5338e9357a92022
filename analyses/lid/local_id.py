"""Local ID of every point of a cloud, and `measure`: the local IDs of the same sampled tokens in one or more
models at every measured site (one `LIDResult`); `measure_stores` the same from activation stores of a corpus.

Local ID of each point: TwoNN on its k nearest neighbours (scikit-dimension's pointwise TwoNN, 10% of the ratios
discarded: the reference code's estimator) or the Levina-Bickel MLE on them; the global TwoNN of the cloud comes
from the same k-NN pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.lid.clouds import N_TOKENS, PointCloud, iter_clouds, store_clouds
from analyses.lid.estimators import levina_bickel_from_distances, neighbourhood_twonn, twonn_from_distances
from analyses.lid.knn import MEMORY_BUDGET, knn
from interp.errors import BadModelArgument, BadOption, BadPrompts
from interp.models import Model, Pair, model_label
from interp.prompts import PromptSet, Tokens, prompt_texts
from interp.results import Result
from interp.store import ActivationStore

K = 128
"""Neighbours per local estimate (the reference code's L)."""
ESTIMATORS = ("twonn", "mle")


def estimate(points: Float[Tensor, "point d_model"], k: int = K, estimator: str = "twonn", *,
             discard_fraction: float = 0.1, dtype: torch.dtype = torch.float32, device=None,
             memory_budget: int = MEMORY_BUDGET) -> tuple[Float[Tensor, " point"], float]:
    """Local ID of every point ("twonn": pointwise TwoNN on its k nearest neighbours; "mle": Levina-Bickel on
    them) and the global TwoNN of the cloud, from one k-NN pass."""
    if estimator not in ESTIMATORS:
        raise BadOption(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if len(points) <= k:
        raise BadPrompts(f"the cloud has {len(points)} distinct tokens, not more than k={k} neighbours; "
                         f"pass more prompts or a smaller k")
    x = points.to(device=device or points.device, dtype=dtype)
    distances, neighbours = knn(x, k, dtype=dtype, memory_budget=memory_budget)
    if estimator == "twonn":
        local = neighbourhood_twonn(x, distances, neighbours, neighbours, discard_fraction,
                                    memory_budget=memory_budget)
    else:
        local = levina_bickel_from_distances(distances, memory_budget=memory_budget - x.nbytes - neighbours.nbytes)
    return local.cpu(), twonn_from_distances(distances, discard_fraction)


def finite(t: Tensor) -> Tensor:
    return t[t.isfinite()]


def summary(lid: Float[Tensor, " point"]) -> dict[str, float]:
    """n, mean, median, std and quartiles of the finite local IDs."""
    v = finite(lid).double()
    if len(v) == 0:
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "std": float("nan"), "q25": float("nan"),
                "q75": float("nan")}
    q25, median, q75 = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype)).tolist()
    return {"n": len(v), "mean": float(v.mean()), "median": median, "std": float(v.std()) if len(v) > 1 else 0.0,
            "q25": q25, "q75": q75}


@dataclass
class LIDResult(Result):
    """Local ID of every sampled token, per model and site, on one prompt set. Read it by (model, site):

    lid[model, site]              [point]  local ID (dimensionless; NaN where the estimator is undefined)
    prompt, position[model, site] [point]  which token each point is (row in `prompts`, canonical position)
    global_id[model, site]        float    global TwoNN of the cloud

    Stored as `cells` ("lid.i.j", "prompt.i.j", "position.i.j" for model i and site j) and `global_twonn`
    [model][site]."""

    ANALYSIS = "lid"
    models: list[str]
    sites: list[str]
    prompts: list[str]
    cells: dict[str, Tensor]
    global_twonn: list[list[float]]
    estimator: str = "twonn"
    k: int = K
    label: str = "prompts"

    def _by_cell(self, name: str) -> dict[tuple[str, str], Tensor]:
        return {(m, s): self.cells[f"{name}.{i}.{j}"] for i, m in enumerate(self.models)
                for j, s in enumerate(self.sites)}

    @property
    def lid(self) -> dict[tuple[str, str], Tensor]:
        return self._by_cell("lid")

    @property
    def prompt(self) -> dict[tuple[str, str], Tensor]:
        return self._by_cell("prompt")

    @property
    def position(self) -> dict[tuple[str, str], Tensor]:
        return self._by_cell("position")

    @property
    def global_id(self) -> dict[tuple[str, str], float]:
        return {(m, s): float("nan") if self.global_twonn[i][j] is None else self.global_twonn[i][j]
                for i, m in enumerate(self.models) for j, s in enumerate(self.sites)}

    def mean(self, model: str, site: str) -> float:
        return summary(self.lid[model, site])["mean"]

    def to_frame(self):
        """One row per model and site: label, model, site, n, mean, median, std, q25, q75, global_twonn."""
        import pandas as pd

        lid, global_id = self.lid, self.global_id
        rows = [{"label": self.label, "model": m, "site": s, **summary(lid[m, s]), "global_twonn": global_id[m, s],
                 "estimator": self.estimator, "k": self.k} for m in self.models for s in self.sites]
        return pd.DataFrame(rows)

    def points_frame(self):
        """One row per point: label, model, site, prompt, position, lid."""
        import pandas as pd

        lid, prompt, position = self.lid, self.prompt, self.position
        return pd.concat([pd.DataFrame({"label": self.label, "model": m, "site": s, "prompt": prompt[m, s].numpy(),
                                        "position": position[m, s].numpy(), "lid": lid[m, s].numpy()})
                          for m in self.models for s in self.sites], ignore_index=True)

    def plot(self, ax=None):
        """Mean LID per layer, one line per model."""
        from analyses.lid.plots import plot_layers

        return plot_layers([self], ax)


def measure(pair_or_model: Pair | Model, prompts: PromptSet | Sequence[str] | Tokens, layers=None,
            **kwargs) -> LIDResult:
    """Local ID of the same sampled tokens' vectors in the pair's two models (or in one model) at every one of
    `layers` (see `layer_site`; None: the last layer). Models are named by `model_label` ("base" and "tuned"
    when a pair's labels are equal). Keyword arguments as `measure_models`."""
    if isinstance(pair_or_model, Pair):
        names = [model_label(m) for m in pair_or_model.models]
        names = names if names[0] != names[1] else ["base", "tuned"]
        return measure_models(dict(zip(names, pair_or_model.models)), prompts, layers, **kwargs)
    if isinstance(pair_or_model, Model):
        return measure_models({model_label(pair_or_model): pair_or_model}, prompts, layers, **kwargs)
    raise BadModelArgument(f"lid.measure takes a Pair or a Model, not {type(pair_or_model).__name__}; for several "
                           f"models on the same tokens use lid.measure_models({{name: model}}, prompts)")


def measure_models(models: dict[str, Model], prompts: PromptSet | Sequence[str] | Tokens, layers=None, *,
                   k: int = K, n_tokens: int | None = N_TOKENS, estimator: str = "twonn",
                   discard_fraction: float = 0.1, seed: int = 0, deduplicate: bool = True,
                   dtype: torch.dtype = torch.float32, device=None, memory_budget: int = MEMORY_BUDGET,
                   label: str | None = None, batch_size: int = 16, backend: str | None = None,
                   shard_dir: str | Path | None = None, progress: bool = True) -> LIDResult:
    """Local ID of the same sampled tokens' vectors in every model of {name: Model} at every one of `layers`.

    Every model samples the same tokens (same seed, same prompts). k-NN runs on `device` (default: each model's)
    in `dtype` (torch.float64 for reference-grade numbers), holding at most `memory_budget` bytes in all (the
    cloud, the k-NN and the estimates). `label` defaults to the prompt set's.
    """
    if not models:
        raise BadModelArgument("lid.measure_models needs at least one model: pass {name: model}")
    clouds = {name: iter_clouds(model, prompts, layers, n_tokens=n_tokens, seed=seed, deduplicate=deduplicate,
                                batch_size=batch_size, backend=backend, shard_dir=shard_dir, progress=progress)
              for name, model in models.items()}
    devices = {name: device or model.device for name, model in models.items()}
    cells, global_id, sites = _estimate_clouds(clouds, devices, k=k, estimator=estimator,
                                               discard_fraction=discard_fraction, dtype=dtype,
                                               memory_budget=memory_budget)
    settings = {"n_tokens": n_tokens, "seed": seed, "deduplicate": deduplicate, "discard_fraction": discard_fraction,
                "dtype": str(dtype).removeprefix("torch.")}
    label = label or (prompts.label if isinstance(prompts, PromptSet) else "prompts")
    return LIDResult(list(models), sites, prompt_texts(prompts), cells, global_id, estimator, k, label,
                     settings=settings)


def measure_stores(stores: dict[str, ActivationStore] | ActivationStore, layers=None, *, k: int = K,
                   n_tokens: int | None = N_TOKENS, estimator: str = "twonn", discard_fraction: float = 0.1,
                   seed: int = 0, deduplicate: bool = True, dtype: torch.dtype = torch.float32, device=None,
                   memory_budget: int = MEMORY_BUDGET, label: str | None = None) -> LIDResult:
    """`measure_models` on activation stores (`interp.store`) instead of models and prompts: {name: store} (or one
    store, named by its model), the clouds drawn by `store_clouds` (the same tokens in stores of the same corpus), a
    point's `prompt` its document. k-NN runs on `device` (default CPU); `label` defaults to the corpus file's stem."""
    if isinstance(stores, ActivationStore):
        stores = {model_label(stores.name): stores}
    if not stores:
        raise BadModelArgument("lid.measure_stores needs at least one store: pass {name: ActivationStore}")
    clouds = {name: store_clouds(store, layers, n_tokens=n_tokens, seed=seed, deduplicate=deduplicate)
              for name, store in stores.items()}
    cells, global_id, sites = _estimate_clouds(clouds, dict.fromkeys(stores, device or "cpu"), k=k,
                                               estimator=estimator, discard_fraction=discard_fraction, dtype=dtype,
                                               memory_budget=memory_budget)
    first = next(iter(stores.values()))
    settings = {"n_tokens": n_tokens, "seed": seed, "deduplicate": deduplicate, "discard_fraction": discard_fraction,
                "dtype": str(dtype).removeprefix("torch."), "stores": [str(s.path) for s in stores.values()]}
    return LIDResult(list(stores), sites, [], cells, global_id, estimator, k,
                     label or Path(first.manifest["corpus"]["path"]).stem, settings=settings)


def _estimate_clouds(clouds: dict[str, Iterator[tuple[str, PointCloud]]], devices: dict, **estimate_kw
                     ) -> tuple[dict[str, Tensor], list[list[float]], list[str]]:
    """Local IDs of every model's clouds ({name: (site, cloud) iterator}): the cells of an LIDResult, the global
    TwoNN [model][site] and the sites in order."""
    cells, global_id, sites = {}, {}, []
    for i, (name, model_clouds) in enumerate(clouds.items()):
        for s, cloud in model_clouds:
            if s not in sites:
                sites.append(s)
            j = sites.index(s)
            local, global_id[i, j] = estimate(cloud.points, device=devices[name], **estimate_kw)
            cells.update({f"lid.{i}.{j}": local, f"prompt.{i}.{j}": cloud.prompt,
                          f"position.{i}.{j}": cloud.position})
            del cloud  # hold no cloud while the next is read
    return cells, [[global_id[i, j] for j in range(len(sites))] for i in range(len(clouds))], sites
