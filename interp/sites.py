"""Canonical activation sites: the one vocabulary that capture and intervene speak.

A `Site` names one activation of a decoder-only transformer. Each backend maps a site to its own
hook in exactly one function (`interp.backends.bridge.hook_name`, `interp.backends.nnsight_backend`), with the
module names of the model's family from `interp.backends.architectures` (which also says what the sites are on
sandwich-norm, post-norm and parallel-residual families).

Shapes as returned by capture for a batch (canonical layout, right-padded, position 0 = first token):

    embed, resid_pre, resid_mid, resid_post, attn_out, mlp_out, final   [batch, pos, d_model]
    head_out                                                             [batch, pos, head, d_model]
    attn_pattern                                                         [batch, head, query_pos, key_pos]

`embed` is the input of block 0 (token plus position embedding, i.e. `resid_pre` of layer 0),
`final` the output of the final norm. `attn_out` and `mlp_out` are what each branch adds to the residual stream
(after the post-norms of Gemma 2/3 and OLMo 2), so `resid_pre + attn_out = resid_mid` and
`resid_mid + mlp_out = resid_post` on every family; on parallel-residual blocks (GPT-NeoX) `resid_mid` is defined as
`resid_pre + attn_out`. `head_out` is each head's contribution to `attn_out` (`z_h @ W_O[h]`, without the output
bias; behind a post-norm, times the norm's scale on the whole attention output): `attn_out = head_out.sum(head) + b_O`.
A site with `head` set selects one head of `head_out` (for edits and capture alike).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from interp.errors import UnknownSite

LAYER_KINDS = ("resid_pre", "head_out", "attn_pattern", "attn_out", "resid_mid", "mlp_out", "resid_post")
"""Per-layer kinds, in the order the forward pass produces them."""
GLOBAL_KINDS = ("embed", "final")
KINDS = GLOBAL_KINDS + LAYER_KINDS
READ_ONLY_KINDS = ("attn_pattern",)


@dataclass(frozen=True, order=True)
class Site:
    """An activation: `kind` (one of KINDS), `layer` (None for embed/final), `head` (head_out only)."""

    kind: str
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnknownSite(f"unknown site kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if (self.kind in GLOBAL_KINDS) != (self.layer is None):
            need = "no layer" if self.kind in GLOBAL_KINDS else "a layer"
            raise UnknownSite(f"site {self.kind!r} takes {need}, got layer={self.layer}")
        if self.head is not None and self.kind != "head_out":
            raise UnknownSite(f"only head_out sites select a head, got {self.kind} with head={self.head}")

    def __str__(self) -> str:
        parts = [self.kind] + [str(i) for i in (self.layer, self.head) if i is not None]
        return ".".join(parts)

    @property
    def hooked(self) -> Site:
        """The site a backend hooks: the head selection dropped, `embed` as `resid_pre.0`."""
        if self.kind == "embed":
            return Site("resid_pre", 0)
        return Site(self.kind, self.layer)

    def order_key(self) -> tuple[int, int]:
        """Position of this site in the forward pass, for backends that must visit sites in order."""
        if self.kind == "embed":
            return (-1, 0)
        if self.kind == "final":
            return (1 << 30, 0)
        return (self.layer, LAYER_KINDS.index(self.kind))

    def check(self, n_layers: int, n_heads: int) -> Site:
        """Raise UnknownSite if this site does not exist in a model of the given size."""
        if self.layer is not None and not 0 <= self.layer < n_layers:
            raise UnknownSite(f"site {self}: layer {self.layer} out of range, the model has {n_layers} layers")
        if self.head is not None and not 0 <= self.head < n_heads:
            raise UnknownSite(f"site {self}: head {self.head} out of range, the model has {n_heads} heads")
        return self


_TL_NAME = re.compile(r"^blocks\.(\d+)\.(?:attn\.)?hook_(\w+)$")
_TL_KINDS = {"resid_pre": "resid_pre", "resid_mid": "resid_mid", "resid_post": "resid_post",
             "attn_out": "attn_out", "mlp_out": "mlp_out", "result": "head_out", "pattern": "attn_pattern"}


def site(spec: str | Site) -> Site:
    """Parse `"resid_post.3"`, `"head_out.2.1"`, `"embed"`, or a TransformerLens name like
    `"blocks.3.hook_resid_post"` / `"blocks.2.attn.hook_result"` into a Site."""
    if isinstance(spec, Site):
        return spec
    m = _TL_NAME.match(spec)
    if m and m.group(2) in _TL_KINDS:
        return Site(_TL_KINDS[m.group(2)], int(m.group(1)))
    kind, *idx = spec.split(".")
    try:
        numbers = [int(i) for i in idx]
    except ValueError:
        raise UnknownSite(f"cannot parse site {spec!r}; write e.g. 'resid_post.3' or 'head_out.2.1'") from None
    if len(numbers) > 2:
        raise UnknownSite(f"cannot parse site {spec!r}: at most a layer and a head")
    return Site(kind, *numbers)


def every_layer(kind: str, n_layers: int) -> list[Site]:
    """The sites of one kind at every layer, e.g. every_layer('resid_post', model.n_layers)."""
    return [Site(kind, layer) for layer in range(n_layers)]


def resid_pre(layer: int) -> Site: return Site("resid_pre", layer)
def resid_mid(layer: int) -> Site: return Site("resid_mid", layer)
def resid_post(layer: int) -> Site: return Site("resid_post", layer)
def attn_out(layer: int) -> Site: return Site("attn_out", layer)
def mlp_out(layer: int) -> Site: return Site("mlp_out", layer)
def head_out(layer: int, head: int | None = None) -> Site: return Site("head_out", layer, head)
def attn_pattern(layer: int) -> Site: return Site("attn_pattern", layer)


EMBED = Site("embed")
FINAL = Site("final")
