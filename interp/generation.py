"""Generation under the models' active edits, KV-cached, through either backend: greedy or sampled (temperature,
top-p, seed), with stop strings, returning ids and text.

How positions are counted. Each model's edits are resolved once, against the prompts, before the first step, so an
edit means the same at every step and in both paths below (index 0 = each prompt's first token):
- None / "all": every position, prompt and generated; each new token is edited as it is produced;
- "last", an int or a list of ints (negative ones count back from the prompt's last token): those prompt positions
  only, never a generated token (an int past a prompt's end selects nothing in it);
- a boolean mask [prompt, pos]: absolute positions of the whole sequence, so its columns past a prompt's length
  select generated tokens (e.g. `analyses.shift.prompt_positions("from-last", lengths, n_ctx)`: the last prompt
  token and every token generated after it); positions past the mask's width are not edited;
- `replace` needs values [prompt, pos, ...] at every position it selects: one that would reach a generated token
  without values there is an UnsupportedEdit.

The cached path (default): one forward of the left-padded prompts fills a Hugging Face KV cache per model, then each
step runs only the new token of each prompt (position id = its index in its own sequence) through the same backend
hooks, every edit cut to that token's column. Both backends take the cache, blends included (the other model's blocks
keep their own cache, `interp.backends.blending`); on the bridge it needs the alias in `interp.backends.bridge`
(transformer-lens 4.3 reads the cache under a name transformers 5 no longer passes). `cache=False` re-runs the whole
right-padded sequence each step: the reference the tests hold the cached path to, and the benchmark's baseline. No
case needs it; a user's own hook that keeps state across forwards, or a remote (NDIF) trace, would.

`generate_combined` runs several models of one tokenizer on the same sequence and picks from `combine(next-token
logits of each)`, e.g. model-diff amplification `(1 + a) l_tuned - a l_base`; each model keeps its own cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.backends import Past, run
from interp.errors import BadOption, BadPositions, PromptTooLong, UnsupportedEdit
from interp.intervene import Edit, Replace
from interp.prompts import Batch, Tokens, as_tokens

Combine = Callable[[list[Float[Tensor, "batch vocab"]]], Float[Tensor, "batch vocab"]]


@dataclass
class Generation:
    """The continuation of each prompt: `ids[i]` its new token ids [n_new] (through the token that completed a stop
    string), `texts[i]` their text (cut before the stop string), `stops[i]` the stop string that ended it (None: it
    ran to max_new_tokens). Iterating, indexing and len() go over `ids`, the list of id tensors callers had before."""

    ids: list[Int[Tensor, " new"]]
    texts: list[str]
    stops: list[str | None]

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.ids)

    def __getitem__(self, i: int) -> Tensor:
        return self.ids[i]


def generate(model, prompts, max_new_tokens: int = 20, *, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, stop: str | Sequence[str] = (), cache: bool = True,
             backend: str | None = None) -> Generation:
    """Continue each prompt (strings, token-id lists or `Tokens`) by up to `max_new_tokens` tokens under the model's
    active edits: greedy at temperature 0, else sampled from softmax(logits / temperature) cut to its top-p nucleus
    with a generator seeded by `seed`; a row ends at the first of the `stop` strings in its text."""
    return generate_combined([model], _only, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, stop=stop, cache=cache, backend=backend)


def _only(logits: list[Tensor]) -> Tensor:
    return logits[0]


def generate_combined(models: Sequence, combine: Combine, prompts, max_new_tokens: int = 20, *,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] = (),
                      cache: bool = True, backend: str | None = None) -> Generation:
    """`generate` from `combine([next-token logits of each model])` (each model under its own active edits, logits
    in float32 on the CPU). The models share a tokenizer (prompts are tokenised and texts decoded with the first
    one's)."""
    stops_at = _check(max_new_tokens, temperature, top_p, stop)
    tokens = as_tokens(models[0], prompts)
    prompt_lengths = tokens.lengths
    for m in models:
        _check_context(m, prompt_lengths, max_new_tokens)
    width = int(prompt_lengths.max()) + max_new_tokens
    ids = F.pad(tokens.ids, (0, width - tokens.ids.shape[1]), value=tokens.pad_id)
    steppers = [(_Cached if cache else _Recompute)(m, _resolve(m.edits, prompt_lengths, width), tokens.pad_id,
                                                   backend) for m in models]
    generator = torch.Generator().manual_seed(seed)
    rows, lengths = torch.arange(len(tokens)), prompt_lengths.clone()
    kept, stops = torch.full_like(lengths, max_new_tokens), [None] * len(tokens)
    decode = models[0].tokenizer.decode
    for step in range(max_new_tokens):
        with torch.no_grad():
            logits = [s.next_logits(ids, lengths) for s in steppers]
        ids[rows, lengths] = _pick(combine(logits), temperature, top_p, generator)
        lengths = lengths + 1
        if not stops_at:
            continue
        for i in range(len(tokens)):
            found = None if stops[i] else _first_stop(decode(ids[i, prompt_lengths[i]: lengths[i]].tolist()), stops_at)
            if found is not None:
                kept[i], stops[i] = step + 1, found[1]
        if all(stops):
            break
    new = [ids[i, prompt_lengths[i]: prompt_lengths[i] + kept[i]] for i in range(len(tokens))]
    texts = [decode(x.tolist()) for x in new]
    texts = [t if s is None else t[: _first_stop(t, stops_at)[0]] for t, s in zip(texts, stops)]
    return Generation(new, texts, stops)


def _check(max_new_tokens: int, temperature: float, top_p: float, stop: str | Sequence[str]) -> tuple[str, ...]:
    """The stop strings as a tuple; BadOption for an option out of its range."""
    if max_new_tokens < 0:
        raise BadOption(f"max_new_tokens={max_new_tokens}; pass 0 or more")
    if temperature < 0:
        raise BadOption(f"temperature={temperature}; pass 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise BadOption(f"top_p={top_p}; pass a probability in (0, 1]")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise BadOption(f"stop strings {stops!r}; pass non-empty strings")
    return stops


def _check_context(model, lengths: Int[Tensor, " prompt"], max_new_tokens: int) -> None:
    longest = int(lengths.max())
    if model.n_ctx is not None and longest + max_new_tokens > model.n_ctx:
        raise PromptTooLong(f"a prompt of {longest} tokens plus {max_new_tokens} new ones passes {model.name}'s "
                            f"context of {model.n_ctx} tokens; generate fewer tokens or shorten the prompt")


def _resolve(edits: Sequence, lengths: Int[Tensor, " prompt"], width: int) -> list:
    """Each edit with its positions as an absolute mask [prompt, width] (module docstring) and replace values padded
    to `width`; blends pass as they are."""
    out = []
    for e in edits:
        if not isinstance(e, Edit):
            out.append(e)
            continue
        mask = _absolute(e.positions, lengths, width)
        changes = {"positions": mask}
        if isinstance(e, Replace):
            changes["values"] = _covering(e, mask)
        out.append(dataclasses.replace(e, **changes))
    return out


def _absolute(positions, lengths: Int[Tensor, " prompt"], width: int) -> Bool[Tensor, "prompt width"]:
    n, longest = len(lengths), int(lengths.max())
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return torch.ones(n, width, dtype=torch.bool)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.dim() != 2 or len(positions) < n:
            raise BadPositions(f"a position mask of shape {tuple(positions.shape)} for {n} prompts; pass one row "
                               f"[pos] per prompt")
        mask = torch.zeros(n, width, dtype=torch.bool)
        cols = min(width, positions.shape[1])
        mask[:, :cols] = positions[:n, :cols].cpu()
        return mask
    prompt = Batch(torch.zeros(n, longest, dtype=torch.long), lengths, torch.arange(n), "right", 0)
    return F.pad(prompt.positions_mask(positions), (0, width - longest))


def _covering(e: Replace, mask: Bool[Tensor, "prompt width"]) -> Tensor:
    """`e.values` padded with zeros to the mask's width, where the mask selects no position past the values."""
    have = e.values.shape[1]
    beyond = mask[:, have:].nonzero()
    if len(beyond):
        prompt, col = beyond[0].tolist()
        raise UnsupportedEdit(f"replace at {e.site}: its values cover {have} positions, and generation would edit "
                              f"position {have + col} of prompt {prompt}; restrict its positions to the prompt, or "
                              f"give values for every position")
    pad = [0, 0] * (e.values.dim() - 2) + [0, mask.shape[1] - have]
    return F.pad(e.values, pad)


def _at_columns(edits: Sequence, cols: Int[Tensor, " prompt"]) -> list:
    """The edits as they apply to one new token per prompt, at canonical column `cols[i]` of prompt i: masks (and
    replace values) cut to that column, [prompt, 1]; an edit that selects none of these tokens is left out."""
    rows = torch.arange(len(cols))
    out = []
    for e in edits:
        if not isinstance(e, Edit):
            out.append(e)
            continue
        here = e.positions[rows, cols][:, None]
        if not here.any():
            continue
        changes = {"positions": here}
        if isinstance(e, Replace):
            changes["values"] = e.values[rows.to(e.values.device), cols.to(e.values.device)][:, None]
        out.append(dataclasses.replace(e, **changes))
    return out


class _Recompute:
    """Next-token logits by a forward of the whole right-padded sequence each step."""

    def __init__(self, model, edits: list, pad_id: int, backend: str | None):
        self.model, self.edits, self.pad_id, self.backend = model, edits, pad_id, backend

    def next_logits(self, ids: Int[Tensor, "prompt width"], lengths: Int[Tensor, " prompt"]) -> Tensor:
        rows = torch.arange(len(lengths))
        batch = Tokens(ids, lengths, self.pad_id).batch(rows, "right")
        logits = run(self.model, batch, [], self.edits, None, self.backend).logits
        return logits[rows, lengths - 1].float().cpu()


class _Cached:
    """Next-token logits from a KV cache: the left-padded prompts on the first call, then one new token a call."""

    def __init__(self, model, edits: list, pad_id: int, backend: str | None):
        from transformers import DynamicCache

        self.model, self.edits, self.pad_id, self.backend = model, edits, pad_id, backend
        self.cache = DynamicCache(config=model.hf.config)
        self.mask: Tensor | None = None  # attention mask [prompt, tokens in the cache]

    def next_logits(self, ids: Int[Tensor, "prompt width"], lengths: Int[Tensor, " prompt"]) -> Tensor:
        rows = torch.arange(len(lengths))
        if self.mask is None:
            batch = Tokens(ids, lengths, self.pad_id).batch(rows, "left")
            self.mask, edits, positions = batch.attention_mask, self.edits, batch.position_ids
        else:
            last = lengths - 1
            batch = Batch(ids[rows, last][:, None], torch.ones_like(lengths), rows, "right", self.pad_id)
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            edits, positions = _at_columns(self.edits, last), last[:, None]
        past = Past(self.cache, self.mask, positions)
        return run(self.model, batch, [], edits, None, self.backend, past).logits[:, -1].float().cpu()


def _pick(logits: Float[Tensor, "batch vocab"], temperature: float, top_p: float,
          generator: torch.Generator) -> Int[Tensor, " batch"]:
    """The argmax at temperature 0; else one draw per row from softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches `top_p` (the most likely token always in)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.double() / temperature).softmax(-1)
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)
    ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)
    draw = torch.multinomial(ranked, 1, generator=generator)
    return order.gather(-1, draw)[:, 0]


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in `text`, or None."""
    found = [(text.find(s), s) for s in stops if s in text]
    return min(found) if found else None
