"""LoRA adapters as weight deltas, and weight matrices named and oriented for spectral analysis.

A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) is read directly, without building a
model: for each adapted module, delta W = scaling * B @ A, of shape (out, in), with scaling = alpha / r
(rsLoRA: alpha / sqrt(r)). Deltas come back keyed and laid out like the base model's stored weight, so
`W0 + delta` is the merged weight, as `merge_and_unload()` would write it.
"""

import json
import math
import re
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from interp.errors import UnsupportedAdapter

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

KINDS = {
    "attn.c_attn": "qkv",  # GPT-2's fused (in, 3 d) Conv1D, output [q | k | v]: split by `analysis_matrices`
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_out",
    "attn.c_proj": "o",
    "mlp.c_fc": "mlp_in",
    "mlp.c_proj": "mlp_out",
}


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


def matrix_kind(name: str) -> str | None:
    """q, k, v, o, mlp_in, mlp_out (qkv for a fused c_attn) of a parameter or `analysis_matrices` name, else None."""
    if name.endswith((":q", ":k", ":v")):
        return name[-1]
    module = "." + name.removesuffix(".weight")
    return next((kind for suffix, kind in KINDS.items() if module.endswith("." + suffix)), None)


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted name (`model.layers.3.mlp.up_proj.weight` -> 3), if any."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match[1]) if match else None


def analysis_matrices(
    name: str, weight: Float[Tensor, "..."], *, fan_in_fan_out: bool
) -> list[tuple[str, Float[Tensor, "out in"]]]:
    """The (out, in) matrices stored under parameter `name`, for SVD.

    `fan_in_fan_out=True` for GPT-2 Conv1D, stored (in, out): transposed (a view). Singular values do not care,
    but left singular vectors (output directions, which intruder similarity compares) do.
    GPT-2's fused `attn.c_attn` is split into its q, k, v thirds, named `name:q`, `name:k`, `name:v`.
    """
    W = weight.mT if fan_in_fan_out else weight
    if matrix_kind(name) == "qkv":
        return [(f"{name}:{kind}", part) for kind, part in zip("qkv", W.chunk(3, dim=0), strict=True)]
    return [(name, W)]


def paired_matrices(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    *,
    fan_in_fan_out: bool | Container[str],
    extra: Container[str] = (),
) -> Iterator[tuple[str, Float[Tensor, "out in"], Float[Tensor, "out in"]]]:
    """(name, W0, Wt) for every q/k/v/o/mlp matrix present in both state dicts, in base order, lazily.

    `fan_in_fan_out`: True/False for every matrix, or the names of the parameters stored (in, out).
    `extra`: parameter names to pair although they have no `matrix_kind` (e.g. the token embedding).
    """
    for name, W0 in base.items():
        if (matrix_kind(name) is None and name not in extra) or name not in tuned:
            continue
        flag = fan_in_fan_out if isinstance(fan_in_fan_out, bool) else name in fan_in_fan_out
        pairs = zip(
            analysis_matrices(name, W0, fan_in_fan_out=flag),
            analysis_matrices(name, tuned[name], fan_in_fan_out=flag),
            strict=True,
        )
        for (matrix, w0), (_, wt) in pairs:
            yield matrix, w0, wt
