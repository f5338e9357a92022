"""Attribution patching vs activation patching (run on demand: `python tests/benchmarks/bench_circuits.py`).

Both score every head (and, with --mlps, every MLP) of a model on the same clean/corrupt pairs: activation
patching runs one patched forward per component, attribution patching one forward on each input and one
backward. Prints both times (median of --repeats), their ratio, and the target ratio n_heads_total / 4, plus
the Spearman correlation of the two head rankings. Default: zoo:base on 64 copy pairs.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    from scipy.stats import spearmanr

    import interp
    from analyses.circuits import patching as cp
    from interp.app import zoo_defaults

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="zoo:base")
    parser.add_argument("--skill", default="copy")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--mlps", action="store_true", help="score the MLPs too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    model = interp.load_model(args.model, device=args.device)
    tp = cp.tokenize_pairs(model, zoo_defaults.circuit_pairs(args.skill, args.n))
    sites = cp.component_sites(model, ("head", "mlp") if args.mlps else ("head",))
    times = {"activation": [], "attribution": []}
    results = {}
    for _ in range(args.repeats):  # interleaved, so that load on the machine hits both alike
        for name, fn in (("activation", cp.activation_patching), ("attribution", cp.attribution_patching)):
            start = time.perf_counter()
            results[name] = fn(model, tp, sites)
            times[name].append(time.perf_counter() - start)
    act, att = (statistics.median(times[k]) for k in ("activation", "attribution"))
    n_heads = model.n_layers * model.n_heads
    rho = spearmanr(results["activation"].numpy(), results["attribution"].numpy()).statistic
    print(f"{args.model}, {len(tp)} {args.skill} pairs, {len(sites)} components on {model.device}: activation patching "
          f"{act:.2f} s, attribution patching {att:.2f} s (median of {args.repeats}); speed-up {act / att:.1f}x, "
          f"target >= n_heads / 4 = {n_heads / 4:.1f}x -> {'met' if act / att >= n_heads / 4 else 'NOT met'}; "
          f"Spearman {rho:.3f}")


if __name__ == "__main__":
    main()
