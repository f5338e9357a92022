"""`measure`: the intruder analysis of every weight matrix that differs between a base and a tuned model, and
`measure_series` along a checkpoint series.

The tuned weights are read from the tuned model, or, when it was loaded from a PEFT LoRA adapter
(`Model.adapter`), from the adapter's factors: Wt = W0 + scaling B A is formed one matrix at a time on the
device (in the SVD dtype), never from the merged model's rounded weights. Matrices are walked in the model's
layer order with one pair of SVDs on the device at a time; only spectra and similarities come back to the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from analyses.intruders.lora import LoraMerged
from analyses.intruders.matrices import changed_matrices, layout, model_params
from analyses.intruders.result import IntruderResult
from analyses.intruders.spectra import EPSILON, EPSILONS, K, iter_reports
from interp.errors import BadModelArgument
from interp.models import (CheckpointSeries, Model, Pair, check_compatible, load_model, load_series, model_label,
                           resolve_device, resolve_dtype)


def measure(pair_or_base: Pair | Model, tuned: Model | None = None, *, k: int = K, epsilon: float = EPSILON,
            epsilons: Sequence[float] = EPSILONS, dtype: torch.dtype | str = torch.float32,
            device: str | torch.device = "auto", embeddings: bool = False, label: str | None = None,
            progress: bool = True) -> IntruderResult:
    """Intruder analysis of every matrix that differs between base and tuned: a Pair, or base and tuned Models
    (load them with `interp.load_pair` / `load_model`). A tuned model loaded from a PEFT LoRA adapter is read as
    its factors. dtype: the SVDs' (float32 or float64, whatever the models' dtype); device: where they run;
    embeddings: also analyse the token embedding; label: default the tuned model's short name."""
    base, tuned = _models(pair_or_base, tuned)
    model_params(tuned)  # an unmerged PEFT model is refused even when its adapter could be read
    return _measure(base, tuned, tuned.adapter, tuned.name, label or model_label(tuned), k=k, epsilon=epsilon,
                    epsilons=epsilons, dtype=dtype, device=device, embeddings=embeddings, progress=progress)


def measure_series(base: Model, series: CheckpointSeries | str | Path | Sequence[str | Path], *, k: int = K,
                   epsilon: float = EPSILON, epsilons: Sequence[float] = EPSILONS,
                   dtype: torch.dtype | str = torch.float32, device: str | torch.device = "auto",
                   embeddings: bool = False, progress: bool = False) -> list[tuple[int, IntruderResult]]:
    """`measure` for every checkpoint of a series (a `CheckpointSeries`, or what `load_series` reads) against
    `base`, one checkpoint in memory at a time; results labelled `step N`. PEFT LoRA checkpoints are read as
    their factors (no model is built); other checkpoints are loaded like `base` (device, dtype, backend)."""
    if not isinstance(base, Model):
        raise BadModelArgument(f"measure_series takes a loaded base model, got {type(base).__name__}; load it with "
                               f"interp.load_model")
    series = series if isinstance(series, CheckpointSeries) else load_series(series)
    opts = dict(k=k, epsilon=epsilon, epsilons=epsilons, dtype=dtype, device=device, embeddings=embeddings,
                progress=progress)
    out = []
    for step, path in series:
        path = Path(path)
        if (path / "adapter_config.json").is_file():
            result = _measure(base, None, path, str(path), f"step {step}", **opts)
        else:
            tuned = load_model(path, device=str(base.device), dtype=base.dtype, backend=base.backend)
            result = _measure(base, tuned, None, tuned.name, f"step {step}", **opts)
        out.append((step, result))
    return out


def _models(pair_or_base, tuned) -> tuple[Model, Model]:
    if isinstance(pair_or_base, Pair):
        if tuned is not None:
            raise BadModelArgument("pass either a Pair or base and tuned, not both")
        return pair_or_base.models
    if tuned is None:
        raise BadModelArgument("measure needs a tuned model (or a Pair)")
    for model in (pair_or_base, tuned):
        if not isinstance(model, Model):
            raise BadModelArgument(f"measure takes loaded models, got {type(model).__name__} {model!r}; load it with "
                                   f"interp.load_model (or both with interp.load_pair)")
    return pair_or_base, tuned


def _measure(base: Model, tuned: Model | None, adapter: Path | None, tuned_name: str, label: str, *, k: int,
             epsilon: float, epsilons: Sequence[float], dtype: torch.dtype | str, device: str | torch.device,
             embeddings: bool, progress: bool) -> IntruderResult:
    """The analysis of `tuned`'s weights, or of base + `adapter`'s factors when an adapter is given."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    transposed, extra = layout(base, embeddings)
    base_params = model_params(base)
    tuned_params = LoraMerged(adapter, base_params, transposed, device, dtype) if adapter else model_params(tuned)
    if tuned is not None:
        check_compatible(base, tuned)
    shapes = []

    def matrices():
        for name, W0, Wt in changed_matrices(base_params, tuned_params, transposed, extra, device):
            shapes.append(tuple(W0.shape))
            yield name, W0, Wt

    reports = list(tqdm(iter_reports(matrices(), k=k, epsilon=epsilon, epsilons=epsilons, dtype=dtype),
                        desc=f"intruders {label}", unit="matrix", disable=not progress, leave=False))
    used = [len(r.sims) for r in reports]  # min(k, rank) of each matrix
    if used and min(used) < k:
        warnings.warn(f"k={k} exceeds the rank of {sum(u < k for u in used)} of {len(used)} matrices of {label} "
                      f"(smallest {min(used)}); their top-{min(used)}..{max(used)} directions are used, and the "
                      f"result records k={max(used)}", stacklevel=3)
    settings = {"k": k, "k_used": used, "epsilon": epsilon, "epsilons": [float(e) for e in epsilons],
                "dtype": str(dtype).removeprefix("torch."), "embeddings": embeddings}
    return IntruderResult.from_reports(reports, base=base.name, tuned=tuned_name, label=label,
                                       k=min(k, max(used, default=k)), epsilon=epsilon, epsilons=epsilons,
                                       shapes=shapes, settings=settings)
