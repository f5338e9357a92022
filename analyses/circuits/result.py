"""`CircuitsResult`: the head maps, detector scores, base circuit, CMAP gains, ablation and LoFiT offsets of one
pair, with its table (`to_frame`), emergent heads and main figure."""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from analyses.circuits.heads import DETECTORS
from analyses.circuits.lofit import LoFiT
from interp.results import Result

MODELS = ("base", "tuned")


@dataclass
class CircuitsResult(Result):
    """One pair's circuits and heads.

    importance  "{method}.{task}.{model}" -> [layer, head], "mlp_{method}.{task}.{model}" -> [layer]: metric drop
                (m_clean - m_patched, metric units; divide by `gaps` for the normalised effect) when the component
                is patched to its corrupt activation; method patching or attribution, task skill or target
    detectors   "detector.{name}.{model}" (repeated random sequences) and "detector_task.{name}.{model}" (the
                skill's prompts followed by their answers) -> [layer, head]
    gaps        "{task}.{model}" -> mean m_clean - m_corrupt
    edges       [upstream, downstream] EAP-IG edge scores of the base on the skill, nodes `upstream`/`downstream`;
                `faithfulness` of the top-n-edge circuits {str(n): value}
    cmap_gain   [component] CMAP gain of each component (names and greedy sets in `cmap`), or None
    ablation    top-3 vs random head ablation of the base on the skill (see `ablation_effect`), or None
    lofit       held-out accuracy without and with LoFiT offsets (heads, k, accuracies), offsets [k, d_model] and
                stage-1 scales [layer, head] in lofit_offsets / lofit_s, or None
    """

    ANALYSIS = "circuits"
    base: str
    tuned: str
    skill: str
    target: str
    metric: str
    importance: dict[str, Tensor]
    detectors: dict[str, Tensor]
    gaps: dict[str, float]
    edges: Float[Tensor, "up down"]
    upstream: list[str]
    downstream: list[str]
    faithfulness: dict[str, float]
    cmap_gain: Float[Tensor, " component"] | None = None
    cmap: dict | None = None
    ablation: dict | None = None
    lofit: dict | None = None
    lofit_offsets: Float[Tensor, "k d_model"] | None = None
    lofit_s: Float[Tensor, "layer head"] | None = None

    @property
    def method(self) -> str:
        """The importance measure the maps, emergent heads and ablation use: activation patching when it was run,
        else attribution patching."""
        return "patching" if "patching.skill.base" in self.importance else "attribution"

    def heads(self, method: str, task: str, model: str) -> Tensor:
        return self.importance[f"{method}.{task}.{model}"]

    def fitted(self) -> LoFiT | None:
        """The LoFiT offsets trained on the base (re-apply with `model.edit(*result.fitted().edits())`)."""
        if self.lofit_offsets is None:
            return None
        return LoFiT(self.lofit["heads"], self.lofit_offsets, self.lofit_s)

    def emergent(self, n: int = 5, task: str = "target") -> list[dict]:
        """Heads whose importance on `task` grows most from base to tuned, with their detector scores."""
        base, tuned = self.heads(self.method, task, "base"), self.heads(self.method, task, "tuned")
        diff = tuned - base
        rows = []
        for i in diff.flatten().topk(min(n, diff.numel())).indices.tolist():
            layer, h = divmod(i, diff.shape[1])
            rows.append({"layer": layer, "head": h, "base": float(base[layer, h]), "tuned": float(tuned[layer, h]),
                         "difference": float(diff[layer, h]),
                         **{f"{kind}.{d}": float(self.detectors[f"{kind}.{d}.tuned"][layer, h])
                            for kind in ("detector", "detector_task") for d in DETECTORS}})
        return rows

    def to_frame(self):
        """One row per model, layer and head: importances (patching and attribution, both tasks) and detectors."""
        import pandas as pd

        n_layers, n_heads = self.detectors["detector.induction.base"].shape
        rows = []
        for model in MODELS:
            for layer, h in ((layer, h) for layer in range(n_layers) for h in range(n_heads)):
                row = {"model": model, "layer": layer, "head": h}
                for key, t in {**self.importance, **self.detectors}.items():
                    if key.endswith("." + model) and t.dim() == 2:
                        row[key.removesuffix("." + model)] = float(t[layer, h])
                rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Target-skill head importance maps: base, tuned, tuned - base (needs three axes or none)."""
        from analyses.circuits.plots import plot_head_maps

        return plot_head_maps(self, "target", ax)


def top_heads(importance: Float[Tensor, "layer head"], n: int = 3) -> list[tuple[int, int]]:
    """The `n` (layer, head) of largest importance."""
    n_heads = importance.shape[1]
    return [divmod(i, n_heads) for i in importance.flatten().topk(n).indices.tolist()]


def summary_row(result: CircuitsResult) -> dict:
    """The result's headline numbers as one table row (a column per number; missing parts are left out)."""
    faith = result.faithfulness
    row = {"skill": result.skill, "target": result.target, "method": result.method,
           "top_heads": str(top_heads(result.heads(result.method, "skill", "base"))),
           **{f"faithfulness_{k}": v for k, v in faith.items()},
           "top_emergent_head": "L{layer}H{head}".format(**result.emergent(1)[0])}
    if result.cmap is not None:
        best_set, gain = result.cmap["greedy"][-1]
        row.update(cmap_set=" ".join(best_set), cmap_gain=gain)
    if result.ablation is not None:
        row.update(top_drop=result.ablation["top_drop"], random_drop=result.ablation["random_drop"])
    if result.lofit is not None:
        row.update(lofit_heads=str(result.lofit["heads"]), lofit_base_accuracy=result.lofit["base_accuracy"],
                   lofit_accuracy=result.lofit["lofit_accuracy"])
    return row


def summary(result: CircuitsResult) -> str:
    """One line: the base's top skill heads, the ablation, the CMAP best set and LoFiT, as measured."""
    parts = [f"top heads {top_heads(result.heads(result.method, 'skill', 'base'))}"]
    if result.ablation is not None:
        a = result.ablation
        parts.append(f"ablating them drops accuracy by {a['top_drop']:.2f} (random heads {a['random_drop']:.2f})")
    if result.cmap is not None:
        parts.append(f"CMAP best set {result.cmap['greedy'][-1]}")
    if result.lofit is not None:
        lf = result.lofit
        parts.append(f"LoFiT on {lf['k']} heads: accuracy {lf['base_accuracy']:.2f} -> {lf['lofit_accuracy']:.2f}")
    return "; ".join(parts)
