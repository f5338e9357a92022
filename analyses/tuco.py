"""TuCo: the fine-tuned forward pass split into pre-training and fine-tuning components (Nuti et al., 2025).

On the tuned model's trajectory x_l (resid_pre of layer l, x_L the last block's output):

    PTC_l = f^PT_l(x_l)                    the base's block l run on the tuned model's input
    FTC_l = f^FT_l(x_l) - f^PT_l(x_l)      so that  x_L = x_0 + sum_l PTC_l + sum_l FTC_l  exactly.

TuCo of a token = ||sum_l FTC_l|| / (||sum_l PTC_l|| + ||sum_l FTC_l||) in [0, 1], taken before the final norm;
per layer ||FTC_l|| / (||PTC_l|| + ||FTC_l||). Cost: one tuned forward capturing every resid_pre, then one base
forward in which every block's input is replaced by the tuned block's input (blocks are independent given their
inputs). With `sublayers=True` a second base pass also replaces resid_mid, splitting each layer into its
attention and MLP parts. The embedding difference ||x_0^FT - x_0^PT|| is reported separately when the
embeddings differ (one more base pass).

Steering (`steer`): x_{l+1} = x_l + PTC_l + alpha FTC_l on the steered trajectory, i.e. each block's update
is alpha f^FT + (1 - alpha) f^PT on the same input, and so are the embeddings, final norm and unembedding;
alpha = 0 is the base model exactly, alpha = 1 the tuned model exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.capture import capture
from interp.errors import BadOption
from interp.intervene import blend, replace
from interp.models import Pair
from interp.plotting import figure, integer_ticks, model_color, save_figure
from interp.prompts import PromptSet, Tokens, as_prompt_set, as_tokens, position_index, prompt_texts
from interp.results import Result
from interp.sites import every_layer


@dataclass
class TuCoResult(Result):
    """Component norms per prompt, layer and token (canonical positions; pads are 0), and the totals.

    ptc_norm, ftc_norm   [prompt, layer, pos]  ||PTC_l||, ||FTC_l|| at each token
    ptc_total, ftc_total [prompt, pos]         ||sum_l PTC_l||, ||sum_l FTC_l||
    embed_shift          [prompt, pos]         ||x_0^FT - x_0^PT|| (zeros when the embeddings are equal)
    sublayer             {"ptc_attn", "ftc_attn", "ptc_mlp", "ftc_mlp"} -> [prompt, layer, pos] (optional)
    """

    ANALYSIS = "tuco"
    base: str
    tuned: str
    prompts: list[str]
    lengths: Int[Tensor, " prompt"]
    ptc_norm: Float[Tensor, "prompt layer pos"]
    ftc_norm: Float[Tensor, "prompt layer pos"]
    ptc_total: Float[Tensor, "prompt pos"]
    ftc_total: Float[Tensor, "prompt pos"]
    embed_shift: Float[Tensor, "prompt pos"]
    label: str = "prompts"
    sublayer: dict[str, Tensor] = field(default_factory=dict)

    @property
    def mask(self) -> Tensor:
        return torch.arange(self.ptc_total.shape[1]) < self.lengths[:, None]

    def tuco_tokens(self) -> Float[Tensor, "prompt pos"]:
        """TuCo of every token (pads 0)."""
        return _ratio(self.ftc_total, self.ptc_total) * self.mask

    def tuco(self, position: int | str = "last") -> Float[Tensor, " prompt"]:
        """TuCo per prompt at `position` ("last" = each prompt's last token, or a canonical index)."""
        return _at(self.tuco_tokens(), self.lengths, position)

    def layer_tuco(self, position: int | str = "last") -> Float[Tensor, "prompt layer"]:
        """||FTC_l|| / (||PTC_l|| + ||FTC_l||) per prompt and layer at `position`."""
        ratio = _ratio(self.ftc_norm, self.ptc_norm).transpose(1, 2)  # [prompt, pos, layer]
        return _at(ratio, self.lengths, position)

    def to_frame(self, position: int | str = "last"):
        """One row per prompt: label, prompt, TuCo, ||sum PTC||, ||sum FTC|| at `position`."""
        import pandas as pd

        return pd.DataFrame({"label": self.label, "prompt": self.prompts, "tuco": self.tuco(position).numpy(),
                             "ptc": _at(self.ptc_total, self.lengths, position).numpy(),
                             "ftc": _at(self.ftc_total, self.lengths, position).numpy()})

    def layer_frame(self, position: int | str = "last"):
        """Mean component norms and TuCo per layer (long format)."""
        import pandas as pd

        ptc = _at(self.ptc_norm.transpose(1, 2), self.lengths, position).mean(0)
        ftc = _at(self.ftc_norm.transpose(1, 2), self.lengths, position).mean(0)
        return pd.DataFrame({"layer": range(len(ptc)), "ptc_norm": ptc.numpy(), "ftc_norm": ftc.numpy(),
                             "layer_tuco": self.layer_tuco(position).mean(0).numpy()})

    def plot(self, ax=None):
        """Per-layer mean component norms at the last token."""
        return plot_layer_norms(self, ax)


def _ratio(ftc: Tensor, ptc: Tensor) -> Tensor:
    return ftc / (ptc + ftc).clamp_min(torch.finfo(ftc.dtype).tiny)


def _at(t: Tensor, lengths: Tensor, position: int | str) -> Tensor:
    """t[prompt, pos, ...] at each prompt's `position` ("last" or a canonical index, negative from the end)."""
    return t[torch.arange(len(lengths)), position_index(lengths, position)]


def measure(pair: Pair, prompts: PromptSet | Sequence[str] | Tokens, *, sublayers: bool = False,
            label: str | None = None, batch_size: int = 16, chunk: int = 64, backend: str | None = None,
            progress: bool = True) -> TuCoResult:
    """Decompose the tuned model's forward pass on `prompts` (see the module docstring). `label` defaults to the
    prompt set's."""
    base, tuned = pair.base, pair.tuned
    tokens = as_tokens(tuned, prompts)
    label = label or (prompts.label if isinstance(prompts, PromptSet) else "prompts")
    embeds_differ = any("emb" in name or name.endswith(("wte.weight", "wpe.weight"))
                        for name in pair.changed_parameters())
    parts = []
    for start in range(0, len(tokens), chunk):
        rows = torch.arange(start, min(start + chunk, len(tokens)))
        piece = Tokens(tokens.ids[rows], tokens.lengths[rows], tokens.pad_id)
        parts.append(_measure_chunk(base, tuned, piece, sublayers, embeds_differ, batch_size, backend, progress))
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    sub = {k: joined.pop(k) for k in list(joined) if k.startswith(("ptc_attn", "ftc_attn", "ptc_mlp", "ftc_mlp"))}
    return TuCoResult(base.name, tuned.name, prompt_texts(prompts), tokens.lengths, label=label, sublayer=sub,
                      settings={"sublayers": sublayers}, **joined)


def components(base, tuned, tokens: Tokens, *, batch_size: int = 16, backend: str | None = None,
               progress: bool = False, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The decomposition itself, in canonical layout, in float32 (or wider) on `device`: x [prompt, layer + 1, pos,
    d_model] (the tuned trajectory, x[:, L] the last block's output), ptc and ftc [prompt, layer, pos, d_model].
    The base's blocks run on the tuned model's states moved to wherever each base block lives."""
    pre, post = every_layer("resid_pre", tuned.n_layers), every_layer("resid_post", tuned.n_layers)
    kw = dict(batch_size=batch_size, backend=backend, progress=progress, dtype=_stats_dtype(base, tuned),
              device=device)
    ft = capture(tuned, tokens, pre + [post[-1]], **kw)
    x = torch.stack([ft[s] for s in pre] + [ft[post[-1]]], dim=1)
    pt = capture(base, tokens, post, edits=[replace(p, ft[p]) for p in pre], **kw)
    ptc = torch.stack([pt[s] for s in post], dim=1) - x[:, :-1]
    return {"x": x, "ptc": ptc, "ftc": (x[:, 1:] - x[:, :-1]) - ptc}


def _stats_dtype(base, tuned) -> torch.dtype:
    """float32, or the wider of the two models' dtypes: one dtype for both trajectories."""
    return torch.promote_types(torch.promote_types(base.dtype, tuned.dtype), torch.float32)


def _sublayer_norms(base, tuned, tokens: Tokens, **kw) -> dict[str, Tensor]:
    """Attention and MLP parts: the base's sub-layers on the tuned model's resid_pre and resid_mid."""
    n_layers = tuned.n_layers
    pre, mid = every_layer("resid_pre", n_layers), every_layer("resid_mid", n_layers)
    outs = every_layer("attn_out", n_layers) + every_layer("mlp_out", n_layers)
    ft = capture(tuned, tokens, pre + mid + outs, **kw)
    pt = capture(base, tokens, outs, edits=[replace(s, ft[s]) for s in pre + mid], **kw)
    out = {}
    for kind in ("attn", "mlp"):
        pt_k = torch.stack([pt[f"{kind}_out.{l}"] for l in range(n_layers)], 1)
        ft_k = torch.stack([ft[f"{kind}_out.{l}"] for l in range(n_layers)], 1)
        out[f"ptc_{kind}"], out[f"ftc_{kind}"] = pt_k.norm(dim=-1), (ft_k - pt_k).norm(dim=-1)
    return out


def _measure_chunk(base, tuned, tokens: Tokens, sublayers: bool, embeds_differ: bool, batch_size: int,
                   backend, progress: bool) -> dict[str, Tensor]:
    kw = dict(batch_size=batch_size, backend=backend, progress=progress)
    device = tuned.device  # the decomposition stays on the tuned model's device; only norms come to the CPU
    c = components(base, tuned, tokens, device=device, **kw)
    ptc, ftc = c["ptc"], c["ftc"]
    out = {"ptc_norm": ptc.norm(dim=-1), "ftc_norm": ftc.norm(dim=-1), "ptc_total": ptc.sum(1).norm(dim=-1),
           "ftc_total": ftc.sum(1).norm(dim=-1), "embed_shift": torch.zeros_like(ptc[:, 0, :, 0])}
    kw.update(dtype=c["x"].dtype, device=device)
    if embeds_differ:
        out["embed_shift"] = (c["x"][:, 0] - capture(base, tokens, ["embed"], **kw)["embed"]).norm(dim=-1)
    if sublayers:
        out.update(_sublayer_norms(base, tuned, tokens, **kw))
    return {k: v.cpu() for k, v in out.items()}


def measure_series(base, series, prompts, **kwargs) -> list[tuple[int, TuCoResult]]:
    """TuCo of every checkpoint of a series against `base` on the same prompts (one checkpoint in memory)."""
    from interp.models import check_compatible

    out = []
    for step, model in series.models(device=str(base.device)):
        check_compatible(base, model)
        out.append((step, measure(Pair(base, model), prompts, progress=False, **kwargs)))
    return out


def steering_edits(pair: Pair, alpha: float | Sequence[float], alpha_outside: float | None = None) -> list:
    """The blends that make the tuned model compute x_{l+1} = x_l + PTC_l + alpha_l FTC_l. Outside the blocks
    (embeddings, final norm, unembedding) `alpha_outside` applies: by default alpha itself when it is a scalar,
    and 1 (the tuned model's own) when alpha is given per layer."""
    n_layers = pair.tuned.n_layers
    per_layer = [float(alpha)] * n_layers if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if len(per_layer) != n_layers:
        raise BadOption(f"alpha has {len(per_layer)} values; the model has {n_layers} layers")
    outside = alpha_outside if alpha_outside is not None else (float(alpha) if isinstance(alpha, (int, float))
                                                               else 1.0)
    return ([blend(layer, pair.base, a) for layer, a in enumerate(per_layer)] +
            [blend(part, pair.base, outside) for part in ("embed", "final", "unembed")])


@contextmanager
def steer(pair: Pair, alpha: float | Sequence[float], alpha_outside: float | None = None):
    """Within the block, `pair.tuned` runs with its fine-tuning component scaled by alpha (for logits, loss and
    generation, through either backend). Yields the steered model."""
    with pair.tuned.edit(*steering_edits(pair, alpha, alpha_outside)):
        yield pair.tuned


@dataclass
class AlphaSweep(Result):
    """Behaviour of `tuned` steered by alpha: `value[i]` is `metric` at `alpha[i]` (0 the base, 1 the tuned model)."""

    ANALYSIS = "tuco"
    tuned: str
    alpha: list[float]
    metric: str
    value: list[float]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"tuned": self.tuned, "alpha": self.alpha, "metric": self.metric, "value": self.value})

    def at(self, alpha: float) -> float | None:
        """The value at `alpha`, or None when it was not swept."""
        return self.value[self.alpha.index(alpha)] if alpha in self.alpha else None

    def plot(self, ax=None):
        return plot_alpha_sweep(self, ax)


def alpha_sweep(pair: Pair, prompts: PromptSet | Sequence[str],
                alphas: Sequence[float] = (-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), **kwargs) -> AlphaSweep:
    """Behaviour vs alpha: answer-token accuracy when the prompt set has answers, else the probability of the
    tuned model's own greedy next token."""
    from interp.scoring import answer_scores

    prompts = as_prompt_set(prompts)
    texts, answers = prompts.prompts, prompts.answers
    values = []
    if answers is None:
        target = capture(pair.tuned, texts, [], positions="last", logits=True, progress=False)["logits"].argmax(-1)
    for a in alphas:
        with steer(pair, a):
            if answers is not None:
                values.append(float(answer_scores(pair.tuned, texts, answers, **kwargs).accuracy.mean()))
            else:
                logits = capture(pair.tuned, texts, [], positions="last", logits=True, progress=False)["logits"]
                values.append(float(logits.softmax(-1)[torch.arange(len(target)), target].mean()))
    return AlphaSweep(pair.tuned.name, [float(a) for a in alphas],
                      "answer accuracy" if answers is not None else "p(tuned next token)", values,
                      settings={"prompts": len(texts), "label": prompts.label})


# ------------------------------------------------------------------------------------------------ figures

def plot_distributions(results: Sequence[TuCoResult], ax=None, position: int | str = "last"):
    """TuCo distributions of two or more prompt sets side by side (violins with the means marked)."""
    if ax is None:
        ax = figure()[1][0, 0]
    data = [r.tuco(position).numpy() for r in results]
    parts = ax.violinplot(data, showmeans=True, showextrema=False)
    for body, r in zip(parts["bodies"], results):
        body.set_facecolor(model_color(r.label))
        body.set_alpha(0.6)
    ax.set_xticks(range(1, len(results) + 1), [r.label for r in results])
    ax.set(ylabel="TuCo (last token)", ylim=(0, 1), title=f"TuCo of {results[0].tuned} vs {results[0].base}")
    return ax


def plot_layer_norms(result: TuCoResult, ax=None):
    """Mean ||PTC_l|| and ||FTC_l|| per layer at the last token."""
    if ax is None:
        ax = figure()[1][0, 0]
    frame = result.layer_frame()
    ax.plot(frame.layer, frame.ptc_norm, marker="o", label="PTC (pre-training)", color=model_color("base"))
    ax.plot(frame.layer, frame.ftc_norm, marker="s", label="FTC (fine-tuning)", color=model_color("full"))
    ax.set(xlabel="layer", ylabel="mean norm (last token)", title=f"Components of {result.tuned}")
    ax.legend()
    return integer_ticks(ax, "x")


def plot_alpha_sweep(sweep: AlphaSweep, ax=None, label: str = "tuned"):
    """Behaviour vs alpha (alpha = 0 is the base model, 1 the tuned model)."""
    if ax is None:
        ax = figure()[1][0, 0]
    ax.plot(sweep.alpha, sweep.value, marker="o", color=model_color(label))
    for a in (0.0, 1.0):
        ax.axvline(a, ls=":", color="grey")
    ax.set(xlabel=r"$\alpha$ (scale of the fine-tuning component)", ylabel=sweep.metric,
           title="Steering with TuCo")
    return ax


def save_figures(results: Sequence[TuCoResult], sweep: AlphaSweep | None, out: str | Path,
                 suffix: str = "") -> list[Path]:
    """The TuCo figures of one tuned model into `out` (PDF and PNG each): distributions per prompt set, layer
    norms, and the alpha sweep; file names end in `suffix`."""
    out = Path(out)
    fig, ax = figure()
    plot_distributions(results, ax[0, 0])
    written = list(save_figure(fig, out / f"tuco_distributions{suffix}"))
    fig, ax = figure()
    plot_layer_norms(results[0], ax[0, 0])
    written += save_figure(fig, out / f"tuco_layer_norms{suffix}")
    if sweep is not None:
        fig, ax = figure()
        plot_alpha_sweep(sweep, ax[0, 0])
        written += save_figure(fig, out / f"tuco_alpha_sweep{suffix}")
    return written
