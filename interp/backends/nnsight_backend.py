"""nnsight backend: canonical sites -> module inputs/outputs of the Hugging Face model, traced with nnsight.

Works on any decoder whose layers follow the usual pre-norm layout (GPT-2, Llama, Qwen2, Mistral, ...):
found by attribute names in `architecture()`, the one place that knows them. Nothing here stops a user
from running the same trace remotely on NDIF (no local-only state is read inside the trace but weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum, rearrange
from torch import nn

from interp.backends import Metric, RunOutput
from interp.errors import IncompatibleModels
from interp.backends.blending import blending
from interp.intervene import Edit, by_site, split
from interp.prompts import Batch
from interp.sites import Site

_NAMES = {
    "attn": ("self_attn", "attn", "attention"),
    "mlp": ("mlp", "feed_forward"),
    "norm2": ("post_attention_layernorm", "ln_2"),
    "o_proj": ("o_proj", "c_proj", "dense", "out_proj"),
    "final_norm": ("norm", "ln_f", "final_layernorm"),
}


@dataclass(frozen=True)
class Architecture:
    """Attribute paths (dotted, relative to the model) of the modules the sites live on."""

    embed_tokens: str
    embeddings: tuple[str, ...]
    unembed: str
    layers: str
    attn: str
    mlp: str
    norm2: str
    o_proj: str
    final_norm: str
    n_heads: int
    o_proj_is_conv1d: bool


def _child(module: nn.Module, role: str, where: str) -> str:
    for name in _NAMES[role]:
        if isinstance(getattr(module, name, None), nn.Module):
            return name
    raise IncompatibleModels(f"nnsight backend: no {role} module ({'/'.join(_NAMES[role])}) in {where}; "
                             f"this architecture is not supported, use backend='bridge'")


def architecture(hf: nn.Module) -> Architecture:
    """Locate the decoder layers and their sub-modules by name in a Hugging Face causal LM."""
    n_layers = hf.config.num_hidden_layers
    layers = next((name for name, m in hf.named_modules()
                   if isinstance(m, nn.ModuleList) and len(m) == n_layers), None)
    if layers is None:
        raise IncompatibleModels(f"nnsight backend: no list of {n_layers} layers in {type(hf).__name__}")
    parent = hf.get_submodule(layers.rpartition(".")[0])
    layer0 = hf.get_submodule(layers)[0]
    attn = _child(layer0, "attn", "layer 0")
    o_proj = _child(layer0.get_submodule(attn), "o_proj", f"layer 0's {attn}")
    o_module = layer0.get_submodule(attn).get_submodule(o_proj)
    named = dict(hf.named_modules())
    embed_tokens = next(name for name, m in named.items() if m is hf.get_input_embeddings())
    embeddings = tuple(name for name, m in named.items()
                       if isinstance(m, nn.Embedding) and not name.startswith(layers))
    unembed = next(name for name, m in named.items() if m is hf.get_output_embeddings())
    return Architecture(
        embed_tokens=embed_tokens, embeddings=embeddings, unembed=unembed, layers=layers, attn=attn, mlp=_child(layer0, "mlp", "layer 0"), norm2=_child(layer0, "norm2", "layer 0"),
        o_proj=f"{attn}.{o_proj}", final_norm=f"{layers.rpartition('.')[0]}.{_child(parent, 'final_norm', 'the model')}",
        n_heads=hf.config.num_attention_heads, o_proj_is_conv1d=type(o_module).__name__ == "Conv1D")


def _envoy(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _w_o(module: nn.Module, n_heads: int, conv1d: bool) -> torch.Tensor:
    """Output projection as [head, d_head, d_model]."""
    weight = module.weight if conv1d else module.weight.T
    return rearrange(weight, "(head d_head) d_model -> head d_head d_model", head=n_heads)


def _bias(module: nn.Module) -> torch.Tensor | float:
    return module.bias if getattr(module, "bias", None) is not None else 0.0


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _apply(edits, act, batch):
    for e in edits:
        act = e.apply(act, batch)
    return act


def _edit_output(envoy, edits, batch: Batch):
    """A module's output (the first element when it returns a tuple), edited in place of the original."""
    out = envoy.output
    x = _apply(edits, _first(out), batch)
    if edits:
        envoy.output = (x, *out[1:]) if isinstance(out, tuple) else x
    return x, x


def _visit(nn_model, arch: Architecture, s: Site, edits, batch: Batch):
    """Read site `s` inside a trace, applying `edits`; returns (activation, tensor whose grad is the site's)."""
    if s.kind == "final":
        return _edit_output(_envoy(nn_model, arch.final_norm), edits, batch)
    layer = _envoy(nn_model, arch.layers)[s.layer]
    if s.kind == "resid_pre":
        x = _apply(edits, layer.input, batch)
        if edits:
            layer.input = x
        return x, x
    if s.kind == "head_out":
        o_proj = _envoy(layer, arch.o_proj)
        w_o = _w_o(o_proj._module, arch.n_heads, arch.o_proj_is_conv1d)
        z = rearrange(o_proj.input, "b p (head d_head) -> b p head d_head", head=arch.n_heads)
        heads = _apply(edits, einsum(z, w_o, "b p head d_head, head d_head d_model -> b p head d_model"), batch)
        if edits:
            o_proj.output = heads.sum(2) + _bias(o_proj._module)
        return heads, o_proj.output
    if s.kind == "attn_pattern":
        pattern = _envoy(layer, arch.attn).output[1]
        return pattern, pattern
    if s.kind == "attn_out":
        return _edit_output(_envoy(layer, arch.attn), edits, batch)
    if s.kind == "resid_mid":  # edited in place: the layer keeps this tensor as its residual
        x = _envoy(layer, arch.norm2).input
        if edits:
            x[:] = _apply(edits, x.clone(), batch)
        return x, x
    if s.kind == "mlp_out":
        return _edit_output(_envoy(layer, arch.mlp), edits, batch)
    return _edit_output(layer, edits, batch)


def _site_grad(value: torch.Tensor, grad: torch.Tensor, s: Site) -> torch.Tensor:
    """Gradient at a site: for head_out the attention output's gradient is every head's gradient."""
    return grad[:, :, None].expand_as(value) if s.kind == "head_out" else grad


def run(model, batch: Batch, read: list[Site], edits: list[Edit], metric: Metric | None) -> RunOutput:
    arch = model.architecture
    nn_model = model.nnsight
    edits, blends = split(edits)
    device = model.device
    out: dict = {"acts": {}, "grads": {}}
    with blending(model.hf, arch, blends) as mixes:
        edits_at = by_site(mixes + edits)
        sites = sorted(set(read) | set(edits_at), key=Site.order_key)
        with torch.set_grad_enabled(metric is not None), nn_model.trace(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device), use_cache=False):
            _trace_body(nn_model, arch, sites, read, edits_at, batch, metric, out)
    acts = {s: a if metric is not None else a.detach() for s, a in out["acts"].items()}
    grads = {s: _site_grad(acts[s], g.detach(), s) for s, g in out["grads"].items()}
    value = out.get("metric")
    return RunOutput(out["logits"].detach(), acts, grads, None if value is None else value.detach())


def _trace_body(nn_model, arch, sites, read, edits_at, batch, metric, out: dict) -> None:
    """Everything that runs inside the trace; results go into `out` (saved values)."""
    if metric is not None:
        _envoy(nn_model, arch.embed_tokens).output.requires_grad_(True)
    live = {s: _visit(nn_model, arch, s, edits_at.get(s, ()), batch) for s in sites}
    for s in sites:
        if s in read:
            out["acts"][s] = live[s][0].save()
    logits = nn_model.output.logits
    out["logits"] = logits.save()
    if metric is None:
        return
    value = metric(logits, batch)
    out["metric"] = value.save()
    with value.backward():
        for s in reversed(sites):
            if s in read and s.kind != "attn_pattern":
                out["grads"][s] = live[s][1].grad.save()
