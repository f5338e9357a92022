"""TuCo cost (run on demand: `python tests/benchmarks/bench_tuco.py`).

Time of `tuco.measure` divided by (tuned forward + base forward) on the same batch, for a 12-layer
d_model=768 random-weight GPT-2-shaped pair whose blocks differ. Target ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    import interp
    from analyses import tuco
    from conftest import word_tokenizer
    from interp.prompts import Tokens

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=96, n_positions=256)
        base = GPT2LMHeadModel(cfg)
        base.save_pretrained(f"{tmp}/base")
        with torch.no_grad():
            for block in base.transformer.h:
                block.mlp.c_fc.weight.add_(0.01 * torch.randn_like(block.mlp.c_fc.weight))
        base.save_pretrained(f"{tmp}/tuned")
        for name in ("base", "tuned"):
            word_tokenizer().save_pretrained(f"{tmp}/{name}")
        pair = interp.load_pair(f"{tmp}/base", f"{tmp}/tuned")
        ids = torch.randint(2, 96, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        tokens = Tokens(ids, torch.full((args.batch,), args.seq), 0)

        def forwards():
            with torch.no_grad():
                pair.tuned.hf(ids)
                pair.base.hf(ids)

        def measured():
            tuco.measure(pair, tokens, batch_size=args.batch, progress=False)

        measured(), forwards()  # warm-up
        best = {}
        for name, fn in (("forwards", forwards), ("measure", measured)):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best[name] = min(times)
    print(f"TuCo on a 12 x 768 GPT-2 pair, batch {args.batch} x {args.seq}, best of {args.repeats}:")
    print(f"  tuned + base plain forwards  {best['forwards'] * 1e3:8.1f} ms")
    print(f"  tuco.measure                 {best['measure'] * 1e3:8.1f} ms   ratio {best['measure'] / best['forwards']:.3f}"
          f"  (target <= 1.15)")


if __name__ == "__main__":
    main()
