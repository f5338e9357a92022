"""Concept shift vectors: how fine-tuning moves the concepts of the representation space (Khayatan et al., 2025).

For inputs x (chosen token positions of a prompt set) at a layer, h_base(x) and h_tuned(x) are the two
models' representations (`resid_post.l`, or `final`, the output of the final norm as in the reference code).

    concepts     a dictionary of K vectors u_k learned on h_base (or h_tuned): K-means (centroids), PCA
                 (principal directions) or semi-NMF (Ding et al.: H ~ G F, G >= 0, F free); input x belongs
                 to the concept with the highest activation (for K-means the nearest centroid), A_k
    shift        Delta_k = mean_{x in A_k} h_tuned(x) - mean_{x in A_k} h_base(x);  global: mean over all x
    recovery     h_base(x) + Delta_{k(x)} vs h_tuned(x) (cosine, relative error), against h_base(x) alone and
                 h_base(x) + Delta_global
    matching     a dictionary learned the same way on the other model, matched one-to-one by cosine
                 (Hungarian): for K-means u_k + Delta_k against the tuned centroids, else |cos(u_k, v_j)|
    grounding    each concept's top-activating inputs and the tokens u_k (and Delta_k) decode to through
                 the unembedding W_U (no final norm applied)
    stability    mean cosine of the concepts of two seeds, matched as above; `choose_k` picks the K whose
                 least stable layer is the most stable (the paper's default is K = 20)

Steering (`steer`): add a vector (a concept shift, the global shift, or `mean_difference` of two prompt
groups) with a strength to `resid_post.l` (or `final`) of either model, at all positions by default (the
paper's setting), at the last prompt token, or from it on (generation). Concept-wise steering adds to each
position the shift of the base concept nearest to its representation there (`add_nearest`).
`strength_sweep` reports KL(steered || target) of the next-token distribution at the last prompt token and
the accuracy on a held-out skill (the side effect) as a `StrengthSweep`; `steering_curve` takes shifts and the
layer from train prompts and the curve from test prompts (a `SteeringCurve`).

    concepts.py   representations, dictionaries, matching, stability and `choose_k` (a `KStability`)
    result.py     `measure(pair, prompts, ...) -> ShiftResult`: shifts, recovery, matching, grounding
    steering.py   `steer` (a context manager), `strength_sweep`, `steering_curve`
    streamed.py   the K-means / PCA dictionaries and the shifts streamed from activation stores (`measure_stores`)
    plots.py      the figures, each from a saved result
"""

from analyses.shift.concepts import (
    K_CANDIDATES, METHODS, RESTARTS, Concepts, KStability, choose_k, items, kmeans, learn_concepts, match_concepts,
    mean_difference, representations, semi_nmf, sites_for, stability,
)
from analyses.shift.plots import plot_concept_table, plot_recovery, plot_shift_norms, plot_strength_sweep, save_figures
from analyses.shift.result import RECOVERY, TOP, ShiftResult, concept_shifts, decode, measure, recovery
from analyses.shift.streamed import (
    StreamedShifts, concept_activations, concept_shifts_streamed, learn_concepts_streamed, measure_stores,
)
from analyses.shift.steering import (
    STEER_MODES, STEER_POSITIONS, STRENGTHS, SteeringCurve, StrengthSweep, best_layer, layer_kls, next_token_kl,
    prompt_positions, steer, steering_curve, steering_edit, steering_vectors, strength_sweep,
)

__all__ = ["K_CANDIDATES", "METHODS", "RECOVERY", "RESTARTS", "STEER_MODES", "STEER_POSITIONS", "STRENGTHS", "TOP",
           "Concepts", "KStability", "ShiftResult", "SteeringCurve", "StreamedShifts", "StrengthSweep",
           "best_layer", "choose_k", "concept_activations", "concept_shifts", "concept_shifts_streamed", "decode",
           "items", "kmeans", "layer_kls", "learn_concepts", "learn_concepts_streamed", "match_concepts",
           "mean_difference", "measure", "measure_stores", "next_token_kl", "plot_concept_table", "plot_recovery",
           "plot_shift_norms", "plot_strength_sweep", "prompt_positions", "recovery", "representations",
           "save_figures", "semi_nmf", "sites_for", "stability", "steer", "steering_curve", "steering_edit",
           "steering_vectors", "strength_sweep"]
