"""The weight-space lens: the update theta_tuned - theta_base itself (METHODS.md section 7).

    anatomy = weights.measure(pair)                  # or measure(base_folder, adapter_folder): an Anatomy
    anatomy.to_frame(); anatomy.grid("share"); anatomy.plot()
    with weights.lines(pair, alpha=0.2, beta=0.8) as model:   # LiNeS: block l's update times alpha + beta (l-1)/(L-1)
        ...                                          # the tuned model's own weights, restored exactly on exit
    weights.save_lines_checkpoint(pair, 0.2, 0.8, folder)
    sweep = weights.lines_sweep(pair, target, other)          # LinesSweep: the frontier vs uniform scaling
    with weights.merge(base, [full, safety], [1.0, 1.0]) as model: ...   # task arithmetic; [-1.0] negates
    table = weights.task_arithmetic(base, {"full": full, "safety": safety}, sets)   # TaskArithmetic
    with weights.reset(pair, ["3.q", "embed"]) as model: ...  # parts of the update set back to the base
    resets = weights.reset_map(pair, target, other)           # ResetMap: target lost, forgetting recovered

Read top to bottom: `parts` (every parameter named by block and module), `sources` (weights read from a model, a
folder, a LoRA adapter), `anatomy` (measure, measure_series), `editing` (the weight edits), `scores` (the metric of a
prompt set), `frontier` (the LiNeS sweep), `resets` (the reset map), `arithmetic` (task arithmetic).
"""

from analyses.weights.parts import BLOCK_MODULES, OUTSIDE, Part, Piece, model_parts, select
from analyses.weights.sources import update
from analyses.weights.anatomy import Anatomy, measure, measure_series, plot_anatomy, plot_series
from analyses.weights.editing import lines, lines_scale, merge, reset, rewritten, save_lines_checkpoint
from analyses.weights.scores import better, metric_of, score
from analyses.weights.frontier import ALPHAS, BETAS, LinesSweep, lines_sweep, plot_frontier
from analyses.weights.resets import ResetMap, plot_reset_cells, plot_reset_layers, reset_map
from analyses.weights.arithmetic import TaskArithmetic, default_variants, plot_task_arithmetic, task_arithmetic

__all__ = ["BLOCK_MODULES", "OUTSIDE", "Part", "Piece", "model_parts", "select", "update", "Anatomy", "measure",
           "measure_series", "plot_anatomy", "plot_series", "lines", "lines_scale", "merge", "reset", "rewritten",
           "save_lines_checkpoint", "better", "metric_of", "score", "ALPHAS", "BETAS", "LinesSweep", "lines_sweep",
           "plot_frontier", "ResetMap", "plot_reset_cells", "plot_reset_layers", "reset_map", "TaskArithmetic",
           "default_variants", "plot_task_arithmetic", "task_arithmetic"]
