"""Activation-store benchmark (run on demand: `OMP_NUM_THREADS=1 python tests/benchmarks/bench_store.py`).

A synthetic corpus of `--tokens` tokens (default 1M; documents of 1 to 8 zoo task examples, so that some are longer
than the tiny zoo's 48-token context and are cut into windows) streams through `capture_corpus` into an activation
store of zoo:base and one of zoo:full (resid_post.1 and resid_post.3, float32), then from the stores through LID
(`lid.measure_stores`, 60k tokens per site) and the shift dictionary fitting (`shift.measure_stores`: streamed
K-means with K = 20 and the concept shifts). Each stage runs in a fresh process, so that its peak resident memory
is its own; it is reported above the process's level before the stage (interpreter, libraries and the loaded model)
and as a ratio to the memory budget plus the model's size (target <= 1.00: nothing grows with the corpus). The store's
size on disk is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SITES = ["resid_post.1", "resid_post.3"]


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def write_corpus(path: Path, tokens: int, seed: int = 0) -> int:
    """Documents of 1 to 8 zoo examples ("prompt answer"), written one a line until about `tokens` tokens (a word is
    a token, plus a BOS per document); returns the number of documents."""
    from interp import zoo

    rng = random.Random(seed)
    pool = [f"{e.prompt} {e.answer}" for skill in (*zoo.SKILLS, zoo.TARGET_SKILL)
            for e in zoo.task_prompts(skill, 2000, seed=seed, split="train")]
    written = documents = 0
    with path.open("w") as f:
        while written < tokens:
            line = " ".join(rng.choice(pool) for _ in range(rng.randint(1, 8)))
            f.write(line + "\n")
            written += len(line.split()) + 1
            documents += 1
    return documents


def stage(name: str, root: Path, budget_mib: int, workers: int) -> dict:
    """One stage in this (fresh) process: its time, tokens per second and peak memory above its starting level."""
    from analyses import lid, shift
    from interp.store import ActivationStore, capture_corpus

    os.environ["INTERP_MEMORY_BUDGET"] = str(budget_mib * 2**20)
    corpus, model_mib = root / "corpus.txt", 0.0
    if name.startswith("capture"):
        import interp

        spec = f"zoo:{name.split('-')[1]}"
        model = interp.load_model(spec)
        model_mib = sum(p.numel() * p.element_size() for p in model.hf.parameters()) / 2**20
        interp.capture(model, ["copy a b c ="], SITES, progress=False)  # boots the bridge before the baseline
    before = _rss_mib("VmRSS")
    start = time.perf_counter()
    if name.startswith("capture"):
        target = model if workers == 0 else spec
        store = capture_corpus(target, corpus, root / name.split("-")[1], SITES, batch_size=64,
                               workers=workers or None, progress=False)
        tokens = len(store)
    elif name == "lid":
        store = ActivationStore(root / "base")
        clouds = dict(lid.store_clouds(store, SITES, n_tokens=60_000))  # the store's part alone, first
        reading = _rss_mib("VmHWM") - before
        del clouds
        result = lid.measure_stores({"base": store}, SITES, n_tokens=60_000, memory_budget=budget_mib * 2**20)
        tokens = len(store)
        means = ", ".join(f"{s} mean {result.mean('base', s):.2f} on {len(result.lid['base', s])} points"
                          for s in SITES)
        print(f"  LID: {means}; drawing the clouds from the store alone peaked {reading:.0f} MiB above the start "
              f"of the stage", file=sys.stderr)
    else:
        base, full = ActivationStore(root / "base"), ActivationStore(root / "full")
        result = shift.measure_stores(base, full, SITES[-1], k=20, batch_size=8192)
        tokens = len(base)
        print(f"  shift: |global shift| {float(result.global_shift.norm()):.3f}, concept rel. error "
              f"{float(result.rel_error[:, 2].mean()):.3f} vs h_base alone {float(result.rel_error[:, 0].mean()):.3f}",
              file=sys.stderr)
    seconds = time.perf_counter() - start
    return {"stage": name, "seconds": seconds, "tokens": tokens, "before_mib": before,
            "peak_mib": _rss_mib("VmHWM"), "model_mib": model_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--budget-mib", type=int, default=1024, help="the memory budget of every stage")
    parser.add_argument("--workers", type=int, default=0, help="Ray workers for the captures (0: in process)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.root, args.budget_mib, args.workers)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        documents = write_corpus(root / "corpus.txt", args.tokens)
        print(f"corpus: {documents} documents, about {args.tokens} tokens; memory budget {args.budget_mib} MiB, "
              f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
        for name in ("capture-base", "capture-full", "lid", "shift"):
            done = subprocess.run([sys.executable, __file__, "--stage", name, "--root", str(root), "--budget-mib",
                                   str(args.budget_mib), "--workers", str(args.workers)],
                                  check=True, capture_output=True, text=True)
            sys.stderr.write("".join(line + "\n" for line in done.stderr.splitlines() if line.startswith("  ")))
            r = json.loads(done.stdout.strip().splitlines()[-1])
            grown = r["peak_mib"] - r["before_mib"]
            disk = sum(p.stat().st_size for p in (root / "base").glob("shard-*")) / 2**20 if name != "lid" else 0
            print(f"{name:<13} {r['seconds']:7.1f} s  {r['tokens'] / r['seconds']:9.0f} tokens/s  peak RSS "
                  f"{r['peak_mib']:6.0f} MiB ({grown:5.0f} above the {r['before_mib']:.0f} MiB before it; ratio to "
                  f"budget + model {grown / (args.budget_mib + r['model_mib']):.2f})"
                  + (f"  store of zoo:base on disk {disk:.0f} MiB" if disk else ""))


if __name__ == "__main__":
    main()
