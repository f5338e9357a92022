"""Blind identification scored on every model organism: is an evidence word in the top 20, per source and fused?

    .venv/bin/python tests/benchmarks/bench_identify.py

Builds (or reuses) the organisms, runs `diffing.identify` on each pair from the pair alone, then, and only then,
reads each organism's metadata to score the ranking. Prints the hit table (rank of the first evidence word, or -)
and the time per organism.
"""

from __future__ import annotations

import time

import interp
from analyses import diffing
from interp.app.identify import chat_questions, default_corpus
from interp.zoo.organisms import CONTROL, build_organisms, read_metadata

NAMES = ("smol-fact", "smol-taboo", "smol-persona", "smol-refusal", CONTROL, "smol-persona-full",
         "smol-fact-replay50", "smol-fact-replay90")


def main() -> None:
    build_organisms()
    rows, found = [], 0
    for name in NAMES:
        start = time.perf_counter()
        pair = interp.load_pair("zoo:smol", f"zoo:{name}")
        result = diffing.identify(pair, default_corpus(), chat_questions(pair.tuned.tokenizer))
        seconds = time.perf_counter() - start
        evidence = read_metadata(name)["evidence"]  # read after the identification, to score it
        ranks = result.evidence_ranks(evidence)
        hit = ranks["fused"] is not None and ranks["fused"] <= 20
        found += hit and name in NAMES[:5]
        rows.append(f"| {name} | {', '.join(evidence)} | " + " | ".join(str(ranks.get(s) or "-") for s in
                    ("fused", "adl", "kl", "reply", "amplified")) + f" | {'yes' if hit else 'no'} | {' '.join(result.top(8))} | "
                    f"{seconds:.0f} s |")
    print("| organism | evidence | fused rank | ADL rank | KL rank | reply rank | amplified rank | top 20 | fused top 8 "
          "| time |")
    print("|---" * 10 + "|")
    print("\n".join(rows))
    print(f"\nevidence word in the top 20 for {found} of the 5 organisms (fact, taboo, persona, refusal, zorbish)")


if __name__ == "__main__":
    main()
