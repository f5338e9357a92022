"""TransformerLens 4.x `TransformerBridge` backend: canonical sites -> TransformerLens hook names."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from interp.backends import Metric, RunOutput
from interp.backends.architectures import post_norm_scale
from interp.backends.blending import blending
from interp.intervene import Edit, by_site, split
from interp.prompts import Batch
from interp.sites import Site

_HOOKS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "head_out": "blocks.{}.attn.hook_result",
    "attn_pattern": "blocks.{}.attn.hook_pattern",
}


def hook_name(s: Site) -> str:
    """The TransformerLens hook name of a hooked site (see `Site.hooked`)."""
    if s.kind == "final":
        return "ln_final.hook_out"
    return _HOOKS[s.kind].format(s.layer)


@contextmanager
def _attn_result(bridge, on: bool):
    """Per-head outputs (`hook_result`) are only computed while `use_attn_result` is set."""
    before = bool(getattr(bridge.cfg, "use_attn_result", False))
    if on != before:
        bridge.set_use_attn_result(on)
    try:
        yield
    finally:
        if on != before:
            bridge.set_use_attn_result(before)


def hooks_for(model, batch: Batch | None, read: list[Site], edits: list[Edit], acts: dict, grads: dict | None):
    """(hook name, fn) pairs that apply `edits`, store `read` sites in `acts` and their gradients in `grads`.

    Each layer's attn_out is handled in one function at `hook_attn_out`, which also takes what TransformerLens
    does not hook the way our sites are defined (`interp.backends.architectures`):
    - an edit at resid_mid (TransformerBridge passes an edited `hook_resid_mid` on to the MLP but not to the
      residual stream): attn_out' = edit(resid_pre + attn_out) - resid_pre;
    - resid_mid of a parallel block (no hook): resid_pre + attn_out;
    - head_out behind a post-norm (Gemma 2/3, OLMo 2; `hook_result` holds the heads before it): each head times the
      post-norm's scale on the whole attention output (`attn.hook_out`), so that the heads sum to attn_out.
    """
    arch = model.architecture
    post_norm, parallel = arch.attn_post_norm is not None, arch.parallel
    edits_at = by_site(edits)
    mids = {s.layer: edits_at.pop(s) for s in list(edits_at) if s.kind == "resid_mid"}
    wanted = set(read) | set(edits_at)

    def at_attn_out_hook(s: Site) -> bool:
        return s.kind == "attn_out" or (s.kind, True) in (("head_out", post_norm), ("resid_mid", parallel))

    layers = sorted({s.layer for s in wanted if at_attn_out_hook(s)} | set(mids))
    stash: dict[tuple[str, int], torch.Tensor] = {}  # resid_pre, heads and post-norm input of a layer, as they pass
    hooks = []

    def keep(s: Site, act: torch.Tensor, grad_of: torch.Tensor | None = None):
        """Store a read site (and its gradient: `grad_of`'s, expanded over heads, when given)."""
        if s not in read:
            return
        acts[s] = act if grads is not None else act.detach()
        if grads is not None:
            if grad_of is None:
                act.register_hook(lambda g: grads.__setitem__(s, g.detach()))
            else:
                grad_of.register_hook(lambda g: grads.__setitem__(s, g.detach()[:, :, None].expand(act.shape)))

    def at_attn_out(act, hook, layer):
        heads_site, attn_site, mid_site = (Site(k, layer) for k in ("head_out", "attn_out", "resid_mid"))
        x = act
        if post_norm and heads_site in wanted:
            norm, o_proj = (arch.layer(model.hf, layer, p) for p in (arch.attn_post_norm, arch.o_proj))
            scale = post_norm_scale(arch, norm, stash["y", layer])
            heads = _apply(edits_at.get(heads_site, ()), stash["heads", layer] * scale[:, :, None], batch)
            if edits_at.get(heads_site):
                x = heads.sum(2) + (o_proj.bias * scale if o_proj.bias is not None else 0.0)
            keep(heads_site, heads, grad_of=x)
        x = _apply(edits_at.get(attn_site, ()), x, batch)
        keep(attn_site, x)
        if layer in mids or (parallel and mid_site in read):
            mid = stash["pre", layer] + x
            if layer in mids or (parallel and grads is not None):
                mid = _apply(mids.get(layer, ()), mid, batch)
                x = mid - stash["pre", layer]
            if parallel:
                keep(mid_site, mid)
        return x

    def site_hook(act, hook, s):
        act = _apply(edits_at.get(s, ()), act, batch)
        keep(s, act)
        return act

    def remember(act, hook, key):
        stash[key] = act
        return act

    for s in sorted(wanted, key=Site.order_key):
        if not at_attn_out_hook(s):
            hooks.append((hook_name(s), partial(site_hook, s=s)))
    for layer in layers:  # after the site hooks: resid_pre as edited
        hooks.append((hook_name(Site("resid_pre", layer)), partial(remember, key=("pre", layer))))
        if post_norm and Site("head_out", layer) in wanted:
            hooks.append((f"blocks.{layer}.attn.hook_result", partial(remember, key=("heads", layer))))
            hooks.append((f"blocks.{layer}.attn.hook_out", partial(remember, key=("y", layer))))
        hooks.append((hook_name(Site("attn_out", layer)), partial(at_attn_out, layer=layer)))
    return hooks


def _apply(edits, act, batch):
    for e in edits:
        act = e.apply(act, batch)
    return act


def _start_graph(act, hook):
    """Make the token embeddings a leaf that requires grad, so activations downstream carry a graph
    while the weights stay frozen."""
    return act.detach().requires_grad_(True)


def run(model, batch: Batch, read: list[Site], edits: list[Edit], metric: Metric | None) -> RunOutput:
    bridge = model.bridge
    edits, blends = split(edits)
    acts: dict[Site, torch.Tensor] = {}
    grads: dict[Site, torch.Tensor] | None = {} if metric is not None else None
    device = model.device
    with blending(bridge.original_model, model.architecture, blends) as mixes:
        hooks = hooks_for(model, batch, read, mixes + edits, acts, grads)
        if metric is not None:
            hooks.insert(0, ("hook_embed", _start_graph))
        need_heads = any(name.endswith("hook_result") for name, _ in hooks)
        with _attn_result(bridge, need_heads), bridge.hooks(fwd_hooks=hooks), torch.set_grad_enabled(metric is not None):
            logits = bridge(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                            return_type="logits", use_cache=False)
            value = None
            if metric is not None:
                value = metric(logits, batch)
                value.backward()
    return RunOutput(logits.detach(), acts, grads or {}, None if value is None else value.detach())
