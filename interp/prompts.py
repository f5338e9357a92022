"""Prompt sets: reading prompt files, tokenising once, and batching with padding.

Tokens are kept in the canonical layout: right-padded, position 0 is each prompt's first token.
A `Batch` lays a slice of them out the way the model wants (left or right padding) and converts
activations back to the canonical layout, so every result is indexed the same way whatever the padding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interp.errors import BadPrompts, PromptTooLong


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or JSON lines (a string, or an object with "prompt"/"text")."""
    path = Path(path)
    if not path.is_file():
        raise BadPrompts(f"prompt file {path} does not exist; pass a .txt (one prompt per line) or .jsonl file")
    lines = [line for line in _read_text(path).splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        lines = [json_text(line, f"{path}:{n}") for n, line in enumerate(lines, 1)]
    if not lines:
        raise BadPrompts(f"prompt file {path} is empty; write one prompt per line")
    return lines


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadPrompts(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def json_text(line: str, where: str, keys: tuple[str, ...] = ("prompt", "text")) -> str:
    """The text of one JSON line: the line itself when it is a string, else its first string field among `keys`;
    BadPrompts naming `where` (e.g. "file.jsonl:3") otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadPrompts(f"{where} is not valid JSON ({e.msg})") from None
    if isinstance(record, str):
        return record
    for key in keys:
        if isinstance(record, dict) and isinstance(record.get(key), str):
            return record[key]
    raise BadPrompts(f"{where} has no string field {' or '.join(repr(k) for k in keys)}")


@dataclass
class PromptSet:
    """A labelled set of prompts, with the expected answer of each when the task has one."""

    prompts: list[str]
    answers: list[str] | None = None
    label: str = "prompts"

    def __post_init__(self) -> None:
        if self.answers is not None and len(self.answers) != len(self.prompts):
            raise BadPrompts(f"prompt set {self.label!r} has {len(self.prompts)} prompts but {len(self.answers)} "
                             f"answers; give one answer per prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> PromptSet:
        """The first `n` prompts (and answers)."""
        return PromptSet(self.prompts[:n], self.answers and self.answers[:n], self.label)

    def split(self) -> tuple[PromptSet, PromptSet]:
        """Even and odd prompts: a train and a test half of the same distribution."""
        halves = [PromptSet(self.prompts[i::2], self.answers and self.answers[i::2], self.label) for i in (0, 1)]
        return halves[0], halves[1]


def as_prompt_set(prompts: PromptSet | Sequence[str], label: str | None = None) -> PromptSet:
    """`prompts` as a PromptSet (a list of strings gets no answers); `label` overrides its label."""
    if isinstance(prompts, PromptSet):
        return prompts if label is None else PromptSet(prompts.prompts, prompts.answers, label)
    return PromptSet(list(prompts), None, label or "prompts")


def read_prompt_set(path: str | Path, label: str | None = None) -> PromptSet:
    """A prompt file as a PromptSet labelled by its stem; .jsonl objects that all carry a string "answer" give
    the answers."""
    path = Path(path)
    prompts = read_prompts(path)
    answers = None
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]
        found = [r.get("answer") if isinstance(r, dict) else None for r in records]
        answers = found if all(isinstance(a, str) for a in found) else None
    return PromptSet(prompts, answers, label or path.stem)


@dataclass
class Tokens:
    """A tokenised prompt set in canonical layout. `ids` [prompt, pos] right-padded with `pad_id`."""

    ids: Int[Tensor, "prompt pos"]
    lengths: Int[Tensor, " prompt"]
    pad_id: int

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def mask(self) -> Bool[Tensor, "prompt pos"]:
        """True at real (non-pad) tokens."""
        return torch.arange(self.ids.shape[1]) < self.lengths[:, None]

    def batches(self, batch_size: int, padding_side: str = "right") -> Iterator[Batch]:
        """Consecutive batches, each trimmed to its longest prompt and padded on `padding_side`."""
        for start in range(0, len(self), batch_size):
            index = torch.arange(start, min(start + batch_size, len(self)))
            yield self.batch(index, padding_side)

    def batch(self, index: Int[Tensor, " batch"], padding_side: str = "right") -> Batch:
        lengths = self.lengths[index]
        width = int(lengths.max())
        ids = self.ids[index, :width]
        batch = Batch(ids, lengths, index, padding_side, self.pad_id)
        batch.input_ids = batch.from_canonical(ids, fill=self.pad_id)
        return batch


def tokenize(tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], max_length: int | None = None) -> Tokens:
    """Tokenise once. `prompts` are strings or lists of token ids. Raises PromptTooLong past `max_length`."""
    if len(prompts) == 0:
        raise BadPrompts("no prompts given; pass at least one prompt")
    if isinstance(prompts[0], str):
        encoded = [tokenizer(p)["input_ids"] for p in prompts]
    else:
        encoded = [list(map(int, p)) for p in prompts]
    for n, ids in enumerate(encoded):
        if not ids:
            raise BadPrompts(f"prompt {n} tokenises to nothing: {str(prompts[n])[:60]!r}")
        if max_length is not None and len(ids) > max_length:
            raise PromptTooLong(
                f"prompt {n} has {len(ids)} tokens but the model's context is {max_length}; "
                f"shorten it (starts {str(prompts[n])[:40]!r})")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = torch.tensor([len(ids) for ids in encoded])
    padded = torch.full((len(encoded), int(lengths.max())), pad_id, dtype=torch.long)
    for row, ids in enumerate(encoded):
        padded[row, : len(ids)] = torch.tensor(ids)
    return Tokens(padded, lengths, pad_id)


def as_tokens(model, prompts: PromptSet | Sequence[str] | Sequence[Sequence[int]] | Tokens) -> Tokens:
    """`prompts` tokenised for `model` (Tokens pass through), checked against its context length."""
    if isinstance(prompts, Tokens):
        return prompts
    if isinstance(prompts, PromptSet):
        prompts = prompts.prompts
    return tokenize(model.tokenizer, prompts, max_length=model.n_ctx)


def prompt_texts(prompts: PromptSet | Sequence[str] | Tokens) -> list[str]:
    """The prompts as strings, for results and tables (Tokens are shown as their token-id lists)."""
    if isinstance(prompts, Tokens):
        return [str(row[:n].tolist()) for row, n in zip(prompts.ids, prompts.lengths)]
    if isinstance(prompts, PromptSet):
        return list(prompts.prompts)
    return [p if isinstance(p, str) else str(list(p)) for p in prompts]


def position_index(lengths: Int[Tensor, " prompt"], position: int | str) -> Int[Tensor, " prompt"]:
    """The canonical column of `position` in each prompt: "last", an index, or a negative index from the end."""
    if position == "last":
        return lengths - 1
    if not isinstance(position, int):
        raise BadPrompts(f"position {position!r} is not 'last' or an integer")
    return lengths + position if position < 0 else torch.full_like(lengths, position)


@dataclass
class Batch:
    """A batch of prompts laid out for the model. `index` are the prompts' rows in their `Tokens`."""

    input_ids: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    index: Int[Tensor, " batch"]
    padding_side: str
    pad_id: int

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def offsets(self) -> Int[Tensor, " batch"]:
        """Column of each prompt's first token in the model layout (0 unless left-padded)."""
        if self.padding_side == "left":
            return self.width - self.lengths
        return torch.zeros_like(self.lengths)

    @property
    def attention_mask(self) -> Int[Tensor, "batch pos"]:
        cols = torch.arange(self.width)[None] - self.offsets[:, None]
        return ((cols >= 0) & (cols < self.lengths[:, None])).long()

    @property
    def position_ids(self) -> Int[Tensor, "batch pos"]:
        """Positions counted from each prompt's first token (pads get 0), as HF needs with left padding."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to_canonical(self, t: Tensor, pos_dim: int = 1) -> Tensor:
        """Model layout -> canonical (right-padded) along `pos_dim`; pad positions hold arbitrary values."""
        if self.padding_side != "left":
            return t
        cols = (torch.arange(self.width)[None] + self.offsets[:, None]).clamp(max=self.width - 1)
        return _gather_pos(t, cols, pos_dim)

    def from_canonical(self, t: Tensor, pos_dim: int = 1, fill: float = 0) -> Tensor:
        """Canonical -> model layout along `pos_dim`; pad positions get `fill`."""
        if self.padding_side != "left":
            return t
        cols = (torch.arange(self.width)[None] - self.offsets[:, None]).clamp(min=0)
        out = _gather_pos(t, cols, pos_dim)
        pads = _along(self.attention_mask == 0, out.dim(), pos_dim).to(t.device)
        return out.masked_fill(pads, fill)

    def positions_mask(self, positions: PositionSpec) -> Bool[Tensor, "batch pos"]:
        """Canonical-layout mask [batch, pos] of the positions an edit or a capture selects, pads excluded."""
        real = torch.arange(self.width)[None] < self.lengths[:, None]
        if positions is None or positions == "all":
            return real
        if positions == "last":
            positions = [-1]
        if isinstance(positions, Tensor) and positions.dtype == torch.bool:
            chosen = positions[self.index, : self.width]
            if chosen.shape[1] < self.width:
                chosen = torch.nn.functional.pad(chosen, (0, self.width - chosen.shape[1]))
            return chosen & real
        cols = torch.as_tensor(positions if not isinstance(positions, int) else [positions])
        absolute = torch.where(cols[None] < 0, self.lengths[:, None] + cols[None], cols[None])
        chosen = torch.zeros_like(real)
        inside = (absolute >= 0) & (absolute < self.lengths[:, None])
        rows = torch.arange(len(self.lengths))[:, None].expand_as(absolute)
        chosen[rows[inside], absolute[inside]] = True
        return chosen


PositionSpec = "str | int | Sequence[int] | Bool[Tensor, 'prompt pos'] | None"


def _along(x: Tensor, ndim: int, pos_dim: int) -> Tensor:
    """Reshape a [batch, pos] tensor to broadcast against an `ndim` tensor whose positions are at `pos_dim`."""
    shape = [1] * ndim
    shape[0], shape[pos_dim] = x.shape
    return x.reshape(shape)


def _gather_pos(t: Tensor, cols: Int[Tensor, "batch pos"], pos_dim: int) -> Tensor:
    """out[b, ..., p, ...] = t[b, ..., cols[b, p], ...] along `pos_dim`."""
    idx = _along(cols.to(t.device), t.dim(), pos_dim)
    return t.gather(pos_dim, idx.expand_as(t))
