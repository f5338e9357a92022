"""The model families interp supports, and the one place that knows their module names.

A `Family` names, for one layout of decoder layer, the modules the canonical sites live on: the attention, its
output projection, the MLP, the norms before and after each branch, and the final norm. Both backends read these
names (through `architecture(hf)`, resolved once per model); the bridge for the layout facts TransformerLens does not
expose as hooks (per-head outputs behind a post-norm, resid_mid of a parallel block), the nnsight backend for every
site. A model whose `config.model_type` is not listed here is refused at load (`UnsupportedArchitecture`).

What the sites are on each layout (tested site by site against HF's forward in tests/test_architectures.py):
- pre-norm (GPT-2, Llama, Mistral, Qwen2, Qwen3, Phi-3, sequential GPT-NeoX): attn_out and mlp_out are the branch
  outputs, resid_mid the pre-MLP norm's input;
- sandwich norms (Gemma 2, Gemma 3) and post-norms (OLMo 2): attn_out and mlp_out are the post-norms' outputs, the
  tensors added to the residual stream. head_out is each head's share of attn_out: the post-norm is linear once its
  per-position scale is fixed at its value on the whole attention output, so head h contributes
  `(z_h W_O[h]) * scale` and the heads sum to attn_out exactly. An edit at head_out changes attn_out by the edited
  heads' change at that fixed scale (the norm is not recomputed), which is what additive attribution assumes;
- parallel residual (GPT-NeoX, `use_parallel_residual`): attention and MLP both read resid_pre, and
  resid_post = resid_pre + attn_out + mlp_out. resid_mid is defined as resid_pre + attn_out (no tensor of the model
  holds it; the MLP does not read it), so both residual identities hold; an edit there reaches resid_post only.

To add a family: append a `Family` to FAMILIES (its `config.model_type` and module names), add its config to
FAMILIES in tests/test_architectures.py, and run that battery; a layout not listed above needs the backends taught it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from interp.errors import UnsupportedArchitecture
from interp.placement import resident


@dataclass(frozen=True)
class Family:
    """Module names of one family: `layers` and `final_norm` relative to the causal LM, the rest to one layer."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    final_norm: str
    attn: str
    o_proj: str
    mlp: str
    attn_norm: str | None  # the norm before attention (None: the attention reads the residual directly)
    mlp_norm: str | None  # the norm before the MLP (None: the MLP reads the residual directly, OLMo 2)
    attn_post_norm: str | None = None  # the norm of the attention output before the residual add (Gemma 2/3, OLMo 2)
    mlp_post_norm: str | None = None
    parallel: str | None = None  # the config field that says attention and MLP both read resid_pre (GPT-NeoX)
    norm_offset: bool = False  # RMSNorm gain is 1 + weight (Gemma)


_LLAMA = {"layers": "model.layers", "final_norm": "model.norm", "attn": "self_attn", "o_proj": "self_attn.o_proj",
          "mlp": "mlp", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_GEMMA = {**_LLAMA, "mlp_norm": "pre_feedforward_layernorm", "attn_post_norm": "post_attention_layernorm",
          "mlp_post_norm": "post_feedforward_layernorm", "norm_offset": True}
_OLMO2 = {**_LLAMA, "attn_norm": None, "mlp_norm": None, "attn_post_norm": "post_attention_layernorm",
          "mlp_post_norm": "post_feedforward_layernorm"}

FAMILIES = (
    Family("GPT-2", ("gpt2",), layers="transformer.h", final_norm="transformer.ln_f", attn="attn",
           o_proj="attn.c_proj", mlp="mlp", attn_norm="ln_1", mlp_norm="ln_2"),
    Family("Llama", ("llama",), **_LLAMA),
    Family("Mistral", ("mistral",), **_LLAMA),
    Family("Qwen2", ("qwen2",), **_LLAMA),
    Family("Qwen3", ("qwen3",), **_LLAMA),
    Family("Phi-3", ("phi3",), **_LLAMA),
    Family("Gemma 2", ("gemma2",), **_GEMMA),
    Family("Gemma 3 (text)", ("gemma3_text",), **_GEMMA),
    Family("OLMo 2", ("olmo2",), **_OLMO2),
    Family("GPT-NeoX", ("gpt_neox",), layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
           attn="attention", o_proj="attention.dense", mlp="mlp", attn_norm="input_layernorm",
           mlp_norm="post_attention_layernorm", parallel="use_parallel_residual"),
)
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported() -> str:
    """'GPT-2, Llama, ...': the supported families, for messages and the README."""
    return ", ".join(f.name for f in FAMILIES)


@dataclass(frozen=True)
class Architecture:
    """One model's family with its paths resolved: `layers`, `final_norm`, `embed_tokens`, `embeddings` (every
    embedding outside the layers), `unembed` relative to the model; `attn`, `o_proj`, `mlp` and the norms relative to
    a layer. `attn_out` / `mlp_out` name the modules whose outputs are added to the residual stream, `resid_mid` the
    module whose input is resid_mid (None on parallel blocks, where resid_mid is resid_pre + attn_out)."""

    family: Family
    embed_tokens: str
    embeddings: tuple[str, ...]
    unembed: str
    layers: str
    final_norm: str
    attn: str
    o_proj: str
    mlp: str
    attn_post_norm: str | None
    mlp_post_norm: str | None
    parallel: bool
    n_heads: int
    o_proj_is_conv1d: bool

    @property
    def attn_out(self) -> str:
        return self.attn_post_norm or self.attn

    @property
    def mlp_out(self) -> str:
        return self.mlp_post_norm or self.mlp

    @property
    def resid_mid(self) -> str | None:
        return None if self.parallel else (self.family.mlp_norm or self.family.mlp)

    def layer(self, hf: nn.Module, index: int, path: str) -> nn.Module:
        """The module at `path` (relative to a layer) of layer `index` of `hf`."""
        return hf.get_submodule(f"{self.layers}.{index}.{path}")


def family_of(config) -> Family:
    """The Family of a HF config, or UnsupportedArchitecture naming it."""
    model_type = getattr(config, "model_type", None)
    family = BY_MODEL_TYPE.get(model_type)
    if family is None:
        classes = getattr(config, "architectures", None)
        named = f"model type {model_type!r}" + (f" ({', '.join(classes)})" if classes else "")
        raise UnsupportedArchitecture(
            f"{named} is not a supported family; interp supports {supported()}. To add one, list its module names "
            f"in interp/backends/architectures.py and run tests/test_architectures.py on it")
    return family


def architecture(hf: nn.Module) -> Architecture:
    """Resolve `hf`'s family (by `config.model_type`) to module paths in `hf` (a wrapper such as a PEFT model adds
    a prefix, found here); UnsupportedArchitecture if the family is not listed or its modules are missing."""
    family = family_of(hf.config)
    named = dict(hf.named_modules())
    prefix = next((name[: len(name) - len(family.layers)] for name in named
                   if name == family.layers or name.endswith("." + family.layers)), None)
    layers = None if prefix is None else prefix + family.layers
    n_layers = hf.config.num_hidden_layers
    if layers is None or not isinstance(named[layers], nn.ModuleList) or len(named[layers]) != n_layers:
        raise UnsupportedArchitecture(f"{family.name} model {type(hf).__name__} has no list of {n_layers} layers at "
                                      f"{family.layers}; its module names differ from the {family.name} entry in "
                                      f"interp/backends/architectures.py")
    layer0 = named[layers][0]
    parallel = bool(getattr(hf.config, family.parallel)) if family.parallel else False
    paths = [family.attn, family.o_proj, family.mlp, family.attn_post_norm, family.mlp_post_norm,
             None if parallel else (family.mlp_norm or family.mlp)]
    missing = [p for p in paths if p is not None and not isinstance(_get(layer0, p), nn.Module)]
    if missing or not isinstance(named.get(prefix + family.final_norm), nn.Module):
        raise UnsupportedArchitecture(f"{family.name} model {type(hf).__name__} lacks "
                                      f"{', '.join(missing) or prefix + family.final_norm}; its module names differ "
                                      f"from the {family.name} entry in interp/backends/architectures.py")
    embed = hf.get_input_embeddings()
    return Architecture(
        family=family, embed_tokens=next(n for n, m in named.items() if m is embed),
        embeddings=tuple(n for n, m in named.items() if isinstance(m, nn.Embedding) and not n.startswith(layers)),
        unembed=next(n for n, m in named.items() if m is hf.get_output_embeddings()), layers=layers,
        final_norm=prefix + family.final_norm, attn=family.attn, o_proj=family.o_proj, mlp=family.mlp,
        attn_post_norm=family.attn_post_norm, mlp_post_norm=family.mlp_post_norm, parallel=parallel,
        n_heads=hf.config.num_attention_heads, o_proj_is_conv1d=type(_get(layer0, family.o_proj)).__name__ == "Conv1D")


def _get(module: nn.Module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def post_norm_scale(arch: Architecture, norm: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """[..., d_model] factor with norm(y) == y * factor for an RMSNorm `norm` (the post-norm of a branch): the
    per-position 1 / rms(y) times the gain, computed in float32 as HF's RMSNorms do."""
    eps = getattr(norm, "eps", None)
    eps = getattr(norm, "variance_epsilon", 1e-6) if eps is None else eps
    gain = resident(norm, "weight").float() + (1.0 if arch.family.norm_offset else 0.0)
    y32 = y.float()
    return (torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + eps) * gain).to(y.dtype)
