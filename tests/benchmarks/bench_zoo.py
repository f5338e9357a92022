"""Zoo build time (run on demand: `python tests/benchmarks/bench_zoo.py`).

Builds the whole zoo from scratch into a temporary folder and prints the wall time of each model and of
the whole build against the 8-minute target, plus each model's accuracies. The build uses one torch thread
(`registry.THREADS`), so the ratio is the number to compare across machines with 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

TARGET_S = 8 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["INTERP_ZOO_DIR"] = tmp
        import interp.zoo as zoo

        start = time.perf_counter()
        zoo.build(seed=args.seed, progress=True)
        total = time.perf_counter() - start
        load = os.getloadavg()[0]
        for name in zoo.MODEL_NAMES:
            info = json.loads((Path(tmp) / name / "zoo.json").read_text())
            acc = " ".join(f"{k} {100 * v:.1f}" for k, v in info["accuracy"].items())
            print(f"{name:9s} trained {info.get('train_seconds', 0):6.1f} s   {acc}")
        print(f"whole zoo: {total:.1f} s = {total / TARGET_S:.2f} x the 8-minute target (load average {load:.1f})")


if __name__ == "__main__":
    main()
