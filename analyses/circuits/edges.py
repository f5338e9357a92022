"""Edge attribution patching (EAP) and its integrated-gradients variant (EAP-IG, Hanna et al. 2024).

Nodes. Upstream (writers to the residual stream): `embed`, every head `a{L}.{H}` (head_out.L.H) and every MLP
`m{L}` (mlp_out.L). Downstream (readers): each layer's attention `attn{L}` (all heads of a layer share one
input, so the q/k/v inputs of single heads are not separated), each MLP `mlp{L}` and the `logits`.

An edge u -> v exists when u writes before v reads. Its score, for the noising direction (corrupt into clean),

    score(u -> v) = mean over pairs of  sum_pos (a_u,corrupt - a_u,clean) . dm / d(input_v)  /  (m_clean - m_corrupt)

where dm/d(input_v) is the gradient through v alone. From the gradients g at the residual sites:

    attn{L}: g(resid_pre.L) - g(resid_mid.L)     mlp{L}: g(resid_mid.L) - g(resid_post.L)     logits: g(resid_post.last)

so an upstream node's edge scores sum to its attribution-patching estimate (tested). EAP takes g at the
clean run; EAP-IG averages g over `ig_steps` runs whose input embeddings are interpolated between clean and
corrupt at the midpoints alpha = (k - 1/2) / steps.

Faithfulness of a circuit (a set of kept edges) is measured at node level: every upstream node that has no
kept edge is patched to its corrupt activation, all at once, and the metric is normalised,
(m_circuit - m_corrupt) / (m_clean - m_corrupt) (1 = the full model, 0 = the fully corrupted run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float
from torch import Tensor

from analyses.circuits.patching import TokenPairs, _grad_metric, last_logits, metric_of, metric_values
from interp.capture import capture
from interp.errors import BadOption
from interp.intervene import replace
from interp.sites import Site


@dataclass
class EdgeScores:
    """Normalised edge scores [upstream, downstream]; `valid` marks the edges that exist."""

    upstream: list[str]
    downstream: list[str]
    scores: Float[Tensor, "up down"]
    valid: Bool[Tensor, "up down"]

    def circuit(self, top_n: int | None = None, threshold: float | None = None) -> Bool[Tensor, "up down"]:
        """Kept edges: the `top_n` largest |score|, or every |score| >= `threshold`."""
        size = self.scores.abs().masked_fill(~self.valid, -1.0)
        if top_n is not None:
            keep = torch.zeros_like(self.valid)
            keep.view(-1)[size.flatten().topk(min(top_n, int(self.valid.sum()))).indices] = True
            return keep
        if threshold is None:
            raise BadOption("pass top_n or threshold")
        return size >= threshold

    def top(self, n: int) -> list[tuple[str, str, float]]:
        """The n edges of largest |score| as (upstream, downstream, score)."""
        kept = self.circuit(top_n=n).nonzero().tolist()
        rows = [(self.upstream[u], self.downstream[v], float(self.scores[u, v])) for u, v in kept]
        return sorted(rows, key=lambda r: -abs(r[2]))


def node_names(n_layers: int, n_heads: int) -> tuple[list[str], list[str]]:
    up = ["embed"] + [n for layer in range(n_layers) for n in
                      [*(f"a{layer}.{h}" for h in range(n_heads)), f"m{layer}"]]
    down = [n for layer in range(n_layers) for n in (f"attn{layer}", f"mlp{layer}")] + ["logits"]
    return up, down


def _order(name: str) -> tuple[float, float]:
    """(layer, 0 = attention, 1 = MLP) of a node; embed first, logits last."""
    if name == "embed":
        return (-1, 1)
    if name == "logits":
        return (float("inf"), 0)
    if name.startswith(("attn", "a")):
        return (int(name.removeprefix("attn").removeprefix("a").split(".")[0]), 0)
    return (int(name.removeprefix("mlp").removeprefix("m")), 1)


def edge_valid(up: list[str], down: list[str]) -> Tensor:
    return torch.tensor([[_order(u) < _order(v) for v in down] for u in up])


def upstream_site(name: str) -> Site:
    if name == "embed":
        return Site("embed")
    if name.startswith("a"):
        layer, head = name[1:].split(".")
        return Site("head_out", int(layer), int(head))
    return Site("mlp_out", int(name[1:]))


def edge_attribution(model, tp: TokenPairs, *, ig_steps: int = 0, metric: str = "logit_diff",
                     batch_size: int = 64) -> EdgeScores:
    """EAP (`ig_steps=0`) or EAP-IG edge scores, noising direction (see the module docstring)."""
    L = model.n_layers
    writers = [Site("embed")] + [Site(k, layer) for layer in range(L) for k in ("head_out", "mlp_out")]
    readers = [Site(k, layer) for layer in range(L) for k in ("resid_pre", "resid_mid")] + [Site("resid_post", L - 1)]
    corrupt = capture(model, tp.corrupt, writers, logits=True, batch_size=batch_size, progress=False)
    clean = capture(model, tp.clean, writers + readers, logits=True, metric=_grad_metric(tp, metric),
                    batch_size=batch_size, progress=False)
    if ig_steps:
        path = corrupt["embed"] - clean["embed"]
        grads = {s: 0.0 for s in readers}
        for k in range(ig_steps):
            alpha = (k + 0.5) / ig_steps
            start = (clean["embed"] + alpha * path).requires_grad_(True)
            run = capture(model, tp.clean, readers, edits=[replace("embed", start)], metric=_grad_metric(tp, metric),
                          batch_size=batch_size, progress=False)
            grads = {s: grads[s] + run.grad(s) / ig_steps for s in readers}
    else:
        grads = {s: clean.grad(s) for s in readers}
    g = [grads[Site("resid_pre", layer)] for layer in range(L)] + [grads[Site("resid_post", L - 1)]]
    mid = [grads[Site("resid_mid", layer)] for layer in range(L)]
    path_grads = torch.stack([x for layer in range(L) for x in (g[layer] - mid[layer], mid[layer] - g[layer + 1])]
                             + [g[L]])  # [down, pair, pos, d_model]
    deltas = [corrupt["embed"] - clean["embed"]]
    for layer in range(L):
        heads = corrupt[f"head_out.{layer}"] - clean[f"head_out.{layer}"]
        mlp = corrupt[f"mlp_out.{layer}"] - clean[f"mlp_out.{layer}"]
        deltas += [*rearrange(heads, "pair pos head d -> head pair pos d"), mlp]
    raw = einsum(torch.stack(deltas), path_grads, "up pair pos d, down pair pos d -> up down") / len(tp)
    gap = (metric_of(last_logits(clean), tp.answer, tp.wrong, metric).mean()
           - metric_of(last_logits(corrupt), tp.answer, tp.wrong, metric).mean())
    up, down = node_names(L, model.n_heads)
    valid = edge_valid(up, down)
    return EdgeScores(up, down, (raw / gap).masked_fill(~valid, 0.0), valid)


def faithfulness(model, tp: TokenPairs, edges: EdgeScores, keep: Bool[Tensor, "up down"], *,
                 metric: str = "logit_diff", batch_size: int = 64, ends: tuple[float, float] | None = None) -> float:
    """Normalised metric with every upstream node outside the circuit patched to corrupt (node level).
    `ends` = (mean m_clean, mean m_corrupt) when already known."""
    outside = [upstream_site(u) for u, row in zip(edges.upstream, keep) if not row.any()]
    corrupt = capture(model, tp.corrupt, outside, batch_size=batch_size, progress=False) if outside else None
    edits = [replace(s, corrupt[s]) for s in outside]
    m_circuit = float(metric_values(model, tp.clean, tp, metric, edits, batch_size).mean())
    m_clean, m_corrupt = ends or (float(metric_values(model, t, tp, metric, batch_size=batch_size).mean())
                                  for t in (tp.clean, tp.corrupt))
    return (m_circuit - m_corrupt) / (m_clean - m_corrupt)


def faithfulness_curve(model, tp: TokenPairs, edges: EdgeScores, sizes, *, metric: str = "logit_diff",
                       batch_size: int = 64) -> dict[int, float]:
    """Faithfulness of the top-n-edge circuit for each n in `sizes`."""
    ends = tuple(float(metric_values(model, t, tp, metric, batch_size=batch_size).mean())
                 for t in (tp.clean, tp.corrupt))
    return {n: faithfulness(model, tp, edges, edges.circuit(top_n=n), metric=metric, batch_size=batch_size,
                            ends=ends) for n in sizes}
