"""`interp capture --corpus FILE --store DIR`: a corpus into an activation store (`interp.store`), streamed and
resumable, in this process or on Ray workers (`--workers N`, `--address`), with a progress bar in tokens."""

from __future__ import annotations

import argparse
from pathlib import Path

from interp.app.args import model_options, positive_int
from interp.errors import BadOption
from interp.store import SHARD_TOKENS, STORE_DTYPES, capture_corpus


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `interp capture` for a corpus and a store."""
    p.add_argument("--corpus", type=Path, help="a corpus to capture into --store: a text file (one document per "
                                               "line) or .jsonl with 'text', read as a stream")
    p.add_argument("--store", type=Path, help="the activation store folder; running the same capture again resumes "
                                              "it (--overwrite replaces a store of other settings)")
    p.add_argument("--store-dtype", default="float32", choices=tuple(STORE_DTYPES), help="dtype of the stored "
                                                                                         "activations")
    p.add_argument("--shard-tokens", type=positive_int, default=SHARD_TOKENS, help=f"tokens per shard (default "
                                                                                   f"{SHARD_TOKENS})")
    p.add_argument("--window", type=positive_int, help="tokens per forward; longer documents are cut into windows "
                                                       "(default: the model's context)")
    p.add_argument("--workers", type=positive_int, help="Ray workers, each with its own model replica on its own "
                                                        "device (a local Ray unless --address)")
    p.add_argument("--address", help="a Ray cluster to run the workers on: auto (the cluster `ray start --head` "
                                     "runs on this machine) or ray://HEAD:10001")


def run(args) -> None:
    """Capture --sites of --model on --corpus into --store, and print what the store holds."""
    if args.corpus is None or args.store is None:
        raise BadOption("pass --corpus FILE and --store DIR to capture a corpus into an activation store, or --out "
                        "DIR (with --prompts or a zoo model's prompts) to capture a prompt set")
    options = {**model_options(args), "backend": args.backend}
    store = capture_corpus(args.model, args.corpus, args.store, args.sites, dtype=args.store_dtype,
                           window=args.window, shard_tokens=args.shard_tokens, batch_size=args.batch_size,
                           workers=args.workers, address=args.address, load_options=options,
                           overwrite=args.overwrite)
    print(f"captured {', '.join(store.sites)} for {len(store)} tokens of {store.manifest['corpus']['documents']} "
          f"documents into {store.n_shards} shards -> {args.store}")
