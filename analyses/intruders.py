"""Intruder dimensions: high-ranking singular directions of a tuned weight matrix that the base matrix lacks.

Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence"), METHODS.md section 3. For every
weight matrix that differs between base and tuned (attention q, k, v, o, MLP in and out; the token embedding on
request), in the (out, in) orientation, W0 = U0 S0 V0^T and Wt = Ut St Vt^T (Wt the merged matrix). The i-th of
Wt's top-k left singular vectors is an intruder at epsilon when max_j |cos(Ut_i, U0_j)| < epsilon. Per matrix the
result holds the similarities, intruder counts over a sweep of epsilon, the spectra of W0, Wt and delta W = Wt - W0,
||delta W||_2 against W0's top and k-th singular values, delta W's effective rank and the fraction of its energy in
intruder directions.

Models come as `interp.Model`s, a `Pair`, or specs (zoo names, folders, hub ids). A PEFT LoRA adapter (a folder, or
a zoo LoRA name) is read directly: Wt = W0 + scaling B A is formed one matrix at a time on the device, never as a
merged model. Matrices are walked in the model's layer order with one pair of SVDs on the device at a time (float32
or float64 whatever the model dtype); only spectra and similarities come back to the CPU.

Steering (`steer`): W' = Wt - (1 - lambda) sum_{i in intruders} s_i u_i v_i^T, a new Model (the pair untouched);
`lambda_sweep` reports pre-training-distribution loss (forgetting) against target-task accuracy over lambda.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from analyses.intruder_math import EPSILON, EPSILONS, K, MatrixReport, intruder_directions, iter_reports
from analyses.lora_weights import analysis_matrices, layer_index, lora_factors, matrix_kind, paired_matrices
from interp.errors import BadPrompts, IncompatibleModels, UnsupportedAdapter, ZooModelNotBuilt
from interp.models import (CheckpointSeries, Model, Pair, ZOO_PREFIX, check_compatible, load_model, load_series,
                           model_label, resolve_device, resolve_dtype, unique_labels)
from interp.plotting import PALETTE, figure, model_color, save_figure
from interp.results import load_result, save_result

EMBED = "embed"
KIND_ORDER = ("q", "k", "v", "o", "mlp_in", "mlp_out", EMBED)
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


# ------------------------------------------------------------------------------------------------ weights

def _params(model: Model) -> dict[str, Tensor]:
    if type(model.hf).__name__.startswith("Peft"):
        raise UnsupportedAdapter(f"{model.name} is an unmerged PEFT model; load it with merge=True or pass the "
                                 f"adapter folder itself")
    return {name: p.detach() for name, p in model.hf.named_parameters()}


def _layout(model: Model, embeddings: bool) -> tuple[set[str], set[str]]:
    """(names of parameters stored (in, out), extra parameter names to analyse). GPT-2 Conv1D weights are stored
    (in, out); the token embedding (vocab, d_model) is analysed as the (d_model, vocab) map into the residual stream."""
    from transformers.pytorch_utils import Conv1D

    transposed = {f"{name}.weight" for name, m in model.hf.named_modules() if isinstance(m, Conv1D)}
    extra = set()
    if embeddings:
        embed = model.hf.get_input_embeddings().weight
        extra = {name for name, p in model.hf.named_parameters() if p is embed}
        transposed |= extra
    return transposed, extra


class _LoraMerged(Mapping):
    """W0 + scaling B A of each adapted parameter (stored layout, on `device`, in `dtype`), formed only when read;
    unadapted parameters are the base's own."""

    def __init__(self, adapter: Path, base: Mapping[str, Tensor], transposed: set[str], device, dtype):
        self.factors, _ = lora_factors(adapter)
        self.base, self.transposed, self.device, self.dtype = base, transposed, device, dtype
        missing = sorted(set(self.factors) - set(base))
        if missing:
            raise IncompatibleModels(f"adapter {adapter} adapts {len(missing)} weights the base lacks (e.g. "
                                     f"{missing[0]}); pass the base model the adapter was trained on")
        self.adapter = adapter

    def __getitem__(self, name: str) -> Tensor:
        W0 = self.base[name]
        if name not in self.factors:
            return W0
        # PEFT orients the delta by the module type (Conv1D is always fan_in_fan_out), not by the config flag.
        delta = self.factors[name].delta(self.device, self.dtype)
        delta = delta.mT if name in self.transposed else delta
        if delta.shape != W0.shape:
            raise IncompatibleModels(f"adapter {self.adapter}: {name} has delta shape {tuple(delta.shape)}, the base "
                                     f"weight {tuple(W0.shape)}; pass the base model the adapter was trained on")
        return W0.to(self.device, self.dtype) + delta

    def __contains__(self, name) -> bool:
        return name in self.base

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def _adapter_folder(spec) -> Path | None:
    """The PEFT adapter folder a tuned spec names (a folder with adapter_config.json, or a zoo LoRA), else None."""
    if isinstance(spec, Model):
        return None
    spec = str(spec)
    if spec.startswith(ZOO_PREFIX):
        from interp import zoo

        name = spec[len(ZOO_PREFIX):]
        if name not in zoo.ALL_NAMES or not zoo.is_lora(name):
            return None  # load_model explains unknown names
        try:
            return Path(zoo.model_path(name))
        except FileNotFoundError:
            raise ZooModelNotBuilt(f"zoo model {name!r} is not built yet; run `interp zoo build`") from None
    path = Path(spec).expanduser()
    return path if (path / "adapter_config.json").is_file() else None


def _weights(base, tuned, *, device, dtype, model_dtype, embeddings: bool):
    """(base Model, base params, tuned params (maybe lazy), tuned name, layout) for a pair of models or specs."""
    if isinstance(base, Pair):
        if tuned is not None:
            raise TypeError("pass either a Pair or base and tuned, not both")
        base, tuned = base.models
    if tuned is None:
        raise TypeError("measure needs a tuned model (or a Pair)")
    load = dict(device=str(device), dtype=model_dtype)
    base_model = base if isinstance(base, Model) else load_model(base, **load)
    transposed, extra = _layout(base_model, embeddings)
    base_params = _params(base_model)
    adapter = _adapter_folder(tuned)
    if adapter is not None:
        return base_model, base_params, _LoraMerged(adapter, base_params, transposed, device, dtype), str(tuned), \
            (transposed, extra)
    tuned_model = tuned if isinstance(tuned, Model) else load_model(tuned, **load)
    tuned_params = _params(tuned_model)
    check_compatible(base_model, tuned_model)
    return base_model, base_params, tuned_params, tuned_model.name, (transposed, extra)


def _changed_matrices(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], transposed: set[str],
                      extra: set[str], device) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(name, W0, Wt) on `device` for every analysed (out, in) matrix that fine-tuning changed, in model order."""
    for name, W0, Wt in paired_matrices(base, tuned, fan_in_fan_out=transposed, extra=extra):
        W0, Wt = W0.to(device), Wt.to(device)
        if not torch.equal(W0.to(Wt.dtype), Wt):
            yield name, W0, Wt


# ------------------------------------------------------------------------------------------------- result

@dataclass
class IntruderResult:
    """Intruder analysis of every changed matrix of one tuned model (rows in the model's layer order).

    names                       analysed matrices (`...c_attn.weight:q` for GPT-2's fused q/k/v)
    shapes     [matrix, 2]      (out, in)
    epsilons   [eps]            the sweep; counts [matrix, eps] intruders among the top k at each epsilon
    sims       [matrix, k]      max |cos| of each of Wt's top-k left singular vectors with W0's (NaN past min(out, in))
    base_s, tuned_s, delta_s    [matrix, r] singular values of W0, Wt, delta W, descending (NaN-padded)
    delta_erank [matrix]        effective rank of delta W
    intruder_energy [matrix]    fraction of ||delta W||_F^2 in the intruder directions at `epsilon`
    """

    base: str
    tuned: str
    label: str
    names: list[str]
    k: int
    epsilon: float
    shapes: Int[Tensor, "matrix 2"]
    epsilons: Float[Tensor, " eps"]
    counts: Int[Tensor, "matrix eps"]
    sims: Float[Tensor, "matrix k"]
    base_s: Float[Tensor, "matrix r"]
    tuned_s: Float[Tensor, "matrix r"]
    delta_s: Float[Tensor, "matrix r"]
    delta_erank: Float[Tensor, " matrix"]
    intruder_energy: Float[Tensor, " matrix"]

    TENSORS = ("shapes", "epsilons", "counts", "sims", "base_s", "tuned_s", "delta_s", "delta_erank",
               "intruder_energy")

    @classmethod
    def from_reports(cls, reports: Sequence[MatrixReport], *, base: str, tuned: str, label: str, k: int,
                     epsilon: float, epsilons: Sequence[float], shapes: Sequence[tuple[int, int]]) -> IntruderResult:
        def padded(rows: list[Tensor]) -> Tensor:
            width = max((len(r) for r in rows), default=0)
            out = torch.full((len(rows), width), math.nan)
            for i, r in enumerate(rows):
                out[i, :len(r)] = r
            return out

        n_eps = len(epsilons)
        return cls(base, tuned, label, [r.name for r in reports], k, epsilon,
                   torch.tensor(list(shapes), dtype=torch.long).reshape(-1, 2),
                   torch.tensor(list(epsilons), dtype=torch.float32),
                   torch.stack([r.counts for r in reports]) if reports else torch.zeros(0, n_eps, dtype=torch.long),
                   padded([r.sims for r in reports]), padded([r.base_s for r in reports]),
                   padded([r.tuned_s for r in reports]), padded([r.delta_s for r in reports]),
                   torch.tensor([r.delta_erank for r in reports]), torch.tensor([r.intruder_energy for r in reports]))

    @property
    def layers(self) -> list[int | None]:
        return [layer_index(n) for n in self.names]

    @property
    def kinds(self) -> list[str]:
        return [matrix_kind(n) or EMBED for n in self.names]

    def intruders(self, epsilon: float | None = None) -> Tensor:
        """[matrix, k] True where the tuned direction is an intruder at `epsilon` (default: the result's)."""
        return self.sims < (self.epsilon if epsilon is None else epsilon)  # NaN padding compares False

    def count(self, epsilon: float | None = None) -> Int[Tensor, " matrix"]:
        return self.intruders(epsilon).sum(1)

    def totals(self) -> Int[Tensor, " eps"]:
        """Intruders summed over all matrices at each epsilon of the sweep."""
        return self.counts.sum(0)

    def ratio(self, rank: int = 1) -> Float[Tensor, " matrix"]:
        """||delta W||_2 / (the base's `rank`-th singular value), per matrix (NaN where it has fewer)."""
        if self.base_s.shape[1] < rank:
            return torch.full((len(self.names),), math.nan)
        return self.delta_s[:, 0] / self.base_s[:, rank - 1]

    def to_frame(self):
        """One row per matrix: where it is, its top singular values, delta W's size, shape and energy, the counts."""
        import pandas as pd

        intruders = self.intruders()
        intruder_s = torch.where(intruders, self.tuned_s[:, :intruders.shape[1]], 0.0).amax(1) \
            if len(self.names) else torch.zeros(0)
        frame = pd.DataFrame({
            "model": self.label, "matrix": self.names, "layer": pd.array(self.layers, dtype="Int64"),
            "kind": self.kinds, "out": self.shapes[:, 0].numpy(), "in": self.shapes[:, 1].numpy(),
            "base_s1": self.base_s[:, 0].numpy(), "tuned_s1": self.tuned_s[:, 0].numpy(),
            "delta_norm": self.delta_s[:, 0].numpy(), "delta_over_base_s1": self.ratio(1).numpy(),
            f"delta_over_base_s{self.k}": self.ratio(self.k).numpy(), "delta_erank": self.delta_erank.numpy(),
            "intruder_energy": self.intruder_energy.numpy(), "top_intruder_s": intruder_s.numpy(),
            "intruders": self.count().numpy(),
        })
        for e, eps in enumerate(self.epsilons.tolist()):
            frame[f"eps_{eps:g}"] = self.counts[:, e].numpy()
        return frame

    def counts_frame(self):
        """Intruders over all matrices at each epsilon, with the largest and median ||delta W||_2 / s1(W0)."""
        import pandas as pd

        ratio = self.ratio(1)
        return pd.DataFrame({"model": self.label, "epsilon": self.epsilons.numpy(), "intruders": self.totals().numpy(),
                             "matrices": len(self.names), "k": self.k,
                             "max_delta_over_base_s1": float(ratio.max()) if len(ratio) else 0.0,
                             "median_delta_over_base_s1": float(ratio.median()) if len(ratio) else 0.0})

    def layer_frame(self, epsilon: float | None = None):
        """Intruder counts at `epsilon` per layer (rows) and matrix kind (columns); the embedding is left out."""
        import pandas as pd

        frame = pd.DataFrame({"layer": self.layers, "kind": self.kinds, "intruders": self.count(epsilon).numpy()})
        frame = frame[frame.kind != EMBED]
        table = frame.pivot_table(index="layer", columns="kind", values="intruders", aggfunc="sum", fill_value=0)
        return table.reindex(columns=[k for k in KIND_ORDER if k in table.columns])

    def plot(self, ax=None):
        """Intruder count vs epsilon."""
        return plot_counts([self], ax)

    def save(self, folder: str | Path) -> Path:
        meta = {"analysis": "intruders", "base": self.base, "tuned": self.tuned, "label": self.label,
                "names": self.names, "k": self.k, "epsilon": self.epsilon}
        return save_result(folder, {name: getattr(self, name) for name in self.TENSORS}, meta)

    @classmethod
    def load(cls, folder: str | Path) -> IntruderResult:
        tensors, meta = load_result(folder)
        return cls(meta["base"], meta["tuned"], meta["label"], meta["names"], meta["k"], meta["epsilon"],
                   **{name: tensors[name] for name in cls.TENSORS})


def counts_table(results: dict[str, IntruderResult]) -> str:
    """Text table: per model, intruders over all matrices at each epsilon of the sweep, and ||delta W||_2 over the
    base's s1 (max, median) and s10 (max)."""
    width = max(map(len, results), default=5) + 2
    eps = next(iter(results.values())).epsilons.tolist() if results else []
    lines = [f"{'model':<{width}}" + "".join(f"{e:>6.1f}" for e in eps) + "   ||dW||2/s1 max  median   ||dW||2/s10 max"]
    for name, r in results.items():
        ratio1, ratio10 = r.ratio(1), r.ratio(10)
        lines.append(f"{name:<{width}}" + "".join(f"{int(c):>6d}" for c in r.totals()) +
                     f"   {float(ratio1.max()):>14.3f}  {float(ratio1.median()):>6.3f}   {float(ratio10.max()):>15.3f}")
    return "\n".join(lines)


def measure(base, tuned=None, *, k: int = K, epsilon: float = EPSILON, epsilons: Sequence[float] = EPSILONS,
            dtype: torch.dtype | str = torch.float32, device: str | torch.device = "auto", embeddings: bool = False,
            label: str | None = None, model_dtype: str | torch.dtype = "float32",
            progress: bool = True) -> IntruderResult:
    """Intruder analysis of every matrix that differs between `base` and `tuned` (see the module docstring).

    base, tuned: Models or specs, or a Pair as `base`. A PEFT LoRA adapter folder or zoo LoRA name as `tuned` is read
    as factors (no merged model). dtype: the SVDs' (float32 or float64); model_dtype: for models loaded from specs.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    base_model, base_params, tuned_params, tuned_name, (transposed, extra) = _weights(
        base, tuned, device=device, dtype=dtype, model_dtype=model_dtype, embeddings=embeddings)
    shapes = []

    def matrices():
        for name, W0, Wt in _changed_matrices(base_params, tuned_params, transposed, extra, device):
            shapes.append(tuple(W0.shape))
            yield name, W0, Wt

    reports = list(tqdm(iter_reports(matrices(), k=k, epsilon=epsilon, epsilons=epsilons, dtype=dtype),
                        desc=f"intruders {model_label(tuned_name)}", unit="matrix", disable=not progress, leave=False))
    return IntruderResult.from_reports(reports, base=base_model.name, tuned=tuned_name,
                                       label=label or model_label(tuned_name), k=k, epsilon=epsilon, epsilons=epsilons,
                                       shapes=shapes)


def measure_series(base, series, **kwargs) -> list[tuple[int, IntruderResult]]:
    """`measure` for every checkpoint of a series (a `CheckpointSeries`, a folder of checkpoints, `zoo:series`),
    one checkpoint in memory at a time; results labelled `step N`."""
    kwargs.setdefault("progress", False)
    if not isinstance(base, Model):
        base = load_model(base, device=str(resolve_device(kwargs.get("device", "auto"))),
                          dtype=kwargs.get("model_dtype", "float32"))
    series = series if isinstance(series, CheckpointSeries) else load_series(series)
    return [(step, measure(base, path, label=f"step {step}", **kwargs)) for step, path in series]


def series_frame(series: Sequence[tuple[int, IntruderResult]]):
    """Intruders over all matrices per step and epsilon, with the largest ||delta W||_2 / s1(W0) at each step."""
    import pandas as pd

    return pd.concat([r.counts_frame().assign(step=step) for step, r in series], ignore_index=True)


# ------------------------------------------------------------------------------------------------ steering

def intruder_updates(pair: Pair, epsilon: float = EPSILON, k: int = K, *, dtype: torch.dtype | str = torch.float32,
                     device: str | torch.device = "auto", embeddings: bool = False) -> dict[str, Tensor]:
    """sum_{i in intruders} s_i u_i v_i^T for every tuned parameter that has intruders at `epsilon`, in the
    parameter's stored layout, in `dtype`, on the tuned model's device. Parameters without intruders are absent."""
    return _intruder_updates(pair, epsilon, k, dtype=dtype, device=device, embeddings=embeddings)[0]


def _intruder_updates(pair: Pair, epsilon: float, k: int, *, dtype, device, embeddings) -> tuple[dict, int]:
    """(`intruder_updates`, the number of intruders)."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    transposed, extra = _layout(pair.base, embeddings)
    tuned_params = _params(pair.tuned)
    updates: dict[str, Tensor] = {}
    n_intruders = 0
    for matrix, W0, Wt in _changed_matrices(_params(pair.base), tuned_params, transposed, extra, device):
        U, S, Vh = intruder_directions(W0, Wt, epsilon, k, dtype)
        if len(S) == 0:
            continue
        n_intruders += len(S)
        name = matrix.split(":")[0]
        if name not in updates:
            updates[name] = torch.zeros_like(tuned_params[name], dtype=dtype)
        views = dict(analysis_matrices(name, updates[name], fan_in_fan_out=name in transposed))
        views[matrix].copy_((U * S) @ Vh)  # a view into the stored layout (transposed, or a third of a fused q/k/v)
    return updates, n_intruders


def _set_scaled(hf: torch.nn.Module, tuned: Model, updates: Mapping[str, Tensor], lam: float) -> None:
    """hf's parameters := tuned's - (1 - lam) * update (lam = 1 is tuned exactly)."""
    target, source = dict(hf.named_parameters()), dict(tuned.hf.named_parameters())
    with torch.no_grad():
        for name, update in updates.items():
            W = source[name]
            target[name].copy_((W.to(update.dtype) - (1 - lam) * update.to(W.device)).to(W.dtype))


def steer(pair: Pair, lam: float, epsilon: float = EPSILON, k: int = K, *,
          updates: Mapping[str, Tensor] | None = None, **kwargs) -> Model:
    """A new Model: the tuned model with its intruder singular values scaled by `lam` (0 removes the intruders,
    1 is the tuned model exactly); the pair is untouched. `updates` from `intruder_updates` skip the SVDs.
    `save_checkpoint` writes it as a standard Hugging Face folder."""
    updates = intruder_updates(pair, epsilon, k, **kwargs) if updates is None else updates
    hf = copy.deepcopy(pair.tuned.hf)
    _set_scaled(hf, pair.tuned, updates, lam)
    return Model(hf, pair.tuned.tokenizer, f"{pair.tuned.name} (intruders x {lam:g})", backend=pair.tuned.backend)


def save_checkpoint(model: Model, folder: str | Path) -> Path:
    """`model` as a Hugging Face folder (safetensors weights, config, tokenizer) that `load_model` reads back."""
    folder = Path(folder)
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def _scores(model: Model, pretrain_prompts, pretrain_answers, target_prompts, target_answers, batch_size) -> dict:
    from interp.scoring import answer_scores, loss

    if pretrain_answers is None:
        pretrain = {"pretrain_loss": float(loss(model, pretrain_prompts, batch_size=batch_size).mean()),
                    "pretrain_accuracy": None}
    else:
        s = answer_scores(model, pretrain_prompts, pretrain_answers, batch_size=batch_size)
        pretrain = {"pretrain_loss": float(s.loss.mean()), "pretrain_accuracy": float(s.accuracy.mean())}
    t = answer_scores(model, target_prompts, target_answers, batch_size=batch_size)
    return {**pretrain, "target_loss": float(t.loss.mean()), "target_accuracy": float(t.accuracy.mean())}


def lambda_sweep(pair: Pair, lams: Sequence[float], pretrain_prompts: Sequence[str], target_prompts: Sequence[str],
                 target_answers: Sequence[str], *, pretrain_answers: Sequence[str] | None = None,
                 epsilon: float = EPSILON, k: int = K, batch_size: int = 16, **kwargs) -> dict:
    """Forgetting vs target skill as the intruders are scaled by each lambda.

    Pre-training side: the mean answer loss (and accuracy) on `pretrain_prompts` when `pretrain_answers` are given,
    else the mean next-token loss over the prompts' text. Target side: answer loss and accuracy. Also scores the
    base model. Returns a JSON-ready dict of lists over `lams` (plus "base" and "n_intruders").
    """
    kwargs = {"dtype": torch.float32, "device": "auto", "embeddings": False, **kwargs}
    updates, n_intruders = _intruder_updates(pair, epsilon, k, **kwargs)
    steered = steer(pair, 1.0, updates={})  # one copy of the tuned model, re-weighted in place for each lambda
    args = (pretrain_prompts, pretrain_answers, target_prompts, target_answers, batch_size)
    rows = []
    for lam in lams:
        _set_scaled(steered.hf, pair.tuned, updates, lam)
        rows.append(_scores(steered, *args))
    return {"tuned": pair.tuned.name, "epsilon": epsilon, "k": k, "n_intruders": n_intruders,
            "pretrain_metric": "answer loss on pre-training skills" if pretrain_answers is not None
            else "loss on pre-training text",
            "lam": [float(lam) for lam in lams], **{key: [row[key] for row in rows] for key in rows[0]},
            "base": _scores(pair.base, *args)}


# ------------------------------------------------------------------------------------------------ figures

def plot_counts(results: Sequence[IntruderResult], ax=None):
    """Intruders summed over all matrices vs epsilon, one line per model (full fine-tune and LoRA ranks together)."""
    if ax is None:
        ax = figure()[1][0, 0]
    for r in results:
        ax.plot(r.epsilons.numpy(), r.totals().numpy(), marker="o", markersize=3, label=r.label,
                color=model_color(r.label))
    ax.set(xlabel=r"$\epsilon$ (similarity threshold)", ylabel=f"intruders (top {results[0].k}, all matrices)",
           title="Intruder dimensions")
    ax.legend()
    return ax


def plot_layer_heatmap(result: IntruderResult, ax=None, epsilon: float | None = None):
    """Intruder counts per layer and matrix kind at `epsilon` (default the result's)."""
    if ax is None:
        ax = figure()[1][0, 0]
    table = result.layer_frame(epsilon)
    counts = table.to_numpy().T  # [kind, layer]
    image = ax.imshow(counts, aspect="auto", cmap="Reds", vmin=0, vmax=max(result.k, 1))
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, str(value), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(table.index)), [str(i) for i in table.index])
    ax.set_yticks(range(len(table.columns)), list(table.columns))
    ax.grid(False)
    eps = result.epsilon if epsilon is None else epsilon
    ax.set(xlabel="layer", title=f"Intruders of {result.label} ($\\epsilon$ = {eps:g})")
    ax.figure.colorbar(image, ax=ax, label="intruders")
    return ax


def _showcase(result: IntruderResult) -> int:
    """The matrix with the most intruders at the result's epsilon, ties broken by the largest ||delta W||_2 / s1."""
    counts, ratio = result.count().double(), result.ratio(1).nan_to_num(0).double()
    return int((counts * 1e6 + ratio).argmax())


def plot_spectra(result: IntruderResult, ax=None, matrix: str | int | None = None):
    """Singular values of W0, Wt and delta W of one matrix (default: the one with most intruders); intruders marked."""
    if ax is None:
        ax = figure()[1][0, 0]
    i = _showcase(result) if matrix is None else (result.names.index(matrix) if isinstance(matrix, str) else matrix)
    color = model_color(result.label)
    for values, name, style, c in ((result.base_s[i], "base", "-", model_color("base")),
                                   (result.tuned_s[i], result.label, "-", color),
                                   (result.delta_s[i], r"$\Delta W$", ":", color)):
        values = values[~values.isnan()]
        if style == ":":  # delta W: leave out the float round-off past its rank
            values = values[values > 1e-5 * values.max()]
        ax.plot(range(1, len(values) + 1), values.numpy(), style, label=name, color=c)
    hits = torch.nonzero(result.intruders()[i]).flatten()
    ax.scatter((hits + 1).numpy(), result.tuned_s[i, hits].numpy(), marker="x", color="black", zorder=3,
               label=f"intruders ($\\epsilon$ = {result.epsilon:g})")
    ax.set(xscale="log", yscale="log", xlabel="index", ylabel="singular value",
           title=f"Spectra of {result.names[i]}")
    ax.legend()
    return ax


def plot_lambda(sweep: dict, ax=None):
    """Target accuracy against pre-training loss as the intruders are scaled by lambda; the base model as a star."""
    if ax is None:
        ax = figure()[1][0, 0]
    label = model_label(sweep["tuned"])
    ax.plot(sweep["pretrain_loss"], sweep["target_accuracy"], marker="o", color=model_color(label), label=label)
    for lam, x, y in zip(sweep["lam"], sweep["pretrain_loss"], sweep["target_accuracy"]):
        ax.annotate(f"{lam:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.scatter([sweep["base"]["pretrain_loss"]], [sweep["base"]["target_accuracy"]], marker="*", s=40,
               color=model_color("base"), label="base", zorder=3)
    ax.set(xlabel=sweep["pretrain_metric"] + " (forgetting)", ylabel="target accuracy",
           title=rf"Scaling intruders by $\lambda$ ($\epsilon$ = {sweep['epsilon']:g})")
    ax.legend()
    return ax


def plot_series(series: Sequence[tuple[int, IntruderResult]], ax=None, epsilons: Sequence[float] = (0.3, 0.5, 0.7)):
    """Intruders over all matrices vs training step, one line per epsilon."""
    if ax is None:
        ax = figure()[1][0, 0]
    steps = [step for step, _ in series]
    for eps, color in zip(epsilons, PALETTE):
        ax.plot(steps, [int(r.count(eps).sum()) for _, r in series], marker="o", markersize=3, color=color,
                label=f"$\\epsilon$ = {eps:g}")
    ax.set(xlabel="training step", ylabel=f"intruders (top {series[0][1].k})", title="Intruders during fine-tuning")
    ax.legend()
    return ax


def save_figures(results: Sequence[IntruderResult], sweep: dict | None, series, out: str | Path) -> list[Path]:
    """Every intruder figure for saved results into `out` (PDF and PNG each)."""
    out = Path(out)
    fig, ax = figure()
    plot_counts(results, ax[0, 0])
    written = list(save_figure(fig, out / "intruder_counts"))
    for r in results:
        if not r.names:
            continue
        fig, ax = figure()
        plot_layer_heatmap(r, ax[0, 0])
        written += save_figure(fig, out / f"intruder_layers_{r.label}")
        fig, ax = figure()
        plot_spectra(r, ax[0, 0])
        written += save_figure(fig, out / f"intruder_spectra_{r.label}")
    if sweep is not None:
        fig, ax = figure()
        plot_lambda(sweep, ax[0, 0])
        written += save_figure(fig, out / "intruder_lambda")
    if series:
        fig, ax = figure()
        plot_series(series, ax[0, 0])
        written += save_figure(fig, out / "intruder_series")
    return written


# ---------------------------------------------------------------------------------------------------- CLI

ZOO_TUNED = ("zoo:full", "zoo:lora-r1", "zoo:lora-r8", "zoo:lora-r64")


def add_arguments(parser) -> None:
    from interp.cli import add_model_arguments

    parser.add_argument("--base", default="zoo:base", help="pre-trained model: hub id, local folder or zoo name")
    parser.add_argument("--tuned", action="append",
                        help="fine-tuned model: folder, PEFT adapter folder, hub id or zoo name; repeat to compare "
                             "several on one figure (zoo default: " + ", ".join(ZOO_TUNED) + ")")
    parser.add_argument("--series", help="a folder of checkpoints (or zoo:series, the zoo default): intruders vs "
                                         "training step")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--k", type=int, default=K, help=f"top singular directions checked (default {K})")
    parser.add_argument("--epsilon", type=float, default=EPSILON,
                        help=f"intruder threshold for energy, heatmaps and steering (default {EPSILON})")
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS), help="the epsilon sweep")
    parser.add_argument("--svd-dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--embeddings", action="store_true", help="also analyse the token embedding")
    parser.add_argument("--lams", type=float, nargs="+", default=list(LAMBDAS), help="lambdas of the steering sweep")
    parser.add_argument("--steer", help="tuned model of the lambda sweep (default: the one with most intruders; "
                                        "zoo default: zoo:lora-r1)")
    parser.add_argument("--prompts", type=Path,
                        help="target-task prompts for the lambda sweep: .jsonl with 'prompt' and 'answer' "
                             "(zoo default: the target skill)")
    parser.add_argument("--pretrain-prompts", type=Path,
                        help="pre-training-distribution prompts: .txt (loss over the text) or .jsonl with answers "
                             "(zoo default: the pre-training skills)")
    parser.add_argument("--n-prompts", type=int, default=64, help="zoo prompts per set")
    add_model_arguments(parser)


def _read_examples(path: Path) -> tuple[list[str], list[str] | None]:
    """Prompts of a prompt file, and their answers when it is .jsonl with an 'answer' on every line."""
    import json

    from interp.prompts import read_prompts

    prompts = read_prompts(path)
    if path.suffix != ".jsonl":
        return prompts, None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    answers = [r.get("answer") if isinstance(r, dict) else None for r in records]
    return prompts, answers if all(isinstance(a, str) for a in answers) else None


def zoo_fine_tunes(base: str) -> tuple[list[str], str, str]:
    """(tuned models, checkpoint series, model to steer) of zoo base `base` (tiny or real): its full fine-tune and
    LoRA r=1, 8, 64, its series, and LoRA r=1 (the paper's low-rank case)."""
    from interp.zoo import in_real_zoo

    prefix = f"{ZOO_PREFIX}smol-" if in_real_zoo(base) else ZOO_PREFIX
    tuned = [prefix + t.removeprefix(ZOO_PREFIX) for t in ZOO_TUNED]
    return tuned, f"{prefix}series", f"{prefix}lora-r1"


def _sweep_prompts(args) -> dict | None:
    """Prompt sets of the lambda sweep from the arguments, or on zoo models the zoo's; None when there are none."""
    if args.prompts is None and args.pretrain_prompts is None:
        if not str(args.base).startswith(ZOO_PREFIX):
            return None
        from interp.zoo import default_prompts

        (target, answers), (pretrain, pretrain_answers) = default_prompts(args.base, args.n_prompts).values()
        return {"target_prompts": target, "target_answers": answers, "pretrain_prompts": pretrain,
                "pretrain_answers": pretrain_answers}
    if args.prompts is None or args.pretrain_prompts is None:
        raise BadPrompts("the lambda sweep needs both --prompts (target task, .jsonl with answers) and "
                         "--pretrain-prompts; pass both or neither")
    target, answers = _read_examples(args.prompts)
    if answers is None:
        raise BadPrompts(f"{args.prompts}: the target prompts need answers; write .jsonl lines with 'prompt' and "
                         f"'answer'")
    pretrain, pretrain_answers = _read_examples(args.pretrain_prompts)
    return {"target_prompts": target, "target_answers": answers, "pretrain_prompts": pretrain,
            "pretrain_answers": pretrain_answers}


def run_cli(args) -> None:
    from interp.errors import ModelNotFound

    tuned, series_spec = args.tuned, args.series
    if tuned is None:
        if not str(args.base).startswith(ZOO_PREFIX):
            raise ModelNotFound(f"pass --tuned (one or more) for base {args.base}; zoo bases default to "
                                f"{', '.join(ZOO_TUNED)}")
        tuned, default_series, default_steer = zoo_fine_tunes(args.base)
        series_spec, args.steer = series_spec or default_series, args.steer or default_steer
    prompts = _sweep_prompts(args)
    base = load_model(args.base, device=args.device, dtype=args.dtype, backend=args.backend)
    kw = dict(k=args.k, epsilon=args.epsilon, epsilons=args.epsilons, dtype=args.svd_dtype, device=args.device,
              embeddings=args.embeddings, model_dtype=args.dtype)
    labels = unique_labels([model_label(t) for t in tuned])
    results = [measure(base, t, label=label, **kw) for t, label in zip(tuned, labels)]
    series = measure_series(base, series_spec, **kw) if series_spec else None
    sweep = None
    steer_spec = args.steer or _most_intruders(tuned, results)
    if prompts is not None and steer_spec is not None:
        steered = load_model(steer_spec, base=args.base, device=args.device, dtype=args.dtype, backend=args.backend)
        check_compatible(base, steered)
        pair = Pair(base, steered)
        sweep = lambda_sweep(pair, args.lams, epsilon=args.epsilon, k=args.k, dtype=args.svd_dtype,
                             device=args.device, embeddings=args.embeddings, **prompts)
    write(results, sweep, series, args.out)
    eps = args.epsilon
    print(f"intruders written to {args.out}: " + ", ".join(
        f"{r.label} {int(r.count(eps).sum())} at eps {eps:g} (max ||dW||/s1 {float(r.ratio(1).max()):.2f})"
        if r.names else f"{r.label} unchanged" for r in results))


def _most_intruders(tuned: Sequence[str], results: Sequence[IntruderResult]) -> str | None:
    counts = [int(r.count().sum()) for r in results]
    return tuned[counts.index(max(counts))] if max(counts, default=0) > 0 else None


def write(results: Sequence[IntruderResult], sweep: dict | None, series, out: str | Path) -> None:
    """Results, CSV tables and figures into `out`; `redraw(out)` re-draws the figures from these files."""
    import json

    import pandas as pd

    out = Path(out)
    for r in results:
        r.save(out / "results" / r.label)
    manifest = {"results": [r.label for r in results], "series": []}
    pd.concat([r.to_frame() for r in results]).to_csv(out / "intruders.csv", index=False)
    pd.concat([r.counts_frame() for r in results]).to_csv(out / "intruder_counts.csv", index=False)
    pd.concat([r.layer_frame().reset_index().assign(model=r.label) for r in results]).to_csv(
        out / "intruder_layers.csv", index=False)
    if series:
        for step, r in series:
            r.save(out / "series" / f"step-{step:06d}")
        manifest["series"] = [step for step, _ in series]
        series_frame(series).to_csv(out / "intruder_series.csv", index=False)
    if sweep is not None:
        (out / "lambda_sweep.json").write_text(json.dumps(sweep, indent=1))
    (out / "intruders.json").write_text(json.dumps(manifest, indent=1))
    save_figures(results, sweep, series, out / "figures")


def redraw(out: str | Path) -> list[Path]:
    """Re-draw every figure from the results saved by `write` (no model is run)."""
    import json

    out = Path(out)
    manifest = json.loads((out / "intruders.json").read_text())
    results = [IntruderResult.load(out / "results" / label) for label in manifest["results"]]
    series = [(step, IntruderResult.load(out / "series" / f"step-{step:06d}")) for step in manifest["series"]]
    sweep = json.loads((out / "lambda_sweep.json").read_text()) if (out / "lambda_sweep.json").is_file() else None
    return save_figures(results, sweep, series, out / "figures")
