"""Model diffing: what fine-tuning changed, read from the two models' outputs and activations (METHODS.md, 6).

    kl.py          `measure_kl(pair, prompts) -> KLResult`: per-token KL(tuned || base), top-KL contexts, diff mining
    adl.py         `measure_adl(pair, prompts) -> ADLResult` (also `measure`): the Activation Difference Lens, mean
                   h_tuned - h_base at the first k positions of every layer, read by the logit lens and Patchscope
    steering.py    `steer(model, vector, layer, strength)` (a context manager), `strength_sweep -> SteeringSweep`
    crosscoder.py  `paired_activations`, `train_crosscoder -> CrosscoderResult`: a BatchTopK crosscoder (own trainer)
    scaling.py     `latent_scaling(cc, data, models) -> LatentScaling`: nu = beta_PT / beta_FT, labels, grounding;
                   `latent_direction` to steer with a latent
    identify.py    `identify(pair, corpus, questions) -> Identification`: blind ranked tokens of what a fine-tune did
    amplify.py     `amplify(pair, alpha)`, `scale_update(pair, alpha)` (contexts), `amplification -> Amplification`
    plots.py       the figures, each from a saved result

    with diffing.steer(pair.base, adl.steering_vector(), adl.layer, 1.0) as model:
        interp.generate(model, prompts)
"""

from analyses.diffing.adl import (
    POSITIONS,
    SCALES,
    ADLResult,
    differences,
    layer_scores,
    measure_adl,
    patchscope,
)
from analyses.diffing.amplify import (
    ALPHAS,
    Amplification,
    Amplified,
    amplification,
    amplified_logits,
    amplify,
    scale_update,
)
from analyses.diffing.crosscoder import (
    Crosscoder,
    CrosscoderResult,
    PairedActivations,
    paired_activations,
    train_crosscoder,
)
from analyses.diffing.identify import Identification, evidence_rank, hits, identify, reply_change
from analyses.diffing.identify import normalise as identify_normalise
from analyses.diffing.kl import KLResult, measure_kl
from analyses.diffing.plots import (
    plot_adl_norms,
    plot_adl_tokens,
    plot_amplification,
    plot_identification,
    plot_kl_tokens,
    plot_latent_scaling,
    plot_mined,
    plot_steering_sweep,
    plot_training,
)
from analyses.diffing.scaling import (
    LABELS,
    THRESHOLD,
    LatentScaling,
    latent_direction,
    latent_scaling,
)
from analyses.diffing.steering import (
    STRENGTHS,
    TOLERANCE,
    SteeringSweep,
    steer,
    strength_sweep,
)

measure = measure_adl

__all__ = ["ALPHAS", "LABELS", "POSITIONS", "SCALES", "STRENGTHS", "THRESHOLD", "TOLERANCE", "ADLResult",
           "Amplification", "Amplified", "Crosscoder", "CrosscoderResult", "Identification", "KLResult", "LatentScaling",
           "PairedActivations", "SteeringSweep", "amplification", "amplified_logits", "amplify", "differences",
           "evidence_rank", "hits", "identify", "identify_normalise", "latent_direction", "latent_scaling", "layer_scores", "measure", "measure_adl", "measure_kl",
           "paired_activations", "patchscope", "reply_change", "plot_adl_norms", "plot_adl_tokens", "plot_amplification",
           "plot_identification", "plot_kl_tokens", "plot_latent_scaling", "plot_mined", "plot_steering_sweep", "plot_training",
           "scale_update", "steer", "strength_sweep", "train_crosscoder"]
