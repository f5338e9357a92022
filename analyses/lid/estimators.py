"""Local intrinsic dimension estimators: pointwise TwoNN and Levina-Bickel, on the exact k-NN of `knn`.

The numerical core of the LID analysis (METHODS.md section 5; Ruppik et al. 2025). Every function takes a point
cloud, rows are points, and works on ``device`` in ``dtype`` in chunks planned so that all it holds at once,
points and results included, fits ``memory_budget`` bytes (`twonn_plan`; `analyses.lid.knn`).

Pointwise TwoNN needs, for every member of every neighbourhood, its two nearest other members.
They are read off the members' own sorted neighbour lists (`neighbourhood_twonn`), so after the one
global k-NN pass no neighbourhood needs a distance matrix of its own.

Exact duplicate points are at distance 0 from each other, which makes the TwoNN ratio r2/r1
undefined and the Levina-Bickel estimate 0 for them. The reference pipeline removes them
before estimating, and so should callers (`deduplicate`); the estimators warn when they meet
them, and TwoNN drops the undefined ratios from its fits, as scikit-dimension does.
"""

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses.lid.knn import INDEX, MEMORY_BUDGET, _working_copy, chunk_rows, knn
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
    (n, width), (q, k) = neighbours.shape, hoods.shape
    plan = twonn_plan(n, points.shape[1], width, k, distances.dtype, memory_budget, None if hoods is neighbours else q)
    r1, r2 = _two_nearest_members(points, distances, neighbours, hoods, plan)
    local, undefined = r1.new_empty(q), 0
    for start in range(0, q, plan.fit_rows):
        rows = slice(start, start + plan.fit_rows)
        undefined += int((r1[rows] == 0).sum())
        local[rows] = _twonn_fit(r2[rows] / r1[rows], discard_fraction, method)
    if undefined:
        _warn_duplicates(f"{undefined} neighbourhood ratios r2/r1 had r1 = 0 and were dropped")
    return local


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
    distances = knn(points, k, memory_budget=memory_budget, dtype=dtype, device=device)[0]
    return levina_bickel_from_distances(distances, memory_budget=memory_budget)


def levina_bickel_from_distances(distances: Float[Tensor, "n k"], *,
                                 memory_budget: int = MEMORY_BUDGET) -> Float[Tensor, "n"]:
    """`levina_bickel_local` from sorted k-NN distances (``knn(points, k)[0]``), in `chunk_rows` of logs and
    differences (2 k elements a row) beside the distances and the estimates in ``memory_budget`` bytes."""
    if (distances[:, 0] == 0).any():
        _warn_duplicates(f"{int((distances[:, 0] == 0).sum())} points have estimate 0")
    (n, k), e = distances.shape, distances.element_size()
    rows = chunk_rows(memory_budget, e * n * (k + 1), 2 * e * k, n)
    local = distances.new_empty(n)
    for start in range(0, n, rows):
        log_t = distances[start : start + rows].log()
        local[start : start + rows] = (k - 1) / (log_t[:, -1:] - log_t[:, :-1]).sum(dim=1)
    return local


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
FIT_SCRATCH = 48
"""Bytes of the TwoNN fit's temporaries per ratio, at most (mask, sorted copy, order, sort's scratch, logs, ranks:
measured at most 37 at float32 or float64)."""


@dataclass(frozen=True)
class TwonnPlan:
    """Chunks of `neighbourhood_twonn`, and the most bytes it holds at once with them."""

    hood_rows: int  # neighbourhoods whose members are looked up at once
    list_members: int  # members searching their whole list at once (their list's head holds < 2 fellows)
    measured_members: int  # members measured to their fellows at once (their whole list holds < 2)
    fit_rows: int  # neighbourhoods whose ratios are fitted at once
    peak: int  # bytes; over the budget only where one row or member per chunk is


def twonn_plan(n: int, dim: int, width: int, k: int, dtype: torch.dtype = torch.float32,
               memory_budget: int = MEMORY_BUDGET, queries: int | None = None) -> TwonnPlan:
    """How `neighbourhood_twonn` chunks n points of ``dim`` coordinates with neighbour lists ``width`` long and
    neighbourhoods of k members (``queries`` of them; None: the lists themselves, so k = width) so that all it
    holds at once fits ``memory_budget`` bytes, counting, with e bytes an element and q neighbourhoods:

    throughout: the points (n x dim), the lists (n x width distances and indices), the neighbourhoods (q x k
    indices, with queries), r1 and r2 (q x k each) and the estimates (q);
    looking up: the lists' heads (n x SCAN distances and indices) and per neighbourhood a row of marks (n bytes)
    and per member its marked position, its head's entries (index, shifted index, distance, mark and unmark
    each), the candidates for r1 and r2 with their positions and the (row, column) where they are missing; the
    members whose head holds fewer than two fellows then search their whole list, and those whose list holds
    fewer measure the distance to every fellow (k x dim gathered and subtracted), in pieces that fit in the
    heads' entries' place;
    fitting: per neighbourhood its ratios with the fit's temporaries (k x (e + FIT_SCRATCH)).

    Neighbourhoods come in `chunk_rows`.
    """
    e, scan = dtype.itemsize, min(SCAN, width)
    q = n if queries is None else queries
    held = e * n * dim + (e + INDEX) * n * width + (0 if queries is None else INDEX * q * k) + 2 * e * q * k + e * q
    looking = held + (e + INDEX) * n * scan
    entry = 2 * INDEX + e + 2
    hood_row = n + INDEX + k * (5 * INDEX + 2 * e + scan * entry)
    hood_rows = chunk_rows(memory_budget, looking, hood_row, q)
    spare = hood_rows * k * scan * entry
    listed = width * entry + 4 * INDEX + 2 * e
    measured = k * (2 * dim * e + INDEX) + dim * e + 4 * INDEX + 2 * e
    list_members, measured_members = max(1, spare // listed), max(1, spare // measured)
    fit_row = k * (e + FIT_SCRATCH)
    fit_rows = chunk_rows(memory_budget, held, fit_row, q)
    pieces = max(spare, list_members * listed, measured_members * measured)
    peak = max(looking + hood_rows * hood_row - spare + pieces, held + fit_rows * fit_row)
    return TwonnPlan(hood_rows, list_members, measured_members, fit_rows, peak)


def _two_nearest_members(x: Float[Tensor, "n dim"], distances: Float[Tensor, "n m"], neighbours: Int[Tensor, "n m"],
                         hoods: Int[Tensor, "q k"], plan: TwonnPlan
                         ) -> tuple[Float[Tensor, "q k"], Float[Tensor, "q k"]]:
    """r1, r2 of every member j of every neighbourhood H: its distances to its first and second
    nearest other members of H, read from j's sorted list where it holds two of them."""
    (n, width), (q, k) = neighbours.shape, hoods.shape
    scan = min(SCAN, width)
    head = neighbours[:, :scan].contiguous(), distances[:, :scan].contiguous()
    in_hood = torch.zeros(plan.hood_rows * n, dtype=torch.bool, device=hoods.device)  # [row, point], flat
    r1, r2 = distances.new_empty(q, k), distances.new_empty(q, k)
    for start in range(0, q, plan.hood_rows):
        members = hoods[start : start + plan.hood_rows]
        offset = torch.arange(len(members), device=hoods.device)[:, None] * n
        marked = (members + offset).flatten()
        in_hood.index_fill_(0, marked, True)
        first, second = _first_two_on_lists(in_hood, offset, *head, members)
        for row, column in (part.T for part in second.isinf().nonzero().split(plan.list_members)):  # head < 2
            first[row, column], second[row, column] = _first_two_on_lists(
                in_hood, offset[row], neighbours, distances, members[row, column]
            )
        for row, column in (part.T for part in second.isinf().nonzero().split(plan.measured_members)):  # list < 2
            first[row, column], second[row, column] = _measure_two_nearest(x, members, row, column)
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


def _measure_two_nearest(x: Float[Tensor, "n dim"], members: Int[Tensor, "rows k"], row: Int[Tensor, " m"],
                         column: Int[Tensor, " m"]) -> tuple[Float[Tensor, " m"], Float[Tensor, " m"]]:
    """r1, r2 of the members at (``row``, ``column``) by direct distances to their neighbourhood."""
    who = members[row, column]
    to_all = torch.linalg.vector_norm(x[members[row]] - x[who, None], dim=-1)
    return _two_smallest(to_all.masked_fill_(members[row] == who[:, None], torch.inf))


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
