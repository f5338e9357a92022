"""The zoo's cache: model names, the cache folder, and writing a built model into it atomically.

Layout under `zoo_dir()`: one Hugging Face folder per name (weights, config, tokenizer, `zoo.json`); LoRA names hold
PEFT adapter folders; series hold `step-XXXX/` checkpoint folders. A folder counts as built once its `zoo.json`
exists; it is written in a hidden temporary folder and renamed into place, so an interrupted build never leaves a
half folder that looks built. The tiny zoo's builder is `interp.zoo.registry`, the real zoo's `interp.zoo.smol`,
`zoo:gemma3`'s `interp.zoo.gemma3`.
"""

import contextlib
import json
import os
import random
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from interp.errors import BadOption

MODEL_NAMES: tuple[str, ...] = ("base", "full", "lora-r1", "lora-r8", "lora-r64", "series", "safety")
LORA_RANKS = {"lora-r1": 1, "lora-r8": 8, "lora-r64": 64}
KINDS = {"base": "base", "full": "full", "series": "series", "safety": "safety"} | {n: "lora" for n in LORA_RANKS}
# The real zoo (interp.zoo.smol): SmolLM2-135M-Instruct and its fine-tunes, built by `interp zoo build --real`.
REAL_NAMES: tuple[str, ...] = ("smol", "smol-full", "smol-lora-r1", "smol-lora-r8", "smol-lora-r64", "smol-series")
REAL_LORA_RANKS = {f"smol-{n}": r for n, r in LORA_RANKS.items()}
# Gemma-3-270m (interp.zoo.gemma3), converted from its GGUF by `interp zoo build --gemma3`; no fine-tunes.
GEMMA_NAMES: tuple[str, ...] = ("gemma3",)
# Model organisms of zoo:smol (interp.zoo.organisms): fine-tunes with known objectives, `interp zoo build --organisms`.
ORGANISM_NAMES: tuple[str, ...] = ("smol-fact", "smol-fact-replay50", "smol-fact-replay90", "smol-taboo",
                                   "smol-persona", "smol-persona-full", "smol-refusal")
ALL_NAMES = MODEL_NAMES + REAL_NAMES + GEMMA_NAMES + ORGANISM_NAMES
KINDS |= {"smol": "base", "smol-full": "full", "smol-series": "series"} | {n: "lora" for n in REAL_LORA_RANKS}
KINDS |= {"gemma3": "base"} | {n: "full" if n.endswith("-full") else "lora" for n in ORGANISM_NAMES}
ENV_VAR = "INTERP_ZOO_DIR"
THREADS = 1  # one thread: bit-for-bit reproducible, and fastest on a shared 2-core machine


def zoo_dir() -> Path:
    """The cache root: $INTERP_ZOO_DIR, else ~/.cache/interp/zoo."""
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "interp" / "zoo").expanduser()


def check_name(name: str) -> None:
    if name not in ALL_NAMES:
        raise BadOption(f"unknown zoo model {name!r}; valid names: {', '.join(ALL_NAMES)}")


def is_lora(name: str) -> bool:
    """Whether zoo model `name` is a PEFT LoRA adapter folder (on top of `base_of(name)`)."""
    check_name(name)
    return name in LORA_RANKS or name in REAL_LORA_RANKS or KINDS[name] == "lora"


def in_tiny_zoo(spec: str) -> bool:
    """Whether model spec `spec` names a tiny-zoo model (`zoo:base` and its fine-tunes, tasks in `zoo.tasks`)."""
    return str(spec).startswith("zoo:") and str(spec).removeprefix("zoo:") in MODEL_NAMES


def in_real_zoo(spec: str) -> bool:
    """Whether model spec `spec` names a real-zoo model (`zoo:smol` and its fine-tunes, task in `zoo.smol_task`)."""
    return str(spec).startswith("zoo:") and str(spec).removeprefix("zoo:") in REAL_NAMES


def base_of(name: str) -> str:
    """The zoo name of the pre-trained model that zoo model `name` is (or was fine-tuned from)."""
    check_name(name)
    if name in GEMMA_NAMES:
        return name
    return "smol" if name in REAL_NAMES + ORGANISM_NAMES else "base"


def model_path(name: str) -> Path:
    """The folder of built zoo model `name`; FileNotFoundError if it is not built yet (MissingExtra for a
    real-zoo name when the `real` extra that builds it is not installed, for `gemma3` without the `gemma3` extra)."""
    check_name(name)
    path = zoo_dir() / name
    if not (path / "zoo.json").is_file():
        if name in REAL_NAMES + ORGANISM_NAMES:
            from interp.zoo.smol_source import gguf_file

            gguf_file()  # MissingExtra names the extra to install
        if name in GEMMA_NAMES:
            from interp.zoo.gemma3 import check_extra

            check_extra()  # MissingExtra names the extra to install
        command = ("interp zoo build --real" if name in REAL_NAMES else
                   "interp zoo build --organisms" if name in ORGANISM_NAMES else
                   "interp zoo build --gemma3" if name in GEMMA_NAMES else "interp zoo build")
        raise FileNotFoundError(f"zoo model {name!r} is not built yet; run `{command}` (looked in {path})")
    return path


def read_info(name: str) -> dict | None:
    path = zoo_dir() / name / "zoo.json"
    return json.loads(path.read_text()) if path.is_file() else None


def list_models(names: Iterable[str] = MODEL_NAMES) -> list[dict]:
    """One dict per zoo name: name, kind, rank (LoRA) or None, built, path, accuracy (per skill) or None, and for an
    organism its behaviour rates and the base's (else None)."""
    out = []
    for name in names:
        check_name(name)
        info = read_info(name)
        out.append({
            "name": name, "kind": KINDS[name], "rank": (LORA_RANKS | REAL_LORA_RANKS).get(name),
            "built": info is not None,
            "path": zoo_dir() / name, "accuracy": info.get("accuracy") if info else None,
            "behaviour": info.get("behaviour") if info else None,
            "base_behaviour": info.get("base_behaviour") if info else None,
        })
    return out


def write(name: str, fill: Callable[[Path], None]) -> Path:
    """Fill a hidden temporary folder with `fill`, then rename it to zoo_dir()/name (replacing any old one)."""
    root = zoo_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f".tmp-{name}-{uuid.uuid4().hex}", root / name
    try:
        fill(tmp)
        if final.exists():
            old = root / f".old-{name}-{uuid.uuid4().hex}"
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, info: dict) -> None:
    model.save_pretrained(folder, **({"save_embedding_layers": False} if isinstance(model, PeftModel) else {}))
    tokenizer.save_pretrained(folder)
    (folder / "zoo.json").write_text(json.dumps(info, indent=2) + "\n")


@contextlib.contextmanager
def quiet_threads() -> Iterator[None]:
    """One torch thread and no transformers progress bars inside; both restored after."""
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(THREADS)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def seeded(seed: int, name: str) -> tuple[int, random.Random]:
    """A torch seed and a data RNG for model `name`, both derived from the zoo seed."""
    return zlib.crc32(f"{seed}/{name}".encode()), random.Random(f"{seed}/{name}/data")
