"""TransformerLens 4.x `TransformerBridge` backend: canonical sites -> TransformerLens hook names."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial

import torch

from interp.backends import Metric, Past, RunOutput
from interp.backends.architectures import post_norm_scale
from interp.backends.blending import blending
from interp.intervene import Edit, by_site, split
from interp.placement import resident
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
def _attn_result(model, layers: set[int]):
    """Per-head outputs (`hook_result`) at `layers` are only computed while `use_attn_result` is set. TransformerLens
    computes them from the output projection's weight without running that module, so where a device map offloads
    it, its weight is loaded for the run (accelerate's `align_module_device`)."""
    from accelerate.utils import align_module_device

    bridge, on = model.bridge, bool(layers)
    before = bool(getattr(bridge.cfg, "use_attn_result", False))
    if on != before:
        bridge.set_use_attn_result(on)
    try:
        with ExitStack() as stack:
            for layer in sorted(layers):
                o_proj = model.architecture.layer(bridge.original_model, layer, model.architecture.o_proj)
                stack.enter_context(align_module_device(o_proj._modules.get("_original_component", o_proj)))
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
                bias = resident(o_proj, "bias")
                x = heads.sum(2) + (bias * scale if bias is not None else 0.0)
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


def _cache_as_past_key_values(module, args, kwargs):
    """transformer-lens 4.3's attention components read the KV cache from `past_key_values` (or `layer_past`) only;
    transformers 5.x passes it to the layers as `cache`, so without this the cache is never extended and a cached
    decoding step attends to its own token alone (why TransformerBridge.generate disagrees with Hugging Face)."""
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs["past_key_values"] = kwargs["cache"]
    return args, kwargs


@contextmanager
def _kv_cache(bridge, on: bool):
    """Hand the attention components the KV cache under the name they read (`_cache_as_past_key_values`)."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    handles = [m.register_forward_pre_hook(_cache_as_past_key_values, with_kwargs=True)
               for m in bridge.modules() if on and isinstance(m, AttentionBridge)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run(model, batch: Batch, read: list[Site], edits: list[Edit], metric: Metric | None,
        past: Past | None = None) -> RunOutput:
    bridge = model.bridge
    edits, blends = split(edits)
    acts: dict[Site, torch.Tensor] = {}
    grads: dict[Site, torch.Tensor] | None = {} if metric is not None else None
    device = model.device
    inputs = (past.forward_kwargs(bridge.original_model, device) if past is not None else
              {"attention_mask": batch.attention_mask.to(device), "use_cache": False})
    with blending(bridge.original_model, model.architecture, blends) as mixes:
        hooks = hooks_for(model, batch, read, mixes + edits, acts, grads)
        if metric is not None:
            hooks.insert(0, ("hook_embed", _start_graph))
        need_heads = {int(name.split(".")[1]) for name, _ in hooks if name.endswith("attn.hook_result")}
        with _attn_result(model, need_heads), _kv_cache(bridge, past is not None), bridge.hooks(fwd_hooks=hooks), \
                torch.set_grad_enabled(metric is not None):
            logits = bridge(batch.input_ids.to(device), return_type="logits", **inputs)
            value = None
            if metric is not None:
                value = metric(logits, batch)
                value.backward()
    return RunOutput(logits.detach(), acts, grads or {}, None if value is None else value.detach())
