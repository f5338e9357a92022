"""The Activation Difference Lens (Minder et al. 2025, "Narrow finetuning leaves clearly readable traces in
activation differences").

On N texts of unrelated (pre-training-like) data, at each of the first k positions p and every layer l:

    delta_l(p) = mean_x [h^FT_l(x)_p - h^PT_l(x)_p]          h_l = resid_post.l, canonical positions

Only the first k tokens of each text are run (a causal model's first k positions depend on nothing later); a text
shorter than k counts at its own positions only (`counts`). Position 0 is reported separately: it carries the same
token in every text and, in real models, massive activations. Readouts, through the readout model's final norm
and unembedding (`interp.readout.logit_lens`):

    logit lens   logits of delta_l(p) at every layer and position; "promoted" = the mean of those logits over
                 positions 1..k-1 at the chosen layer (the identification output)
    Patchscope   delta_l(p), rescaled to `scale` times the base's mean activation norm there, replaces the
                 readout model's residual at layer l at the last token of a neutral prompt; the next-token
                 distribution, averaged over the scales, is read

Choosing the readout layer without labels (**ours**): by default the last layer, the one place where the logit lens
is exact (the final norm and unembedding read resid_post of the last block and nothing else); at earlier layers it
is a decoding the model never applies, and the calibration on SmolLM2 found only "unembedding junk" there (word
fragments that top the logit lens of almost any large vector). As a diagnostic (and with `layer="score"` the
choice) every layer gets score(l) = mean over position pairs 1 <= p < q < k of cos(z_l(p), z_l(q)) - mean_p
cos(z_l(p), z(mu_l)), z the centred logit lens and mu_l the base's mean activation at layer l: a trace reads the
same at every position, junk reads like the lens of any large vector. On the tiny zoo's fine-tunes this score does
not single out the readable layer (every layer's readout is consistent there), so it is not the default.
Patchscope reads the middle layer by default, where it says something the logit lens does not (at the last layer
it is the logit lens itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.capture import capture
from interp.errors import BadOption
from interp.intervene import replace
from interp.models import Model, Pair
from interp.prompts import PromptSet, Tokens, as_tokens
from interp.readout import logit_lens, token_strings
from interp.results import Result
from interp.sites import every_layer, resid_post

POSITIONS = 5
SCALES = (0.5, 1.0, 2.0)


@dataclass
class ADLResult(Result):
    """Mean activation differences at the first k positions of every layer, and their readouts.

    delta        [layer, pos, d_model]  mean h_tuned - h_base at resid_post.l, position p
    counts       [pos]                  texts long enough to have position p
    base_norm    [layer, pos]           mean ||h_base|| there (the scale of Patchscope and steering)
    base_mean    [layer, d_model]       mean h_base over positions 1..k-1 (the junk baseline of the layer score)
    lens_ids, lens_logits  [layer, pos, top]  logit-lens top tokens of delta_l(p)
    layer_score  [layer]                the label-free layer score (module docstring); `layer` the readout layer
    promoted_ids, promoted_logits  [top]      mean logit lens over positions 1..k-1 at `layer`
    patch_ids, patch_probs  [pos, top]  Patchscope next-token top tokens at `patch_layer` (empty without a neutral
                                        prompt)
    """

    ANALYSIS = "diffing"
    base: str
    tuned: str
    label: str
    readout: str
    n_texts: int
    delta: Float[Tensor, "layer pos d_model"]
    counts: Int[Tensor, " pos"]
    base_norm: Float[Tensor, "layer pos"]
    base_mean: Float[Tensor, "layer d_model"]
    lens_ids: Int[Tensor, "layer pos top"]
    lens_logits: Float[Tensor, "layer pos top"]
    layer_score: Float[Tensor, " layer"]
    layer: int
    promoted_ids: Int[Tensor, " top"]
    promoted_logits: Float[Tensor, " top"]
    patch_ids: Int[Tensor, "pos top"]
    patch_probs: Float[Tensor, "pos top"]
    patch_layer: int | None
    neutral: str | None
    vocab: dict[str, str]

    def name(self, i: int | Tensor) -> str:
        return self.vocab[str(int(i))]

    def promoted(self, n: int | None = None) -> list[str]:
        """The tokens most promoted at the chosen layer (positions 1..k-1), best first."""
        return [self.name(i) for i in self.promoted_ids[:n]]

    def lens_tokens(self, layer: int, position: int, n: int | None = None) -> list[str]:
        return [self.name(i) for i in self.lens_ids[layer, position, :n]]

    def patch_tokens(self, position: int, n: int | None = None) -> list[str]:
        return [self.name(i) for i in self.patch_ids[position, :n]] if self.patch_ids.numel() else []

    def norms(self) -> Float[Tensor, "layer pos"]:
        """||delta_l(p)|| / mean ||h_base|| at each layer and position."""
        return self.delta.norm(dim=-1) / self.base_norm.clamp_min(1e-12)

    def steering_vector(self, layer: int | None = None, position: int | str = "mean") -> Float[Tensor, " d_model"]:
        """delta at `layer` (default the chosen one), at `position` or averaged over positions 1..k-1 ("mean"),
        rescaled to the base's mean activation norm there: strength 1 adds a vector as long as a typical
        activation."""
        layer = self.layer if layer is None else layer
        cols = (list(range(1, self.delta.shape[1])) or [0]) if position == "mean" else [int(position)]
        v = self.delta[layer, cols].mean(0)
        return v / v.norm().clamp_min(1e-12) * self.base_norm[layer, cols].mean()

    def to_frame(self):
        """One row per layer and position: relative norm, layer score, the top logit-lens tokens."""
        import pandas as pd

        rows = [{"layer": l, "position": p, "count": int(self.counts[p]), "relative_norm": float(self.norms()[l, p]),
                 "layer_score": float(self.layer_score[l]), "chosen": l == self.layer,
                 "logit_lens": " ".join(self.lens_tokens(l, p, 10))}
                for l in range(self.delta.shape[0]) for p in range(self.delta.shape[1])]
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        from analyses.diffing.plots import plot_adl_norms

        return plot_adl_norms(self, ax)


def differences(pair: Pair, tokens: Tokens, positions: int = POSITIONS, *, batch_size: int = 16,
                backend: str | None = None, chunk: int = 256) -> dict[str, Tensor]:
    """Sums over texts at the first `positions` positions of every layer: {"delta", "base", "base_norm"}
    [layer, pos, (d_model)] and "counts" [pos] (means are sums / counts). `chunk` texts are held at a time."""
    k = min(positions, tokens.ids.shape[1])
    sites = every_layer("resid_post", pair.base.n_layers)
    kw = dict(batch_size=batch_size, backend=backend, progress=False)
    sums: dict[str, Tensor] = {}
    for start in range(0, len(tokens), chunk):
        rows = slice(start, start + chunk)
        short = Tokens(tokens.ids[rows, :k], tokens.lengths[rows].clamp(max=k), tokens.pad_id)
        hb, ht = (capture(m, short, sites, **kw) for m in pair.models)
        base = torch.stack([hb[s] for s in sites], 1).double()  # [text, layer, pos, d], pads 0
        diff = torch.stack([ht[s] for s in sites], 1).double() - base
        part = {"delta": diff.sum(0), "base": base.sum(0), "base_norm": base.norm(dim=-1).sum(0),
                "counts": short.mask.sum(0)}
        sums = part if not sums else {key: sums[key] + value for key, value in part.items()}
    return sums


def measure_adl(pair: Pair, prompts: PromptSet | Sequence[str] | Tokens, *, positions: int = POSITIONS,
                readout: str = "tuned", layer: int | str = "last", neutral: str | None = None,
                patch_layer: int | str = "middle", scales: Sequence[float] = SCALES, top: int = 20,
                label: str | None = None, batch_size: int = 16, backend: str | None = None) -> ADLResult:
    """The ADL of `pair` on `prompts` (module docstring). `readout`: whose final norm and unembedding read the
    differences ("tuned" or "base"); `layer`: "last", "score" (the layer score's argmax) or an index;
    `neutral`: the prompt Patchscope injects into (None: no Patchscope) at `patch_layer` ("middle" or an index)."""
    if readout not in ("tuned", "base"):
        raise BadOption(f"readout {readout!r}; use 'tuned' or 'base'")
    if positions < 1:
        raise BadOption(f"positions={positions}; the lens needs at least one position")
    tokens = as_tokens(pair.tuned, prompts)
    sums = differences(pair, tokens, positions, batch_size=batch_size, backend=backend)
    counts = sums["counts"]
    delta = (sums["delta"] / counts[None, :, None].clamp_min(1)).float()
    base_norm = (sums["base_norm"] / counts[None].clamp_min(1)).float()
    later = slice(1, None) if delta.shape[1] > 1 else slice(0, 1)
    base_mean = (sums["base"][:, later].sum(1) / counts[later].sum().clamp_min(1)).float()
    model = pair.tuned if readout == "tuned" else pair.base
    lens = logit_lens(model, delta)
    top = min(top, lens.shape[-1])
    score = layer_scores(lens, logit_lens(model, base_mean))
    n_layers = pair.base.n_layers
    chosen = _layer(layer, score, n_layers)
    promoted = lens[chosen, later].mean(0).topk(top)
    lens_top = lens.topk(top, dim=-1)
    patch = torch.zeros(0, top, dtype=torch.long), torch.zeros(0, top)
    patch_at = None if neutral is None else _layer(patch_layer, score, n_layers)
    if neutral is not None:
        probs = patchscope(model, neutral, delta[patch_at], base_norm[patch_at], patch_at, scales, backend=backend)
        patch = tuple(probs.topk(top, dim=-1))[::-1]
    ids = torch.cat([lens_top.indices.flatten(), promoted.indices, patch[0].flatten()]).unique()
    return ADLResult(pair.base.name, pair.tuned.name, label or (prompts.label if isinstance(prompts, PromptSet)
                                                                else "prompts"),
                     readout, len(tokens), delta, counts, base_norm, base_mean, lens_top.indices, lens_top.values,
                     score, chosen, promoted.indices, promoted.values, patch[0], patch[1], patch_at, neutral,
                     {str(int(i)): token_strings(model, i) for i in ids},
                     settings={"positions": positions, "readout": readout, "layer": layer, "scales": list(scales),
                               "patch_layer": patch_layer, "top": top})


def _layer(layer: int | str, score: Tensor, n_layers: int) -> int:
    """A layer option as an index: "last", "middle", "score" (the score's argmax, the later on ties) or an index."""
    named = {"last": n_layers - 1, "middle": n_layers // 2}
    if layer in named:
        return named[layer]
    if layer == "score":
        return max(i for i in range(len(score)) if score[i] >= score.max() - 1e-9)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise BadOption(f"layer {layer!r}; use 'last', 'middle', 'score' or an index in 0..{n_layers - 1}")
    return layer


def layer_scores(lens: Float[Tensor, "layer pos vocab"], junk: Float[Tensor, "layer vocab"]) -> Float[Tensor, " layer"]:
    """Consistency of the centred logit lens across positions 1..k-1 minus its likeness to the lens of the base's
    mean activation, per layer (module docstring)."""
    z = lens[:, 1:] if lens.shape[1] > 1 else lens
    z = torch.nn.functional.normalize(z - z.mean(-1, keepdim=True), dim=-1)
    j = torch.nn.functional.normalize(junk - junk.mean(-1, keepdim=True), dim=-1)
    k = z.shape[1]
    gram = z @ z.transpose(1, 2)  # [layer, pos, pos]
    consistency = (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / max(k * (k - 1), 1)
    return consistency - (z @ j[:, :, None])[..., 0].mean(1)


def patchscope(model: Model, neutral: str, vectors: Float[Tensor, "pos d_model"], norms: Float[Tensor, " pos"],
               layer: int, scales: Sequence[float] = SCALES, *,
               backend: str | None = None) -> Float[Tensor, "pos vocab"]:
    """Next-token probabilities of `model` on `neutral` with its residual at `layer`, last token, replaced by each
    vector rescaled to `scale * norms[p]`, averaged over `scales`: [pos, vocab]."""
    tokens = as_tokens(model, [neutral])
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    injected = torch.stack([s * norms[p] * unit[p] for p in range(len(unit)) for s in scales])  # [pos*scale, d]
    width = int(tokens.lengths[0])
    values = torch.zeros(len(injected), width, vectors.shape[-1])
    values[:, -1] = injected
    many = Tokens(tokens.ids[:, :width].expand(len(injected), -1).contiguous(), tokens.lengths.expand(len(injected)),
                  tokens.pad_id)
    out = capture(model, many, [], positions="last", logits=True, progress=False, backend=backend,
                  edits=[replace(resid_post(layer), values, positions="last")])
    return out["logits"].float().softmax(-1).reshape(len(unit), len(scales), -1).mean(1)
