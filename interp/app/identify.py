"""`interp identify`: what was this fine-tune trained to do? A ranked short list of tokens and contexts, blind.

Reads only the two models and generic probes: unrelated prose (`--corpus`, default the zoo's prose paragraphs from
Python's own documentation) and generic chat questions (`--questions`, default `smol_task.CHAT_QUESTIONS` through
the tuned model's chat template, none for a model without one). Writes `identification.csv`, `contexts.csv`,
`results/identify/` and `figures/identify.{png,pdf}`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analyses import diffing
from interp.app.args import add_model_arguments, model_options, positive_int
from interp.app.output import claimed
from interp.models import load_pair
from interp.plotting import figure, save_figure
from interp.prompts import read_prompts

HELP = "blind identification: the tokens and contexts that say what a fine-tune was trained to do"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the pre-trained model (zoo:NAME, a folder or a hub id)")
    p.add_argument("--tuned", required=True, help="the fine-tuned model (full weights or a PEFT adapter)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--corpus", type=Path, help="unrelated text, one per line or .jsonl (default: the zoo's prose)")
    p.add_argument("--questions", type=Path, help="generic user turns, asked through the chat template (default: "
                                                 "a fixed set of everyday questions)")
    p.add_argument("--n", type=positive_int, default=20, help="length of the short list (default 20)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    add_model_arguments(p)


def default_corpus() -> list[str]:
    from interp.zoo.smol_task import prose_texts

    return list(prose_texts())


def chat_questions(tokenizer, questions: list[str] | None = None) -> list[str]:
    """`questions` (default the everyday `CHAT_QUESTIONS`) through the tokenizer's chat template, ready for the
    reply; [] when the tokenizer has no chat template."""
    from interp.zoo.smol_task import CHAT_QUESTIONS, chat_prompt

    if not getattr(tokenizer, "chat_template", None):
        return []
    return [chat_prompt(tokenizer, q) for q in questions or [q for q, _ in CHAT_QUESTIONS]]


def run(args) -> None:
    with claimed(args.out, overwrite=args.overwrite) as out:
        from interp.app import zoo_defaults

        zoo_defaults.build([args.base, args.tuned])
        pair = load_pair(args.base, args.tuned, **model_options(args))
        corpus = read_prompts(args.corpus) if args.corpus else default_corpus()
        questions = chat_questions(pair.tuned.tokenizer, read_prompts(args.questions) if args.questions else None)
        result = diffing.identify(pair, corpus, questions, n=args.n)
        result.save(out / "results" / "identify")
        write_tables(result, out)
    print(f"identify written to {out}: {' '.join(result.top(args.n))}")


def write_tables(result: diffing.Identification, out: Path) -> list[Path]:
    """identification.csv, contexts.csv and the figure, from a result."""
    result.to_frame().to_csv(out / "identification.csv", index=False)
    pd.DataFrame(result.contexts).to_csv(out / "contexts.csv", index=False)
    fig, ax = figure(width="single", height=3.2)
    diffing.plot_identification(result, ax[0, 0])
    return save_figure(fig, out / "figures" / "identify")
