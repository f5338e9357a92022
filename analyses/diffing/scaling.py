"""Latent scaling (Minder et al. 2025, arXiv 2504.02922): which crosscoder latents only one model needs, and their
grounding (top-activating contexts, logit-lens tokens).

For latent j with direction d_j and activation f_j(x), the least-squares coefficient of how well it explains y^M:

    beta^M_j = sum_x f_j(x) <d_j, y^M(x)> / (||d_j||^2 sum_x f_j(x)^2)       nu_j = beta^PT_j / beta^FT_j

with y^M the crosscoder's reconstruction of model M's activation ("reconstruction": catches latent decoupling,
other latents carrying the same information in the base) or model M's reconstruction error plus latent j's own
contribution f_j d_j^M ("error": catches complete shrinkage, the base's share left in its error). d_j is the tuned
decoder column (as in the paper), except for latents whose base decoder is the longer one, which get the base's
(a base-only latent has no tuned direction to fit; **ours**). Labels (**ours**): tuned-only when nu < `threshold`
in both variants, base-only when 1/nu < `threshold` in both, shared otherwise, dead when it never fires. The
decoder-norm ratio ||d^FT|| / (||d^PT|| + ||d^FT||) is kept for comparison (it mislabels shared latents as
model-only under the L1 loss; the paper's reason for latent scaling). nu is +inf where beta^FT is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses.diffing.crosscoder import CrosscoderResult, PairedActivations
from interp.models import Model
from interp.readout import logit_lens, token_strings
from interp.results import Result

THRESHOLD = 0.3
LABELS = ("tuned-only", "base-only", "shared", "dead")


@dataclass
class LatentScaling(Result):
    """Per latent: betas of both variants and models, nu, the decoder-norm ratio, firing frequency and the label;
    for the `grounded` latents (the tuned-only ones first, then base-only, by frequency): their top-activating
    contexts and the logit-lens tokens of their tuned and of their base decoder directions (each through its own
    model's head)."""

    ANALYSIS = "diffing"
    layer: int
    beta: dict[str, Tensor]
    """"reconstruction.base", "reconstruction.tuned", "error.base", "error.tuned" -> [latent]"""
    nu_reconstruction: Float[Tensor, " latent"]
    nu_error: Float[Tensor, " latent"]
    norm_ratio: Float[Tensor, " latent"]
    frequency: Float[Tensor, " latent"]
    direction_is_base: Float[Tensor, " latent"]
    labels: list[str]
    threshold: float
    grounded: list[int]
    contexts: list[list[str]]
    lens_tuned: list[list[str]]
    lens_base: list[list[str]]

    def count(self, label: str) -> int:
        return self.labels.count(label)

    def latents(self, label: str) -> list[int]:
        return [j for j, name in enumerate(self.labels) if name == label]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"latent": range(len(self.labels)), "label": self.labels,
                             "nu_reconstruction": self.nu_reconstruction.numpy(), "nu_error": self.nu_error.numpy(),
                             "norm_ratio": self.norm_ratio.numpy(), "frequency": self.frequency.numpy()})

    def grounding(self):
        import pandas as pd

        return pd.DataFrame({"latent": self.grounded, "label": [self.labels[j] for j in self.grounded],
                             "frequency": [float(self.frequency[j]) for j in self.grounded],
                             "lens_tuned_decoder": [" ".join(t) for t in self.lens_tuned],
                             "lens_base_decoder": [" ".join(t) for t in self.lens_base],
                             "top_contexts": [" | ".join(c) for c in self.contexts]})

    def plot(self, ax=None):
        from analyses.diffing.plots import plot_latent_scaling

        return plot_latent_scaling(self, ax)


def latent_scaling(cc: CrosscoderResult, data: PairedActivations, models: tuple[Model, Model] | None = None, *,
                   threshold: float = THRESHOLD, n_grounded: int = 10, n_contexts: int = 5, context: int = 4,
                   n_tokens: int = 8) -> LatentScaling:
    """Betas, nu and labels of every latent of `cc` on `data` (module docstring); with `models` (base, tuned) also
    the grounding of up to `n_grounded` model-only latents."""
    module = cc.module()
    dec = torch.stack([module.decoder(0), module.decoder(1)])  # [model, latent, d]
    is_base = dec[0].norm(dim=-1) > dec[1].norm(dim=-1)
    direction = torch.where(is_base[:, None], dec[0], dec[1])  # [latent, d]
    own = (dec * direction).sum(-1)  # <d_j, d_j^M> [model, latent]
    m = direction.shape[0]
    sums = {key: torch.zeros(m, dtype=torch.float64) for key in
            ("ff", "fired", "reconstruction.base", "reconstruction.tuned", "error.base", "error.tuned")}
    best = torch.full((m, n_contexts), -1.0), torch.full((m, n_contexts), -1, dtype=torch.long)
    offset = 0
    for xb, xt in data.chunks():
        x = torch.stack([xb, xt], 1)
        with torch.no_grad():
            f = module.encode(x)
            recon = module.decode(f)
        f64 = f.double()
        sums["ff"] += f64.pow(2).sum(0)
        sums["fired"] += (f > 0).sum(0)
        for i, side in enumerate(("base", "tuned")):
            sums[f"reconstruction.{side}"] += (f64 * (recon[:, i] @ direction.T).double()).sum(0)
            error = ((x[:, i] - recon[:, i]) @ direction.T).double()
            sums[f"error.{side}"] += (f64 * error).sum(0) + f64.pow(2).sum(0) * own[i].double()
        best = _merge_top(best, f, offset)
        offset += len(f)
    denom = (direction.double().pow(2).sum(-1) * sums["ff"]).clamp_min(1e-30)
    beta = {key: (sums[key] / denom).float() for key in sums if "." in key}
    nu_r, nu_e = (_ratio(beta[f"{v}.base"], beta[f"{v}.tuned"]) for v in ("reconstruction", "error"))
    frequency = (sums["fired"] / max(len(data), 1)).float()
    labels = [_label(float(r), float(e), float(q), threshold) for r, e, q in zip(nu_r, nu_e, frequency)]
    norms = dec.norm(dim=-1)
    grounded, contexts, lens = _ground(labels, frequency, best, data, dec, models, n_grounded, context, n_tokens)
    return LatentScaling(data.layer, beta, nu_r, nu_e, norms[1] / (norms[0] + norms[1]).clamp_min(1e-12), frequency,
                         is_base.float(), labels, threshold, grounded, contexts, *lens,
                         settings={"threshold": threshold, "n_grounded": n_grounded, "n_contexts": n_contexts})


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, +inf where den is 0 (a latent that never fires has both betas 0: its label says dead)."""
    return torch.where(den == 0, torch.full_like(num, float("inf")), num / torch.where(den == 0, 1.0, den))


def _label(nu_r: float, nu_e: float, frequency: float, threshold: float) -> str:
    if frequency == 0:
        return "dead"
    if abs(nu_r) < threshold and abs(nu_e) < threshold:
        return "tuned-only"
    if abs(nu_r) > 1 / threshold and abs(nu_e) > 1 / threshold:
        return "base-only"
    return "shared"


def _merge_top(best: tuple[Tensor, Tensor], f: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """The running top activations of each latent and their row numbers, merged with chunk `f` [rows, latent]."""
    values = torch.cat([best[0], f.T], 1)
    rows = torch.cat([best[1], torch.arange(offset, offset + len(f)).expand(f.shape[1], -1)], 1)
    top = values.topk(best[0].shape[1], dim=1)
    return top.values, rows.gather(1, top.indices)


def _ground(labels, frequency, best, data, dec, models, n_grounded, context, n_tokens):
    if models is None:
        return [], [], ([], [])
    chosen = []
    for label in ("tuned-only", "base-only"):
        js = [j for j, name in enumerate(labels) if name == label]
        chosen += sorted(js, key=lambda j: -float(frequency[j]))
    chosen = chosen[:n_grounded]
    contexts = []
    for j in chosen:
        rows = [int(r) for v, r in zip(best[0][j].tolist(), best[1][j].tolist()) if v > 0]
        contexts.append([_context(models[1], data.tokens.ids, data.where[r], context) for r in rows])
    lens = tuple([[token_strings(model, i) for i in logit_lens(model, dec[side, j]).topk(n_tokens).indices]
                  for j in chosen] for side, model in ((1, models[1]), (0, models[0])))
    return chosen, contexts, lens


def _context(model: Model, ids: Tensor, where: Int[Tensor, " 2"], width: int) -> str:
    """The `width` tokens before the activating one, then that token in brackets."""
    p, t = int(where[0]), int(where[1])
    before = model.tokenizer.decode(ids[p, max(0, t - width): t].tolist())
    return f"{before} [{model.tokenizer.decode([int(ids[p, t])]).strip()}]"


def latent_direction(cc: CrosscoderResult, latent: int, model: str = "tuned") -> Float[Tensor, " d_model"]:
    """Latent `latent`'s decoder direction of `model` ("tuned" or "base") in that model's activation units: steer
    with `analyses.diffing.steer(model, latent_direction(cc, j), cc.layer, strength)`."""
    return cc.module().decoder(1 if model == "tuned" else 0)[latent].detach()
