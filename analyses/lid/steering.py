"""Raw vs on-manifold steering at equal effect (`compare_steering`), with the mean fine-tuning shift
(`mean_shift`) as the vector to steer with.

`compare_steering` scales the raw and the tangent-projected vector (see `analyses.lid.tangent`) to equal effect
(KL of the next-token distribution, or a target token's probability) and reports how far the steered points land
from the reference cloud and the LID of the steered cloud.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.lid.clouds import N_TOKENS, PointCloud, as_list, layer_site, point_cloud, point_clouds
from analyses.lid.knn import knn
from analyses.lid.local_id import K, estimate, summary
from analyses.lid.tangent import prepare_reference, tangent_add, tangent_projection
from interp.capture import capture
from interp.errors import BadOption
from interp.intervene import Edit, add, replace
from interp.models import Model, Pair
from interp.prompts import PromptSet, Tokens, as_tokens
from interp.results import Result
from interp.sites import Site


@dataclass
class SteeringResult(Result):
    """Raw vs tangent-projected steering at equal effect. `table` has one row per method ("none": unsteered,
    "raw", "tangent"), target effect and measured site: the scale found, the effect reached, the mean norm of
    what was added, the mean distance of the steered points to their nearest reference point and the mean LID
    of the steered cloud (NaN, or None once loaded, where an effect was not reachable)."""

    ANALYSIS = "lid"
    site: str
    metric: str
    table: list[dict]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.table)

    def plot(self, ax=None):
        from analyses.lid.plots import plot_steering

        return plot_steering(self, ax)


def mean_shift(pair: Pair, prompts: PromptSet | Sequence[str] | Tokens, site: int | str | Site, *,
               n_tokens: int | None = N_TOKENS, seed: int = 0) -> Float[Tensor, " d_model"]:
    """The mean fine-tuning shift at `site`: the mean of the tuned model's cloud minus the base's, on the same
    sampled tokens of `prompts`."""
    base, tuned = (point_cloud(m, prompts, site, n_tokens=n_tokens, seed=seed, progress=False) for m in pair.models)
    return tuned.points.mean(0) - base.points.mean(0)


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
    measured = [layer_site(model, m) for m in as_list(measure_layers)] if measure_layers is not None else \
        list(dict.fromkeys([steer_site, layer_site(model, None)]))
    kw = dict(n_tokens=n_tokens, seed=seed, batch_size=batch_size, progress=progress)
    references = point_clouds(model, reference_prompts, measured, **kw)
    ref = prepare_reference(references[str(steer_site)], k, device=model.device)
    tokens = as_tokens(model, prompts)
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
    return SteeringResult(str(steer_site), metric, table,
                          settings={"effects": [float(e) for e in effects], "k": k, "n_tokens": n_tokens, "seed": seed,
                                    "tolerance": tolerance, "dimension": dimension})


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
            raise BadOption("metric='target' needs target= (a token or token id)")
        t = target if isinstance(target, int) else model.tokenizer.convert_tokens_to_ids(target)
        return lambda edits: float(logprobs(edits)[:, t].exp().mean() - base[:, t].exp().mean())
    raise BadOption(f"unknown metric {metric!r}; use 'kl' or 'target'")


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
