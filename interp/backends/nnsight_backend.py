"""nnsight backend: canonical sites -> module inputs/outputs of the Hugging Face model, traced with nnsight.

Which module holds which site comes from the model's family (`interp.backends.architectures`, the one place that
knows module names); each layer's sites are visited in the order its forward produces them, as nnsight needs.
Nothing here stops a user from running the same trace remotely on NDIF (no local-only state is read inside the
trace but weights).
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from torch import nn

from interp.backends import Metric, Past, RunOutput
from interp.backends.architectures import Architecture, architecture, post_norm_scale
from interp.backends.blending import blending
from interp.intervene import Edit, by_site, split
from interp.placement import resident
from interp.prompts import Batch
from interp.sites import Site

__all__ = ["Architecture", "architecture", "run"]


def _envoy(root, path: str):
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _w_o(module: nn.Module, n_heads: int, conv1d: bool) -> torch.Tensor:
    """Output projection as [head, d_head, d_model]."""
    weight = resident(module, "weight") if conv1d else resident(module, "weight").T
    return rearrange(weight, "(head d_head) d_model -> head d_head d_model", head=n_heads)


def _bias(module: nn.Module) -> torch.Tensor | float:
    bias = resident(module, "bias")
    return bias if bias is not None else 0.0


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


def _layer(nn_model, arch: Architecture, index: int, kinds: set[str], edits_at: dict, batch: Batch,
           graph: bool) -> dict[str, tuple]:
    """Read (and edit) the sites `kinds` of one layer inside a trace, module by module in forward order; returns
    {kind: (activation, tensor whose grad is the site's)}. See `interp.backends.architectures` for what each
    site is on each layout."""
    layer = _envoy(nn_model, arch.layers)[index]
    at = {kind: edits_at.get(Site(kind, index), ()) for kind in kinds}
    live: dict[str, tuple] = {}
    virtual_mid = arch.parallel and "resid_mid" in kinds
    pre = None
    if "resid_pre" in kinds or virtual_mid:
        pre = _apply(at.get("resid_pre", ()), layer.input, batch)
        if at.get("resid_pre"):
            layer.input = pre
        live["resid_pre"] = (pre, pre)
    heads = o_proj = y = None
    if "head_out" in kinds:
        o_proj = _envoy(layer, arch.o_proj)
        w_o = _w_o(o_proj._module, arch.n_heads, arch.o_proj_is_conv1d)
        z = rearrange(o_proj.input, "b p (head d_head) -> b p head d_head", head=arch.n_heads)
        heads = einsum(z, w_o, "b p head d_head, head d_head d_model -> b p head d_model")
        if arch.attn_post_norm is None:
            heads = _apply(at["head_out"], heads, batch)
            if at["head_out"]:
                o_proj.output = heads.sum(2) + _bias(o_proj._module)
            live["head_out"] = (heads, o_proj.output)
        else:
            y = o_proj.output  # the post-norm's input: its scale makes the heads' shares of attn_out
    if "attn_pattern" in kinds:
        pattern = _envoy(layer, arch.attn).output[1]
        live["attn_pattern"] = (pattern, pattern)
    if arch.attn_post_norm is not None and ("head_out" in kinds or "attn_out" in kinds):
        norm = _envoy(layer, arch.attn_post_norm)
        x, changed = norm.output, False
        if "head_out" in kinds:
            scale = post_norm_scale(arch, norm._module, y)
            heads = _apply(at["head_out"], heads * scale[:, :, None], batch)
            if at["head_out"]:
                x, changed = heads.sum(2) + _bias(o_proj._module) * scale, True
            live["head_out"] = (heads, x)
        if at.get("attn_out"):
            x, changed = _apply(at["attn_out"], x, batch), True
        if changed:
            norm.output = x
        live["attn_out"] = (x, x)
    elif "attn_out" in kinds or virtual_mid:
        attn = _envoy(layer, arch.attn)
        out = attn.output
        x = _apply(at.get("attn_out", ()), _first(out), batch)
        changed = bool(at.get("attn_out"))
        live["attn_out"] = (x, x)
        if virtual_mid:  # resid_mid = resid_pre + attn_out; edited (or differentiated) through attn_out
            mid = pre + x
            if at["resid_mid"] or graph:
                mid = _apply(at["resid_mid"], mid, batch)
                x, changed = mid - pre, True
            live["resid_mid"] = (mid, mid)
        if changed:
            attn.output = (x, *out[1:]) if isinstance(out, tuple) else x
    if "resid_mid" in kinds and not arch.parallel:  # edited in place: the layer keeps this tensor as its residual
        x = _envoy(layer, arch.resid_mid).input
        if at["resid_mid"]:
            x[:] = _apply(at["resid_mid"], x.clone(), batch)
        live["resid_mid"] = (x, x)
    if "mlp_out" in kinds:
        live["mlp_out"] = _edit_output(_envoy(layer, arch.mlp_out), at["mlp_out"], batch)
    if "resid_post" in kinds:
        live["resid_post"] = _edit_output(layer, at["resid_post"], batch)
    return {kind: live[kind] for kind in kinds}


def _site_grad(value: torch.Tensor, grad: torch.Tensor, s: Site) -> torch.Tensor:
    """Gradient at a site: for head_out the attention output's gradient is every head's gradient."""
    return grad[:, :, None].expand_as(value) if s.kind == "head_out" else grad


def run(model, batch: Batch, read: list[Site], edits: list[Edit], metric: Metric | None,
        past: Past | None = None) -> RunOutput:
    arch = model.architecture
    nn_model = model.nnsight
    edits, blends = split(edits)
    device = model.device
    out: dict = {"acts": {}, "grads": {}}
    inputs = (past.forward_kwargs(model.hf, device) if past is not None else
              {"attention_mask": batch.attention_mask.to(device), "position_ids": batch.position_ids.to(device),
               "use_cache": False})
    with blending(model.hf, arch, blends) as mixes:
        edits_at = by_site(mixes + edits)
        sites = sorted(set(read) | set(edits_at), key=Site.order_key)
        with torch.set_grad_enabled(metric is not None), nn_model.trace(input_ids=batch.input_ids.to(device),
                                                                         **inputs):
            _trace_body(nn_model, arch, sites, read, edits_at, batch, metric, out)
    acts = {s: a if metric is not None else a.detach() for s, a in out["acts"].items()}
    grads = {s: _site_grad(acts[s], g.detach(), s) for s, g in out["grads"].items()}
    value = out.get("metric")
    return RunOutput(out["logits"].detach(), acts, grads, None if value is None else value.detach())


def _trace_body(nn_model, arch, sites, read, edits_at, batch, metric, out: dict) -> None:
    """Everything that runs inside the trace; results go into `out` (saved values)."""
    if metric is not None:
        _envoy(nn_model, arch.embed_tokens).output.requires_grad_(True)
    live: dict[Site, tuple] = {}
    for index in sorted({s.layer for s in sites if s.layer is not None}):
        kinds = {s.kind for s in sites if s.layer == index}
        live.update({Site(kind, index): v for kind, v in
                     _layer(nn_model, arch, index, kinds, edits_at, batch, metric is not None).items()})
    if Site("final") in sites:
        live[Site("final")] = _edit_output(_envoy(nn_model, arch.final_norm), edits_at.get(Site("final"), ()), batch)
    for s in sites:
        if s in read:
            out["acts"][s] = live[s][0].save()
    logits = nn_model.output.logits
    out["logits"] = logits.save()
    if metric is None:
        return
    value = metric(logits, batch)
    out["metric"] = value.save()
    with value.backward():  # gradients are asked for in the order backward reaches them
        for s in sorted((s for s in sites if s in read), key=_backward_order):
            out["grads"][s] = live[s][1].grad.save()


def _backward_order(s: Site) -> tuple[int, int]:
    """Later sites first; within a layer head_out's gradient (taken at the attention output) before the pattern's."""
    layer, kind = s.order_key()
    if s.kind in ("head_out", "attn_pattern"):
        kind = Site("attn_out", 0).order_key()[1] - (0.5 if s.kind == "head_out" else 1)
    return (-layer, -kind)
