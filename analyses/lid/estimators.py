"""Local intrinsic dimension estimators: pointwise TwoNN and Levina-Bickel, on the exact k-NN of `knn`.

The numerical core of the LID analysis (METHODS.md section 5; Ruppik et al. 2025). Every function takes a point
cloud, rows are points, and works on ``device`` in ``dtype`` in chunks of ``memory_budget`` bytes (see
`analyses.lid.knn`).

Pointwise TwoNN needs, for every member of every neighbourhood, its two nearest other members.
They are read off the members' own sorted neighbour lists (`neighbourhood_twonn`), so after the one
global k-NN pass no neighbourhood needs a distance matrix of its own.

Exact duplicate points are at distance 0 from each other, which makes the TwoNN ratio r2/r1
undefined and the Levina-Bickel estimate 0 for them. The reference pipeline removes them
before estimating, and so should callers (`deduplicate`); the estimators warn when they meet
them, and TwoNN drops the undefined ratios from its fits, as scikit-dimension does.
"""

import warnings
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses.lid.knn import MEMORY_BUDGET, _working_copy, knn
from interp.errors import BadOption


def twonn_local(points: Float[Tensor, "n dim"], k: int = 128, discard_fraction: float = 0.1, *,
                method: Literal["linear", "mle"] = "linear", memory_budget: int = MEMORY_BUDGET,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Float[Tensor, "n"]:
    """Pointwise TwoNN: the TwoNN estimate on each point's k nearest neighbours.

    Reproduces scikit-dimension's ``TwoNN(discard_fraction).fit_pw(X, n_neighbors=k)``, which
    the reference code calls with k=128 and discard_fraction=0.1: the neighbourhood of a
    point is its k nearest neighbours, without the point itself; each of those k points gets
    mu = r2/r1 from its first and second nearest neighbours within the neighbourhood; and
    the k ratios are fitted as by `twonn_global` (``method``, discarded fraction and all).
    One k-NN pass (`knn`), then `neighbourhood_twonn` on those neighbourhoods.

    Precision: r1 and r2 are distances ||a - b|| from `knn`, so near duplicates get a small r1
    and a huge ratio (discarded, as in float64), and exact duplicates get r1 = 0 and their
    ratios are dropped. Which points are neighbours is decided by the float32 ranking of
    `knn`, exact up to near-ties at the k-th neighbour; use torch.float64 to settle those.

    Returns the local intrinsic dimension of every point, dimensionless, on the working device.
    """
    _check_discard(discard_fraction, method)
    _check_kept(k, discard_fraction)
    x = _working_copy(points, dtype, device)
    distances, neighbours = knn(x, k, memory_budget=memory_budget, dtype=x.dtype)
    return neighbourhood_twonn(
        x, distances, neighbours, neighbours, discard_fraction, method=method, memory_budget=memory_budget
    )


def neighbourhood_twonn(points: Float[Tensor, "n dim"], distances: Float[Tensor, "n m"],
                        neighbours: Int[Tensor, "n m"], hoods: Int[Tensor, "q k"], discard_fraction: float = 0.1, *,
                        method: Literal["linear", "mle"] = "linear",
                        memory_budget: int = MEMORY_BUDGET) -> Float[Tensor, "q"]:
    """TwoNN estimate on each neighbourhood: row i of ``hoods`` lists k rows of ``points``.

    ``distances`` and ``neighbours`` are ``knn(points, m)`` (any m >= 2). Each member j of a
    neighbourhood H gets mu = r2/r1 from its two nearest other members of H. Those are the first
    two members of H on j's own sorted neighbour list whenever that list holds two of them (every
    member of H off the list is farther than everything on it), so they are read from
    ``distances``; the few members whose list holds fewer than two are measured directly. The k
    ratios of each neighbourhood are then fitted as by `twonn_global`.

    `twonn_local` is this with each point's own neighbours as its neighbourhood; with the k
    nearest ``points`` of other query points (``knn(points, k, queries=...)``) it gives the local
    dimension at those queries.
    """
    _check_discard(discard_fraction, method)
    r1, r2 = _two_nearest_members(points, distances, neighbours, hoods, memory_budget)
    undefined = int((r1 == 0).sum())
    if undefined:
        _warn_duplicates(f"{undefined} neighbourhood ratios r2/r1 had r1 = 0 and were dropped")
    return _twonn_fit(r2 / r1, discard_fraction, method)


def twonn_global(points: Float[Tensor, "n dim"], discard_fraction: float = 0.1, *,
                 method: Literal["linear", "mle"] = "linear", memory_budget: int = MEMORY_BUDGET,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> float:
    """TwoNN intrinsic dimension of the whole cloud (Facco et al. 2017), as scikit-dimension.

    Each point gets mu = r2/r1, its second over first nearest-neighbour distance; points with
    r1 = 0 (duplicates) are dropped, and the largest ``discard_fraction`` of the N ratios are
    discarded. ``method="linear"`` (scikit-dimension's default, so the reference code's) is the
    least-squares slope through the origin of -log(1 - i/N) against log mu_(i), over the kept
    sorted ratios. ``method="mle"`` is the closed-form MLE, d = (n - 1) / sum log mu over n
    ratios; with discarding, the discarded ratios count as censored at the largest kept one.
    """
    distances, _ = knn(points, 2, memory_budget=memory_budget, dtype=dtype, device=device)
    return twonn_from_distances(distances, discard_fraction, method=method)


def twonn_from_distances(distances: Float[Tensor, "n m"], discard_fraction: float = 0.1, *,
                         method: Literal["linear", "mle"] = "linear") -> float:
    """`twonn_global` from sorted nearest-neighbour distances (``knn(points, m)[0]``, any m >= 2)."""
    _check_discard(discard_fraction, method)
    if (distances[:, 0] == 0).any():
        _warn_duplicates(f"{int((distances[:, 0] == 0).sum())} points dropped from the fit")
    return _twonn_fit((distances[:, 1] / distances[:, 0])[None], discard_fraction, method).item()


def levina_bickel_local(points: Float[Tensor, "n dim"], k: int = 20, *, memory_budget: int = MEMORY_BUDGET,
                        dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> Float[Tensor, "n"]:
    """Levina-Bickel (2004) MLE at each point from its k nearest-neighbour distances T_1..T_k.

    m_k(x) = (k - 1) / sum_{j<k} log(T_k / T_j). Dimensionless, on the working device.
    """
    if k < 2:
        raise BadOption(f"Levina-Bickel needs k >= 2 neighbours, got k={k}")
    distances, _ = knn(points, k, memory_budget=memory_budget, dtype=dtype, device=device)
    return levina_bickel_from_distances(distances)


def levina_bickel_from_distances(distances: Float[Tensor, "n k"]) -> Float[Tensor, "n"]:
    """`levina_bickel_local` from sorted k-NN distances (``knn(points, k)[0]``)."""
    if (distances[:, 0] == 0).any():
        _warn_duplicates(f"{int((distances[:, 0] == 0).sum())} points have estimate 0")
    log_t = distances.log()
    return (distances.shape[1] - 1) / (log_t[:, -1:] - log_t[:, :-1]).sum(dim=1)


def levina_bickel_global(points: Float[Tensor, "n dim"], k: int = 20, *,
                         average: Literal["inverse", "mean"] = "inverse", memory_budget: int = MEMORY_BUDGET,
                         dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> float:
    """Levina-Bickel intrinsic dimension of the whole cloud from the local estimates.

    ``average="inverse"`` averages the inverses, 1 / mean(1 / m_k(x)) (MacKay and Ghahramani
    2005, less biased); ``average="mean"`` is Levina and Bickel's plain mean of m_k(x).
    """
    local = levina_bickel_local(points, k, memory_budget=memory_budget, dtype=dtype, device=device)
    if average == "inverse":
        return 1 / local.reciprocal().mean().item()
    if average == "mean":
        return local.mean().item()
    raise BadOption(f"average must be 'inverse' or 'mean', got {average!r}")



SCAN = 16
"""Entries of each member's neighbour list searched first for its nearest fellow members."""


def _two_nearest_members(x: Float[Tensor, "n dim"], distances: Float[Tensor, "n m"], neighbours: Int[Tensor, "n m"],
                         hoods: Int[Tensor, "q k"], memory_budget: int
                         ) -> tuple[Float[Tensor, "q k"], Float[Tensor, "q k"]]:
    """r1, r2 of every member j of every neighbourhood H: its distances to its first and second
    nearest other members of H, read from j's sorted list where it holds two of them."""
    (n, width), (q, k) = neighbours.shape, hoods.shape
    scan = min(SCAN, width)
    head = neighbours[:, :scan].contiguous(), distances[:, :scan].contiguous()
    per_row = n + k * scan * (2 * neighbours.element_size() + distances.element_size() + 1)
    chunk_size = max(1, min(q, memory_budget // per_row))
    in_hood = torch.zeros(chunk_size * n, dtype=torch.bool, device=hoods.device)  # [row, point], flat
    r1, r2 = distances.new_empty(q, k), distances.new_empty(q, k)
    for start in range(0, q, chunk_size):
        members = hoods[start : start + chunk_size]
        offset = torch.arange(len(members), device=hoods.device)[:, None] * n
        marked = (members + offset).flatten()
        in_hood.index_fill_(0, marked, True)
        first, second = _first_two_on_lists(in_hood, offset, *head, members)
        missing = second.isinf().nonzero().unbind(dim=1)  # lists whose head holds < 2 members
        if len(missing[0]):
            rows = members[missing]
            first[missing], second[missing] = _first_two_on_lists(
                in_hood, offset[missing[0]], neighbours, distances, rows
            )
            missing = tuple(index[second[missing].isinf()] for index in missing)  # whole list < 2
            if len(missing[0]):
                first[missing], second[missing] = _measure_two_nearest(x, members, missing, memory_budget)
        in_hood.index_fill_(0, marked, False)
        r1[start : start + len(members)], r2[start : start + len(members)] = first, second
    return r1, r2


def _first_two_on_lists(in_hood: Tensor, offset: Int[Tensor, "rows 1"], neighbours: Tensor, distances: Tensor,
                        members: Tensor) -> tuple[Tensor, Tensor]:
    """The two smallest distances on each member's list to points marked in its row of ``in_hood``
    (inf where fewer than two are marked). ``members`` is [rows, ...] of point indices."""
    lists = neighbours[members]  # [rows, ..., m]
    offset = offset.view(offset.shape + (1,) * (lists.dim() - 2))
    marked = in_hood.take(lists + offset)
    return _two_smallest(distances[members].masked_fill_(~marked, torch.inf))


def _measure_two_nearest(x: Float[Tensor, "n dim"], members: Int[Tensor, "rows k"], missing: tuple[Tensor, Tensor],
                         memory_budget: int) -> tuple[Tensor, Tensor]:
    """r1, r2 of the members at ``missing`` (row, column) by direct distances to their neighbourhood."""
    row, column = missing
    k, dim = members.shape[1], x.shape[1]
    chunk_size = max(1, memory_budget // (x.element_size() * k * dim))
    pieces = []
    for start in range(0, len(row), chunk_size):
        r, c = row[start : start + chunk_size], column[start : start + chunk_size]
        who = members[r, c]
        to_all = torch.linalg.vector_norm(x[members[r]] - x[who, None], dim=-1)
        pieces.append(torch.stack(_two_smallest(to_all.masked_fill_(members[r] == who[:, None], torch.inf))))
    return torch.cat(pieces, dim=1).unbind()


def _two_smallest(values: Float[Tensor, "... m"]) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."]]:
    """Smallest and second smallest along the last dimension (overwrites ``values``)."""
    first, at = values.min(dim=-1)
    second = values.scatter_(-1, at[..., None], torch.inf).min(dim=-1).values
    return first, second


def _twonn_fit(mu: Float[Tensor, "batch m"], discard_fraction: float,
               method: Literal["linear", "mle"]) -> Float[Tensor, "batch"]:
    """TwoNN dimension of each row of ratios mu = r2/r1; non-finite ratios (r1 = 0) are dropped."""
    finite = mu.isfinite()
    n = finite.sum(dim=1, keepdim=True)  # ratios left in each row
    n_keep = (n.double() * (1 - discard_fraction)).long()  # as scikit-dimension: int(n * (1 - f))
    log_mu = mu.masked_fill(~finite, torch.inf).sort(dim=1).values.log()
    rank = torch.arange(1, mu.shape[1] + 1, device=mu.device, dtype=mu.dtype)
    kept = rank <= n_keep
    if method == "linear":
        y = -torch.log1p(-rank / n)  # -log(1 - F_emp(mu_(i)))
        return (log_mu * y).where(kept, 0).sum(dim=1) / log_mu.square().where(kept, 0).sum(dim=1)
    largest_kept = log_mu.gather(1, (n_keep - 1).clamp(min=0)).squeeze(1)
    censored = (n - n_keep).squeeze(1) * largest_kept
    return (n_keep.squeeze(1) - 1) / (log_mu.where(kept, 0).sum(dim=1) + censored)


def _check_kept(k: int, discard_fraction: float) -> None:
    if int(k * (1 - discard_fraction)) < 2:
        raise BadOption(
            f"k={k} with discard_fraction={discard_fraction} keeps fewer than 2 ratios per "
            "neighbourhood; raise k"
        )


def _check_discard(discard_fraction: float, method: str) -> None:
    if method not in ("linear", "mle"):
        raise BadOption(f"method must be 'linear' or 'mle', got {method!r}")
    if method == "linear" and not 0 < discard_fraction < 1:
        raise BadOption(
            f"the linear TwoNN fit needs 0 < discard_fraction < 1, got {discard_fraction} "
            "(the largest ratio has F_emp = 1, so -log(1 - F_emp) is infinite); use method='mle'"
        )
    if not 0 <= discard_fraction < 1:
        raise BadOption(f"discard_fraction must be in [0, 1), got {discard_fraction}")


def _warn_duplicates(what: str) -> None:
    warnings.warn(
        f"exact duplicate points: {what}; TwoNN is undefined at a zero first-neighbour "
        "distance and Levina-Bickel gives 0, so call deduplicate(points) first",
        stacklevel=3,
    )
