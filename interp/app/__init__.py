"""The application layer: the `interp` command line, the report and its HTML page, and one runner per lens.

It sits on top of the two lower layers and is the only place that knows the zoo's defaults:

    interp.app    cli, args (shared options), context (Context, Section, loading a run's models and prompt
                  sets), zoo_defaults, report, page, lenses/<name>.py (add_arguments, run(ctx), redraw)
    analyses      the science: measure(...) -> Result, steer(...) as a context manager, plots
    interp        the core: models, sites, prompts, capture, intervene, results, plotting, backends, zoo

`interp <lens>` and `interp report` call the same `lenses.<name>.run(ctx)`, so both publish the same numbers.
"""
