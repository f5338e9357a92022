"""Forward-pass edits as data: add, add_nearest (a vector per nearest centroid), scale, ablate, project, replace,
at any site, chosen heads and positions.

An edit is a frozen dataclass naming a `Site`, the positions it touches and what it does. Edits compose
by listing them (applied in order at each site), print readably, and are applied by whichever backend
runs the model, so the same list means the same thing through TransformerBridge and nnsight:

    with model.edit(add(resid_post(2), v, scale=2.0), ablate(head_out(1, 3))):
        model.generate(...)

Positions are canonical (index 0 = each prompt's first token): None / "all", "last", an int or list of
ints (negative counts back from each prompt's last token), or a boolean mask [prompt, pos].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import UnsupportedEdit
from interp.prompts import Batch
from interp.sites import READ_ONLY_KINDS, Site, site as parse_site


@dataclass(frozen=True)
class Edit:
    """Base: `site` to edit and `positions` to touch. Subclasses define `transform`."""

    site: Site
    positions: object = field(default=None, kw_only=True)

    def transform(self, x: Tensor, batch: Batch) -> Tensor:
        """New activation for the selected slice `x` [batch, pos, ...] (model layout)."""
        raise NotImplementedError

    def apply(self, act: Tensor, batch: Batch) -> Tensor:
        """Apply to a whole-site activation in model layout ([batch, pos, ...] or [batch, pos, head, d])."""
        x = act[:, :, self.site.head] if self.site.head is not None else act
        new = self.transform(x, batch).to(x.dtype)
        if self.positions is not None and self.positions != "all":
            where = batch.from_canonical(batch.positions_mask(self.positions)).to(act.device)
            new = torch.where(where.reshape(where.shape + (1,) * (x.dim() - 2)), new, x)
        if self.site.head is None:
            return new
        out = act.clone()
        out[:, :, self.site.head] = new
        return out


@dataclass(frozen=True)
class Add(Edit):
    """x + scale * vector. `vector` [d_model] (or broadcastable to the selected slice)."""

    vector: Tensor = None
    scale: float = 1.0

    def transform(self, x: Tensor, batch: Batch) -> Tensor:
        return x + self.scale * self.vector.to(x.device, x.dtype)


@dataclass(frozen=True)
class AddNearest(Edit):
    """x + scale * vectors[k(x)], where k(x) is the centroid nearest to x (Euclidean), chosen per position:
    a piecewise-constant edit (e.g. concept-wise steering). `centroids`, `vectors` [k, d_model]."""

    centroids: Tensor = None
    vectors: Tensor = None
    scale: float = 1.0

    def transform(self, x: Tensor, batch: Batch) -> Tensor:
        centroids = self.centroids.to(x.device, torch.float64)
        nearest = torch.cdist(x.double().reshape(-1, x.shape[-1]), centroids).argmin(-1).reshape(x.shape[:-1])
        return x + self.scale * self.vectors.to(x.device, x.dtype)[nearest]


@dataclass(frozen=True)
class Scale(Edit):
    """factor * x (a head or a whole site)."""

    factor: float = 1.0

    def transform(self, x: Tensor, batch: Batch) -> Tensor:
        return x * self.factor


@dataclass(frozen=True)
class Ablate(Edit):
    """Zero-ablation (`mean=None`) or mean-ablation (x replaced by `mean`, [d_model] or broadcastable)."""

    mean: Tensor | None = None

    def transform(self, x: Tensor, batch: Batch) -> Tensor:
        if self.mean is None:
            return torch.zeros_like(x)
        return self.mean.to(x.device, x.dtype).expand_as(x)


@dataclass(frozen=True)
class Project(Edit):
    """Project out of (`keep=False`) or onto (`keep=True`) the span of `basis` [d_model, k] (any basis)."""

    basis: Tensor = None
    keep: bool = False

    def transform(self, x: Tensor, batch: Batch) -> Tensor:
        q, _ = torch.linalg.qr(self.basis.to(x.device, torch.float64))
        inside = ((x.double() @ q) @ q.T).to(x.dtype)
        return inside if self.keep else x - inside


@dataclass(frozen=True)
class Replace(Edit):
    """Replace with given activations in canonical layout [prompt, pos, ...], rows indexed like the
    prompt set being run (e.g. a capture of the same prompts from another run or another model)."""

    values: Tensor = None

    def transform(self, x: Tensor, batch: Batch) -> Tensor:
        rows = self.values[batch.index.to(self.values.device), : batch.width].to(x.device, x.dtype)
        if rows.shape[1] < batch.width:
            raise UnsupportedEdit(f"replace at {self.site}: values have {rows.shape[1]} positions, "
                                  f"the batch needs {batch.width}; capture them from the same prompts")
        return batch.from_canonical(rows)


def _site(s: Site | str) -> Site:
    s = parse_site(s)
    if s.kind in READ_ONLY_KINDS:
        raise UnsupportedEdit(f"{s} is read-only: attention patterns are captured, not edited")
    return s


def add(s: Site | str, vector: Float[Tensor, " d_model"], scale: float = 1.0, positions=None) -> Add:
    return Add(_site(s), vector=vector, scale=scale, positions=positions)


def add_nearest(s: Site | str, centroids: Float[Tensor, "k d_model"], vectors: Float[Tensor, "k d_model"],
                scale: float = 1.0, positions=None) -> AddNearest:
    if centroids.shape != vectors.shape:
        raise UnsupportedEdit(f"add_nearest at {s}: centroids {tuple(centroids.shape)} and vectors "
                              f"{tuple(vectors.shape)} must have the same shape [k, d_model]")
    return AddNearest(_site(s), centroids=centroids, vectors=vectors, scale=scale, positions=positions)


def scale(s: Site | str, factor: float, positions=None) -> Scale:
    return Scale(_site(s), factor=factor, positions=positions)


def ablate(s: Site | str, mean: Tensor | None = None, positions=None) -> Ablate:
    return Ablate(_site(s), mean=mean, positions=positions)


def project_out(s: Site | str, basis: Float[Tensor, "d_model k"], positions=None) -> Project:
    return Project(_site(s), basis=_as_basis(basis), keep=False, positions=positions)


def project_onto(s: Site | str, basis: Float[Tensor, "d_model k"], positions=None) -> Project:
    return Project(_site(s), basis=_as_basis(basis), keep=True, positions=positions)


def replace(s: Site | str, values: Tensor, positions=None) -> Replace:
    return Replace(_site(s), values=values, positions=positions)


def _as_basis(basis: Tensor) -> Tensor:
    return basis[:, None] if basis.dim() == 1 else basis


@dataclass(frozen=True)
class Blend:
    """Run `other` (a model of the same architecture) on the same inputs as one part of this model and
    output `alpha * own + (1 - alpha) * other's`. `part` is a layer index (a whole block), "embed" (token and
    position embeddings), "final" (the final norm) or "unembed". For a block this is
    `x_{l+1} = x_l + alpha f_self(x_l) + (1 - alpha) f_other(x_l)`; alpha = 1 leaves the model as it is,
    alpha = 0 swaps the part for the other model's. Applied by plain module hooks, so it runs locally only.
    """

    part: int | str
    other: object
    alpha: float = 1.0

    def __repr__(self) -> str:
        return f"Blend(part={self.part!r}, other={getattr(self.other, 'name', self.other)!r}, alpha={self.alpha})"


def blend(part: int | str, other, alpha: float) -> Blend:
    if not isinstance(part, int) and part not in ("embed", "final", "unembed"):
        raise UnsupportedEdit(f"blend part {part!r}: use a layer index, 'embed', 'final' or 'unembed'")
    return Blend(part, other, alpha)


def split(edits: Sequence) -> tuple[list[Edit], list[Blend]]:
    """Site edits (applied through backend hooks) and blends (applied on modules)."""
    return [e for e in edits if isinstance(e, Edit)], [e for e in edits if isinstance(e, Blend)]


def by_site(edits: Sequence[Edit]) -> dict[Site, list[Edit]]:
    """Group edits by the whole site they hook (head edits share their layer's head_out hook), keeping order."""
    grouped: dict[Site, list[Edit]] = {}
    for e in edits:
        grouped.setdefault(e.site.hooked, []).append(e)
    return grouped
