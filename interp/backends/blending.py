"""Blends (`interp.intervene.Blend`): a part of one model mixed with the same part of another model run on
the same inputs. Both backends share this one implementation, on the module tree each runs:

- a block or the final norm: a forward pre-hook runs the other model's module on the same inputs first, and a
  site edit at the part's output (resid_post.l / final) mixes the two, so a capture there sees the blend;
- the embeddings and the unembedding (no site reads their outputs directly): a forward hook mixes outputs.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from interp.intervene import Blend, Edit
from interp.prompts import Batch
from interp.sites import Site


@dataclass(frozen=True)
class _Mix(Edit):
    """alpha * x + (1 - alpha) * the other model's output, stashed by the pre-hook of the same forward."""

    stash: dict = field(default_factory=dict)
    alpha: float = 1.0

    def transform(self, x: Tensor, batch: Batch) -> Tensor:
        return self.alpha * x + (1 - self.alpha) * self.stash["out"].to(x.dtype)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _mix_outputs(own, other, alpha: float):
    return alpha * own + (1 - alpha) * other


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
                        return _mix_outputs(output, twin(*args, **kwargs), alpha)

                    stack.callback(tree.get_submodule(path).register_forward_hook(after, with_kwargs=True).remove)
                continue
            path, s = (arch.final_norm, Site("final")) if b.part == "final" else (
                f"{arch.layers}.{b.part}", Site("resid_post", b.part))
            twin, stash = b.other.hf.get_submodule(path), {}

            def before(module, args, kwargs, twin=twin, stash=stash):
                stash["out"] = _first(twin(*args, **kwargs))

            stack.callback(tree.get_submodule(path).register_forward_pre_hook(before, with_kwargs=True).remove)
            mixes.append(_Mix(s, stash=stash, alpha=b.alpha))
        yield mixes
