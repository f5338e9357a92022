"""Figures of model diffing, each from a saved result and an Axes (returns the Axes)."""

from __future__ import annotations

import numpy as np

from interp.plotting import figure, integer_ticks, model_color

LABEL_COLORS = {"tuned-only": model_color("full"), "base-only": model_color("base"), "shared": "#999999",
                "dead": "#dddddd"}


def _ax(ax, **kw):
    return figure(**kw)[1][0, 0] if ax is None else ax


def plot_kl_tokens(result, ax=None, n_texts: int = 6, width: int = 16):
    """KL(tuned || base) at each position of the `n_texts` texts with the largest KL, each token printed in its
    cell (first `width` positions)."""
    ax = _ax(ax, width="double", height=0.35 * n_texts + 0.8)
    kl = result.kl.masked_fill(~result.mask, float("nan"))
    order = kl.nan_to_num(-1).amax(1).argsort(descending=True)[:n_texts].tolist()
    cols = min(width, kl.shape[1])
    grid = kl[order, :cols].numpy()
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=0, vmax=np.nanmax(grid) if np.isfinite(grid).any()
                      else 1)
    for r, p in enumerate(order):
        for c, token in enumerate(result.tokens[p][:cols]):
            ax.text(c, r, token.strip()[:6], ha="center", va="center", fontsize=5,
                    color="white" if grid[r, c] > 0.6 * np.nanmax(grid) else "black")
    ax.set(xlabel="position", ylabel="text", yticks=range(len(order)), yticklabels=[str(p) for p in order],
           title=f"KL({result.settings.get('tuned_label', result.tuned)} || base) per token, {result.label}")
    ax.grid(False)
    ax.figure.colorbar(image, ax=ax, label="KL (nats)", shrink=0.8)
    return integer_ticks(ax, "x")


def plot_mined(result, ax=None, n: int = 12, by: str = "mean_logprob"):
    """The tokens whose probability rises most from base to tuned (diff mining)."""
    ax = _ax(ax)
    frame = result.mined(n, by)[::-1]
    ax.barh(range(len(frame)), frame[by], color=model_color(result.settings.get("tuned_label", result.tuned)))
    ax.set_yticks(range(len(frame)), [repr(t)[1:-1] for t in frame.token])
    ax.set(xlabel={"mean_logprob": "mean change of log p", "mean_logit": "mean change of logit",
                   "top_rate": "share of positions in the top changes"}[by], title=f"Diff mining, {result.label}")
    return ax


def plot_adl_norms(result, ax=None):
    """||delta_l(p)|| / mean ||h_base|| per layer, one line per position (position 0 dashed)."""
    ax = _ax(ax)
    norms = result.norms().numpy()
    for p in range(norms.shape[1]):
        ax.plot(range(norms.shape[0]), norms[:, p], marker="o", markersize=3, ls="--" if p == 0 else "-",
                label=f"position {p}")
    ax.axvline(result.layer, ls=":", color="grey")
    ax.set(xlabel="layer", ylabel=r"$\|\delta\|$ / mean $\|h_{base}\|$", title="Activation differences")
    ax.legend(ncols=2)
    return integer_ticks(ax, "x")


def plot_adl_tokens(result, ax=None, n: int = 12):
    """The tokens the mean difference promotes most through the logit lens at the readout layer (positions
    1..k-1)."""
    ax = _ax(ax)
    values = result.promoted_logits[:n].numpy()[::-1]
    ax.barh(range(len(values)), values, color=model_color("full"))
    ax.set_yticks(range(len(values)), [repr(t)[1:-1] for t in result.promoted(n)[::-1]])
    ax.set(xlabel="logit-lens logit", title=f"ADL readout, layer {result.layer} ({result.readout} head)")
    return ax


def plot_steering_sweep(sweep, ax=None):
    """Held-out loss of the steered model vs strength; the tolerance band and the chosen strength."""
    ax = _ax(ax)
    ax.plot(sweep.strength, sweep.loss, marker="o", color=model_color("full"))
    base = sweep.loss[sweep.strength.index(0.0)]
    ax.axhline(base + sweep.tolerance, ls=":", color="grey", label="coherence limit")
    ax.axvline(sweep.chosen, ls="--", color="grey", label=f"chosen {sweep.chosen:g}")
    ax.set(xlabel="steering strength", ylabel=f"loss on {sweep.heldout} (nats)", title=f"Steering: {sweep.source}")
    ax.legend()
    return ax


def plot_training(result, ax=None):
    """Fraction of variance unexplained of each model and the fraction of dead latents vs training step."""
    ax = _ax(ax)
    ax.plot(result.step, result.fvu_base, color=model_color("base"), label="FVU base")
    ax.plot(result.step, result.fvu_tuned, color=model_color("full"), label="FVU tuned")
    ax.plot(result.step, result.dead, color="grey", ls="--", label="dead latents")
    ax.set(xlabel="step", ylabel="fraction", ylim=(0, max(1.0, max(result.fvu_base + result.fvu_tuned, default=1))),
           title=f"Crosscoder at layer {result.layer} (k={result.k})")
    ax.legend()
    return integer_ticks(ax, "x")


def plot_latent_scaling(result, ax=None, clip: tuple[float, float] = (-0.5, 2.0)):
    """nu (error variant) against nu (reconstruction variant) per latent, coloured by label (clipped)."""
    ax = _ax(ax)
    r = result.nu_reconstruction.nan_to_num(clip[1]).clamp(*clip).numpy()
    e = result.nu_error.nan_to_num(clip[1]).clamp(*clip).numpy()
    for label, color in LABEL_COLORS.items():
        idx = [j for j, name in enumerate(result.labels) if name == label]
        if idx and label != "dead":
            ax.scatter(r[idx], e[idx], s=5, color=color, label=f"{label} ({len(idx)})")
    ax.set(xlabel=r"$\nu$ (reconstruction)", ylabel=r"$\nu$ (error)", title="Latent scaling")
    ax.legend()
    return ax


def plot_amplification(result, ax=None):
    """Share of prompts whose amplified generation equals the tuned model's (alpha = 0), per alpha."""
    ax = _ax(ax)
    ref = result.logit_texts[result.alpha.index(0.0)] if 0.0 in result.alpha else result.logit_texts[0]
    for kind, texts, color in (("logits", result.logit_texts, model_color("full")),
                               ("update", result.update_texts, model_color("lora-r8"))):
        if texts and texts[0]:
            same = [np.mean([a == b for a, b in zip(row, ref)]) for row in texts]
            ax.plot(result.alpha, same, marker="o", color=color, label=f"{kind} amplification")
    ax.set(xlabel=r"$\alpha$ (0: tuned, $-1$: base)", ylabel="same text as the tuned model", ylim=(-0.05, 1.05),
           title="Amplification")
    ax.legend()
    return ax


def plot_identification(result, ax=None, n: int = 20):
    """The identification ranking: 1 / best rank over the sources of the top `n` tokens, best at the top."""
    ax = _ax(ax, height=0.14 * n + 0.8)
    tokens, scores = result.tokens[:n][::-1], result.scores[:n][::-1]
    ax.barh(range(len(tokens)), scores, color=model_color(result.tuned))
    ax.set_yticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens])
    ax.set(xlabel="1 / best rank in a source", title=f"What was {result.tuned} tuned to do?")
    return ax
