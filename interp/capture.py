"""Run prompts through a model and keep the activations at chosen sites.

    acts = capture(model, prompts, ["resid_post.3", head_out(2)], positions="last")
    acts["resid_post.3"]          # [prompt, d_model]

Layouts of `acts[site]` (shapes of one site as in `interp.sites`, with `batch` -> `prompt`):
    positions="all"        [prompt, pos, ...]      canonical right-padded; `acts.mask` [prompt, pos] marks real tokens
    positions="last"       [prompt, ...]           each prompt's last real token
    positions=int or list  [prompt, k, ...]        canonical positions, negative ones count back from the last token
    positions=bool mask    [selected, ...]         mask [prompt, pos] in canonical layout; `acts.selected` [selected, 2]
attn_pattern: [prompt, head, query, key] for "all"; otherwise positions pick queries: "last" gives [prompt, head, key].

Results are on the CPU in float32 (or the model's dtype when it is wider; or `dtype=`, `device=`), whatever devices
and dtype the model runs in: positions are chosen on the model's device before anything is moved. Batched,
padding-aware (a pad token never appears in a result), gradients on request (`metric`), and memory-bounded: when the
estimated result exceeds `memory_budget` bytes it streams to safetensors shards in
`shard_dir`, one per batch, and a capture interrupted midway resumes from the shards already written.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from interp.backends import Metric, run
from interp.prompts import Batch, Tokens, as_tokens
from interp.sites import KINDS, Site, site as parse_site
from interp.errors import BadOption, BadPositions, NonFiniteValues, OverMemoryBudget

DEFAULT_BUDGET = 4 * 2**30
"""Bytes a capture may hold in memory before it streams to shards, unless $INTERP_MEMORY_BUDGET (bytes) or the
command line's --memory-budget (GiB) says otherwise."""


BUDGET_VARIABLE = "INTERP_MEMORY_BUDGET"


def memory_budget_in_force() -> int:
    """The memory budget in force: $INTERP_MEMORY_BUDGET (bytes, read at each call), else DEFAULT_BUDGET."""
    value = os.environ.get(BUDGET_VARIABLE)
    try:
        budget = int(float(value)) if value else DEFAULT_BUDGET
    except ValueError:
        raise BadOption(f"INTERP_MEMORY_BUDGET={value!r} is not a number of bytes") from None
    if budget <= 0:
        raise BadOption(f"INTERP_MEMORY_BUDGET={value!r}: the memory budget must be positive")
    return budget
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
            raise BadOption("tokens_of needs a capture with positions='all'")
        return self[key][self.mask]


def _key(key: str | Site) -> str:
    return key if isinstance(key, str) and (key == LOGITS or key.startswith("grad:")) else str(parse_site(key))


def capture(model, prompts, sites: Sequence[str | Site], *, positions="all", batch_size: int = 16,
            edits: Sequence = (), metric: Metric | None = None, logits: bool = False,
            backend: str | None = None, padding_side: str = "right", memory_budget: int | None = None,
            shard_dir: str | Path | None = None, progress: bool = True, nonfinite: str = "raise",
            dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Activations:
    """Activations of `model` at `sites` for `prompts` (strings, token-id lists, or `Tokens`).

    `edits` (plus the model's active edits) apply during the forward; a captured site holds its value
    after its own edits. `metric(logits, batch) -> scalar` adds gradients at every site (`acts.grad(site)`);
    return a sum over prompts so that gradients do not depend on the batching. A NaN or inf in a captured
    activation raises `NonFiniteValues` naming the model, the first site (in forward order) and the prompt where
    it appears; `nonfinite="warn"` warns instead and keeps the values. `dtype`: of the results (default float32, or
    the model's when wider: a bfloat16 model's activations are exact in float32). `device`: where results held in
    memory are kept (default the CPU; the model's device keeps an intermediate capture off the host; shards are
    always on the CPU).
    """
    if nonfinite not in ("raise", "warn"):
        raise BadOption(f"nonfinite={nonfinite!r}; use 'raise' or 'warn'")
    tokens = as_tokens(model, prompts)
    dtype = dtype or torch.promote_types(model.dtype, torch.float32)
    memory_budget = memory_budget_in_force() if memory_budget is None else memory_budget
    sites = [parse_site(s).check(model.n_layers, model.n_heads) for s in sites]
    all_edits = [*model.edits, *edits]
    read = {s.hooked for s in sites}
    estimate = _estimate_bytes(model, tokens, sites, positions, logits, dtype) * (2 if metric else 1)
    stream = estimate > memory_budget
    if stream and shard_dir is None:
        raise OverMemoryBudget(f"capture needs about {estimate / 2**30:.2f} GiB, over the memory budget of "
                          f"{memory_budget / 2**30:.2f} GiB; pass shard_dir=... to stream it to disk")
    result = Activations(sites, positions, tokens, shard_dir=Path(shard_dir) if stream else None)
    done: set[str] = set()
    if stream:
        done = _prepare_shards(result.shard_dir, _capture_key(model, tokens, sites, positions, batch_size,
                                                              padding_side, all_edits, metric, logits, dtype))
    chunks: dict[str, list[Tensor]] = {}
    batches = list(tokens.batches(batch_size, padding_side))
    for batch in tqdm(batches, desc=f"capture {model.name}", disable=not progress, leave=False):
        name = f"shard-{int(batch.index[0]):08d}.safetensors"
        if name in done:
            continue
        out = run(model, batch, read, all_edits, metric, backend)
        piece = _select(batch, sites, positions, out, logits, tokens.ids.shape[1], dtype,
                        torch.device("cpu") if stream else torch.device(device))
        _check_finite(piece, sites, batch, model, nonfinite)
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


def _check_finite(piece: dict[str, Tensor], sites: list[Site], batch: Batch, model, nonfinite: str) -> None:
    """Raise (or warn) at the first non-finite value of a batch: the earliest site in forward order, then logits."""
    order = sorted(sites, key=lambda s: (-1 if s.kind == "embed" else model.n_layers if s.layer is None else s.layer,
                                         KINDS.index(s.kind)))
    for key in [str(s) for s in order] + [LOGITS] + [f"grad:{s}" for s in order]:
        values = piece.get(key)
        if values is None or bool(torch.isfinite(values).all()):
            continue
        rows = (~torch.isfinite(values)).reshape(len(values), -1).any(-1).nonzero()
        where = f"prompt {int(batch.index[int(rows[0])])}" if len(values) == len(batch.index) else "a selected token"
        message = (f"{model.name}: NaN or inf at {key}, first for {where}, in {int((~torch.isfinite(values)).sum())} "
                   f"values of this batch; check the weights and the dtype (float16 overflows), or pass "
                   f"nonfinite='warn' to keep them")
        if nonfinite == "raise":
            raise NonFiniteValues(message)
        warnings.warn(message, stacklevel=3)
        return


def _select(batch: Batch, sites: list[Site], positions, out, logits: bool, width: int, dtype: torch.dtype,
            device: torch.device) -> dict[str, Tensor]:
    """Canonical layout, chosen positions, moved to `device` in `dtype`, for one batch."""
    where = dict(dtype=dtype, device=device)
    piece = {}
    for s in sites:
        act = out.acts[s.hooked]
        piece[str(s)] = _positions(batch, s, act, positions, width, **where)
        if out.grads:
            piece["grad:" + str(s)] = _positions(batch, s, out.grads[s.hooked], positions, width, **where)
    if logits:
        piece[LOGITS] = _positions(batch, Site("final"), out.logits, positions, width, **where)
    return piece


def _positions(batch: Batch, s: Site, act: Tensor, positions, width: int, dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """One site of one batch: canonical layout, pads zeroed, the chosen positions (queries for patterns), selected on
    the activation's device, then moved to `device` in `dtype`."""
    if s.kind == "attn_pattern":  # [batch, head, query, key] -> [batch, query, head, key], keys canonical
        act = batch.to_canonical(batch.to_canonical(act, pos_dim=2), pos_dim=3).movedim(1, 2)
        keys = batch.positions_mask("all").to(act.device)[:, None, None, :]
        act = torch.nn.functional.pad(act * keys.to(act.dtype), (0, width - act.shape[-1]))
    else:
        act = batch.to_canonical(act)
    if s.head is not None:
        act = act[:, :, s.head]
    act = act.detach()
    if positions is None or positions == "all":
        real = batch.positions_mask("all").to(act.device)
        act = _pad_pos(_moved(act * real.reshape(real.shape + (1,) * (act.dim() - 2)).to(act.dtype), dtype, device),
                       width)
        return (act.movedim(2, 1) if s.kind == "attn_pattern" else act).contiguous()
    if positions == "last":
        return _moved(act[torch.arange(len(batch.lengths)), batch.lengths - 1], dtype, device)
    if isinstance(positions, Tensor):
        return _moved(act[batch.positions_mask(positions).to(act.device)], dtype, device)
    cols = torch.as_tensor([positions] if isinstance(positions, int) else list(positions))
    absolute = torch.where(cols[None] < 0, batch.lengths[:, None] + cols[None], cols[None])
    if ((absolute < 0) | (absolute >= batch.lengths[:, None])).any():
        raise BadPositions(f"positions {cols.tolist()} fall outside some prompts (lengths {batch.lengths.tolist()})")
    return _moved(act[torch.arange(len(batch.lengths))[:, None], absolute], dtype, device)


def _moved(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`t` on `device` in `dtype`, contiguous (moved first, then cast: the copy between devices is in t's dtype)."""
    return t.to(device).to(dtype).contiguous()


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


def _estimate_bytes(model, tokens: Tokens, sites: list[Site], positions, logits: bool, dtype: torch.dtype) -> int:
    """Size of the result: prompts x positions x (elements per position of every site)."""
    width = tokens.ids.shape[1]
    per_position = {"head_out": model.n_heads * model.d_model, "attn_pattern": model.n_heads * width}
    elements = sum(model.d_model if s.head is not None else per_position.get(s.kind, model.d_model) for s in sites)
    elements += model.config.vocab_size if logits else 0
    n = len(tokens) * _positions_per_prompt(positions, tokens)
    return int(n * elements * torch.finfo(dtype).bits // 8)


def _capture_key(model, tokens: Tokens, sites, positions, batch_size, padding_side, edits, metric, logits,
                 dtype) -> str:
    """What a resumed capture must share with the one that wrote the shards: the model, the tokens, every
    option, the edits' tensors byte for byte and the metric's code and captured values."""
    h = hashlib.sha256()
    for part in (model.fingerprint(), [str(s) for s in sites], positions, batch_size, padding_side, list(edits),
                 metric, logits, tokens.ids, str(dtype)):
        _digest(part, h)
    return h.hexdigest()


def _digest(value, h, depth: int = 0) -> None:
    """Feed `value` into the hash `h` by content: tensors by dtype, shape and bytes (never their abbreviated
    repr), dataclasses field by field, functions by code, defaults and closure, models by fingerprint."""
    if depth > 20:
        raise RecursionError("value nests too deeply to fingerprint")
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif hasattr(value, "fingerprint") and callable(value.fingerprint):
        h.update(f"model {value.fingerprint()}".encode())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(type(value).__qualname__.encode())
        for f in dataclasses.fields(value):
            h.update(f.name.encode())
            _digest(getattr(value, f.name), h, depth + 1)
    elif isinstance(value, (list, tuple)):
        h.update(f"seq {len(value)}".encode())
        for v in value:
            _digest(v, h, depth + 1)
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}".encode())
        for k, v in value.items():
            _digest(k, h, depth + 1)
            _digest(v, h, depth + 1)
    elif isinstance(value, functools.partial):
        for part in ("partial", value.func, value.args, value.keywords):
            _digest(part, h, depth + 1)
    elif isinstance(value, types.CodeType):
        h.update(f"code {value.co_name}".encode() + value.co_code)
        _digest(value.co_consts, h, depth + 1)
    elif isinstance(value, types.FunctionType):
        h.update(f"function {value.__module__}.{value.__qualname__}".encode())
        _digest(value.__code__, h, depth + 1)
        _digest(value.__defaults__ or (), h, depth + 1)
        _digest([c.cell_contents for c in value.__closure__ or ()], h, depth + 1)
    elif isinstance(value, types.MethodType):
        for part in ("method", value.__func__, value.__self__):
            _digest(part, h, depth + 1)
    else:
        h.update(f"{type(value).__qualname__} {value!r}".encode())


def _manifest(shard_dir: Path) -> dict:
    return json.loads((shard_dir / "capture.json").read_text())


def _prepare_shards(shard_dir: Path, key: str) -> set[str]:
    """Create or reuse a shard folder; returns the names of the shards already written for this same capture whose
    bytes match the checksum the manifest recorded (a truncated or altered shard is computed again)."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = shard_dir / "capture.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest.get("key") == key:
        sums = manifest.get("sha256", {})
        return {p.name for p in shard_dir.glob("shard-*.safetensors") if sums.get(p.name) == file_sha256(p)}
    for old in shard_dir.glob("shard-*.safetensors"):
        old.unlink()
    _write_manifest(manifest_path, {"key": key, "keys": [], "sha256": {}})
    return set()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(path: Path, manifest: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, path)


def _write_atomic(path: Path, piece: dict[str, Tensor]) -> None:
    """Write one shard (renamed into place once complete) and record its checksum in the manifest."""
    tmp = path.with_suffix(".tmp")
    save_file(piece, str(tmp))
    os.replace(tmp, path)
    manifest_path = path.parent / "capture.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["keys"] = manifest["keys"] or list(piece)
    manifest.setdefault("sha256", {})[path.name] = file_sha256(path)
    _write_manifest(manifest_path, manifest)
