"""Capture benchmarks (run on demand: `python tests/benchmarks/bench_capture.py`).

1. Overhead: hooked capture of every layer's resid_post vs the plain forward of the same model on the same
   batch, for a 12-layer d_model=768 random-weight GPT-2-shaped model. Target ratio <= 1.10 on CPU.
2. Memory: a capture several times larger than the memory budget streams to shards; the process's peak
   resident memory above its level after loading the model stays within budget + model size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _model_dir(root: Path, layers: int = 12, d_model: int = 768) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import word_tokenizer

    path = root / f"gpt2-{layers}x{d_model}"
    if not path.exists():
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d_model, n_head=d_model // 64, vocab_size=96,
                                   n_positions=256)).save_pretrained(path)
        word_tokenizer().save_pretrained(path)
    return path


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def overhead(root: Path, batch: int, seq: int, repeats: int) -> None:
    import interp
    from interp.backends import run
    from interp.prompts import Tokens
    from interp.sites import every_layer

    model = interp.load_model(_model_dir(root))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (batch, seq), generator=g)
    tokens = Tokens(ids, torch.full((batch,), seq), 0)
    sites = every_layer("resid_post", model.n_layers)
    one_batch = tokens.batch(torch.arange(batch))

    def hf_forward():
        with torch.no_grad():
            model.hf(ids, attention_mask=one_batch.attention_mask)

    def bridge_forward():
        with torch.no_grad():
            run(model, one_batch, [], [], None, "bridge")

    def captured():
        interp.capture(model, tokens, sites, batch_size=batch, progress=False)

    for backend in ("bridge", "nnsight"):
        interp.capture(model, tokens, sites, batch_size=batch, backend=backend, progress=False)  # warm-up
    hf_forward(), bridge_forward()
    t_hf, t_bridge, t_capture = (_best_of(f, repeats) for f in (hf_forward, bridge_forward, captured))
    t_nnsight = _best_of(lambda: interp.capture(model, tokens, sites, batch_size=batch, backend="nnsight",
                                                progress=False), repeats)
    print(f"capture overhead, 12 x 768 GPT-2, batch {batch} x {seq} tokens, best of {repeats}:")
    print(f"  plain HF forward            {t_hf * 1e3:8.1f} ms")
    print(f"  bridge forward, no hooks    {t_bridge * 1e3:8.1f} ms")
    print(f"  capture all resid_post      {t_capture * 1e3:8.1f} ms   ratio vs plain forward {t_capture / t_hf:.3f}"
          f"  (target <= 1.10)")
    print(f"  same through nnsight        {t_nnsight * 1e3:8.1f} ms   ratio vs plain forward {t_nnsight / t_hf:.3f}")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(root: Path, budget_mib: int) -> None:
    """Runs in a fresh process so that its peak resident memory belongs to this capture alone."""
    import interp
    from interp.sites import every_layer

    model = interp.load_model(_model_dir(root, layers=6, d_model=512))
    model_mib = sum(p.numel() * p.element_size() for p in model.hf.parameters()) / 2**20
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 96, (256, 128), generator=g).tolist()
    interp.capture(model, prompts[:2], ["resid_post.0"], progress=False)  # warm-up (boots the bridge)
    before = _rss_kib("VmRSS") / 1024
    acts = interp.capture(model, prompts, every_layer("resid_post", model.n_layers), batch_size=8,
                          memory_budget=budget_mib * 2**20, shard_dir=root / "shards", progress=False)
    peak = _rss_kib("VmHWM") / 1024
    total = sum(p.stat().st_size for p in acts.shard_dir.glob("shard-*")) / 2**20
    print(f"memory: capture of {total:.0f} MiB (budget {budget_mib} MiB, model {model_mib:.0f} MiB) streamed to "
          f"{len(list(acts.shard_dir.glob('shard-*')))} shards; peak RSS above the loaded model: "
          f"{peak - before:.0f} MiB, ratio to budget + model {(peak - before) / (budget_mib + model_mib):.2f} "
          f"(target <= 1.00)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-mib", type=int, default=128)
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.budget_mib)
        return
    with tempfile.TemporaryDirectory() as tmp:
        overhead(Path(tmp), args.batch, args.seq, args.repeats)
        subprocess.run([sys.executable, __file__, "--memory-child", tmp, "--budget-mib", str(args.budget_mib)],
                       check=True)


if __name__ == "__main__":
    main()
