"""Benchmark: pointwise TwoNN of `analyses.lid.estimators` against scikit-dimension's.

Run on demand, not under pytest:

    python tests/benchmarks/bench_lid.py                       # 20,000 points, 384-D, k=100
    python tests/benchmarks/bench_lid.py --n 20000 --skdim-n 2000

Times ``twonn_local`` and ``skdim.id.TwoNN().fit_pw`` on the same cloud in the same run and
prints both, their ratio and the agreement of the mean LIDs. Wall-clock and CPU time (all threads
of this process) are both printed: on a shared machine the wall-clock ratio moves with the load
(ours is multi-threaded, scikit-dimension's per-point loop is not), the CPU-time ratio much less.
scikit-dimension fits one neighbourhood at a time in Python, which takes minutes at 20,000 points
on a small CPU, so ``--skdim-n`` also times both at a smaller N (a prefix of the same cloud).
"""

import argparse
import time
import warnings

import numpy as np
import torch

from analyses.lid.estimators import twonn_local
from analyses.lid.knn import MEMORY_BUDGET


def cloud(n: int, dim: int, intrinsic: int, seed: int) -> np.ndarray:
    """n points near a curved ``intrinsic``-dimensional manifold in ``dim`` dimensions, float64."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, intrinsic))
    features = np.concatenate([latent, np.sin(2 * latent), latent[:, :1] * latent[:, 1:]], axis=1)
    embedding = rng.standard_normal((features.shape[1], dim)) / np.sqrt(features.shape[1])
    return features @ embedding + 5.0 + 1e-3 * rng.standard_normal((n, dim))


def timed(run):
    """(result, wall-clock seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def compare(points: np.ndarray, k: int, memory_budget: int, run_skdim: bool) -> None:
    ours, ours_s, ours_cpu = timed(
        lambda: twonn_local(torch.from_numpy(points), k, memory_budget=memory_budget).double().numpy()
    )
    print(
        f"N={len(points):>6} k={k}  interp twonn_local (float32): {ours_s:8.2f} s wall, {ours_cpu:8.2f} s CPU  "
        f"mean LID {ours.mean():.4f}"
    )
    if not run_skdim:
        return
    import skdim

    def fit_pw():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return skdim.id.TwoNN().fit_pw(points, n_neighbors=k).dimension_pw_

    theirs, theirs_s, theirs_cpu = timed(fit_pw)
    relative = np.abs(ours / theirs - 1)
    print(
        f"N={len(points):>6} k={k}  skdim TwoNN().fit_pw (float64):  {theirs_s:8.2f} s wall, {theirs_cpu:8.2f} s CPU  "
        f"mean LID {theirs.mean():.4f}"
    )
    print(
        f"  speed-up {theirs_s / ours_s:.1f}x wall-clock, {theirs_cpu / ours_cpu:.1f}x CPU time; "
        "mean LID relative difference "
        f"{abs(ours.mean() / theirs.mean() - 1):.2e}; pointwise relative difference "
        f"median {np.median(relative):.1e}, max {relative.max():.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="points in the main comparison")
    parser.add_argument("--skdim-n", type=int, default=None, help="also compare at this smaller N")
    parser.add_argument("--no-skdim-at-n", action="store_true", help="time only ours at --n")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--intrinsic", type=int, default=8)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--memory-budget", type=int, default=MEMORY_BUDGET, help="bytes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    points = cloud(args.n, args.dim, args.intrinsic, args.seed)
    if args.skdim_n:
        compare(points[: args.skdim_n], args.k, args.memory_budget, run_skdim=True)
    compare(points, args.k, args.memory_budget, run_skdim=not args.no_skdim_at_n)


if __name__ == "__main__":
    main()
