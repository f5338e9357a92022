"""Weight edits built from task vectors tau = theta_tuned - theta_base: LiNeS, task arithmetic, resets.

All three are weight edits, not forward-pass edits: inside the `with` block a model's own parameters carry the edited
values (so logits, loss, generation and every backend see them), and on exit they are restored bit for bit. Values
are formed as torch.lerp(theta0, theta, s), so a scale of 0 gives the base's values and 1 the tuned's exactly.

LiNeS (Wang et al. 2024): block l = 1..L of the tuned model gets theta0 + lambda(l) tau with
lambda(l) = alpha + beta (l - 1) / (L - 1) (lambda = alpha when L = 1). Outside the blocks: the token and position
embeddings sit below block 1 and get lambda(1) = alpha; the final norm and the unembedding sit above block L and get
lambda(L) = alpha + beta (`embed_scale`, `head_scale` override them). Tied embeddings (one matrix for both ends) are
the embedding and get alpha. So (alpha, beta) = (1, 0) is the tuned model, (0, 0) the base, (lam, 0) uniform scaling.

Task arithmetic: theta0 + lambda(l) sum_i c_i tau_i (lambda = 1 without LiNeS); a negative c_i negates a task.
Reset: the tuned model with some parts (`analyses.weights.parts`) set back to the base's values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from analyses.intruders.matrices import layout
from analyses.weights.parts import Part, model_parts
from interp.errors import BadModelArgument, BadOption
from interp.models import Model, Pair, check_compatible
from interp.weights import rewritten, save_checkpoint


def lines_scale(layer: int, n_layers: int, alpha: float, beta: float) -> float:
    """lambda(l) = alpha + beta (l - 1) / (L - 1) of block `layer` (0-based, so l = layer + 1)."""
    return alpha + (beta * layer / (n_layers - 1) if n_layers > 1 else 0.0)


def part_scales(parts: Sequence[Part], n_layers: int, alpha: float, beta: float, embed_scale: float | None = None,
                head_scale: float | None = None) -> dict[str, float]:
    """The LiNeS scale of every part, by name (see the module docstring for the parts outside the blocks)."""
    bottom = alpha if embed_scale is None else embed_scale
    top = lines_scale(n_layers - 1, n_layers, alpha, beta) if head_scale is None else head_scale
    return {p.name: lines_scale(p.layer, n_layers, alpha, beta) if p.layer is not None
            else bottom if p.module in ("embed", "pos_embed") else top for p in parts}


def interpolated(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], parts: Sequence[Part],
                 scales: Mapping[str, float]) -> dict[str, Tensor]:
    """theta0 + s tau for every piece of every part with scale s != 1 (and pieces of the same parameter at 1 too);
    parameters untouched by such a part are left out (they keep the tuned values)."""
    values: dict[str, Tensor] = {}
    for part in parts:
        s = scales.get(part.name, 1.0)
        if s == 1.0:
            continue
        for piece in part.pieces:
            if piece.param not in values:
                values[piece.param] = tuned[piece.param].detach().clone()
            target = piece.view(values[piece.param])
            target.copy_(torch.lerp(piece.view(base[piece.param]), piece.view(tuned[piece.param]), s))
    return values


def _parts(model: Model) -> list[Part]:
    return model_parts(model.hf, layout(model, False)[0])


def _params(model: Model) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.hf.named_parameters()}


@contextmanager
def scaled(pair: Pair, scales: Mapping[str, float]) -> Iterator[Model]:
    """`pair.tuned` with each part's update scaled by `scales[part name]` (1 where absent); yields it."""
    parts = _parts(pair.tuned)
    with rewritten(pair.tuned) as write:
        write(interpolated(_params(pair.base), _params(pair.tuned), parts, scales))
        yield pair.tuned


@contextmanager
def lines(pair: Pair, alpha: float, beta: float, *, embed_scale: float | None = None,
          head_scale: float | None = None) -> Iterator[Model]:
    """Within the block, `pair.tuned` carries the LiNeS-scaled update (module docstring): block l's update times
    alpha + beta (l - 1) / (L - 1). Yields it; its weights are restored exactly on exit."""
    scales = part_scales(_parts(pair.tuned), pair.tuned.n_layers, alpha, beta, embed_scale, head_scale)
    with scaled(pair, scales) as model:
        yield model


def save_lines_checkpoint(pair: Pair, alpha: float, beta: float, folder: str | Path, **kwargs) -> Path:
    """The LiNeS-scaled tuned model as a Hugging Face folder (weights, config, tokenizer) that `load_model` reads;
    `kwargs` as for `lines`."""
    with lines(pair, alpha, beta, **kwargs) as model:
        return save_checkpoint(model, folder)


@contextmanager
def reset(pair: Pair, parts: Sequence[Part | str]) -> Iterator[Model]:
    """Within the block, `pair.tuned` has `parts` (Parts or part names, e.g. "3.q", "embed") reset to the base's
    values and keeps the rest of its update. Yields it; restored exactly on exit."""
    known = {p.name for p in _parts(pair.tuned)}
    names = [p.name if isinstance(p, Part) else p for p in parts]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BadOption(f"unknown part {unknown[0]!r}; the parts are named like {', '.join(sorted(known)[:4])}, ...")
    with scaled(pair, dict.fromkeys(names, 0.0)) as model:
        yield model


@contextmanager
def merge(base: Model, tuned: Sequence[Model], coefficients: Sequence[float], *,
          lines: tuple[float, float] | None = None) -> Iterator[Model]:
    """Task arithmetic: within the block, `tuned[0]` carries theta0 + lambda(l) sum_i c_i tau_i (lambda(l) the LiNeS
    scale of `lines` = (alpha, beta), else 1). Yields it; every tuned model is restored exactly on exit. One task
    vector with coefficient 1 is that fine-tune exactly; `merge(base, [t], [-1.0])` negates it."""
    if not tuned or len(tuned) != len(coefficients):
        raise BadOption(f"merge needs one coefficient per tuned model, got {len(tuned)} models and "
                        f"{len(coefficients)} coefficients")
    for model in tuned:
        if not isinstance(model, Model):
            raise BadModelArgument(f"merge takes loaded Models, got {type(model).__name__}")
        check_compatible(base, model)
    parts = _parts(base)
    scales = (part_scales(parts, base.n_layers, *lines) if lines is not None else {})
    theta0, thetas = _params(base), [_params(t) for t in tuned]
    with rewritten(tuned[0]) as write:
        write(_merged(theta0, thetas, [float(c) for c in coefficients], parts, scales))
        yield tuned[0]


def _merged(theta0: Mapping[str, Tensor], thetas: Sequence[Mapping[str, Tensor]], coefficients: Sequence[float],
            parts: Sequence[Part], scales: Mapping[str, float]) -> dict[str, Tensor]:
    """theta0 + s_part sum_i c_i tau_i of every parameter (one task vector: lerp, exact at 0 and 1)."""
    values: dict[str, Tensor] = {}
    for part in parts:
        s = scales.get(part.name, 1.0)
        for piece in part.pieces:
            name = piece.param
            if name not in values:
                values[name] = theta0[name].clone()
            W0 = piece.view(theta0[name])
            if len(thetas) == 1:
                edited = torch.lerp(W0, piece.view(thetas[0][name]), s * coefficients[0])
            else:
                edited = W0 + s * sum(c * (piece.view(t[name]) - W0) for c, t in zip(coefficients, thetas))
            piece.view(values[name]).copy_(edited)
    return values
