"""Point clouds: the vectors at a site of N sampled, non-pad tokens, each with the prompt and position it came from.

Tokens are drawn with a seeded generator. With `deduplicate`, a token whose whole prefix repeats an earlier
token's is dropped before the forward (in a causal model it has the same vector, and deciding on token ids is
immune to batch-dependent round-off), and exactly equal vectors left after it are dropped too, as the reference
code does. A site is `resid_post.l` (an int l, negative from the end), "final" (the final norm's output), or any
site name. `store_clouds` draws the clouds from an activation store (`interp.store`) instead of running a model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from analyses.lid.knn import distinct_rows
from interp.capture import DEFAULT_BUDGET, capture
from interp.models import Model
from interp.prompts import Tokens, as_tokens
from interp.sites import Site, site as parse_site
from interp.store import ActivationStore

N_TOKENS = 60_000
"""Points per cloud (the paper's N)."""


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
    keyed by site name. `prompts`: a PromptSet, strings or Tokens. `edits` apply during the forward (e.g. a
    steering edit)."""
    return dict(iter_clouds(model, prompts, layers, n_tokens=n_tokens, seed=seed, deduplicate=deduplicate,
                            edits=edits, batch_size=batch_size, backend=backend, memory_budget=memory_budget,
                            shard_dir=shard_dir, progress=progress))


def point_cloud(model: Model, prompts, layer: int | str | Site | None = None, **kwargs) -> PointCloud:
    """The point cloud at one site; keyword arguments as `point_clouds`."""
    (cloud,) = point_clouds(model, prompts, [layer], **kwargs).values()
    return cloud


def iter_clouds(model: Model, prompts, layers, *, n_tokens, seed, deduplicate, edits=(), batch_size=16,
                backend=None, memory_budget=DEFAULT_BUDGET, shard_dir=None,
                progress=True) -> Iterator[tuple[str, PointCloud]]:
    """One capture of the sampled tokens at every site, then the clouds one site at a time."""
    tokens = as_tokens(model, prompts)
    sites = [layer_site(model, layer) for layer in as_list(layers)]
    chosen = sample_tokens(tokens, n_tokens, seed, deduplicate)
    acts = capture(model, tokens, sites, positions=chosen, edits=edits, batch_size=batch_size, backend=backend,
                   memory_budget=memory_budget, shard_dir=shard_dir, progress=progress)
    where = acts.selected
    for s in sites:
        points = acts[s]
        keep = distinct_rows(points) if deduplicate else torch.arange(len(points))
        yield str(s), PointCloud(str(s), points[keep], where[keep, 0], where[keep, 1])


def store_clouds(store: ActivationStore, layers=None, *, n_tokens: int | None = N_TOKENS, seed: int = 0,
                 deduplicate: bool = True) -> Iterator[tuple[str, PointCloud]]:
    """Clouds of the same sampled tokens of an activation store (`interp.store`) at each of `layers`, one site at a
    time, the store read one shard at a time. Tokens are drawn as `sample_tokens` draws them, each window of the
    store playing a prompt (a corpus of documents that fit one window gives the clouds `point_clouds` gives with
    the documents as prompts), except that a prefix is recognised by a 62-bit hash of its token ids; a cloud's
    `prompt` is each token's document and `position` its position in the document."""
    sites = [layer_site(store, layer) for layer in as_list(layers)]
    if deduplicate:
        hashes = torch.cat([_prefix_hashes(**store.shard(i, ["position", "token"]), window=store.window)
                            for i in range(store.n_shards)])
        candidates = distinct_rows(hashes[:, None])
        del hashes
    else:
        candidates = torch.arange(len(store))
    if n_tokens is not None and n_tokens < len(candidates):
        draw = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:n_tokens]
        candidates = candidates[draw.sort().values]
        del draw  # a view of the whole permutation
    doc, position = store.rows("doc", candidates), store.rows("position", candidates)
    for s in sites:
        points = store.rows(str(s), candidates).float()
        keep = distinct_rows(points) if deduplicate else torch.arange(len(points))
        points = points[keep]
        yield str(s), PointCloud(str(s), points, doc[keep], position[keep])
        del points  # hold no cloud while the next is read


_HASH = ((2**31 - 1, 48_271), (1_000_000_007, 911_382_323))  # (modulus, multiplier) of two polynomial hashes


def _prefix_hashes(position: Int[Tensor, " token"], token: Int[Tensor, " token"], window: int) -> Int[Tensor, " token"]:
    """For each token of a shard, a 62-bit hash of its prefix in its window (its own id and those before it in the
    window; a window starts where position % window == 0, and its tokens are consecutive rows)."""
    offset = position % window
    by_offset = offset.argsort(stable=True)  # the rows at offset 0, then those at offset 1, ...
    ends = offset.bincount().cumsum(0).tolist()
    parts = []
    for modulus, multiplier in _HASH:
        h = torch.zeros_like(token)
        for p, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends)):
            rows = by_offset[lo:hi]
            before = h[rows - 1] * multiplier if p else 0
            h[rows] = (before + token[rows] + 1) % modulus
        parts.append(h)
    return parts[0] * _HASH[1][0] + parts[1]


def as_list(layers) -> list:
    """`layers` (None, one layer or site, or several) as a list."""
    if layers is None or isinstance(layers, (int, str, Site)):
        return [layers]
    return list(layers)
