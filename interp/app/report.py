"""`interp report`: every lens on one base and one or more tuned models, into one static HTML page.

A report folder DIR holds `index.html` (see `interp.app.page`), `summary.json` (the models, the prompt sets and
every lens' `Section`) and one folder per lens, DIR/<lens>, in the layout of `interp.app.context`, written by the
same `run(ctx)` that `interp <lens>` runs. The page is re-rendered after each lens, so the first lens' results
can be read while the others run. A lens that raises is reported in its own section (message, and the traceback
in DIR/<lens>/error.txt); the others still run. `interp figures DIR` re-draws every figure from the saved results
and re-renders the page. Budget: the default zoo report (three tuned models) should fit a few minutes on 2 CPU
cores, so a lens takes about a minute there, and seconds with `quick`.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

from interp.app import lenses, zoo_defaults
from interp.app.args import load_context, pair_options, stepper, tuned_specs
from interp.app.context import Context, Section
from interp.app.output import claimed
from interp.app.page import SUMMARY, render
from interp.errors import ResultNotFound
from interp.results import write_json

REAL_PART = "real"


def run_report(out: str | Path, base: str = "zoo:base", tuned: tuple[str, ...] | list[str] | None = None, *,
               prompts: Path | None = None, prompts_b: Path | None = None, n_prompts: int | None = None,
               quick: bool = False, only: list[str] | None = None, series: str | None = None, real: bool = False,
               device: str = "auto", dtype: str = "float32", backend: str = "bridge", overwrite: bool = False,
               placement: dict[str, dict] | None = None) -> Path:
    """Run every lens (or `only` these) and write DIR/index.html and DIR/summary.json; returns index.html.

    tuned: default, a zoo base's fine-tunes. series: a checkpoint series of the same fine-tuning (default on zoo
    bases: the zoo's own). real: add the real-model part, `REAL_SECTIONS` on zoo:smol vs `REAL_TUNED` (with the
    smol series) in DIR/real, summarised on the page (builds the real zoo, which needs the `real` extra). A DIR
    that holds an earlier report is refused unless `overwrite` (see `interp.app.output`). `placement`: per-model
    load options in place of device and dtype (`interp.app.args.load_context`)."""
    with claimed(out, overwrite=overwrite) as root:
        return _run_report(root, base, tuned, prompts=prompts, prompts_b=prompts_b, n_prompts=n_prompts,
                           quick=quick, only=only, series=series, real=real, device=device, dtype=dtype,
                           backend=backend, placement=placement)


def _run_report(root: Path, base, tuned, *, prompts, prompts_b, n_prompts, quick, only, series, real, device, dtype,
                backend, placement) -> Path:
    step = stepper("report")
    ctx = load_context(base, tuned_specs(base, tuned), root, prompts=prompts, prompts_b=prompts_b,
                       n_prompts=n_prompts, series=series, quick=quick, device=device, dtype=dtype, backend=backend,
                       placement=placement, step=step)
    summary = {"base": str(base), "tuned": ctx.specs, "series": ctx.series, "quick": quick,
               "prompt_sets": {k: len(v) for k, v in ctx.sets.items()}, "sections": [], "parts": [],
               "complete": False}
    offered = lenses.LENSES + (lenses.REAL_ONLY if zoo_defaults.in_real(base) else ())
    names = [n for n in offered if only is None or n in only]
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        eta = "" if i == 1 else f", about {(time.perf_counter() - start) / (i - 1) * (len(names) - i + 1):.0f}s left"
        step(f"[{i}/{len(names)}] {name}{eta}")
        section = run_lens(name, replace(ctx, out=root / name, step=lambda msg, name=name: step(f"  {name}: {msg}")))
        step(f"[{i}/{len(names)}] {name} " + (f"FAILED: {section.error}" if section.error else
                                             f"done in {section.seconds:.0f}s"))
        summary["sections"].append(asdict(section))
        _write(root, summary)
    if real:
        del ctx
        step(f"real model: zoo:smol vs {', '.join(zoo_defaults.REAL_TUNED)} in {root / REAL_PART}")
        run_report(root / REAL_PART, "zoo:smol", zoo_defaults.REAL_TUNED, n_prompts=n_prompts, quick=quick,
                   only=[n for n in zoo_defaults.REAL_SECTIONS if only is None or n in only],
                   device=device, dtype=dtype, backend=backend, placement=placement)
        summary["parts"].append({"folder": REAL_PART, "title": "Real model: SmolLM2-135M-Instruct (zoo:smol)"})
    summary["complete"] = True
    _write(root, summary)
    return root / "index.html"


def _write(root: Path, summary: dict) -> None:
    """summary.json and index.html of the same state: both rendered into temporary files, then renamed."""
    write_json(root / f".{SUMMARY}.tmp", summary)
    render(root, root / f".{SUMMARY}.tmp", root / ".index.html.tmp")
    os.replace(root / ".index.html.tmp", root / "index.html")
    os.replace(root / f".{SUMMARY}.tmp", root / SUMMARY)


def run_lens(name: str, ctx: Context, reraise: tuple[type[Exception], ...] = ()) -> Section:
    """Run lens `name` on `ctx`, save its Section in ctx.out, and time it; an error becomes the section's error
    (except those of `reraise`, which `interp <lens>` passes on to report bad input in one line)."""
    t0 = time.perf_counter()
    try:
        section = lenses.lens(name).run(ctx)
    except reraise:
        raise
    except Exception as e:  # one failed lens must not stop the others
        ctx.out.mkdir(parents=True, exist_ok=True)
        (ctx.out / "error.txt").write_text(traceback.format_exc())
        section = Section(name, lenses.lens(name).TITLE, error=f"{type(e).__name__}: {e}")
    section.seconds = round(time.perf_counter() - t0, 1)
    section.save(ctx.out)
    return section


def redraw(folder: str | Path) -> list[Path]:
    """Re-draw every figure of a report (from its summary.json) and re-render index.html; no model is run."""
    root = Path(folder)
    if not (root / SUMMARY).is_file():
        raise ResultNotFound(f"{root} holds no report ({SUMMARY} missing); pass a folder written by `interp report`")
    summary = json.loads((root / SUMMARY).read_text())
    written: list[Path] = []
    for section in summary["sections"]:
        if not section["error"]:
            written += lenses.lens(section["name"]).redraw(root / section["name"])
    for part in summary.get("parts", []):
        written += redraw(root / part["folder"])
    render(root)
    return written


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    from interp.app.args import add_run_arguments

    add_run_arguments(parser, many_tuned=True, out_default=Path("out/report"))
    parser.add_argument("--real", action="store_true", help="add the real-model part: "
                        + ", ".join(zoo_defaults.REAL_SECTIONS) + " on zoo:smol (SmolLM2-135M-Instruct) vs its "
                        "fine-tunes; needs the 'real' extra, and builds the real zoo once (about 15 minutes on 2 "
                        "CPU cores)")
    parser.add_argument("--only", nargs="+", choices=list(lenses.LENSES + lenses.REAL_ONLY),
                        help="run only these lenses (organisms: in a report on zoo:smol only)")
    parser.add_argument("--quick", action="store_true", help="small settings everywhere (a smoke test)")


def run_cli(args) -> None:
    index = run_report(args.out, args.base, args.tuned, prompts=args.prompts, prompts_b=args.prompts_b,
                       n_prompts=args.n_prompts, quick=args.quick, only=args.only, series=args.series,
                       real=args.real, backend=args.backend, overwrite=args.overwrite,
                       placement=pair_options(args))
    summary = json.loads((args.out / SUMMARY).read_text())
    failed = [s["name"] for s in summary["sections"] if s["error"]] + [
        f'{p["folder"]}/{s["name"]}' for p in summary["parts"]
        for s in json.loads((args.out / p["folder"] / SUMMARY).read_text())["sections"] if s["error"]]
    print(f"report: {index}" + (f" (not run: {', '.join(failed)})" if failed else ""))


def add_figures_arguments(parser) -> None:
    parser.add_argument("folder", type=Path, help="a report folder written by `interp report`")


def run_figures_cli(args) -> None:
    written = redraw(args.folder)
    print(f"re-drew {len(written)} figure files in {args.folder} and re-rendered {args.folder / 'index.html'}")
