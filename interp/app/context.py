"""What a lens runner gets (`Context`) and returns (`Section`), and the one on-disk layout of a lens run.

A lens runner `run(ctx) -> Section` (in `interp.app.lenses.<name>`) measures its analysis on `ctx.base` against
every model of `ctx.tuned` on `ctx.sets` (the first set is the target task), steers, and writes into `ctx.out`:

    section.json          the Section below (headline numbers, figures, tables, steering), as strict JSON
    results/<key>/        every Result it measured, one folder each (`Result.save`); `redraw` reads only these
    <table>.csv           tables
    figures/<name>.pdf    figures, a PNG of the same name next to each

`interp <lens>` runs it with ctx.out = --out; `interp report` with ctx.out = DIR/<lens>; same Context, same files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from interp.models import Model, Pair
from interp.prompts import PromptSet
from interp.results import Result, write_json

SECTION = "section.json"
RESULTS = "results"


@dataclass
class Section:
    """One lens' outcome. Paths are relative to the report folder (or to --out for one lens); `figures` are PNGs
    with a PDF of the same name next to each, the first one shown in the summary; `tables` map a caption to a CSV."""

    name: str
    title: str
    headline: dict[str, float | int | str] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)
    steering: str = ""
    notes: str = ""
    error: str | None = None
    seconds: float | None = None

    def save(self, folder: Path) -> Path:
        return write_json(Path(folder) / SECTION, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> Section:
        return cls(**json.loads((Path(folder) / SECTION).read_text()))


@dataclass
class Context:
    """A lens run: the models (loaded once), the prompt sets, where to write, and the lens' options.

    `specs` maps each tuned label to what it was loaded from; `series` is a checkpoint series of the same
    fine-tuning (a spec) for the lenses that follow one; `options` are the lens' own settings given on the
    command line (the lens' defaults otherwise); `quick` asks for a small, fast run (tests)."""

    base: Model
    tuned: dict[str, Model]
    specs: dict[str, str]
    sets: dict[str, PromptSet]
    root: Path
    out: Path
    quick: bool = False
    step: Callable[[str], None] = print
    series: str | None = None
    options: dict = field(default_factory=dict)
    base_spec: str = ""

    def pairs(self) -> list[tuple[str, Pair]]:
        return [(label, Pair(self.base, model)) for label, model in self.tuned.items()]

    @property
    def target(self) -> PromptSet:
        return next(iter(self.sets.values()))

    @property
    def other(self) -> PromptSet:
        """The comparison set (the second one), or the target when there is only one."""
        sets = list(self.sets.values())
        return sets[1] if len(sets) > 1 else sets[0]

    def rel(self, path: str | Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def figures(self, *names: str) -> list[str]:
        """Relative paths of the PNGs `ctx.out/figures/<name>.png`."""
        return [self.rel(self.out / "figures" / f"{name}.png") for name in names]

    def table(self, stem: str) -> str:
        """Relative path of the table `ctx.out/<stem>.csv`."""
        return self.rel(self.out / f"{stem}.csv")


def settings(ctx: Context, full, quick):
    """The lens' settings for this run: `quick` for a quick run, else `full`, with the command line's options
    (those given, i.e. not None) on top."""
    import dataclasses

    chosen = quick if ctx.quick else full
    known = {f.name for f in dataclasses.fields(chosen)}
    return dataclasses.replace(chosen, **{k: v for k, v in ctx.options.items() if k in known and v is not None})


def save_results(out: Path, results: dict[str, Result]) -> None:
    """Each result into out/results/<key>/ and the keys, in order, into out/results/index.json."""
    folder = Path(out) / RESULTS
    for key, result in results.items():
        result.save(folder / key)
    write_json(folder / "index.json", list(results))


def load_results(out: Path, *classes: type[Result]) -> dict[str, Result]:
    """The results `save_results` wrote into `out`, in order, each loaded as the one of `classes` it was saved as."""
    folder = Path(out) / RESULTS
    by_name = {c.__name__: c for c in classes}
    loaded = {}
    for key in json.loads((folder / "index.json").read_text()):
        saved_as = json.loads((folder / key / "result.json").read_text())["class"]
        loaded[key] = by_name[saved_as].load(folder / key)
    return loaded
