"""Reading vectors out through a model's own head: the logit lens (final norm, then unembedding).

    logits = logit_lens(model, delta)            # delta [..., d_model] -> [..., vocab]
    top_tokens(model, logits, 10)                # the 10 highest-scoring tokens of each row, as strings

The final-norm module is the one `interp.backends.architectures` names for the model's family (the one place that
knows module names); the unembedding is the model's output embedding (with its bias, if it has one), followed by the
final logit soft-capping of the families that have one (Gemma 2), as in the model's own forward.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def logit_lens(model, vectors: Float[Tensor, "... d_model"], *, norm: bool = True) -> Float[Tensor, "... vocab"]:
    """Logits of `vectors` read as residual-stream states of `model`: unembed(final_norm(v)) (`norm=False`: the
    unembedding alone). Computed on the model's device and dtype, returned on the CPU in float32."""
    hf = model.hf
    head = hf.get_output_embeddings()
    x = vectors.to(model.device, model.dtype)
    with torch.no_grad():
        if norm:
            x = hf.get_submodule(model.architecture.final_norm)(x)
        logits = head(x)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits.float().cpu()


def top_tokens(model, logits: Float[Tensor, "... vocab"], k: int = 10) -> list:
    """The `k` highest-scoring tokens (decoded strings) of each row of `logits`, nested like its leading dims."""
    ids = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return token_strings(model, ids)


def token_strings(model, ids: Tensor) -> list:
    """Token ids [...] as decoded strings, nested like `ids` (a single id gives a string)."""
    if ids.dim() == 0:
        return model.tokenizer.decode([int(ids)])
    return [token_strings(model, row) for row in ids]
