"""`interp report`: every analysis on one base and one or more tuned models, into one static HTML page.

A report folder DIR holds
    index.html      a one-screen summary (each analysis' headline numbers and one figure), then one section per
                    analysis: figures (PNG, each linking to its vector PDF), tables, the steering result, or the
                    error when the analysis failed. Images sit next to it under relative links; no server, no
                    network, no script.
    summary.json    the same page as data: the models, the prompt sets and every `Section` below.
    <analysis>/     that analysis' saved results, CSV tables and figures, as its own `write` saves them.

Plug-in interface. A section builder is a function

    report_section(ctx: Context) -> Section

that runs one analysis through its public API on `ctx.base`, `ctx.tuned` (label -> Model; `ctx.specs` has what each
was loaded from) and `ctx.sets` (label -> PromptSet; the first is the target task), writes everything under
`ctx.out` (DIR/<name>), and returns a `Section` naming its headline numbers, figures, tables and steering result by
paths relative to DIR (`ctx.rel(path)`). `ctx.quick` asks for a small, fast run (tests); `ctx.step(msg)` prints a
progress line. The builder for the analysis `name` in `SECTIONS` is `analyses.<name>.report_section` when that
module defines one, else `analyses.report_sections.BUILDERS[name]`; with neither the section says 'not available'.
`Section.redraw` lists ("module:function", folder) calls that re-draw all of the section's figures from its saved
results without a model; `interp figures DIR` runs them and re-renders index.html from summary.json. A builder that
raises is reported in its own section (message, and the traceback in DIR/<name>/error.txt); the others still run.
Budget: the default zoo report (three tuned models) has to fit about 10 minutes on 2 CPU cores, so a section should
take about 2 minutes there, and seconds with `ctx.quick`.
"""

from __future__ import annotations

import html
import importlib
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from interp.errors import BadPrompts, ResultNotFound
from interp.models import Model, Pair, check_compatible, load_model, model_label, unique_labels

SECTIONS = {
    "tuco": "TuCo: fine-tuning component of the forward pass",
    "circuits": "Circuits and heads",
    "intruders": "LoRA intruder dimensions",
    "shift": "Concept shift vectors",
    "lid": "Local intrinsic dimension",
}
"""Analysis name -> section title, in page order."""
ZOO_TUNED = ("zoo:full", "zoo:lora-r1", "zoo:lora-r8")
REAL_TUNED = ("zoo:smol-full", "zoo:smol-lora-r1", "zoo:smol-lora-r8", "zoo:smol-lora-r64")
REAL_SECTIONS = ("tuco", "intruders", "lid")
"""The real-model part (`real=True`): zoo:smol vs its full fine-tune and LoRA ranks, with these analyses."""
REAL_PART = "real"
SUMMARY = "summary.json"


def zoo_defaults(base: str) -> tuple[tuple[str, ...], str | None]:
    """(tuned models, checkpoint series) a zoo base is reported with by default; ((), None) for other bases."""
    if not str(base).startswith("zoo:"):
        return (), None
    from interp.zoo import in_real_zoo

    return (REAL_TUNED, "zoo:smol-series") if in_real_zoo(base) else (ZOO_TUNED, "zoo:series")


@dataclass
class PromptSet:
    prompts: list[str]
    answers: list[str] | None = None


@dataclass
class Section:
    """One analysis in the report. Paths are relative to the report folder; `figures` are PNGs with a PDF of
    the same name next to each, the first one shown in the summary; `tables` map a caption to a CSV file."""

    name: str
    title: str
    headline: dict[str, float | int | str] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)
    steering: str = ""
    notes: str = ""
    redraw: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None


@dataclass
class Context:
    """What a section builder gets (see the module docstring)."""

    base: Model
    tuned: dict[str, Model]
    specs: dict[str, str]
    sets: dict[str, PromptSet]
    root: Path
    out: Path
    quick: bool = False
    step: Callable[[str], None] = print
    series: str | None = None  # a checkpoint series of the same fine-tuning (spec), for the analyses that follow one

    def pairs(self) -> list[tuple[str, Pair]]:
        return [(label, Pair(self.base, model)) for label, model in self.tuned.items()]

    @property
    def target(self) -> tuple[str, PromptSet]:
        return next(iter(self.sets.items()))

    def rel(self, path: str | Path) -> str:
        return Path(path).relative_to(self.root).as_posix()


def builder(name: str) -> Callable[[Context], Section] | None:
    """The section builder of analysis `name`, or None when the analysis has none (yet)."""
    try:
        module = importlib.import_module(f"analyses.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"analyses.{name}":
            raise
        module = None
    if module is not None and hasattr(module, "report_section"):
        return module.report_section
    from analyses.report_sections import BUILDERS

    return BUILDERS.get(name)


def _read_set(path: Path) -> PromptSet:
    """A prompt file; .jsonl lines with an "answer" on every line carry answers."""
    from interp.prompts import read_prompts

    prompts = read_prompts(path)
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        answers = [r.get("answer") if isinstance(r, dict) else None for r in records]
        if all(isinstance(a, str) for a in answers):
            return PromptSet(prompts, answers)
    return PromptSet(prompts)


def prompt_sets(base: str, prompts: Path | None, prompts_b: Path | None, n_prompts: int) -> dict[str, PromptSet]:
    """The target set (first) and a comparison set: the given files, or on zoo models the zoo's own
    (`interp.zoo.default_prompts`: tiny zoo, target and pre-training skills; real zoo, zorbish and prose)."""
    if prompts is None:
        if not str(base).startswith("zoo:"):
            raise BadPrompts(f"--prompts is required for {base} (zoo models default to the zoo's own prompts)")
        from interp.zoo import default_prompts

        return {label: PromptSet(p, a) for label, (p, a) in default_prompts(base, n_prompts).items()}
    sets = {Path(prompts).stem: _read_set(Path(prompts))}
    if prompts_b is not None:
        sets[Path(prompts_b).stem + ("-b" if Path(prompts_b).stem in sets else "")] = _read_set(Path(prompts_b))
    return sets


def run_report(out: str | Path, base: str = "zoo:base", tuned: tuple[str, ...] | list[str] = ZOO_TUNED, *,
               prompts: Path | None = None, prompts_b: Path | None = None, n_prompts: int | None = None,
               quick: bool = False, only: list[str] | None = None, series: str | None = None, real: bool = False,
               device: str = "auto", dtype: str = "float32", backend: str = "bridge") -> Path:
    """Run every analysis (or `only` these) and write DIR/index.html and DIR/summary.json; returns index.html.

    series: a checkpoint series of the same fine-tuning (default on zoo bases: the zoo's own). real: add the
    real-model part, `REAL_SECTIONS` on zoo:smol vs `REAL_TUNED` (with the smol series) in DIR/real, summarised on
    the page (builds the real zoo, which needs the `real` extra)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def step(msg: str) -> None:
        print(f"[report {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    series = series or zoo_defaults(base)[1]
    named = [str(s).removeprefix("zoo:") for s in (base, *tuned, series) if str(s).startswith("zoo:")]
    if named:
        from interp import zoo

        step("zoo: building (or reusing) the zoo models")
        if any(name in zoo.MODEL_NAMES for name in named):
            zoo.build(progress=True)
        if real_names := [name for name in named if name in zoo.REAL_NAMES]:
            from interp.zoo import smol

            smol.build_real(names=real_names, progress=True)
    sets = prompt_sets(base, prompts, prompts_b, n_prompts or (16 if quick else 64))
    step(f"loading {base} and {', '.join(map(str, tuned))}")
    kw = dict(device=device, dtype=dtype, backend=backend)
    base_model = load_model(base, **kw)
    labels = unique_labels([model_label(t) for t in tuned])
    models = {label: load_model(spec, base=base, **kw) for label, spec in zip(labels, tuned)}
    for model in models.values():
        check_compatible(base_model, model)
    summary = {"base": str(base), "tuned": dict(zip(labels, map(str, tuned))), "series": series, "quick": quick,
               "prompt_sets": {k: len(v.prompts) for k, v in sets.items()}, "sections": [], "parts": []}
    names = [n for n in SECTIONS if only is None or n in only]
    for i, name in enumerate(names, 1):
        step(f"[{i}/{len(names)}] {name}")
        ctx = Context(base_model, models, dict(zip(labels, map(str, tuned))), sets, root, root / name, quick,
                      lambda msg, name=name: step(f"  {name}: {msg}"), series)
        section = _run_section(name, ctx)
        step(f"[{i}/{len(names)}] {name} " + (f"FAILED: {section.error}" if section.error else
                                             f"done in {section.seconds:.0f}s"))
        summary["sections"].append(asdict(section))
        summary["seconds"] = round(time.perf_counter() - start, 1)
        (root / SUMMARY).write_text(json.dumps(summary, indent=1))
    if real:
        del base_model, models
        step(f"real model: zoo:smol vs {', '.join(REAL_TUNED)} in {root / REAL_PART}")
        run_report(root / REAL_PART, "zoo:smol", REAL_TUNED, n_prompts=n_prompts, quick=quick,
                   only=[n for n in REAL_SECTIONS if only is None or n in only], **kw)
        summary["parts"].append({"folder": REAL_PART, "title": "Real model: SmolLM2-135M-Instruct (zoo:smol)"})
        summary["seconds"] = round(time.perf_counter() - start, 1)
        (root / SUMMARY).write_text(json.dumps(summary, indent=1))
    return render(root)


def _run_section(name: str, ctx: Context) -> Section:
    t0 = time.perf_counter()
    try:
        build = builder(name)
        section = build(ctx) if build is not None else Section(
            name, SECTIONS[name], error=f"not available: analyses.{name} has no report_section yet")
    except Exception as e:  # one failed analysis must not stop the others
        ctx.out.mkdir(parents=True, exist_ok=True)
        (ctx.out / "error.txt").write_text(traceback.format_exc())
        section = Section(name, SECTIONS[name], error=f"{type(e).__name__}: {e}")
    section.seconds = round(time.perf_counter() - t0, 1)
    return section


# ------------------------------------------------------------------------------------------------ figures

def redraw(folder: str | Path) -> list[Path]:
    """Re-draw every figure of a report (from its summary.json) and re-render index.html; no model is run."""
    root = Path(folder)
    if not (root / SUMMARY).is_file():
        raise ResultNotFound(f"{root} holds no report ({SUMMARY} missing); pass a folder written by `interp report`")
    summary = json.loads((root / SUMMARY).read_text())
    written: list[Path] = []
    for section in summary["sections"]:
        if section["error"]:
            continue
        for target, sub in section["redraw"]:
            module, function = target.split(":")
            written += getattr(importlib.import_module(module), function)(root / sub)
    for part in summary.get("parts", []):
        written += redraw(root / part["folder"])
    render(root)
    return written


# --------------------------------------------------------------------------------------------------- page

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 10px} .card h3{margin:0 0 4px;font-size:1em}
.card img{width:100%;max-height:240px;object-fit:contain} .err{color:#b00020}
pre{white-space:pre-wrap;background:#fff4f4;padding:8px}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} td,th{padding:1px 8px;border-bottom:1px solid #eee;
text-align:left} .figs img{width:48%;min-width:320px;vertical-align:top} .muted{color:#666;font-size:.9em}
.scroll{overflow-x:auto}"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _headline(section: dict, rows: int | None = None) -> str:
    items = list(section["headline"].items())
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in items[:rows])
    more = f'<p class="muted">{len(items) - rows} more in the section</p>' if rows and len(items) > rows else ""
    return f"<table>{body}</table>{more}" if body else ""


def _figure(png: str) -> str:
    pdf = Path(png).with_suffix(".pdf").as_posix()
    return (f'<a href="{html.escape(pdf)}"><img src="{html.escape(png)}" '
            f'alt="{html.escape(Path(png).stem)}"></a>')


def _table(root: Path, caption: str, csv: str, rows: int = 12) -> str:
    import pandas as pd

    frame = pd.read_csv(root / csv)
    more = f" (first {rows} of {len(frame)} rows)" if len(frame) > rows else ""
    body = frame.head(rows).to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
    return (f'<p class="muted">{html.escape(caption)}{more}: <a href="{html.escape(csv)}">{html.escape(csv)}</a></p>'
            f'<div class="scroll">{body}</div>')


def _card(section: dict, part: str = "") -> str:
    """A section's summary card; `part`: the folder of a report part (its paths are relative to it)."""
    body = (f'<p class="err">{html.escape(section["error"])}</p>' if section["error"] else
            _headline(section, rows=6) + (_figure(f"{part}{section['figures'][0]}") if section["figures"] else ""))
    link = f'{part}index.html#{section["name"]}' if part else f'#{section["name"]}'
    return f'<div class="card"><h3><a href="{link}">{html.escape(section["title"])}</a></h3>{body}</div>'


def _part(root: Path, part: dict) -> str:
    """A report part (a report of its own in a sub-folder): its title, a link to its page and its cards."""
    summary = json.loads((root / part["folder"] / SUMMARY).read_text())
    folder = f'{part["folder"]}/'
    models = ", ".join(f"{html.escape(k)} ({html.escape(v)})" for k, v in summary["tuned"].items())
    return (f'<h2 id="part-{html.escape(part["folder"])}">{html.escape(part["title"])}</h2>'
            f'<p>{html.escape(summary["base"])} vs {models}; every figure and table on '
            f'<a href="{html.escape(folder)}index.html">its own page</a>.</p>'
            f'<div class="cards">{"".join(_card(s, folder) for s in summary["sections"])}</div>')


def _section(root: Path, section: dict) -> str:
    parts = [f'<h2 id="{section["name"]}">{html.escape(section["title"])}</h2>']
    if section["error"]:
        parts.append(f'<p class="err">This analysis did not run.</p><pre>{html.escape(section["error"])}</pre>')
        return "\n".join(parts)
    if section["notes"]:
        parts.append(f"<p>{html.escape(section['notes'])}</p>")
    parts.append(_headline(section))
    if section["steering"]:
        parts.append(f"<p><b>Steering.</b> {html.escape(section['steering'])}</p>")
    parts.append('<div class="figs">' + " ".join(_figure(f) for f in section["figures"]) + "</div>")
    parts += [_table(root, caption, csv) for caption, csv in section["tables"].items()]
    if section["seconds"] is not None:
        parts.append(f'<p class="muted">{section["seconds"]:.0f} s</p>')
    return "\n".join(parts)


def render(folder: str | Path) -> Path:
    """Write DIR/index.html from DIR/summary.json and the files it names."""
    root = Path(folder)
    summary = json.loads((root / SUMMARY).read_text())
    models = ", ".join(f"{html.escape(k)} ({html.escape(v)})" for k, v in summary["tuned"].items())
    sets = ", ".join(f"{html.escape(k)} ({n})" for k, n in summary["prompt_sets"].items())
    sections = summary["sections"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>interp report</title><style>{CSS}</style></head><body>
<h1>What fine-tuning changed: {html.escape(summary["base"])} vs {models}</h1>
<p class="muted">Prompt sets: {sets}.{" Quick run (small settings)." if summary["quick"] else ""}
Every figure links to its PDF; every number is in summary.json and each analysis' folder.</p>
<div class="cards">{"".join(_card(s) for s in sections)}</div>
{"".join(_section(root, s) for s in sections)}
{"".join(_part(root, p) for p in summary.get("parts", []))}
</body></html>
"""
    (root / "index.html").write_text(page, encoding="utf-8")
    return root / "index.html"


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    from interp.cli import add_model_arguments

    parser.add_argument("--base", default="zoo:base", help="pre-trained model: hub id, local folder or zoo name")
    parser.add_argument("--tuned", action="append", help="fine-tuned model (folder, PEFT adapter, hub id or zoo "
                                                         "name); repeat for several (zoo default: the base's "
                                                         "fine-tunes, " + ", ".join(ZOO_TUNED) + " for zoo:base)")
    parser.add_argument("--series", help="a checkpoint series of the same fine-tuning (folder of step-N checkpoints; "
                                         "zoo default: zoo:series, zoo:smol-series for zoo:smol)")
    parser.add_argument("--real", action="store_true", help="add the real-model part: " + ", ".join(REAL_SECTIONS)
                        + " on zoo:smol (SmolLM2-135M-Instruct) vs its fine-tunes; needs the 'real' extra, and "
                          "builds the real zoo once (about 15 minutes on 2 CPU cores)")
    parser.add_argument("--prompts", type=Path, help="target-task prompts (.txt, or .jsonl with 'prompt' and "
                                                     "optional 'answer'); optional on zoo models")
    parser.add_argument("--prompts-b", type=Path, help="a second prompt set to compare (zoo: pre-training skills)")
    parser.add_argument("--n-prompts", type=int, help="zoo prompts per set (default 64, 16 with --quick)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these analyses")
    parser.add_argument("--quick", action="store_true", help="small settings everywhere (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("out/report"), help="report folder (default out/report)")
    add_model_arguments(parser)


def run_cli(args) -> None:
    tuned = args.tuned or list(zoo_defaults(args.base)[0])
    if not tuned:
        from interp.errors import ModelNotFound

        raise ModelNotFound(f"pass --tuned (one or more) for base {args.base}; zoo bases default to their "
                            f"fine-tunes")
    index = run_report(args.out, args.base, tuned, prompts=args.prompts, prompts_b=args.prompts_b,
                       n_prompts=args.n_prompts, quick=args.quick, only=args.only, series=args.series,
                       real=args.real, device=args.device, dtype=args.dtype, backend=args.backend)
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
