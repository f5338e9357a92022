"""Main-job cost (run on demand: `python tests/benchmarks/bench_report.py [--quick]`).

Runs the default zoo report (base vs full, LoRA r=1 and r=8) into a temporary folder and prints the wall time of
each section and of the whole report, each also as a ratio to a reference workload timed in the same run (TuCo of
zoo:full on 64 target prompts, about 10 s on a quiet 2-core machine), so that runs on a loaded machine compare.
Target: the report under 10 minutes on 2 cores (with the zoo build, the README command under 15 minutes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the quick report instead")
    args = parser.parse_args()

    from analyses import tuco
    from interp import load_pair, zoo
    from interp.report import run_report

    zoo.build(progress=False)
    pair = load_pair("zoo:base", "zoo:full")
    prompts = [e.prompt for e in zoo.task_prompts(zoo.TARGET_SKILL, 64, split="test")]
    tuco.measure(pair, prompts[:4], progress=False)  # warm up the backends
    start = time.perf_counter()
    tuco.measure(pair, prompts, progress=False)
    reference = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_report(Path(tmp) / "report", quick=args.quick)
        total = time.perf_counter() - start
        sections = json.loads((Path(tmp) / "report" / "summary.json").read_text())["sections"]
    print(f"reference (TuCo of zoo:full, 64 prompts): {reference:.1f} s")
    for s in sections:
        status = "FAILED" if s["error"] else ""
        print(f"{s['name']:<10} {s['seconds']:7.1f} s  {s['seconds'] / reference:6.1f} x reference {status}")
    print(f"{'report':<10} {total:7.1f} s  {total / reference:6.1f} x reference  (target: under 600 s)")


if __name__ == "__main__":
    main()
