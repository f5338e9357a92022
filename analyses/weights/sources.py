"""Where the weights of an update come from, read without building a model when they can be.

A side of a pair is a loaded `Model` (its parameters; when it was merged from a PEFT LoRA adapter, `Model.adapter`
is read instead), a Hugging Face folder (its safetensors files, read one tensor at a time; the module layout from the
config, on the meta device), or a PEFT LoRA adapter folder on the base (delta W = scaling B A from its factors, by
`analyses.intruders.LoraMerged`: rsLoRA, rank and alpha patterns, and GPT-2's (in, out) layout handled there).
`Update(name)` is (theta_base, theta_tuned - theta_base) of one parameter in its stored layout (None where the update
is zero).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from analyses.intruders.lora import LoraMerged
from analyses.intruders.matrices import layout, model_params
from interp.errors import BadModelArgument, IncompatibleModels, ModelNotFound
from interp.models import Model, Pair, resolve_device, resolve_dtype


class FolderWeights(Mapping):
    """The parameters stored in a Hugging Face folder's safetensors file(s), each read only when asked for."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
            ["model.safetensors"]
        if not all((folder / f).is_file() for f in files):
            raise ModelNotFound(f"{folder} holds no safetensors weights; pass a model folder saved with "
                                f"save_pretrained (or a loaded model)")
        self.handles = [safe_open(str(folder / f), "pt") for f in files]
        self.where = {key: h for h in self.handles for key in h.keys()}  # noqa: SIM118 (safe_open handles are not dicts)

    def __getitem__(self, name: str) -> Tensor:
        return self.where[name].get_tensor(name)

    def __contains__(self, name) -> bool:
        return name in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


@dataclass
class Side:
    """One model's weights: `params` by name (None for an adapter folder, which holds only a delta), the module
    tree `hf` to read names and layout from, its `name`, and the LoRA `adapter` folder when it has one."""

    name: str
    hf: nn.Module | None
    params: Mapping[str, Tensor] | None
    adapter: Path | None = None


def side(spec: Model | str | Path) -> Side:
    """`spec` as a Side: a loaded Model, a model folder, or a PEFT adapter folder."""
    if isinstance(spec, Model):
        model_params(spec)  # refuses an unmerged PEFT model
        return Side(spec.name, spec.hf, {n: p.detach() for n, p in spec.hf.named_parameters()}, spec.adapter)
    if not isinstance(spec, (str, Path)):
        raise BadModelArgument(f"weights take a loaded Model or a folder, got {type(spec).__name__}")
    folder = Path(spec).expanduser()
    if (folder / "adapter_config.json").is_file():
        return Side(str(spec), None, None, folder)
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"{folder} is neither a model folder (config.json) nor a PEFT adapter folder "
                            f"(adapter_config.json); load the model with interp.load_model and pass it")
    return Side(str(spec), meta_model(folder), FolderWeights(folder))


def meta_model(folder: Path) -> nn.Module:
    """The model class of `folder`'s config built on the meta device: names, shapes and layout, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


@dataclass
class Update:
    """theta_tuned - theta_base of every parameter, formed one at a time on `device` in `dtype`."""

    base: Side
    tuned: Side
    transposed: set[str]
    device: torch.device
    dtype: torch.dtype
    lora: LoraMerged | None = None
    _cache: dict = field(default_factory=dict)

    def __call__(self, name: str) -> tuple[Tensor, Tensor | None]:
        """(theta_base, theta_tuned - theta_base) of parameter `name` in its stored layout, on the device in the
        working dtype; the update is None where it is exactly zero. The last parameter asked for is cached, so the
        thirds of a fused q/k/v read it once."""
        if name not in self._cache:
            self._cache.clear()
            self._cache[name] = self._read(name)
        return self._cache[name]

    def _read(self, name: str) -> tuple[Tensor, Tensor | None]:
        W0 = self.base.params[name]
        if self.lora is not None:
            if name not in self.lora.factors:
                return W0.to(self.device, self.dtype), None
            d = self.lora.factors[name].delta(self.device, self.dtype)
            return W0.to(self.device, self.dtype), (d.mT if name in self.transposed else d)
        Wt = self.tuned.params[name]
        if W0.shape != Wt.shape:
            raise IncompatibleModels(f"{name}: base {tuple(W0.shape)}, tuned {tuple(Wt.shape)}; pass a tuned model "
                                     f"fine-tuned from this base")
        W0 = W0.to(self.device, self.dtype)
        if torch.equal(W0, Wt.to(self.device, W0.dtype)):
            return W0, None
        return W0, Wt.to(self.device, self.dtype) - W0


def update(pair_or_base: Pair | Model | str | Path, tuned: Model | str | Path | None = None, *,
           dtype: torch.dtype | str = torch.float32, device: str | torch.device = "auto") -> Update:
    """The update of a Pair, or of base and tuned given as Models or folders (a tuned PEFT adapter folder is read as
    its factors on the base)."""
    if isinstance(pair_or_base, Pair):
        if tuned is not None:
            raise BadModelArgument("pass either a Pair or base and tuned, not both")
        pair_or_base, tuned = pair_or_base.base, pair_or_base.tuned
    if tuned is None:
        raise BadModelArgument("the update needs a tuned model (or a Pair)")
    base_side, tuned_side = side(pair_or_base), side(tuned)
    if base_side.params is None:
        raise BadModelArgument(f"the base {base_side.name} is an adapter folder; pass the model it adapts")
    if device == "auto" and isinstance(pair_or_base, Model):
        device = pair_or_base.device
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    transposed = layout(Model(base_side.hf, None, base_side.name), False)[0]
    lora = None
    if tuned_side.adapter is not None:
        lora = LoraMerged(tuned_side.adapter, base_side.params, transposed, device, dtype)
    names = list(dict(base_side.hf.named_parameters()))
    for who in (base_side, tuned_side) if lora is None else (base_side,):
        missing = [n for n in names if n not in who.params]
        if missing:
            raise IncompatibleModels(f"{who.name} has no parameter {missing[0]} (and {len(missing) - 1} more) of "
                                     f"{base_side.name}'s architecture; pass models of one architecture (a folder "
                                     f"whose weights are stored under other names: load it with interp.load_model)")
    return Update(base_side, tuned_side, transposed, device, dtype, lora)

