"""Run prompts through a model and keep the activations at chosen sites.

    acts = capture(model, prompts, ["resid_post.3", head_out(2)], positions="last")
    acts["resid_post.3"]          # [prompt, d_model]

Layouts of `acts[site]` (shapes of one site as in `interp.sites`, with `batch` -> `prompt`):
    positions="all"        [prompt, pos, ...]      canonical right-padded; `acts.mask` [prompt, pos] marks real tokens
    positions="last"       [prompt, ...]           each prompt's last real token
    positions=int or list  [prompt, k, ...]        canonical positions, negative ones count back from the last token
    positions=bool mask    [selected, ...]         mask [prompt, pos] in canonical layout; `acts.selected` [selected, 2]
attn_pattern: [prompt, head, query, key] for "all"; otherwise positions pick queries: "last" gives [prompt, head, key].

Batched, padding-aware (a pad token never appears in a result), gradients on request (`metric`), and
memory-bounded: when the estimated result exceeds `memory_budget` bytes it streams to safetensors shards in
`shard_dir`, one per batch, and a capture interrupted midway resumes from the shards already written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from interp.backends import Metric, run
from interp.prompts import Batch, Tokens, tokenize
from interp.sites import Site, site as parse_site

DEFAULT_BUDGET = int(float(os.environ.get("INTERP_MEMORY_BUDGET", 4 * 2**30)))
LOGITS = "logits"


@dataclass
class Activations:
    """Captured activations (and gradients) keyed by site, in memory or in shards on disk."""

    sites: list[Site]
    positions: object
    tokens: Tokens
    data: dict[str, Tensor] = field(default_factory=dict)
    shard_dir: Path | None = None
    selected: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        """[prompt, pos]: True at real tokens (canonical layout)."""
        return self.tokens.mask

    def keys(self) -> list[str]:
        return list(self.data) if self.shard_dir is None else _manifest(self.shard_dir)["keys"]

    def __getitem__(self, key: str | Site) -> Tensor:
        key = _key(key)
        if self.shard_dir is None:
            return self.data[key]
        return torch.cat([shard[key] for shard in self.shards()])

    def grad(self, key: str | Site) -> Tensor:
        """d metric / d activation at a site, same layout as the activation."""
        return self["grad:" + _key(key)]

    def shards(self) -> Iterator[dict[str, Tensor]]:
        """Stream the result one batch at a time (the whole result if it is in memory)."""
        if self.shard_dir is None:
            yield self.data
            return
        for path in sorted(self.shard_dir.glob("shard-*.safetensors")):
            yield load_file(path)

    def tokens_of(self, key: str | Site) -> Tensor:
        """positions='all' only: the real-token rows [token, ...] of a per-position site, pads dropped."""
        if self.positions not in (None, "all"):
            raise ValueError("tokens_of needs a capture with positions='all'")
        return self[key][self.mask]


def _key(key: str | Site) -> str:
    return key if isinstance(key, str) and (key == LOGITS or key.startswith("grad:")) else str(parse_site(key))


def capture(model, prompts, sites: Sequence[str | Site], *, positions="all", batch_size: int = 16,
            edits: Sequence = (), metric: Metric | None = None, logits: bool = False,
            backend: str | None = None, padding_side: str = "right", memory_budget: int = DEFAULT_BUDGET,
            shard_dir: str | Path | None = None, progress: bool = True) -> Activations:
    """Activations of `model` at `sites` for `prompts` (strings, token-id lists, or `Tokens`).

    `edits` (plus the model's active edits) apply during the forward; a captured site holds its value
    after its own edits. `metric(logits, batch) -> scalar` adds gradients at every site (`acts.grad(site)`);
    return a sum over prompts so that gradients do not depend on the batching.
    """
    tokens = prompts if isinstance(prompts, Tokens) else tokenize(model.tokenizer, prompts, max_length=model.n_ctx)
    sites = [parse_site(s).check(model.n_layers, model.n_heads) for s in sites]
    all_edits = [*model.edits, *edits]
    read = {s.hooked for s in sites}
    estimate = _estimate_bytes(model, tokens, sites, positions, logits) * (2 if metric else 1)
    stream = estimate > memory_budget
    if stream and shard_dir is None:
        raise MemoryError(f"capture needs about {estimate / 2**30:.2f} GiB, over the memory budget of "
                          f"{memory_budget / 2**30:.2f} GiB; pass shard_dir=... to stream it to disk")
    result = Activations(sites, positions, tokens, shard_dir=Path(shard_dir) if stream else None)
    done: set[str] = set()
    if stream:
        done = _prepare_shards(result.shard_dir, _capture_key(model, tokens, sites, positions, batch_size,
                                                              padding_side, all_edits, metric, logits))
    chunks: dict[str, list[Tensor]] = {}
    batches = list(tokens.batches(batch_size, padding_side))
    for batch in tqdm(batches, desc=f"capture {model.name}", disable=not progress, leave=False):
        name = f"shard-{int(batch.index[0]):08d}.safetensors"
        if name in done:
            continue
        out = run(model, batch, read, all_edits, metric, backend)
        piece = _select(batch, sites, positions, out, logits, tokens.ids.shape[1])
        if stream:
            _write_atomic(result.shard_dir / name, piece)
        else:
            for k, v in piece.items():
                chunks.setdefault(k, []).append(v)
    if not stream:
        result.data = {k: torch.cat(v) for k, v in chunks.items()}
    if isinstance(positions, Tensor):
        result.selected = positions[:, : tokens.ids.shape[1]].logical_and(tokens.mask).nonzero()
    return result


def _select(batch: Batch, sites: list[Site], positions, out, logits: bool, width: int) -> dict[str, Tensor]:
    """Canonical layout, chosen positions, moved to CPU, for one batch."""
    piece = {}
    for s in sites:
        act = out.acts[s.hooked]
        piece[str(s)] = _positions(batch, s, act, positions, width)
        if out.grads:
            piece["grad:" + str(s)] = _positions(batch, s, out.grads[s.hooked], positions, width)
    if logits:
        piece[LOGITS] = _positions(batch, Site("final"), out.logits, positions, width)
    return piece


def _positions(batch: Batch, s: Site, act: Tensor, positions, width: int) -> Tensor:
    """One site of one batch: canonical layout, pads zeroed, the chosen positions (queries for patterns)."""
    if s.kind == "attn_pattern":  # [batch, head, query, key] -> [batch, query, head, key], keys canonical
        act = batch.to_canonical(batch.to_canonical(act, pos_dim=2), pos_dim=3).movedim(1, 2)
        keys = batch.positions_mask("all").to(act.device)[:, None, None, :]
        act = torch.nn.functional.pad(act * keys.to(act.dtype), (0, width - act.shape[-1]))
    else:
        act = batch.to_canonical(act)
    if s.head is not None:
        act = act[:, :, s.head]
    act = act.detach().cpu()
    if positions is None or positions == "all":
        real = batch.positions_mask("all")
        act = _pad_pos(act * real.reshape(real.shape + (1,) * (act.dim() - 2)).to(act.dtype), width)
        return (act.movedim(2, 1) if s.kind == "attn_pattern" else act).contiguous()
    if positions == "last":
        return act[torch.arange(len(batch.lengths)), batch.lengths - 1].contiguous()
    if isinstance(positions, Tensor):
        return act[batch.positions_mask(positions)].contiguous()
    cols = torch.as_tensor([positions] if isinstance(positions, int) else list(positions))
    absolute = torch.where(cols[None] < 0, batch.lengths[:, None] + cols[None], cols[None])
    if ((absolute < 0) | (absolute >= batch.lengths[:, None])).any():
        raise IndexError(f"positions {cols.tolist()} fall outside some prompts (lengths {batch.lengths.tolist()})")
    return act[torch.arange(len(batch.lengths))[:, None], absolute].contiguous()


def _pad_pos(act: Tensor, width: int) -> Tensor:
    pad = width - act.shape[1]
    if pad == 0:
        return act
    return torch.cat([act, act.new_zeros((act.shape[0], pad, *act.shape[2:]))], dim=1)


def _positions_per_prompt(positions, tokens: Tokens) -> float:
    if positions is None or positions == "all":
        return tokens.ids.shape[1]
    if positions == "last":
        return 1
    if isinstance(positions, Tensor):  # a mask may be wider than the prompts (n_ctx): count real tokens only
        return float(positions[:, : tokens.ids.shape[1]].logical_and(tokens.mask).sum()) / len(tokens)
    return 1 if isinstance(positions, int) else len(positions)


def _estimate_bytes(model, tokens: Tokens, sites: list[Site], positions, logits: bool) -> int:
    """Size of the result: prompts x positions x (elements per position of every site)."""
    width = tokens.ids.shape[1]
    per_position = {"head_out": model.n_heads * model.d_model, "attn_pattern": model.n_heads * width}
    elements = sum(model.d_model if s.head is not None else per_position.get(s.kind, model.d_model) for s in sites)
    elements += model.config.vocab_size if logits else 0
    n = len(tokens) * _positions_per_prompt(positions, tokens)
    return int(n * elements * torch.finfo(model.dtype).bits // 8)


def _capture_key(model, tokens: Tokens, sites, positions, batch_size, padding_side, edits, metric, logits) -> str:
    h = hashlib.sha256()
    for part in (model.fingerprint(), [str(s) for s in sites], repr(positions), batch_size, padding_side,
                 [repr(e) for e in edits], metric is not None, logits):
        h.update(repr(part).encode())
    h.update(tokens.ids.numpy().tobytes())
    return h.hexdigest()


def _manifest(shard_dir: Path) -> dict:
    return json.loads((shard_dir / "capture.json").read_text())


def _prepare_shards(shard_dir: Path, key: str) -> set[str]:
    """Create or reuse a shard folder; returns the names of shards already written for this same capture."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = shard_dir / "capture.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("key") == key:
        return {p.name for p in shard_dir.glob("shard-*.safetensors")}
    for old in shard_dir.glob("shard-*.safetensors"):
        old.unlink()
    manifest_path.write_text(json.dumps({"key": key, "keys": []}))
    return set()


def _write_atomic(path: Path, piece: dict[str, Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(piece, str(tmp))
    os.replace(tmp, path)
    manifest_path = path.parent / "capture.json"
    manifest = json.loads(manifest_path.read_text())
    if not manifest["keys"]:
        manifest["keys"] = list(piece)
        manifest_path.write_text(json.dumps(manifest))
