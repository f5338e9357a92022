"""One runner per lens, used by `interp <lens>` and by `interp report` alike.

A lens module `interp.app.lenses.<name>` defines
    TITLE         the section title;  HELP  one line for `interp --help`
    MANY_TUNED    True when it compares several tuned models in one run (`--tuned` repeated)
    add_arguments(parser)   its own options, each defaulting to None (the lens' `Settings` hold the defaults)
    run(ctx) -> Section     measure, steer, write ctx.out in the layout of `interp.app.context`
    redraw(folder) -> list[Path]   re-draw every figure from the saved results alone
A new lens is a module here, a line in LENSES, and its analysis in `analyses/`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

LENSES = ("tuco", "circuits", "intruders", "shift", "lid", "weights", "diffing")
"""Every lens, in the report's page order."""
REAL_ONLY = ("organisms",)
"""Sections of a report on zoo:smol only, after the lenses (the organisms are fine-tunes of zoo:smol)."""


def lens(name: str) -> ModuleType:
    """The runner module of lens `name`."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        from interp.errors import BadOption

        raise BadOption(f"unknown lens {name!r}; the lenses are {', '.join(LENSES)}") from None
