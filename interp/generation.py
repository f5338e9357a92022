"""Greedy generation under the model's active edits, through either backend.

Every step re-runs the whole sequence (no KV cache), so position-specific edits and replacements keep
their meaning and both backends give the same tokens. The KV-cached `TransformerBridge.generate` of
transformer-lens 4.3 is not used: on a random GPT-2 it picked a token outside the top 3 of the model's
own logits at step 3 (tests/test_generation.py keeps the check that ours matches Hugging Face's generate).

`generate_combined` runs several models of one tokenizer on the same sequence each step and takes the argmax of
`combine(next-token logits of each)`, e.g. model-diff amplification `(1 + a) l_tuned - a l_base`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.backends import run
from interp.prompts import Tokens, as_tokens

Combine = Callable[[list[Float[Tensor, "batch vocab"]]], Float[Tensor, "batch vocab"]]


def generate(model, prompts, max_new_tokens: int = 20, *, backend: str | None = None) -> list[Int[Tensor, " new"]]:
    """Greedy continuation of each prompt (strings, token-id lists or `Tokens`): [max_new_tokens] ids each."""
    return generate_combined([model], _only, prompts, max_new_tokens, backend=backend)


def _only(logits: list[Tensor]) -> Tensor:
    return logits[0]


def generate_combined(models: Sequence, combine: Combine, prompts, max_new_tokens: int = 20, *,
                      backend: str | None = None) -> list[Int[Tensor, " new"]]:
    """Greedy continuation of each prompt from `combine([next-token logits of each model])` (each model under its
    own active edits, logits in float32 on the CPU): [max_new_tokens] ids each. The models share a tokenizer
    (prompts are tokenised with the first one's)."""
    tokens = as_tokens(models[0], prompts)
    ids, lengths = tokens.ids.clone(), tokens.lengths.clone()
    rows = torch.arange(len(lengths))
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, ids.new_full((len(ids), 1), tokens.pad_id)], dim=1)
        batch = Tokens(ids, lengths, tokens.pad_id).batch(rows, "right")
        with torch.no_grad():
            logits = [run(m, batch, [], m.edits, None, backend).logits[rows, lengths - 1].float().cpu()
                      for m in models]
        ids[rows, lengths] = combine(logits).argmax(-1)
        lengths = lengths + 1
    return [ids[i, tokens.lengths[i]: lengths[i]] for i in range(len(lengths))]
