"""Main-job cost (run on demand: `python tests/benchmarks/bench_report.py [--quick] [--fresh]`).

Runs the default zoo report (base vs full, LoRA r=1 and r=8) into a temporary folder and prints the wall time of
the zoo build, of each lens and of the whole report, each lens also as a ratio to a reference workload timed in the
same run (TuCo of zoo:full on 64 target prompts, about 10 s on a quiet 2-core machine), so that runs on a loaded
machine compare. `--fresh` starts from an empty zoo cache (a temporary INTERP_ZOO_DIR), as a newcomer's first
`interp report` does: the report builds only the zoo models it names. Targets: the first complete report within
5 minutes of setup on an idle 2-core machine (with --fresh); the report alone under 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the quick report instead")
    parser.add_argument("--fresh", action="store_true", help="from an empty zoo cache (times the zoo build too)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.fresh:
            os.environ["INTERP_ZOO_DIR"] = str(Path(tmp) / "zoo")
        from analyses import tuco
        from interp import load_pair, zoo
        from interp.app.report import run_report

        start = time.perf_counter()
        run_report(Path(tmp) / "report", quick=args.quick)
        total = time.perf_counter() - start
        summary = json.loads((Path(tmp) / "report" / "summary.json").read_text())
        pair = load_pair("zoo:base", "zoo:full")
        prompts = [e.prompt for e in zoo.task_prompts(zoo.TARGET_SKILL, 64, split="test")]
        tuco.measure(pair, prompts[:4], progress=False)  # warm up the backends
        t0 = time.perf_counter()
        tuco.measure(pair, prompts, progress=False)
        reference = time.perf_counter() - t0
        built = sorted(p.name for p in zoo.zoo_dir().iterdir() if (p / "zoo.json").is_file())
    sections = summary["sections"]
    lenses = sum(s["seconds"] for s in sections)
    print(f"reference (TuCo of zoo:full, 64 prompts): {reference:.1f} s")
    print(f"zoo build and loading: {total - lenses:7.1f} s" + (f" (built: {', '.join(built)})" if args.fresh else ""))
    elapsed = total - lenses
    for s in sections:
        elapsed += s["seconds"]
        status = "FAILED" if s["error"] else ""
        print(f"{s['name']:<10} {s['seconds']:7.1f} s  {s['seconds'] / reference:6.1f} x reference  "
              f"(page with it at {elapsed:6.1f} s) {status}")
    target = "first report within 300 s of setup" if args.fresh else "under 600 s"
    print(f"{'report':<10} {total:7.1f} s  {total / reference:6.1f} x reference  (target: {target})")


if __name__ == "__main__":
    main()
