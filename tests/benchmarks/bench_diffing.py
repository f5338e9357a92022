"""Benchmark: the cost of per-token KL and of the ADL against a plain base plus tuned forward over the same tokens,
and the crosscoder's training throughput.

Run on demand, not under pytest:

    python tests/benchmarks/bench_diffing.py                                   # tiny zoo: zoo:base vs zoo:full
    python tests/benchmarks/bench_diffing.py --base zoo:smol --tuned zoo:smol-full --n 64 --device cuda

Target: KL and ADL each <= 1.2x the two forwards (the ADL runs only the first k tokens of each text, and is compared
with two forwards over those same k tokens). Each timing is the best of `--repeats` in this one run.
"""

import argparse
import time

import torch

from analyses import diffing
from interp.app import zoo_defaults
from interp.backends import run
from interp.models import load_pair
from interp.prompts import Tokens, as_tokens


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def forwards(pair, tokens: Tokens, batch_size: int) -> None:
    with torch.no_grad():
        for model in pair.models:
            for batch in tokens.batches(batch_size):
                run(model, batch, [], [], None).logits.sum().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="zoo:base")
    p.add_argument("--tuned", default="zoo:full")
    p.add_argument("--n", type=int, default=256, help="texts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=300, help="crosscoder training steps")
    args = p.parse_args()
    pair = load_pair(args.base, args.tuned, device=args.device)
    sets = zoo_defaults.prompt_sets(args.base, args.n)
    other = list(sets.values())[1]
    texts = [f"{q} {a}" for q, a in zip(other.prompts, other.answers)] if other.answers else other.prompts
    tokens = as_tokens(pair.tuned, texts)
    k = diffing.POSITIONS
    short = Tokens(tokens.ids[:, :k], tokens.lengths.clamp(max=k), tokens.pad_id)
    bs, r = args.batch_size, args.repeats
    ref = best(lambda: forwards(pair, tokens, bs), r)
    kl = best(lambda: diffing.measure_kl(pair, tokens, batch_size=bs), r)
    ref_short = best(lambda: forwards(pair, short, bs), r)
    adl = best(lambda: diffing.measure_adl(pair, tokens, batch_size=bs), r)
    n_tok = int(tokens.mask.sum())
    print(f"{args.base} vs {args.tuned}, {len(tokens)} texts, {n_tok} tokens, device {args.device}")
    print(f"KL:  {kl:.3f} s vs two forwards {ref:.3f} s -> ratio {kl / ref:.2f} (target <= 1.2)")
    print(f"ADL: {adl:.3f} s vs two forwards over the first {k} tokens {ref_short:.3f} s -> ratio "
          f"{adl / ref_short:.2f} (target <= 1.2)")
    data = diffing.paired_activations(pair, tokens, pair.base.n_layers // 2)
    cc = diffing.train_crosscoder(data, steps=args.steps, device=args.device)
    print(f"crosscoder: {cc.weights['W_dec'].shape[0]} latents, k={cc.k}, {cc.tokens} tokens in {cc.seconds:.2f} s "
          f"-> {cc.tokens_per_s:,.0f} tokens/s; final FVU base {cc.fvu_base[-1]:.3f}, tuned {cc.fvu_tuned[-1]:.3f}")


if __name__ == "__main__":
    main()
