"""Intruder dimensions: high-ranking singular directions of a tuned weight matrix that the base matrix lacks.

Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence"), METHODS.md section 3. For every
weight matrix that differs between base and tuned (attention q, k, v, o, MLP in and out; the token embedding on
request), in the (out, in) orientation, W0 = U0 S0 V0^T and Wt = Ut St Vt^T (Wt the merged matrix). The i-th of
Wt's top-k left singular vectors is an intruder at epsilon when max_j |cos(Ut_i, U0_j)| < epsilon. Per matrix the
result holds the similarities, intruder counts over a sweep of epsilon, the spectra of W0, Wt and delta W = Wt - W0,
||delta W||_2 against W0's top and k-th singular values, delta W's effective rank and the fraction of its energy in
intruder directions.

    res = intruders.measure(pair)                       # or measure(base, tuned): an IntruderResult
    res.to_frame(); res.plot(); res.save(folder)
    with intruders.steer(pair, lam=0.0) as model:       # the tuned model without its intruders, restored on exit
        intruders.save_checkpoint(model, folder)
    sweep = intruders.lambda_sweep(pair, target, pretrain, lams=(0, 0.5, 1))   # a LambdaSweep

Read top to bottom: `spectra` (one matrix pair: SVDs, similarities, the report), `lora` (PEFT LoRA adapters read as
deltas), `matrices` (which parameters are analysed, oriented and paired), `result` (IntruderResult and its tables),
`measure` (a pair of models, a checkpoint series), `steering` (steer, lambda_sweep; `save_checkpoint` is `interp.weights.save_checkpoint`), `plots`.
"""

from analyses.intruders.spectra import EPSILON, EPSILONS, K, intruder_directions, matrix_report, scale_intruders
from analyses.intruders.lora import LoraMerged, lora_delta_weights, lora_factors
from analyses.intruders.matrices import analysis_matrices, layer_index, matrix_kind, paired_matrices
from analyses.intruders.result import EMBED, KIND_ORDER, IntruderResult, counts_table, series_frame
from analyses.intruders.measure import measure, measure_series
from analyses.intruders.steering import LAMBDAS, LambdaSweep, intruder_updates, lambda_sweep, steer
from interp.weights import save_checkpoint
from analyses.intruders.plots import plot_counts, plot_lambda, plot_layer_heatmap, plot_series, plot_spectra, \
    save_figures

__all__ = ["EPSILON", "EPSILONS", "K", "LAMBDAS", "EMBED", "KIND_ORDER", "IntruderResult", "LambdaSweep",
           "measure", "measure_series", "steer", "save_checkpoint", "lambda_sweep", "intruder_updates",
           "counts_table", "series_frame", "plot_counts", "plot_layer_heatmap", "plot_spectra", "plot_lambda",
           "plot_series", "save_figures", "intruder_directions", "matrix_report", "scale_intruders",
           "LoraMerged", "lora_factors", "lora_delta_weights", "analysis_matrices", "layer_index", "matrix_kind",
           "paired_matrices"]
