"""LoRA adapters read as weight deltas, without building a model.

A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors): for each adapted module, delta W =
scaling * B @ A, of shape (out, in), with scaling = alpha / r (rsLoRA: alpha / sqrt(r)). Deltas come back keyed
and laid out like the base model's stored weight, so `W0 + delta` is the merged weight, as `merge_and_unload()`
would write it. `LoraMerged` is that merged state dict, formed one matrix at a time when read.
"""

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from interp.errors import IncompatibleModels, UnsupportedAdapter

# Config fields that make the tuned weight something other than W0 + scaling * B @ A (DoRA, QA-LoRA, aLoRA, ...),
# or that tune more than LoRA factors; any truthy value is refused.
UNSUPPORTED_FIELDS = (
    "use_dora",
    "use_qalora",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "lora_bias",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "modules_to_save",
)
# Initialisations that change the base weights too, so the saved A, B are relative to a modified W0;
# `save_pretrained(path_initial_model_for_weight_conversion=...)` turns them into plain LoRA.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")



def _pattern_value(pattern: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: delta W = scaling * B @ A in the (out, in) orientation."""

    A: Float[Tensor, "r in"]
    B: Float[Tensor, "out r"]
    scaling: float

    def delta(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Float[Tensor, "out in"]:
        """delta W (out, in) on `device`, in `dtype` (default float32, or the adapter's dtype if wider)."""
        dtype = dtype or torch.promote_types(self.A.dtype, torch.float32)
        return self.scaling * (self.B.to(device, dtype) @ self.A.to(device, dtype))


def lora_factors(adapter_dir: str | Path) -> tuple[dict[str, LoraFactors], dict]:
    """The LoRA factors of a PEFT LoRA folder keyed by base parameter name (`....c_attn.weight`), and its config.

    Refuses (UnsupportedAdapter) every adapter whose tuned weight is not W0 + scaling * B @ A.
    """
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file():
        raise UnsupportedAdapter(f"{adapter_dir}: no adapter_config.json; pass a PEFT adapter folder")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapter(
            f"{adapter_dir}: peft_type {config.get('peft_type')!r} is not supported; only plain LoRA adapters "
            "(peft_type LORA) can be read as weight deltas. Merge the adapter and compare merged checkpoints instead"
        )
    flags = [name for name in UNSUPPORTED_FIELDS if config.get(name)]
    if config.get("bias", "none") != "none":
        flags.append(f"bias={config['bias']!r} (tuned biases)")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        flags.append(f"init_lora_weights={init!r} (changes the base weights)")
    if flags:
        raise UnsupportedAdapter(
            f"{adapter_dir}: LoRA variant not supported ({', '.join(flags)}); its tuned weights are not "
            "W0 + scaling * B @ A. Merge the adapter and compare merged checkpoints instead"
        )
    if not weights_file.is_file():
        raise UnsupportedAdapter(
            f"{adapter_dir}: no adapter_model.safetensors (pickled .bin files are not loaded); "
            "re-save the adapter with save_pretrained(..., safe_serialization=True)"
        )

    tensors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in load_file(weights_file).items():
        match = LORA_KEY.match(key)
        if match is None:
            raise UnsupportedAdapter(
                f"{adapter_dir}: tensor {key!r} is not a LoRA A/B factor of a linear layer; only those are supported"
            )
        tensors.setdefault(match["module"], {})[match["factor"]] = tensor

    factors = {}
    for module, ab in tensors.items():
        if ab.keys() != {"A", "B"}:
            raise UnsupportedAdapter(f"{adapter_dir}: module {module} has only lora_{next(iter(ab))}")
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        r_config = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if B.shape[1] != r or r_config != r:
            raise UnsupportedAdapter(
                f"{adapter_dir}: module {module} has A {tuple(A.shape)}, B {tuple(B.shape)} "
                f"but the config says r={r_config}"
            )
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[f"{module}.weight"] = LoraFactors(A, B, scaling)
    return factors, config


def lora_delta_weights(adapter_dir: str | Path) -> dict[str, Float[Tensor, "..."]]:
    """delta W per adapted module of a PEFT LoRA folder, keyed by base parameter name (`....c_attn.weight`).

    Each delta has the stored layout of the base weight: (out, in) for nn.Linear, (in, out) for GPT-2's
    Conv1D (`fan_in_fan_out=True`); float32, or the adapter's dtype if wider.
    """
    factors, config = lora_factors(adapter_dir)
    deltas = {name: f.delta() for name, f in factors.items()}
    return {name: d.mT.contiguous() for name, d in deltas.items()} if config.get("fan_in_fan_out") else deltas


class LoraMerged(Mapping):
    """W0 + scaling B A of each adapted parameter (stored layout, on `device`, in `dtype`), formed only when read;
    unadapted parameters are the base's own. `transposed`: the names of the parameters stored (in, out)."""

    def __init__(self, adapter: str | Path, base: Mapping[str, Tensor], transposed: set[str], device, dtype):
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
