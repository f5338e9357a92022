"""Weight matrices named and oriented for spectral analysis: which parameters are attention and MLP matrices,
their (out, in) orientation (GPT-2's Conv1D stores (in, out)), and the pairs that fine-tuning changed.

Names: the parameter's own (`model.layers.3.mlp.up_proj.weight`), or `....c_attn.weight:q` / `:k` / `:v` for the
thirds of GPT-2's fused q/k/v. Kinds: q, k, v, o, mlp_in, mlp_out (and embed for the token embedding).
"""

import re
from collections.abc import Container, Iterator, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import UnsupportedAdapter
from interp.models import Model

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


def model_params(model: Model) -> dict[str, Tensor]:
    """The parameters of a merged model by name (refuses an unmerged PEFT model)."""
    if type(model.hf).__name__.startswith("Peft"):
        raise UnsupportedAdapter(f"{model.name} is an unmerged PEFT model; load it with merge=True or pass the "
                                 f"adapter folder itself")
    return {name: p.detach() for name, p in model.hf.named_parameters()}


def layout(model: Model, embeddings: bool) -> tuple[set[str], set[str]]:
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


def changed_matrices(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], transposed: set[str],
                     extra: set[str], device) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(name, W0, Wt) on `device` for every analysed (out, in) matrix that fine-tuning changed, in model order."""
    for name, W0, Wt in paired_matrices(base, tuned, fan_in_fan_out=transposed, extra=extra):
        W0, Wt = W0.to(device), Wt.to(device)
        if not torch.equal(W0.to(Wt.dtype), Wt):
            yield name, W0, Wt
