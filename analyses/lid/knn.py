"""Exact k nearest neighbours of point clouds, chunked so the N x N distance matrix is never built.

Rows are points, distances are Euclidean in the units of the input. Work runs on ``device`` (default: the
input's) in ``dtype`` (float32 by default, float64 for reference-grade numbers), in row chunks sized from
``memory_budget`` bytes, so N in the hundreds of thousands fits. Exact duplicate points are at distance 0 from
each other; `deduplicate` / `distinct_rows` remove them, as the reference pipeline does before estimating.
"""

from collections.abc import Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import BadOption


MEMORY_BUDGET = 2**30
"""Default bytes of scratch memory per chunk (larger chunks run faster)."""


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
    matrix product per chunk of ``chunk_size`` rows (default: from ``memory_budget``). The
    returned distances are then recomputed as ||a - b||, free of that identity's cancellation,
    so exact duplicates are at distance exactly 0.

    Returns distances (ascending along each row, units of ``points``) and row indices into
    ``points``, both of shape (n or q, k), on the working device.
    """
    x = _working_copy(points, dtype, device)
    q = x if queries is None else _working_copy(queries, dtype, x.device)
    indices = _nearest(x, k, chunk_size, memory_budget, None if queries is None else q)
    rows_per_chunk = max(1, memory_budget // (x.element_size() * k * x.shape[1]))
    hoods = _neighbourhoods(x, indices, rows_per_chunk, q)
    distances = torch.cat([torch.linalg.vector_norm(hood, dim=-1) for _, hood in hoods])
    distances, order = distances.sort(dim=1)
    return distances, indices.gather(1, order)



def _working_copy(points: Float[Tensor, "n dim"], dtype: torch.dtype,
                  device: torch.device | str | None) -> Float[Tensor, "n dim"]:
    if points.ndim != 2:
        raise BadOption(f"points must be an (n, dim) matrix, got shape {tuple(points.shape)}")
    return points.to(device=points.device if device is None else device, dtype=dtype)


def _nearest(x: Float[Tensor, "n dim"], k: int, chunk_size: int | None, memory_budget: int,
             queries: Float[Tensor, "q dim"] | None = None) -> Int[Tensor, "q k"]:
    """Indices of the k nearest rows of ``x`` to every query (default: to every row of ``x``,
    itself excluded), unsorted, by chunked matrix products."""
    n = len(x)
    if not 0 < k < n + (queries is not None):
        raise BadOption(f"k={k} neighbours needs 0 < k < n, with n={n} points; lower k")
    centre = x.mean(dim=0)  # distances are translation-invariant; smaller norms cancel less
    centred = x - centre
    rows_of = centred if queries is None else queries - centre
    sq_norms = centred.square().sum(dim=1)
    if chunk_size is None:
        chunk_size = max(1, memory_budget // (x.element_size() * (2 * n + k)))
    buffer = x.new_empty(min(chunk_size, len(rows_of)), n)  # reused: fresh pages are slow on some hosts
    nearest = []
    for start in range(0, len(rows_of), chunk_size):
        rows = rows_of[start : start + chunk_size]
        # ||a - b||^2 - ||a||^2 = ||b||^2 - 2ab ranks the b of each row a as the distance does
        shifted = torch.addmm(sq_norms, rows, centred.T, alpha=-2, out=buffer[: len(rows)])
        if queries is None:
            shifted.diagonal(offset=start).fill_(torch.inf)  # the point itself
        nearest.append(shifted.topk(k, dim=1, largest=False, sorted=False).indices)
    return torch.cat(nearest)


def _neighbourhoods(x: Float[Tensor, "n dim"], neighbours: Int[Tensor, "q k"], chunk_size: int,
                    centres: Float[Tensor, "q dim"] | None = None
                    ) -> Iterator[tuple[Int[Tensor, "chunk k"], Float[Tensor, "chunk k dim"]]]:
    """Chunks of neighbour indices and their neighbourhoods centred on their points,
    hood[i, j] = x[members[i, j]] - centres[i] (default centres: x itself).

    Every hood is written into the same buffer, so use each before asking for the next.
    """
    centres = x if centres is None else centres
    (n, k), dim = neighbours.shape, x.shape[1]
    buffer = x.new_empty(min(chunk_size, n) * k, dim)
    for start in range(0, n, chunk_size):
        members = neighbours[start : start + chunk_size]
        hood = torch.index_select(x, 0, members.flatten(), out=buffer[: members.numel()])
        hood = hood.view(-1, k, dim).sub_(centres[start : start + len(members), None])
        yield members, hood
