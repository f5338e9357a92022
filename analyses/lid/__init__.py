"""LID: local intrinsic dimension of contextual token embeddings (Ruppik et al., 2025, "Less is More").

    cloud = point_cloud(model, prompts, layer=-1, n_tokens=60_000)        # one site's token vectors  (clouds)
    result = measure(pair, prompts, layers=range(4))                        # local ID of every point   (local_id)
    result = measure_models({"base": b, "full": f, "r8": r}, prompts)       # several models, same tokens
    result = measure_stores({"base": ActivationStore("b/"), "full": f_store})   # from stores of a corpus
    series = measure_series(base, load_series("step-folders/"), prompts, task=task_set)          (series)
    with steer(model, "resid_post.2", v, reference=cloud): ...              # on-manifold steering      (tangent)
    comparison = compare_steering(model, site, v, prompts, reference_prompts)   # raw vs tangent      (steering)

The modules, in reading order: `knn` (exact chunked k-NN) and `estimators` (pointwise TwoNN, Levina-Bickel), the
numerics; `clouds` (sampling the tokens and capturing their vectors, or reading them from a store); `local_id`
(`estimate`, `LIDResult`, `measure`, `measure_stores`); `series` (along a checkpoint series); `tangent` (tangent
spaces of a reference cloud and the on-manifold steering edit); `steering` (raw vs tangent steering at equal
effect); `plots`.
"""

from analyses.lid.clouds import (N_TOKENS, PointCloud, layer_site, point_cloud, point_clouds, sample_tokens,
                                 store_clouds)
from analyses.lid.local_id import ESTIMATORS, K, LIDResult, estimate, measure, measure_models, measure_stores, summary
from analyses.lid.plots import plot_distribution, plot_layers, plot_series, plot_steering, save_figures
from analyses.lid.series import SeriesResult, measure_series
from analyses.lid.steering import SteeringResult, compare_steering, mean_shift
from analyses.lid.tangent import (
    Reference, TangentAdd, prepare_reference, steer, tangent_add, tangent_basis, tangent_projection,
)

__all__ = [
    "ESTIMATORS", "K", "N_TOKENS", "LIDResult", "PointCloud", "Reference", "SeriesResult", "SteeringResult",
    "TangentAdd", "compare_steering", "estimate", "layer_site", "mean_shift", "measure", "measure_models",
    "measure_series", "measure_stores", "plot_distribution", "plot_layers", "plot_series", "plot_steering",
    "point_cloud", "point_clouds", "prepare_reference", "sample_tokens", "save_figures", "steer", "store_clouds",
    "summary", "tangent_add", "tangent_basis", "tangent_projection",
]
