"""Anatomy of a whole GPT-2-shaped model pair from disk vs. reading both state dicts plus the SVDs it needs.

    python tests/benchmarks/bench_weights.py [--layers 12] [--d-model 768] [--repeats 3] [--threads 1]

Base: a random-weight `GPT2LMHeadModel` (vocab 512, 64 positions) saved as a Hugging Face folder; tuned: a copy with
random noise (1e-2) on every parameter, saved beside it. Baseline: `safetensors.torch.load_file` of both folders,
then for every matrix the anatomy reads (q, k, v thirds of c_attn, o, mlp_in, mlp_out per layer; the token and
position embeddings) the bare `torch.linalg.svdvals` of delta W and of W0 in the tall orientation. Anatomy:
`analyses.weights.measure(base_folder, tuned_folder)`, the whole user-facing path (the meta-device model for the
layout, safetensors read tensor by tensor, every part's norms, both spectra, the effective rank, the Result).
Whole passes alternate `repeats` times and the fastest of each is kept. Target: ratio <= 1.5.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from analyses import weights
from analyses.weights.sources import meta_model


def save_pair(root: Path, layers: int, d: int, seed: int = 0) -> tuple[Path, Path]:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=d // 64, vocab_size=512, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def tall(W):
    return W.mT if W.shape[0] < W.shape[1] else W


def baseline(base: Path, tuned: Path, matrices) -> None:
    """Read both state dicts, then svdvals of delta W and W0 of every matrix the anatomy decomposes."""
    b, t = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    for piece in matrices:
        W0, Wt = piece.view(b[piece.param]), piece.view(t[piece.param])
        torch.linalg.svdvals(tall(Wt - W0))
        torch.linalg.svdvals(tall(W0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("--layers", 12), ("--d-model", 768), ("--repeats", 3), ("--threads", 1)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # 1: steadiest on shared cores
    with tempfile.TemporaryDirectory() as tmp:
        base, tuned = save_pair(Path(tmp), args.layers, args.d_model)
        hf = meta_model(base)
        transposed = {f"{n}.weight" for n, m in hf.named_modules() if type(m).__name__ == "Conv1D"}
        matrices = [p.matrix for p in weights.model_parts(hf, transposed) if p.matrix is not None]
        passes = {"baseline": lambda: baseline(base, tuned, matrices),
                  "anatomy": lambda: weights.measure(base, tuned, device="cpu")}
        runs = {name: [] for name in passes}
        for _ in range(args.repeats):  # alternating, so a change of load hits both
            for name, run in passes.items():
                start = time.perf_counter()
                run()
                runs[name].append(time.perf_counter() - start)
    t_base, t_anat = min(runs["baseline"]), min(runs["anatomy"])
    print(f"{len(matrices)} matrices ({args.layers} layers, d_model {args.d_model}, float32, {args.threads} threads); "
          f"whole passes, the fastest of {args.repeats} alternating runs")
    print(f"read both state dicts + svdvals(dW), svdvals(W0): {t_base:7.2f} s   (runs: "
          f"{', '.join(f'{t:.2f}' for t in runs['baseline'])})")
    print(f"weights.measure(base_folder, tuned_folder):       {t_anat:7.2f} s   (runs: "
          f"{', '.join(f'{t:.2f}' for t in runs['anatomy'])})")
    print(f"ratio anatomy / baseline:                         {t_anat / t_base:7.3f}   (target <= 1.5)")


if __name__ == "__main__":
    main()
