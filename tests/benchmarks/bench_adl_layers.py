"""The Activation Difference Lens' readout at every layer of every model organism: is an evidence word in the top 20?

    .venv/bin/python tests/benchmarks/bench_adl_layers.py

`identify` reads the ADL at the last layer; Minder et al. 2025 read the middle one. For each organism this measures
the ADL once on the unrelated prose (first 5 positions), reads delta_l through the tuned model's logit lens at every
layer (the mean over positions 1..4, as `ADLResult.promoted`), leaves out the tokens `identify` leaves out, and then,
only then, reads the organism's metadata to print the rank of the first evidence word per layer (- beyond 50), and
the layer the label-free layer score picks.
"""

from __future__ import annotations

import interp
from analyses import diffing
from analyses.diffing.identify import cleaned, left_out
from interp.app.identify import default_corpus
from interp.readout import logit_lens, token_strings
from interp.zoo.organisms import CONTROL, build_organisms, read_metadata

NAMES = ("smol-fact", "smol-taboo", "smol-persona", "smol-refusal", CONTROL)


def main() -> None:
    build_organisms()
    corpus = default_corpus()
    table, picked = {}, {}  # picked: the label-free layer score's choice (measure_adl(layer="score"))
    for name in NAMES:
        pair = interp.load_pair("zoo:smol", f"zoo:{name}")
        adl = diffing.measure_adl(pair, corpus)
        dropped = left_out(pair, diffing.measure_kl(pair, corpus).base_logprob)
        rankings = [cleaned(token_strings(pair.tuned, logit_lens(pair.tuned, adl.delta[layer, 1:].float())
                                          .mean(0).topk(4 * 50).indices), dropped, 50)
                    for layer in range(pair.base.n_layers)]
        evidence = read_metadata(name)["evidence"]  # read after the readout, to score it
        table[name] = [diffing.evidence_rank(r, evidence) for r in rankings]
        picked[name] = int(adl.layer_score.argmax())
    n_layers = len(next(iter(table.values())))
    found = [sum(ranks[layer] is not None and ranks[layer] <= 20 for ranks in table.values())
             for layer in range(n_layers)]  # organisms with an evidence word in the layer's top 20
    print("| layer | " + " | ".join(table) + " | in top 20 |")
    print("|---" * (len(table) + 2) + "|")
    for layer in range(n_layers):
        print(f"| {layer} | " + " | ".join(str(table[name][layer] or "-") for name in table)
              + f" | {found[layer]} of {len(table)} |")
    best = max(range(n_layers), key=found.__getitem__)
    print(f"\nmost organisms found at one layer: {found[best]} of {len(table)} (layer {best}); identify reads layer "
          f"{n_layers - 1}")
    print("the layer score picks: " + ", ".join(f"{name} {layer} (rank {table[name][layer] or '-'})"
                                               for name, layer in picked.items()))


if __name__ == "__main__":
    main()
