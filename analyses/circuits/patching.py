"""Clean/corrupt prompt pairs, metrics, activation patching and attribution patching.

A pair is a clean prompt and a corrupt one of the same token length, an answer token (right on the clean
prompt) and a wrong token (right on the corrupt one). Metrics, at each prompt's last token:

    logit_diff  logit(answer) - logit(wrong)      prob  p(answer)      loss  -log p(answer)

Normalised effects use the gap m_clean - m_corrupt (means over pairs):

    denoising (clean activation into the corrupt run)  (m_patched - m_corrupt) / (m_clean - m_corrupt)  in [0, 1]
    noising   (corrupt activation into the clean run)  (m_patched - m_clean)   / (m_clean - m_corrupt)  in [-1, 0]

Attribution patching estimates the same effect to first order from one forward on each input and one
backward: m_patched - m_base ~ sum_pos (a_source - a_base) . dm/da at the base run (Nanda 2023).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.capture import capture
from interp.errors import BadOption, BadPrompts
from interp.intervene import replace
from interp.prompts import Tokens, as_tokens
from interp.sites import Site, site

METRICS = ("logit_diff", "prob", "loss")
DIRECTIONS = ("denoising", "noising")


# ------------------------------------------------------------------------------------------------ pairs

@dataclass
class PromptPairs:
    """Texts of clean/corrupt pairs and their answer / wrong tokens, one token each, written as the tokenizer
    spells them after the prompt (e.g. " Paris" for a BPE tokenizer, "a" for a word-level tokenizer)."""

    clean: list[str]
    corrupt: list[str]
    answer: list[str]
    wrong: list[str]

    def __len__(self) -> int:
        return len(self.clean)

    def save(self, path: str | Path) -> Path:
        """JSON lines {"clean", "corrupt", "answer", "wrong"}."""
        path = Path(path)
        rows = [dict(clean=c, corrupt=k, answer=a, wrong=w) for c, k, a, w in
                zip(self.clean, self.corrupt, self.answer, self.wrong)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path


def read_pairs(path: str | Path) -> PromptPairs:
    """Pairs from a jsonl file with the fields "clean", "corrupt", "answer", "wrong" on every line."""
    path = Path(path)
    if not path.is_file():
        raise BadPrompts(f"pair file {path} does not exist; write jsonl lines "
                         '{"clean": ..., "corrupt": ..., "answer": ..., "wrong": ...}')
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadPrompts(f"{path}:{n} is not valid JSON ({e.msg})") from None
        missing = [k for k in ("clean", "corrupt", "answer", "wrong") if not isinstance(row.get(k), str)]
        if missing:
            raise BadPrompts(f"{path}:{n} lacks the string field(s) {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise BadPrompts(f"pair file {path} is empty")
    return PromptPairs(*([r[k] for r in rows] for k in ("clean", "corrupt", "answer", "wrong")))


def pairs_from_answers(model, prompts: Sequence[str], answers: Sequence[str], seed: int = 0) -> PromptPairs:
    """Pairs from a prompt set with answers: each prompt's corrupt partner is another prompt of the same token
    length whose first answer token differs; answer and wrong are the two first answer tokens. Prompts without
    such a partner are dropped; raises BadPrompts when none has one."""
    rng = random.Random(seed)
    tok = model.tokenizer
    length = [len(tok(p)["input_ids"]) for p in prompts]
    first = [tok.decode(tok(f"{p} {a}")["input_ids"][n:n + 1]) for p, a, n in zip(prompts, answers, length)]
    out = PromptPairs([], [], [], [])
    for i, p in enumerate(prompts):
        partners = [j for j in range(len(prompts)) if length[j] == length[i] and first[j] != first[i]]
        if partners:
            j = rng.choice(partners)
            out.clean.append(p), out.corrupt.append(prompts[j]), out.answer.append(first[i]), out.wrong.append(first[j])
    if not out.clean:
        raise BadPrompts("no prompt has a partner of the same token length with a different first answer token; "
                         "pass clean/corrupt pairs (jsonl) instead")
    return out


@dataclass
class TokenPairs:
    """Tokenised pairs: `clean`, `corrupt` (same length per pair), `answer` and `wrong` token ids [pair]."""

    clean: Tokens
    corrupt: Tokens
    answer: Int[Tensor, " pair"]
    wrong: Int[Tensor, " pair"]

    def __len__(self) -> int:
        return len(self.clean)


def tokenize_pairs(model, pairs: PromptPairs) -> TokenPairs:
    """Tokenise once; raises BadPrompts if a corrupt prompt's length differs or an answer is not one token."""
    clean, corrupt = as_tokens(model, pairs.clean), as_tokens(model, pairs.corrupt)
    bad = (clean.lengths != corrupt.lengths).nonzero().flatten().tolist()
    if bad:
        raise BadPrompts(f"pair {bad[0]}: clean has {int(clean.lengths[bad[0]])} tokens, corrupt "
                         f"{int(corrupt.lengths[bad[0]])}; patching needs equal lengths")
    return TokenPairs(clean, corrupt, _one_token(model, pairs.answer, "answer"), _one_token(model, pairs.wrong, "wrong"))


def _one_token(model, words: Sequence[str], field: str) -> Tensor:
    ids = []
    for n, w in enumerate(words):
        enc = model.tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise BadPrompts(f"pair {n}: {field} {w!r} is {len(enc)} tokens; use a one-token {field}")
        ids.append(enc[0])
    return torch.tensor(ids)


# ---------------------------------------------------------------------------------------------- metrics

def metric_of(logits: Float[Tensor, "pair vocab"], answer: Tensor, wrong: Tensor, metric: str) -> Float[Tensor, " pair"]:
    """The metric at the last token of each pair (see the module docstring)."""
    rows = torch.arange(len(answer))
    if metric == "logit_diff":
        return logits[rows, answer] - logits[rows, wrong]
    logp = logits.float().log_softmax(-1)[rows, answer]
    if metric == "prob":
        return logp.exp()
    if metric == "loss":
        return -logp
    raise BadOption(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def metric_values(model, tokens: Tokens, tp: TokenPairs, metric: str, edits: Sequence = (),
                  batch_size: int = 64) -> Float[Tensor, " pair"]:
    """The metric per pair for `tokens` (tp.clean or tp.corrupt) under `edits`."""
    logits = capture(model, tokens, [], positions="last", logits=True, edits=edits, batch_size=batch_size,
                     progress=False)["logits"]
    return metric_of(logits, tp.answer, tp.wrong, metric)


def _grad_metric(tp: TokenPairs, metric: str):
    """metric(logits, batch) for capture: the metric summed over the batch at each prompt's last token."""
    def fn(logits: Tensor, batch) -> Tensor:
        last = logits[torch.arange(len(batch.lengths)), (batch.offsets + batch.lengths - 1).to(logits.device)]
        return metric_of(last, tp.answer[batch.index], tp.wrong[batch.index], metric).sum()
    return fn


def _runs(direction: str, tp: TokenPairs) -> tuple[Tokens, Tokens]:
    """(base run, source run): noising patches corrupt into clean, denoising clean into corrupt."""
    if direction not in DIRECTIONS:
        raise BadOption(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    return (tp.clean, tp.corrupt) if direction == "noising" else (tp.corrupt, tp.clean)


def _normalise(patched: Tensor, m_clean: Tensor, m_corrupt: Tensor, direction: str) -> Tensor:
    """Patched metric means -> normalised effect; `patched` [..., pair]."""
    gap = m_clean.mean() - m_corrupt.mean()
    start = m_clean.mean() if direction == "noising" else m_corrupt.mean()
    return (patched.mean(-1) - start) / gap


# ------------------------------------------------------------------------------------ activation patching

def component_sites(model, kinds: Sequence[str] = ("head", "mlp")) -> list[Site]:
    """Per-component sites: 'head' -> head_out.L.H, 'mlp' -> mlp_out.L, 'attn' -> attn_out.L,
    'resid' -> resid_pre.L, 'embed' -> embed; layers in forward order."""
    out = [Site("embed")] if "embed" in kinds else []
    for layer in range(model.n_layers):
        out += [Site("resid_pre", layer)] if "resid" in kinds else []
        out += [Site("head_out", layer, h) for h in range(model.n_heads)] if "head" in kinds else []
        out += [Site("attn_out", layer)] if "attn" in kinds else []
        out += [Site("mlp_out", layer)] if "mlp" in kinds else []
    return out


def activation_patching(model, tp: TokenPairs, sites: Sequence[Site | Sequence[Site]], *, direction: str = "noising",
                        metric: str = "logit_diff", per_position: bool = False, normalise: bool = True,
                        batch_size: int = 64) -> Tensor:
    """Effect of patching each component (a site, or a tuple of sites patched together) from the source run
    into the base run, at all positions at once or at each canonical position when `per_position`.
    Returns [component] or [component, pos]; normalised as in the module docstring, or the raw metric change
    (m_patched - m_base) when `normalise=False`."""
    groups = [(site(s),) if isinstance(s, (Site, str)) else tuple(map(site, s)) for s in sites]
    base, source = _runs(direction, tp)
    acts = capture(model, source, list(dict.fromkeys(s for g in groups for s in g)), batch_size=batch_size,
                   progress=False)
    m_clean = metric_values(model, tp.clean, tp, metric, batch_size=batch_size)
    m_corrupt = metric_values(model, tp.corrupt, tp, metric, batch_size=batch_size)
    positions = [[p] for p in range(base.ids.shape[1])] if per_position else [None]
    patched = torch.stack([torch.stack([
        metric_values(model, base, tp, metric, [replace(s, acts[s], positions=pos) for s in g], batch_size)
        for pos in positions]) for g in groups])  # [component, pos, pair]
    patched = patched if per_position else patched[:, 0]
    if normalise:
        return _normalise(patched, m_clean, m_corrupt, direction)
    m_base = m_clean if direction == "noising" else m_corrupt
    return (patched - m_base).mean(-1)


def attribution_patching(model, tp: TokenPairs, sites: Sequence[Site], *, direction: str = "noising",
                         metric: str = "logit_diff", normalise: bool = True, batch_size: int = 64) -> Tensor:
    """First-order estimate of `activation_patching` for every site at once: one forward on the source
    input, one forward plus one backward on the base input. Returns [site]."""
    base, source = _runs(direction, tp)
    src = capture(model, source, list(sites), logits=True, positions="all", batch_size=batch_size, progress=False)
    at_base = capture(model, base, list(sites), metric=_grad_metric(tp, metric), logits=True,
                      positions="all", batch_size=batch_size, progress=False)
    estimate = torch.stack([((src[s] - at_base[s]) * at_base.grad(s)).flatten(1).sum(1)
                            for s in sites])  # [site, pair] first-order metric changes
    if not normalise:
        return estimate.mean(-1)
    m_base, m_source = (metric_of(last_logits(a), tp.answer, tp.wrong, metric) for a in (at_base, src))
    m_clean, m_corrupt = (m_base, m_source) if direction == "noising" else (m_source, m_base)
    return estimate.mean(-1) / (m_clean.mean() - m_corrupt.mean())


def last_logits(acts) -> Float[Tensor, "pair vocab"]:
    """Each prompt's last-token logits from a capture with logits=True, positions='all'."""
    return acts["logits"][torch.arange(len(acts.tokens)), acts.tokens.lengths - 1]
