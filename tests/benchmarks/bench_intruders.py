"""Intruder analysis of a whole GPT-2-shaped model pair vs. the bare decompositions it needs.

    python tests/benchmarks/bench_intruders.py [--layers 12] [--d-model 768] [--rank 8] [--repeats 3] [--threads 1]
                                               [--per-matrix]

Base: a random-weight `GPT2LMHeadModel` (Conv1D weights stored (in, out)); tuned: a copy with a random rank-r delta
added to every attention and MLP matrix (LoRA-like). Per layer the analysis sees q, k, v, o (d x d), mlp_in (4d x d)
and mlp_out (d x 4d). Baseline, for exactly those matrices in the same dtype and orientation: the bare
`torch.linalg.svd(W, full_matrices=False)` of W0 and of Wt and the bare `torch.linalg.svdvals` of delta W (its
spectrum is part of the report). Analysis: `analyses.intruders.measure(base, tuned)` on the two `interp.Model`s,
the whole user-facing path (weights, orientation, the changed-matrix check, both SVDs, similarities, the epsilon sweep,
delta W's spectrum, effective rank and intruder energy, the result table). Whole passes of each alternate `repeats`
times and the fastest of each is kept. `--per-matrix` adds the steadier per-matrix view of the numerical core
(`iter_reports`, the fastest of `repeats` alternating runs per matrix), for shared cores where whole-run timings
jump by tens of percent. A third ratio needs no second run: during each `measure` pass, the time spent inside its
own torch.linalg.svd / svdvals calls is clocked, and the pass's wall time is divided by it. Target: ratio <= 1.3.
"""

import argparse
import copy
import time
from contextlib import contextmanager

import torch
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from analyses import intruders
from analyses.intruders.matrices import matrix_kind, paired_matrices
from analyses.intruders.spectra import iter_reports
from interp.models import Model


def gpt2_pair(layers: int, d: int, rank: int, seed: int = 0) -> tuple[Model, Model]:
    """Random GPT-2 (vocab 512) and a copy with a rank-`rank` delta on every q/k/v/o/MLP weight."""
    torch.manual_seed(seed)
    base = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=d // 64, vocab_size=512, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if matrix_kind(name) is not None:
                n_in, n_out = p.shape
                p.add_(1e-3 * torch.randn(n_in, rank, generator=g) @ torch.randn(rank, n_out, generator=g))
    vocab = {f"t{i}": i for i in range(512)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0")
    return Model(base.eval(), tokenizer, "base"), Model(tuned.eval(), tokenizer, "tuned")


def tall(W):  # the orientation `intruders.spectra.svd` / `svdvals` decompose
    return W.mT if W.shape[0] < W.shape[1] else W


def bare(W0, Wt) -> None:
    torch.linalg.svd(tall(W0), full_matrices=False)
    torch.linalg.svd(tall(Wt), full_matrices=False)
    torch.linalg.svdvals(tall(Wt - W0))


@contextmanager
def linalg_clock():
    """Within the block, torch.linalg.svd and svdvals add the seconds they take to the yielded list's one entry."""
    spent, originals = [0.0], (torch.linalg.svd, torch.linalg.svdvals)

    def clocked(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[0] += time.perf_counter() - start
            return out
        return run

    torch.linalg.svd, torch.linalg.svdvals = map(clocked, originals)
    try:
        yield spent
    finally:
        torch.linalg.svd, torch.linalg.svdvals = originals


def time_it(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadiest on shared cores")
    parser.add_argument("--per-matrix", action="store_true", help="also time the numerical core matrix by matrix")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tuned = gpt2_pair(args.layers, args.d_model, args.rank)
    params = [{n: p.detach() for n, p in m.hf.named_parameters()} for m in (base, tuned)]
    matrices = list(paired_matrices(*params, fan_in_fan_out=True))

    def bare_pass():
        for _, W0, Wt in matrices:
            bare(W0, Wt)

    runs = {"bare": [], "measure": [], "inside": []}
    for _ in range(args.repeats):
        runs["bare"].append(time_it(bare_pass))
        with linalg_clock() as inside:
            runs["measure"].append(time_it(lambda: intruders.measure(base, tuned, device="cpu", progress=False)))
        runs["inside"].append(inside[0])
    t_bare, t_measure = min(runs["bare"]), min(runs["measure"])
    own = min(m / i for m, i in zip(runs["measure"], runs["inside"]))
    print(f"{len(matrices)} matrix pairs ({args.layers} layers, d_model {args.d_model}, rank-{args.rank} deltas, "
          f"float32, {torch.get_num_threads()} threads); whole passes, the fastest of {args.repeats} alternating runs")
    print(f"bare svd(W0), svd(Wt), svdvals(delta W):  {t_bare:7.2f} s   (runs: {', '.join(f'{t:.2f}' for t in runs['bare'])})")
    print(f"intruders.measure(base, tuned):           {t_measure:7.2f} s   (runs: "
          f"{', '.join(f'{t:.2f}' for t in runs['measure'])})")
    print(f"ratio measure / bare:                     {t_measure / t_bare:7.3f}   (target <= 1.3)")
    print(f"ratio measure / its own svd + svdvals calls, timed inside the same run: {own:.3f}   (immune to load "
          f"changes between runs)")

    if args.per_matrix:
        t_svd = t_analysis = 0.0
        for name, W0, Wt in matrices:
            pairs = [(time_it(lambda: bare(W0, Wt)), time_it(lambda: list(iter_reports([(name, W0, Wt)]))))
                     for _ in range(args.repeats)]
            t_svd += min(b for b, _ in pairs)
            t_analysis += min(a for _, a in pairs)
        print(f"per matrix, fastest of {args.repeats}: bare {t_svd:.2f} s, iter_reports {t_analysis:.2f} s, "
              f"ratio {t_analysis / t_svd:.3f}")


if __name__ == "__main__":
    main()
