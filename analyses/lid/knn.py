"""Exact k nearest neighbours of point clouds, chunked so the N x N distance matrix is never built.

Rows are points, distances are Euclidean in the units of the input. Work runs on ``device`` (default: the
input's) in ``dtype`` (float32 by default, float64 for reference-grade numbers), in row chunks planned by
`knn_plan` so that everything the k-NN holds at once (points, results and scratch) fits ``memory_budget``
bytes, so N in the hundreds of thousands fits. Exact duplicate points are at distance 0 from each other;
`deduplicate` / `distinct_rows` remove them, as the reference pipeline does before estimating.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import BadOption


MEMORY_BUDGET = 2**30
"""Default bytes of working memory of a whole k-NN or estimate: points, results and scratch."""
INDEX = 8
"""Bytes of an int64 index."""
TOPK_SCRATCH = 16
"""Bytes per point of the top-k's queue (a (value, index) pair per point, per thread)."""


@dataclass(frozen=True)
class KnnPlan:
    """Rows per chunk of `knn`'s two passes, and the most bytes it holds at once with them."""

    block_rows: int  # queries ranked against every point at once
    hood_rows: int  # queries whose neighbourhoods are gathered at once to measure their distances
    peak: int  # bytes; over the budget only where one row per chunk is


def knn_plan(n: int, dim: int, k: int, dtype: torch.dtype = torch.float32, memory_budget: int = MEMORY_BUDGET,
             queries: int | None = None) -> KnnPlan:
    """How `knn` chunks n points of ``dim`` coordinates in ``dtype`` (with ``queries``: that many query rows) so
    that all it holds at once fits ``memory_budget`` bytes, counting, with e bytes an element and q query rows:

    throughout: the points (n x dim), the query copy (q x dim, with queries) and the neighbour indices (q x k);
    ranking: the centred points (n x dim), their squared norms (n), the centred queries (q x dim, with queries),
    the top-k's queue (16 n) and per block row its distances to every point (n) and top-k values (k);
    measuring: the distances (q x k) and per row its neighbourhood (k x dim), its distances sorted (k), the order
    sorting them (k indices) and the indices reordered (k).

    Neighbourhoods come in `chunk_rows`; blocks keep the budget // (e (2n + k)) rows they always had (about half
    the budget) wherever those fit, since the products of a row round differently with the block's height, which
    could flip near-ties at the k-th neighbour.
    """
    e = dtype.itemsize
    q = n if queries is None else queries
    held = e * n * dim + INDEX * q * k + (0 if queries is None else e * q * dim)
    ranking = held + e * (n * dim + n) + (0 if queries is None else e * q * dim) + TOPK_SCRATCH * n
    block_row = e * (n + k)
    block_rows = min(q, max(1, min(memory_budget // (e * (2 * n + k)), (memory_budget - ranking) // block_row)))
    measuring = held + e * q * k
    hood_row = e * k * dim + (e + 2 * INDEX) * k
    hood_rows = chunk_rows(memory_budget, measuring, hood_row, q)
    return KnnPlan(block_rows, hood_rows, max(ranking + block_rows * block_row, measuring + hood_rows * hood_row))


def chunk_rows(memory_budget: int, held: int, row: int, most: int) -> int:
    """Rows (1 to ``most``) of a chunk of ``row`` bytes a row that fit the budget beside ``held`` bytes and take at
    most half of it: larger chunks run no faster, and the other half is room for what no plan counts (the
    allocator's free fragments, BLAS's packing buffers, what the caller holds)."""
    return min(most, max(1, min(memory_budget // 2, memory_budget - held) // row))


def deduplicate(points: Float[Tensor, "n dim"]) -> Float[Tensor, "m dim"]:
    """The distinct rows of ``points``, in order of first occurrence."""
    return points[distinct_rows(points)]


def distinct_rows(points: Float[Tensor, "n dim"]) -> Int[Tensor, "m"]:
    """Indices of the first occurrence of every distinct row of ``points``, ascending."""
    unique, inverse = torch.unique(points, dim=0, return_inverse=True)
    order = torch.arange(len(points), device=points.device)
    first = order.new_full((len(unique),), len(points))
    first.scatter_reduce_(0, inverse, order, reduce="amin")
    return first.sort().values


def knn(points: Float[Tensor, "n dim"], k: int, *, queries: Float[Tensor, "q dim"] | None = None,
        chunk_size: int | None = None, memory_budget: int = MEMORY_BUDGET, dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None) -> tuple[Float[Tensor, "n k"], Int[Tensor, "n k"]]:
    """Exact k nearest neighbours of every point among the others (the point itself excluded),
    or, with ``queries``, the k nearest ``points`` of every query (nothing excluded).

    Neighbours are ranked by squared distances ||a||^2 + ||b||^2 - 2ab on centred points, one
    matrix product per block of ``chunk_size`` rows (default: `knn_plan`'s). The returned
    distances are then recomputed as ||a - b||, free of that identity's cancellation, so exact
    duplicates are at distance exactly 0.

    Returns distances (ascending along each row, units of ``points``) and row indices into
    ``points``, both of shape (n or q, k), on the working device.
    """
    x = _working_copy(points, dtype, device)
    q = x if queries is None else _working_copy(queries, dtype, x.device)
    if not 0 < k < len(x) + (queries is not None):
        raise BadOption(f"k={k} neighbours needs 0 < k < n, with n={len(x)} points; lower k")
    plan = knn_plan(len(x), x.shape[1], k, x.dtype, memory_budget, None if queries is None else len(q))
    indices = _nearest(x, k, chunk_size or plan.block_rows, None if queries is None else q)
    distances = x.new_empty(indices.shape)
    for start, members, hood in _neighbourhoods(x, indices, plan.hood_rows, q):
        rows = slice(start, start + len(members))
        torch.linalg.vector_norm(hood, dim=-1, out=distances[rows])
        distances[rows], order = distances[rows].sort(dim=1)
        indices[rows] = members.gather(1, order)
    return distances, indices


def _working_copy(points: Float[Tensor, "n dim"], dtype: torch.dtype,
                  device: torch.device | str | None) -> Float[Tensor, "n dim"]:
    if points.ndim != 2:
        raise BadOption(f"points must be an (n, dim) matrix, got shape {tuple(points.shape)}")
    return points.to(device=points.device if device is None else device, dtype=dtype)


def _nearest(x: Float[Tensor, "n dim"], k: int, chunk_size: int,
             queries: Float[Tensor, "q dim"] | None = None) -> Int[Tensor, "q k"]:
    """Indices of the k nearest rows of ``x`` to every query (default: to every row of ``x``,
    itself excluded), unsorted, by matrix products of ``chunk_size`` queries at a time."""
    centre = x.mean(dim=0)  # distances are translation-invariant; smaller norms cancel less
    centred = x - centre
    rows_of = centred if queries is None else queries - centre
    sq_norms = centred.square().sum(dim=1)
    rows = min(chunk_size, len(rows_of))
    buffer, values = x.new_empty(rows, len(x)), x.new_empty(rows, k)  # reused: fresh pages are slow on some hosts
    nearest = torch.empty(len(rows_of), k, dtype=torch.long, device=x.device)
    for start in range(0, len(rows_of), chunk_size):
        block = rows_of[start : start + chunk_size]
        # ||a - b||^2 - ||a||^2 = ||b||^2 - 2ab ranks the b of each row a as the distance does
        shifted = torch.addmm(sq_norms, block, centred.T, alpha=-2, out=buffer[: len(block)])
        if queries is None:
            shifted.diagonal(offset=start).fill_(torch.inf)  # the point itself
        torch.topk(shifted, k, dim=1, largest=False, sorted=False,
                   out=(values[: len(block)], nearest[start : start + len(block)]))
    return nearest


def _neighbourhoods(x: Float[Tensor, "n dim"], neighbours: Int[Tensor, "q k"], chunk_size: int,
                    centres: Float[Tensor, "q dim"] | None = None
                    ) -> Iterator[tuple[int, Int[Tensor, "chunk k"], Float[Tensor, "chunk k dim"]]]:
    """Chunks of neighbour indices (with the row they start at) and their neighbourhoods centred
    on their points, hood[i, j] = x[members[i, j]] - centres[i] (default centres: x itself).

    Every hood is written into the same buffer, so use each before asking for the next.
    """
    centres = x if centres is None else centres
    (n, k), dim = neighbours.shape, x.shape[1]
    buffer = x.new_empty(min(chunk_size, n) * k, dim)
    for start in range(0, n, chunk_size):
        members = neighbours[start : start + chunk_size]
        hood = torch.index_select(x, 0, members.flatten(), out=buffer[: members.numel()])
        yield start, members, hood.view(-1, k, dim).sub_(centres[start : start + len(members), None])
