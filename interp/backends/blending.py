"""Blends (`interp.intervene.Blend`): a part of one model mixed with the same part of another model run on
the same inputs. Both backends share this one implementation, on the module tree each runs:

- a block or the final norm: a forward pre-hook runs the other model's module on the same inputs first, and a
  site edit at the part's output (resid_post.l / final) mixes the two, so a capture there sees the blend;
- the embeddings and the unembedding (no site reads their outputs directly): a forward hook mixes outputs.

The other model may live on another device and in another dtype: its module runs on the inputs moved to where it
computes and cast to its dtype, and its output comes back in this model's.

During KV-cached generation the other model's blocks keep their own cache, made on the first step beside the model's.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from transformers import Cache, DynamicCache

from interp.intervene import Blend, Edit
from interp.placement import module_device
from interp.prompts import Batch
from interp.sites import Site


@dataclass(frozen=True)
class _Mix(Edit):
    """alpha * x + (1 - alpha) * the other model's output, stashed by the pre-hook of the same forward."""

    stash: dict = field(default_factory=dict)
    alpha: float = 1.0

    def transform(self, x: Tensor, batch: Batch) -> Tensor:
        return self.alpha * x + (1 - self.alpha) * self.stash["out"].to(x.device, x.dtype)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _mix_outputs(own, other, alpha: float):
    return alpha * own + (1 - alpha) * other.to(own.device, own.dtype)


def _run_on(module: nn.Module, args: tuple, kwargs: dict):
    """`module` run on `args`, `kwargs` moved to the device it computes on, floating tensors cast to its dtype
    (clamped to its range, so that a float32 mask's minimum stays finite in float16)."""
    device, dtype = module_device(module), next(module.parameters()).dtype

    def move(value):
        if isinstance(value, (tuple, list)):
            return type(value)(move(v) for v in value)
        if not isinstance(value, Tensor):
            return value
        if not value.is_floating_point():
            return value.to(device)
        if torch.finfo(dtype).max < torch.finfo(value.dtype).max:
            value = value.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max)
        return value.to(device, dtype)

    return module(*move(args), **{k: move(v) for k, v in kwargs.items()})


_OWN_CACHES: WeakKeyDictionary = WeakKeyDictionary()
"""A model's KV cache -> {id of the other model: that model's own cache}, living as long as the model's."""


def _own_cache(args: tuple, kwargs: dict, other: nn.Module) -> tuple[tuple, dict]:
    """`args`, `kwargs` with a KV cache (incremental decoding) swapped for the other model's own: a block run on both
    models must not write its keys and values into one cache twice."""
    def swap(value):
        if not isinstance(value, Cache):
            return value
        own = _OWN_CACHES.setdefault(value, {})
        if id(other) not in own:
            own[id(other)] = DynamicCache(config=other.config)
        return own[id(other)]

    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


@contextmanager
def blending(tree: nn.Module, arch, blends: list[Blend]):
    """Install the hooks for `blends` on `tree`; yields the site edits that complete them."""
    mixes: list[Edit] = []
    with ExitStack() as stack:
        for b in blends:
            if b.part in ("embed", "unembed"):
                for path in (arch.embeddings if b.part == "embed" else (arch.unembed,)):
                    twin = b.other.hf.get_submodule(path)

                    def after(module, args, kwargs, output, twin=twin, alpha=b.alpha):
                        return _mix_outputs(output, _run_on(twin, args, kwargs), alpha)

                    stack.callback(tree.get_submodule(path).register_forward_hook(after, with_kwargs=True).remove)
                continue
            path, s = (arch.final_norm, Site("final")) if b.part == "final" else (
                f"{arch.layers}.{b.part}", Site("resid_post", b.part))
            twin, stash = b.other.hf.get_submodule(path), {}

            def before(module, args, kwargs, twin=twin, stash=stash, other=b.other.hf):
                args, kwargs = _own_cache(args, kwargs, other)
                stash["out"] = _first(_run_on(twin, args, kwargs))

            stack.callback(tree.get_submodule(path).register_forward_pre_hook(before, with_kwargs=True).remove)
            mixes.append(_Mix(s, stash=stash, alpha=b.alpha))
        yield mixes
