"""On-manifold steering (ours, METHODS.md section 5): a steering vector v at a site is replaced, at each position x,
by its projection onto the local tangent space of a reference cloud: the top principal directions of x's k nearest
reference points, as many as the rounded local ID at x.

    ref = prepare_reference(point_cloud(model, reference_prompts, site), k)
    with steer(model, site, v, ref, scale=2.0) as steered: ...
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses.lid.clouds import PointCloud, layer_site
from analyses.lid.estimators import neighbourhood_twonn
from analyses.lid.knn import MEMORY_BUDGET, knn
from analyses.lid.local_id import K
from interp.errors import BadPrompts
from interp.intervene import Edit, add
from interp.models import Model
from interp.prompts import Batch
from interp.sites import Site


@dataclass(frozen=True, eq=False)
class Reference:
    """A reference cloud prepared for tangent spaces at new points: `points` [point, d_model] with their own
    k nearest neighbours (`distances`, `neighbours` [point, k], as `analyses.lid.knn.knn` gives) and their
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
