"""Circuits and heads: patching, attribution, edge circuits, cross-model patching, emergent heads, head steering.

    result = circuits.measure(pair, pairs, target_pairs)          # clean/corrupt PromptPairs, or prompt sets with answers
    result.emergent(5); result.to_frame(); result.plot()
    with circuits.steer(pair.base, heads, mode="mean", prompts=prompts) as model: ...

The files, read in this order: `patching` (clean/corrupt pairs, metrics, activation and attribution patching),
`edges` (EAP / EAP-IG edges, circuits and their faithfulness), `lofit` (learned per-head offsets), `cmap`
(cross-model activation patching), `heads` (previous-token / duplicate-token / induction detectors, head ablation
and scaling edits), `result` (`CircuitsResult`), `measure` (`measure`, the ablation control, `steer`) and `plots`.
"""

from analyses.circuits import cmap, edges, heads, lofit, patching, plots
from analyses.circuits.cmap import CMAPResult
from analyses.circuits.edges import EdgeScores, edge_attribution, faithfulness, faithfulness_curve
from analyses.circuits.heads import DETECTORS, detector_scores, head_edits, head_means
from analyses.circuits.lofit import LoFiT
from analyses.circuits.measure import ablation_effect, as_pairs, as_task, lofit_summary, measure, steer
from analyses.circuits.patching import (
    PromptPairs, TokenPairs, activation_patching, attribution_patching, component_sites, pairs_from_answers,
    read_pairs, tokenize_pairs,
)
from analyses.circuits.plots import (
    plot_ablation, plot_agreement, plot_circuit, plot_cmap, plot_head_maps, save_base_figures, save_figures,
    save_model_figures,
)
from analyses.circuits.result import CircuitsResult, summary, summary_row, top_heads

__all__ = [
    "CMAPResult", "CircuitsResult", "DETECTORS", "EdgeScores", "LoFiT", "PromptPairs", "TokenPairs",
    "ablation_effect", "activation_patching", "as_pairs", "as_task", "attribution_patching", "cmap",
    "component_sites", "detector_scores", "edge_attribution", "edges", "faithfulness", "faithfulness_curve",
    "head_edits", "head_means", "heads", "lofit", "lofit_summary", "measure", "pairs_from_answers", "patching",
    "plot_ablation", "plot_agreement", "plot_circuit", "plot_cmap", "plot_head_maps", "plots", "read_pairs",
    "save_base_figures", "save_figures", "save_model_figures", "steer", "summary", "summary_row", "tokenize_pairs",
    "top_heads",
]
