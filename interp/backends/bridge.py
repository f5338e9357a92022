"""TransformerLens 4.x `TransformerBridge` backend: canonical sites -> TransformerLens hook names."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from interp.backends import Metric, RunOutput
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


def hooks_for(batch: Batch | None, read: list[Site], edits: list[Edit], acts: dict, grads: dict | None):
    """(hook name, fn) pairs that apply `edits`, store `read` sites in `acts` and their gradients in `grads`.

    TransformerBridge passes an edited `hook_resid_mid` on to the MLP but not to the residual stream, so an
    edit at resid_mid is applied at `hook_attn_out` instead: attn_out' = edit(resid_pre + attn_out) - resid_pre.
    """
    edits_at = by_site(edits)
    mids = {s.layer: edits_at.pop(s) for s in list(edits_at) if s.kind == "resid_mid"}
    pre: dict[int, torch.Tensor] = {}
    hooks = []

    def edit_mid(act, hook, layer):
        mid = pre[layer] + act
        for e in mids[layer]:
            mid = e.apply(mid, batch)
        return mid - pre[layer]

    def keep_pre(act, hook, layer):
        pre[layer] = act
        return act

    for s in sorted(set(read) | set(edits_at), key=Site.order_key):
        def fn(act, hook, s=s):
            for e in edits_at.get(s, ()):
                act = e.apply(act, batch)
            if s in read:
                acts[s] = act if grads is not None else act.detach()
                if grads is not None:
                    act.register_hook(lambda g, s=s: grads.__setitem__(s, g.detach()))
            return act
        hooks.append((hook_name(s), fn))
    for layer in mids:  # after the site hooks: resid_pre as edited, attn_out as read
        hooks.append((hook_name(Site("resid_pre", layer)), partial(keep_pre, layer=layer)))
        hooks.append((hook_name(Site("attn_out", layer)), partial(edit_mid, layer=layer)))
    return hooks


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
        hooks = hooks_for(batch, read, mixes + edits, acts, grads)
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
