"""A BatchTopK crosscoder over paired base/tuned activations at one layer (Lindsey et al. 2024; Minder et al. 2025,
arXiv 2504.02922), with a compact trainer.

    f(x) = BatchTopK(ReLU(W_enc^PT h^PT + W_enc^FT h^FT + b_enc))       one shared dictionary of m latents
    h^M ~ W_dec^M f(x) + b_dec^M                                          one decoder per model

BatchTopK keeps the k * batch largest of f_j(x) (||d_j^PT|| + ||d_j^FT||) over a whole batch (so k latents per token
on average); at inference a latent fires where that score passes a threshold, the running mean of the smallest
score kept in training. Each model's activations are scaled by one number so that their mean squared norm is
d_model (stored; decoders are read in the activations' own units). Loss: the squared error of both models'
reconstructions over d_model, plus an auxiliary loss (weight `aux`) that fits the residual error with the top
`2 k` dead latents (latents that did not fire in the last `dead_after` tokens), as in Gao et al. 2024.

**Why a compact trainer**: SAELens (pip `sae-lens` 6.54) trains SAEs but no crosscoders and pins
transformer-lens < 4 (installing it would downgrade 4.3 to 3.9); `dictionary-learning` 0.1.0 pins nnsight < 0.4
(it would replace 0.8.1) and a CUDA torch build. Neither installs beside our stack unchanged.

Training data: `paired_activations` captures resid_post at `layer` of both models on every real token (position 0
left out by default: the same token in every text and, in real models, massive activations), in memory or, over the
memory budget, streamed to shards on disk (`interp.capture`) and read back one shard pair at a time.
`PairedActivations.from_stores` reads two activation stores of one corpus (`interp.store`) the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import einsum
from jaxtyping import Float, Int
from safetensors.torch import load_file
from torch import Tensor, nn

from interp.capture import DEFAULT_BUDGET, capture
from interp.errors import BadOption
from interp.models import Pair
from interp.prompts import PromptSet, Tokens, as_tokens
from interp.results import Result
from interp.sites import resid_post
from interp.store import ActivationStore


@dataclass
class PairedActivations:
    """resid_post.`layer` of base and tuned on the same tokens: rows [token, d_model] (`where` [token, 2] their
    (prompt, position)); `base`/`tuned` are the Activations captures, in memory or sharded, or two activation stores
    (`from_stores`: no `tokens` or `where`, `n_rows` rows)."""

    layer: int
    tokens: Tokens | None
    base: object
    tuned: object
    where: Int[Tensor, "token 2"] | None
    base_name: str = "base"
    tuned_name: str = "tuned"
    n_rows: int = 0
    skip_first: bool = False

    def __len__(self) -> int:
        return self.n_rows if self.where is None else len(self.where)

    @property
    def names(self) -> tuple[str, str]:
        return self.base_name, self.tuned_name

    @classmethod
    def from_tensors(cls, base: Float[Tensor, "token d_model"], tuned: Float[Tensor, "token d_model"],
                     layer: int = 0) -> PairedActivations:
        """Paired rows given directly (e.g. constructed data); `where` counts them as one prompt."""
        n = len(base)
        where = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], 1)
        return cls(layer, Tokens(torch.zeros(1, n, dtype=torch.long), torch.tensor([n]), 0), base, tuned, where)

    @classmethod
    def from_stores(cls, base: ActivationStore, tuned: ActivationStore, layer: int, *,
                    skip_first: bool = True) -> PairedActivations:
        """resid_post.`layer` of two activation stores of the same corpus, a shard pair a chunk; `skip_first` leaves
        out the first token of every window (of every forward, as `paired_activations` leaves out position 0)."""
        base.check_aligned(tuned)
        key = str(resid_post(layer))
        for store in (base, tuned):
            store.key(key)
        n = sum(int(_kept(base, i, skip_first).sum()) for i in range(base.n_shards))
        return cls(layer, None, base, tuned, None, base.name, tuned.name, n_rows=n, skip_first=skip_first)

    def _shards(self, acts) -> list[Path] | None:
        if isinstance(acts, Tensor) or acts.shard_dir is None:
            return None
        return sorted(acts.shard_dir.glob("shard-*.safetensors"))

    def n_chunks(self) -> int:
        if isinstance(self.base, ActivationStore):
            return self.base.n_shards
        shards = self._shards(self.base)
        return 1 if shards is None else len(shards)

    def chunk(self, i: int) -> tuple[Tensor, Tensor]:
        """(base rows, tuned rows) of shard pair `i` (the whole set when it is in memory), float32."""
        key = str(resid_post(self.layer))
        if isinstance(self.base, ActivationStore):
            kept = _kept(self.base, i, self.skip_first)
            return tuple(store.shard(i, [key])[key][kept].float() for store in (self.base, self.tuned))
        if isinstance(self.base, Tensor):
            return self.base.float(), self.tuned.float()
        if self.base.shard_dir is None:
            return self.base[key].float(), self.tuned[key].float()
        b, t = (load_file(self._shards(acts)[i])[key].float() for acts in (self.base, self.tuned))
        return b, t

    def chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Every chunk in order, one in memory at a time."""
        for i in range(self.n_chunks()):
            yield self.chunk(i)

    def batches(self, batch_size: int, seed: int = 0) -> Iterator[Float[Tensor, "batch 2 d_model"]]:
        """Shuffled batches [batch, model, d_model] for ever: chunk order and rows within a chunk reshuffled each
        epoch; a batch never spans two chunks."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            for c in torch.randperm(self.n_chunks(), generator=gen).tolist():
                x = torch.stack(self.chunk(c), 1)
                order = torch.randperm(len(x), generator=gen)
                for s in range(0, max(len(x) - batch_size + 1, 1), batch_size):
                    yield x[order[s: s + batch_size]]


def _kept(store: ActivationStore, i: int, skip_first: bool) -> Tensor:
    """[token] mask of the rows of shard `i` kept: all, or all but the first token of every window."""
    position = store.shard(i, ["position"])["position"]
    return position % store.window != 0 if skip_first else torch.ones_like(position, dtype=torch.bool)


def paired_activations(pair: Pair, prompts: PromptSet | Sequence[str] | Tokens, layer: int, *,
                       skip_first: bool = True, batch_size: int = 16, memory_budget: int = DEFAULT_BUDGET,
                       shard_dir: str | Path | None = None, backend: str | None = None) -> PairedActivations:
    """Both models' resid_post.`layer` on every real token of `prompts` (module docstring)."""
    tokens = as_tokens(pair.tuned, prompts)
    mask = tokens.mask.clone()
    if skip_first:
        mask[:, 0] = False
    kw = dict(positions=mask, batch_size=batch_size, memory_budget=memory_budget, backend=backend, progress=False)
    acts = [capture(m, tokens, [resid_post(layer)], shard_dir=None if shard_dir is None else Path(shard_dir) / side,
                    **kw) for m, side in zip(pair.models, ("base", "tuned"))]
    return PairedActivations(layer, tokens, acts[0], acts[1], acts[0].selected, pair.base.name, pair.tuned.name)


class Crosscoder(nn.Module):
    """The crosscoder (module docstring). Activations in and out are [batch, model, d_model] in their own units."""

    def __init__(self, d_model: int, n_latents: int, k: int, n_models: int = 2, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        dec = torch.randn(n_latents, n_models, d_model, generator=gen)
        dec = dec / dec.norm(dim=-1, keepdim=True) / n_models ** 0.5
        self.W_dec = nn.Parameter(dec)
        self.W_enc = nn.Parameter(dec.permute(1, 2, 0).clone())  # [model, d_model, latent]
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_model))
        self.register_buffer("scales", torch.ones(n_models))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.k = k

    def scores(self, x: Float[Tensor, "batch model d_model"]) -> tuple[Tensor, Tensor]:
        """(ReLU pre-activations, selection scores f_j * sum_M ||d_j^M||), both [batch, latent]."""
        pre = einsum(x * self.scales[:, None], self.W_enc, "b m d, m d l -> b l") + self.b_enc
        acts = pre.relu()
        return acts, acts * self.W_dec.norm(dim=-1).sum(-1)

    def encode(self, x: Float[Tensor, "batch model d_model"],
               batch_topk: bool = False) -> Float[Tensor, "batch latent"]:
        """Latent activations: the batch's top k * batch scores (`batch_topk`, training) or the threshold rule."""
        acts, score = self.scores(x)
        if batch_topk:
            keep = torch.zeros_like(score, dtype=torch.bool).flatten()
            keep[score.flatten().topk(min(self.k * len(x), score.numel())).indices] = True
            return acts * keep.view_as(acts)
        return acts * (score > self.threshold)

    def decode(self, f: Float[Tensor, "batch latent"]) -> Float[Tensor, "batch model d_model"]:
        return (einsum(f, self.W_dec, "b l, l m d -> b m d") + self.b_dec) / self.scales[:, None]

    def decoder(self, model: int) -> Float[Tensor, "latent d_model"]:
        """Decoder directions of model `model` (0 base, 1 tuned) in that model's activation units."""
        return self.W_dec[:, model] / self.scales[model]


@dataclass
class CrosscoderResult(Result):
    """A trained crosscoder (its weights) and its training curves: at each logged `step`, the fraction of variance
    unexplained of each model (`fvu_base`, `fvu_tuned`, on the batches since the last log) and the fraction of dead
    latents; `tokens_per_s` the training throughput."""

    ANALYSIS = "diffing"
    base: str
    tuned: str
    layer: int
    k: int
    weights: dict[str, Tensor]
    step: list[int]
    fvu_base: list[float]
    fvu_tuned: list[float]
    dead: list[float]
    tokens: int
    seconds: float
    tokens_per_s: float
    data_tokens: int = 0

    def module(self) -> Crosscoder:
        n_latents, n_models, d_model = self.weights["W_dec"].shape
        cc = Crosscoder(d_model, n_latents, self.k, n_models)
        cc.load_state_dict(self.weights)
        return cc.eval().requires_grad_(False)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"step": self.step, "fvu_base": self.fvu_base, "fvu_tuned": self.fvu_tuned,
                             "dead": self.dead})

    def plot(self, ax=None):
        from analyses.diffing.plots import plot_training

        return plot_training(self, ax)


def train_crosscoder(data: PairedActivations, *, expansion: int = 4, k: int = 8, steps: int = 1000,
                     batch_size: int = 256, lr: float = 1e-3, aux: float = 1 / 32, dead_after: int = 10_000,
                     log_every: int = 50, seed: int = 0, device: str | torch.device = "cpu") -> CrosscoderResult:
    """Train a BatchTopK crosscoder with `expansion * d_model` latents on `data` (module docstring)."""
    if len(data) == 0 or steps < 1 or k < 1:
        raise BadOption(f"crosscoder: {len(data)} tokens, {steps} steps, k={k}; need tokens, steps >= 1, k >= 1")
    batch_size = min(batch_size, len(data))
    first = data.chunk(0)
    d_model = first[0].shape[-1]
    cc = Crosscoder(d_model, expansion * d_model, k, seed=seed).to(device)
    x0 = torch.stack(first, 1).to(device)
    with torch.no_grad():
        cc.scales.copy_((d_model / x0.pow(2).sum(-1).mean(0)).sqrt())
        cc.b_dec.copy_((x0 * cc.scales[:, None]).mean(0))
    opt = torch.optim.Adam(cc.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(cc.W_dec.shape[0], device=device)
    log = {"step": [], "fvu_base": [], "fvu_tuned": [], "dead": []}
    window = torch.zeros(2, 2, device=device)  # [model, (error, variance)]
    start, gen = time.perf_counter(), data.batches(batch_size, seed)
    for step in range(1, steps + 1):
        x = next(gen).to(device)
        f = cc.encode(x, batch_topk=True)
        err = x - cc.decode(f)
        xs, es = x * cc.scales[:, None], err * cc.scales[:, None]
        loss = es.pow(2).sum(-1).mean(0).sum() / d_model
        since_fired = torch.where((f > 0).any(0), 0.0, since_fired + len(x))
        dead = since_fired >= dead_after
        if aux > 0 and dead.any():
            loss = loss + aux * _aux_loss(cc, x, es.detach(), dead, 2 * k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            kept = cc.scores(x)[1][f > 0]
            if kept.numel():
                cc.threshold.lerp_(kept.min(), 0.01 if step > 1 else 1.0)
            window += torch.stack([es.pow(2).sum((0, 2)), (xs - xs.mean(0)).pow(2).sum((0, 2))], 1)
        if step % log_every == 0 or step == steps:
            fvu = (window[:, 0] / window[:, 1].clamp_min(1e-12)).tolist()
            for key, value in zip(log, (step, *fvu, float(dead.float().mean()))):
                log[key].append(value)
            window.zero_()
    seconds = time.perf_counter() - start
    weights = {k_: v.detach().cpu().clone() for k_, v in cc.state_dict().items()}
    return CrosscoderResult(*data.names, data.layer, k, weights, log["step"], log["fvu_base"],
                            log["fvu_tuned"], log["dead"], steps * batch_size, seconds, steps * batch_size / seconds,
                            len(data), settings={"expansion": expansion, "k": k, "steps": steps,
                                                 "batch_size": batch_size, "lr": lr, "aux": aux,
                                                 "dead_after": dead_after, "seed": seed})


def _aux_loss(cc: Crosscoder, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """Normalised squared error of fitting the (scaled) residual with the top `k_aux` dead latents per token."""
    acts, _ = cc.scores(x)
    acts = acts.masked_fill(~dead, 0.0)
    top = acts.topk(min(k_aux, int(dead.sum())), dim=-1)
    f = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
    fit = einsum(f, cc.W_dec, "b l, l m d -> b m d")
    return (residual - fit).pow(2).sum(-1).mean() / residual.pow(2).sum(-1).mean().clamp_min(1e-12)
