"""The parts of a model's update: every parameter (or third of GPT-2's fused q/k/v) named by its block and module.

A `Part` is a set of tensor pieces that belong together: one module's weight and bias in one block (`3.q`, `3.mlp_in`),
one norm of a block (`3.attn_norm`), or one piece outside the blocks (`embed`, `pos_embed`, `final_norm`, `unembed`).
Modules in a block: q, k, v, o (attention), mlp_gate, mlp_in, mlp_out (MLP), attn_norm, mlp_norm, and `other` for
anything else a block holds; each belongs to the attention or the MLP half (norms to the half they feed). GPT-2's
fused c_attn (weight and bias) is split into its q, k and v thirds. Tied embeddings are one tensor, counted once as
`embed`. Every parameter falls in exactly one part, so the parts' update energies add up to the whole update's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from analyses.intruders.matrices import layer_index, matrix_kind

ATTN, MLP = "attn", "mlp"
BLOCK_MODULES = ("q", "k", "v", "o", "mlp_gate", "mlp_in", "mlp_out", "attn_norm", "mlp_norm", "other")
OUTSIDE = ("embed", "pos_embed", "final_norm", "unembed", "other")
HALF = {"q": ATTN, "k": ATTN, "v": ATTN, "o": ATTN, "attn_norm": ATTN,
        "mlp_gate": MLP, "mlp_in": MLP, "mlp_out": MLP, "mlp_norm": MLP}
MLP_NORMS = ("ln_2", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclass(frozen=True)
class Piece:
    """Parameter `param`, or its `chunk`-th of `n_chunks` along the output dimension (`out_dim`)."""

    param: str
    chunk: int = 0
    n_chunks: int = 1
    out_dim: int = 0

    def view(self, tensor: Tensor) -> Tensor:
        """This piece of `tensor` (a view, so it can be written into)."""
        return tensor if self.n_chunks == 1 else tensor.chunk(self.n_chunks, dim=self.out_dim)[self.chunk]


@dataclass(frozen=True)
class Part:
    """One module of one block (`layer` >= 0), or a piece outside the blocks (`layer` None). `matrix`: the piece
    whose spectrum the anatomy reads (the module's weight), None for norms and vectors; `transposed`: that weight is
    stored (in, out), as GPT-2's Conv1D does."""

    name: str
    layer: int | None
    module: str
    pieces: tuple[Piece, ...]
    matrix: Piece | None = None
    transposed: bool = False

    @property
    def half(self) -> str | None:
        """attn or mlp for a block's module, None outside the blocks or when it is neither."""
        if self.layer is None:
            return None
        if self.module in HALF:
            return HALF[self.module]
        names = " ".join(p.param for p in self.pieces)
        return ATTN if "attn" in names or "attention" in names else MLP if "mlp" in names else None


def module_of(param: str) -> str:
    """The block module (one of BLOCK_MODULES) parameter `param` belongs to."""
    owner = param.rsplit(".", 1)[0] + ".weight"
    kind = matrix_kind(owner)
    if kind is not None:
        return "mlp_gate" if "gate_proj" in owner else kind
    last = param.rsplit(".", 2)[-2]
    if "norm" in last or last.startswith("ln"):
        return "mlp_norm" if last in MLP_NORMS else "attn_norm"
    return "other"


def model_parts(hf: nn.Module, transposed: set[str]) -> list[Part]:
    """Every part of `hf` (a real or a meta-device model: only names and shapes are read), in model order: the
    pieces before the blocks, the blocks' modules in BLOCK_MODULES order, the pieces after them. `transposed`: names
    of the parameters stored (in, out)."""
    params = dict(hf.named_parameters())  # tied parameters appear once
    n_layers = hf.config.num_hidden_layers
    embed, unembed = _embedding_names(hf, params)
    grouped: dict[tuple[int | None, str], list[str]] = {}
    for name in params:
        layer = layer_index(name)
        if layer is not None and layer < n_layers:
            grouped.setdefault((layer, module_of(name)), []).append(name)
        else:
            grouped.setdefault((None, _outside_of(name, embed, unembed)), []).append(name)
    parts = []
    for layer, module in sorted(grouped, key=lambda k: _order(k, n_layers)):
        names = grouped[layer, module]
        if module == "qkv":
            parts += _fused_thirds(layer, names, transposed)
            continue
        matrix = next((n for n in names if params[n].dim() == 2), None) if module in HALF or layer is None else None
        part_name = module if layer is None else f"{layer}.{module}"
        parts.append(Part(part_name, layer, module, tuple(Piece(n) for n in names),
                          Piece(matrix) if matrix else None, matrix in transposed))
    return parts


def _embedding_names(hf: nn.Module, params: Mapping[str, Tensor]) -> tuple[str | None, str | None]:
    by_id = {id(p): n for n, p in params.items()}
    embed = by_id.get(id(hf.get_input_embeddings().weight))
    out = hf.get_output_embeddings()
    unembed = by_id.get(id(out.weight)) if out is not None else None
    return embed, (unembed if unembed != embed else None)


def _outside_of(name: str, embed: str | None, unembed: str | None) -> str:
    if name == embed:
        return "embed"
    if name == unembed:
        return "unembed"
    last = name.rsplit(".", 2)[-2] if "." in name else name
    if "wpe" in last or "position" in last:
        return "pos_embed"
    return "final_norm" if "norm" in last or last.startswith("ln") else "other"


def _order(key: tuple[int | None, str], n_layers: int) -> tuple:
    layer, module = key
    if layer is None:
        before = module in ("embed", "pos_embed")
        return (-1 if before else n_layers, OUTSIDE.index(module), 0)
    return (layer, BLOCK_MODULES.index(module) if module in BLOCK_MODULES else BLOCK_MODULES.index("q"), 0)


def _fused_thirds(layer: int, names: Sequence[str], transposed: set[str]) -> list[Part]:
    """q, k, v parts of a fused c_attn: thirds of its weight along the output dimension (dim 1 when stored (in,
    out)) and of its bias."""
    parts = []
    for i, kind in enumerate("qkv"):
        pieces = tuple(Piece(n, i, 3, 1 if (n.endswith(".weight") and n in transposed) else 0) for n in names)
        matrix = next(p for p in pieces if p.param.endswith(".weight"))
        parts.append(Part(f"{layer}.{kind}", layer, kind, pieces, matrix, matrix.param in transposed))
    return parts


def select(parts: Sequence[Part], *, layers: Sequence[int] | None = None, modules: Sequence[str] | None = None,
           half: str | None = None, outside: bool = False) -> list[Part]:
    """The parts of the given blocks, modules and half (each None: any), and those outside the blocks when
    `outside`."""
    return [p for p in parts
            if (p.layer is None and outside)
            or (p.layer is not None and (layers is None or p.layer in layers)
                and (modules is None or p.module in modules) and (half is None or p.half == half))]
