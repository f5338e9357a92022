"""The intruder analysis of one tuned model as a Result, and its tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses.intruders.matrices import layer_index, matrix_kind
from analyses.intruders.spectra import MatrixReport
from interp.results import Result

EMBED = "embed"
KIND_ORDER = ("q", "k", "v", "o", "mlp_in", "mlp_out", EMBED)


@dataclass
class IntruderResult(Result):
    """Intruder analysis of every changed matrix of one tuned model (rows in the model's layer order).

    names                       analysed matrices (`...c_attn.weight:q` for GPT-2's fused q/k/v)
    shapes     [matrix, 2]      (out, in)
    epsilons   [eps]            the sweep; counts [matrix, eps] intruders among the top k at each epsilon
    sims       [matrix, k]      max |cos| of each of Wt's top-k left singular vectors with W0's (NaN past min(out, in))
    base_s, tuned_s, delta_s    [matrix, r] singular values of W0, Wt, delta W, descending (NaN-padded)
    delta_erank [matrix]        effective rank of delta W
    intruder_energy [matrix]    fraction of ||delta W||_F^2 in the intruder directions at `epsilon`
    """

    ANALYSIS = "intruders"
    base: str
    tuned: str
    label: str
    names: list[str]
    k: int
    epsilon: float
    shapes: Int[Tensor, "matrix 2"]
    epsilons: Float[Tensor, " eps"]
    counts: Int[Tensor, "matrix eps"]
    sims: Float[Tensor, "matrix k"]
    base_s: Float[Tensor, "matrix r"]
    tuned_s: Float[Tensor, "matrix r"]
    delta_s: Float[Tensor, "matrix r"]
    delta_erank: Float[Tensor, " matrix"]
    intruder_energy: Float[Tensor, " matrix"]

    @classmethod
    def from_reports(cls, reports: Sequence[MatrixReport], *, base: str, tuned: str, label: str, k: int,
                     epsilon: float, epsilons: Sequence[float], shapes: Sequence[tuple[int, int]],
                     settings: dict | None = None) -> IntruderResult:
        def padded(rows: list[Tensor]) -> Tensor:
            width = max((len(r) for r in rows), default=0)
            out = torch.full((len(rows), width), math.nan)
            for i, r in enumerate(rows):
                out[i, :len(r)] = r
            return out

        n_eps = len(epsilons)
        return cls(base, tuned, label, [r.name for r in reports], k, epsilon,
                   torch.tensor(list(shapes), dtype=torch.long).reshape(-1, 2),
                   torch.tensor(list(epsilons), dtype=torch.float32),
                   torch.stack([r.counts for r in reports]) if reports else torch.zeros(0, n_eps, dtype=torch.long),
                   padded([r.sims for r in reports]), padded([r.base_s for r in reports]),
                   padded([r.tuned_s for r in reports]), padded([r.delta_s for r in reports]),
                   torch.tensor([r.delta_erank for r in reports]), torch.tensor([r.intruder_energy for r in reports]),
                   settings=settings or {})

    @property
    def layers(self) -> list[int | None]:
        return [layer_index(n) for n in self.names]

    @property
    def kinds(self) -> list[str]:
        return [matrix_kind(n) or EMBED for n in self.names]

    def intruders(self, epsilon: float | None = None) -> Tensor:
        """[matrix, k] True where the tuned direction is an intruder at `epsilon` (default: the result's)."""
        return self.sims < (self.epsilon if epsilon is None else epsilon)  # NaN padding compares False

    def count(self, epsilon: float | None = None) -> Int[Tensor, " matrix"]:
        return self.intruders(epsilon).sum(1)

    def totals(self) -> Int[Tensor, " eps"]:
        """Intruders summed over all matrices at each epsilon of the sweep."""
        return self.counts.sum(0)

    def ratio(self, rank: int = 1) -> Float[Tensor, " matrix"]:
        """||delta W||_2 / (the base's `rank`-th singular value), per matrix (NaN where it has fewer)."""
        if self.base_s.shape[1] < rank:
            return torch.full((len(self.names),), math.nan)
        return self.delta_s[:, 0] / self.base_s[:, rank - 1]

    def to_frame(self):
        """One row per matrix: where it is, its top singular values, delta W's size, shape and energy, the counts."""
        import pandas as pd

        intruders = self.intruders()
        intruder_s = torch.where(intruders, self.tuned_s[:, :intruders.shape[1]], 0.0).amax(1) \
            if len(self.names) else torch.zeros(0)
        frame = pd.DataFrame({
            "model": self.label, "matrix": self.names, "layer": pd.array(self.layers, dtype="Int64"),
            "kind": self.kinds, "out": self.shapes[:, 0].numpy(), "in": self.shapes[:, 1].numpy(),
            "base_s1": self.base_s[:, 0].numpy(), "tuned_s1": self.tuned_s[:, 0].numpy(),
            "delta_norm": self.delta_s[:, 0].numpy(), "delta_over_base_s1": self.ratio(1).numpy(),
            f"delta_over_base_s{self.k}": self.ratio(self.k).numpy(), "delta_erank": self.delta_erank.numpy(),
            "intruder_energy": self.intruder_energy.numpy(), "top_intruder_s": intruder_s.numpy(),
            "intruders": self.count().numpy(),
        })
        for e, eps in enumerate(self.epsilons.tolist()):
            frame[f"eps_{eps:g}"] = self.counts[:, e].numpy()
        return frame

    def counts_frame(self):
        """Intruders over all matrices at each epsilon, with the largest and median ||delta W||_2 / s1(W0)."""
        import pandas as pd

        ratio = self.ratio(1)
        return pd.DataFrame({"model": self.label, "epsilon": self.epsilons.numpy(), "intruders": self.totals().numpy(),
                             "matrices": len(self.names), "k": self.k,
                             "max_delta_over_base_s1": float(ratio.max()) if len(ratio) else 0.0,
                             "median_delta_over_base_s1": float(ratio.median()) if len(ratio) else 0.0})

    def layer_frame(self, epsilon: float | None = None):
        """Intruder counts at `epsilon` per layer (rows) and matrix kind (columns); the embedding is left out."""
        import pandas as pd

        frame = pd.DataFrame({"layer": self.layers, "kind": self.kinds, "intruders": self.count(epsilon).numpy()})
        frame = frame[frame.kind != EMBED]
        table = frame.pivot_table(index="layer", columns="kind", values="intruders", aggfunc="sum", fill_value=0)
        return table.reindex(columns=[k for k in KIND_ORDER if k in table.columns])

    def plot(self, ax=None):
        """Intruder count vs epsilon."""
        from analyses.intruders.plots import plot_counts

        return plot_counts([self], ax)


def counts_table(results: dict[str, IntruderResult]) -> str:
    """Text table: per model, intruders over all matrices at each epsilon of the sweep, and ||delta W||_2 over the
    base's s1 (max, median) and s10 (max)."""
    width = max(map(len, results), default=5) + 2
    eps = next(iter(results.values())).epsilons.tolist() if results else []
    lines = [f"{'model':<{width}}" + "".join(f"{e:>6.1f}" for e in eps) + "   ||dW||2/s1 max  median   ||dW||2/s10 max"]
    for name, r in results.items():
        ratio1, ratio10 = r.ratio(1), r.ratio(10)
        lines.append(f"{name:<{width}}" + "".join(f"{int(c):>6d}" for c in r.totals()) +
                     f"   {float(ratio1.max()):>14.3f}  {float(ratio1.median()):>6.3f}   {float(ratio10.max()):>15.3f}")
    return "\n".join(lines)


def series_frame(series: Sequence[tuple[int, IntruderResult]]):
    """Intruders over all matrices per step and epsilon, with the largest ||delta W||_2 / s1(W0) at each step."""
    import pandas as pd

    return pd.concat([r.counts_frame().assign(step=step) for step, r in series], ignore_index=True)
