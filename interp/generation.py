"""Greedy generation under the model's active edits, through either backend.

Every step re-runs the whole sequence (no KV cache), so position-specific edits and replacements keep
their meaning and both backends give the same tokens. The KV-cached `TransformerBridge.generate` of
transformer-lens 4.3 is not used: on a random GPT-2 it picked a token outside the top 3 of the model's
own logits at step 3 (tests/test_generation.py keeps the check that ours matches Hugging Face's generate).
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from interp.backends import run
from interp.prompts import Tokens, tokenize


def generate(model, prompts, max_new_tokens: int = 20, *, backend: str | None = None) -> list[Int[Tensor, " new"]]:
    """Greedy continuation of each prompt (strings, token-id lists or `Tokens`): [max_new_tokens] ids each."""
    tokens = prompts if isinstance(prompts, Tokens) else tokenize(model.tokenizer, prompts, max_length=model.n_ctx)
    ids, lengths = tokens.ids.clone(), tokens.lengths.clone()
    rows = torch.arange(len(lengths))
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, ids.new_full((len(ids), 1), tokens.pad_id)], dim=1)
        batch = Tokens(ids, lengths, tokens.pad_id).batch(rows, "right")
        with torch.no_grad():
            logits = run(model, batch, [], model.edits, None, backend).logits
        ids[rows, lengths] = logits[rows, lengths - 1].argmax(-1).cpu()
        lengths = lengths + 1
    return [ids[i, tokens.lengths[i]: lengths[i]] for i in range(len(lengths))]
