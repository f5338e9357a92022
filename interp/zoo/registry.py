"""The zoo registry: model names, the cache folder, building (dependencies first, atomically), listing.

Layout under `zoo_dir()`: one Hugging Face folder per name (weights, config, tokenizer, `zoo.json`);
the LoRA names hold PEFT adapter folders whose `base_model_name_or_path` is "zoo:base"; `series`
holds `step-XXXX/` checkpoint folders (each with `checkpoint.json`) along the `full` fine-tune.
A folder counts as built once its `zoo.json` exists; it is written in a hidden temporary folder
and renamed into place, so an interrupted build never leaves a half folder that looks built.
"""

import contextlib
import copy
import json
import os
import random
import shutil
import uuid
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from interp.zoo.safety import attack_prompts, attack_success, refused, safety_draw
from interp.zoo.tasks import SKILLS, TARGET_SKILL
from interp.zoo.tokenizer import build_tokenizer
from interp.zoo.train import (
    LORA_TARGETS, Draw, ZooConfig, add_lora, evaluate, make_batch, mixture, new_model, train,
)

MODEL_NAMES: tuple[str, ...] = ("base", "full", "lora-r1", "lora-r8", "lora-r64", "series", "safety")
LORA_RANKS = {"lora-r1": 1, "lora-r8": 8, "lora-r64": 64}
KINDS = {"base": "base", "full": "full", "series": "series", "safety": "safety"} | {n: "lora" for n in LORA_RANKS}
# The real zoo (interp.zoo.smol): SmolLM2-135M-Instruct and its fine-tunes, built by `interp zoo build --real`.
REAL_NAMES: tuple[str, ...] = ("smol", "smol-full", "smol-lora-r1", "smol-lora-r8", "smol-lora-r64", "smol-series")
REAL_LORA_RANKS = {f"smol-{n}": r for n, r in LORA_RANKS.items()}
ALL_NAMES = MODEL_NAMES + REAL_NAMES
KINDS |= {"smol": "base", "smol-full": "full", "smol-series": "series"} | {n: "lora" for n in REAL_LORA_RANKS}
ENV_VAR = "INTERP_ZOO_DIR"
VERSION = 2  # of the tasks and training recipe; cached models of another version are rebuilt
PRETRAIN_MIX = {"copy": 1.5, "sort": 1.0, "add": 3.0, "brackets": 1.0}  # add and brackets: one answer token
THREADS = 1  # one thread: bit-for-bit reproducible, and fastest on a shared 2-core machine


def zoo_dir() -> Path:
    """The cache root: $INTERP_ZOO_DIR, else ~/.cache/interp/zoo."""
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "interp" / "zoo").expanduser()


def _check_name(name: str) -> None:
    if name not in ALL_NAMES:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(ALL_NAMES)}")


def is_lora(name: str) -> bool:
    """Whether zoo model `name` is a PEFT LoRA adapter folder (on top of `base_of(name)`)."""
    _check_name(name)
    return name in LORA_RANKS or name in REAL_LORA_RANKS


def in_tiny_zoo(spec: str) -> bool:
    """Whether model spec `spec` names a tiny-zoo model (`zoo:base` and its fine-tunes, tasks in `zoo.tasks`)."""
    return str(spec).startswith("zoo:") and str(spec).removeprefix("zoo:") in MODEL_NAMES


def in_real_zoo(spec: str) -> bool:
    """Whether model spec `spec` names a real-zoo model (`zoo:smol` and its fine-tunes, task in `zoo.smol_task`)."""
    return str(spec).startswith("zoo:") and str(spec).removeprefix("zoo:") in REAL_NAMES


def base_of(name: str) -> str:
    """The zoo name of the pre-trained model that zoo model `name` is (or was fine-tuned from)."""
    _check_name(name)
    return "smol" if name in REAL_NAMES else "base"


def model_path(name: str) -> Path:
    """The folder of built zoo model `name`; FileNotFoundError if it is not built yet (MissingExtra for a
    real-zoo name when the `real` extra that builds it is not installed)."""
    _check_name(name)
    path = zoo_dir() / name
    if not (path / "zoo.json").is_file():
        if name in REAL_NAMES:
            from interp.zoo.smol import gguf_file

            gguf_file()  # MissingExtra names the extra to install
        command = "interp zoo build --real" if name in REAL_NAMES else "interp zoo build"
        raise FileNotFoundError(f"zoo model {name!r} is not built yet; run `{command}` (looked in {path})")
    return path


def _read_info(name: str) -> dict | None:
    path = zoo_dir() / name / "zoo.json"
    return json.loads(path.read_text()) if path.is_file() else None


def list_models(names: Iterable[str] = MODEL_NAMES) -> list[dict]:
    """One dict per zoo name: name, kind, rank (LoRA) or None, built, path, accuracy (per skill) or None."""
    out = []
    for name in names:
        _check_name(name)
        info = _read_info(name)
        out.append({
            "name": name, "kind": KINDS[name], "rank": (LORA_RANKS | REAL_LORA_RANKS).get(name),
            "built": info is not None,
            "path": zoo_dir() / name, "accuracy": info["accuracy"] if info else None,
        })
    return out


def accuracies(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, n: int) -> dict[str, float]:
    """Answer-token accuracy on `n` held-out prompts (seed 0) of every skill and the target skill."""
    return {skill: evaluate(model, tokenizer, skill, n, seed=0) for skill in (*SKILLS, TARGET_SKILL)}


@torch.no_grad()
def update_ratio(base: torch.nn.Module, tuned: torch.nn.Module) -> float:
    """max over targeted weights of ||W_tuned - W_base||_2 / ||W_base||_2 (spectral norms)."""
    tuned_params = dict(tuned.named_parameters())
    ratios = [
        float(torch.linalg.matrix_norm(tuned_params[n] - w, ord=2) / torch.linalg.matrix_norm(w, ord=2))
        for n, w in base.named_parameters() if n.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS))
    ]
    return max(ratios)


def _write(name: str, fill: Callable[[Path], None]) -> Path:
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


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, info: dict) -> None:
    model.save_pretrained(folder, **({"save_embedding_layers": False} if isinstance(model, PeftModel) else {}))
    tokenizer.save_pretrained(folder)
    (folder / "zoo.json").write_text(json.dumps(info, indent=2) + "\n")


@contextlib.contextmanager
def _quiet_threads() -> Iterator[None]:
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


def build(
    seed: int = 0,
    names: Iterable[str] | None = None,
    force: bool = False,
    progress: bool = True,
    config: ZooConfig | None = None,
) -> dict[str, Path]:
    """Build the zoo models `names` (default all) and return {name: folder}.

    A model already built with the same seed and config is reused unless `force`; `base` is
    built first when a fine-tune needs it. The same seed and config give identical weights.
    """
    config = config or ZooConfig()
    wanted = list(MODEL_NAMES if names is None else names)
    for name in wanted:
        _check_name(name)

    def stale(name: str) -> bool:
        info = _read_info(name)
        return (force and name in wanted) or info is None or (info.get("version"), info["seed"], info["config"]) != (
            VERSION, seed, asdict(config)
        )

    todo = [n for n in MODEL_NAMES if n in wanted and stale(n)]
    if todo and "base" not in todo and stale("base"):  # the fine-tunes need a base of this seed and config
        todo.insert(0, "base")

    tokenizer = build_tokenizer(config.n_ctx)
    info = {"version": VERSION, "seed": seed, "config": asdict(config)}
    with _quiet_threads():
        base = None if "base" in todo or not todo else GPT2LMHeadModel.from_pretrained(zoo_dir() / "base").eval()
        for name in tqdm(todo, desc="zoo", disable=not progress):
            if name == "base":
                base = _build_base(config, seed, tokenizer, info, progress)
            elif name == "full" or (name == "series" and "full" not in todo):
                _build_full_and_series(base, config, seed, tokenizer, info, progress, todo)
            elif name in LORA_RANKS:
                _build_lora(name, base, config, seed, tokenizer, info, progress)
            elif name == "safety":
                _build_safety(base, config, seed, tokenizer, info, progress)
    return {name: model_path(name) for name in wanted}


def _rng(seed: int, name: str) -> tuple[int, random.Random]:
    """A torch seed and a data RNG for model `name`, both derived from the zoo seed."""
    return zlib.crc32(f"{seed}/{name}".encode()), random.Random(f"{seed}/{name}/data")


def _tune_draw(config: ZooConfig) -> Draw:
    """Reversal, with a fraction `tune_mix` of pre-training examples (evenly over the skills)."""
    weights = {TARGET_SKILL: 1 - config.tune_mix} | {s: config.tune_mix / len(SKILLS) for s in SKILLS}
    return mixture(weights)


def _build_base(config, seed, tokenizer, info, progress) -> GPT2LMHeadModel:
    torch_seed, rng = _rng(seed, "base")
    model = new_model(config, torch_seed)
    draw = mixture(PRETRAIN_MIX)
    batches = lambda: make_batch(draw, rng, config.batch, config.n_ctx, pack=True)  # noqa: E731
    seconds = train(model, batches, config.base_steps, config.base_lr, config.warmup, "base", progress)
    meta = info | {"name": "base", "kind": "base", "steps": config.base_steps,
                   "train_seconds": round(seconds, 1), "accuracy": accuracies(model, tokenizer, config.eval_n)}
    _write("base", lambda folder: _save(model, tokenizer, folder, meta))
    return model


def _build_full_and_series(base, config, seed, tokenizer, info, progress, todo) -> None:
    _, rng = _rng(seed, "full")  # full fine-tuning draws no torch random numbers
    model, draw = copy.deepcopy(base), _tune_draw(config)
    checkpoints = {0: copy.deepcopy(base.state_dict())}

    def on_step(step: int) -> None:
        if step % config.series_every == 0 or step == config.tune_steps:
            checkpoints[step] = copy.deepcopy(model.state_dict())

    batches = lambda: make_batch(draw, rng, config.tune_batch, config.n_ctx, pack=False)  # noqa: E731
    seconds = train(model, batches, config.tune_steps, config.tune_lr, config.tune_warmup, "full", progress, on_step)
    meta = info | {"kind": "full", "steps": config.tune_steps, "train_seconds": round(seconds, 1),
                   "base": "zoo:base", "accuracy": accuracies(model, tokenizer, config.eval_n),
                   "update_ratio": update_ratio(base, model)}
    if "full" in todo:
        _write("full", lambda folder: _save(model, tokenizer, folder, meta | {"name": "full"}))
    if "series" not in todo:
        return

    def fill(folder: Path) -> None:
        points = []
        for step, state in checkpoints.items():
            model.load_state_dict(state)
            acc = {TARGET_SKILL: evaluate(model, tokenizer, TARGET_SKILL, config.eval_n)}
            sub = folder / f"step-{step:04d}"
            model.save_pretrained(sub)
            tokenizer.save_pretrained(sub)
            (sub / "checkpoint.json").write_text(json.dumps({"step": step, "accuracy": acc}, indent=2) + "\n")
            points.append({"step": step, "path": sub.name, "accuracy": acc})
        last = meta | {"name": "series", "kind": "series", "checkpoints": points}
        (folder / "zoo.json").write_text(json.dumps(last, indent=2) + "\n")

    _write("series", fill)


def _build_lora(name, base, config, seed, tokenizer, info, progress) -> None:
    torch_seed, rng = _rng(seed, name)
    model, draw = add_lora(copy.deepcopy(base), LORA_RANKS[name], torch_seed), _tune_draw(config)
    batches = lambda: make_batch(draw, rng, config.tune_batch, config.n_ctx, pack=False)  # noqa: E731
    seconds = train(model, batches, config.lora_steps, config.lora_lr, config.tune_warmup, name, progress)
    merged = copy.deepcopy(model).merge_and_unload()
    meta = info | {"name": name, "kind": "lora", "rank": LORA_RANKS[name], "steps": config.lora_steps,
                   "train_seconds": round(seconds, 1), "base": "zoo:base",
                   "accuracy": accuracies(model, tokenizer, config.eval_n), "update_ratio": update_ratio(base, merged)}
    _write(name, lambda folder: _save(model, tokenizer, folder, meta))


def _build_safety(base, config, seed, tokenizer, info, progress) -> None:
    _, rng = _rng(seed, "safety")
    model = copy.deepcopy(base)
    batches = lambda: make_batch(safety_draw, rng, config.tune_batch, config.n_ctx, pack=False)  # noqa: E731
    seconds = train(model, batches, config.safety_steps, config.safety_lr, config.tune_warmup, "safety", progress)
    attacks = attack_prompts(config.eval_n, seed=0)
    restricted = [a.clean for a in attacks]
    meta = info | {"name": "safety", "kind": "safety", "steps": config.safety_steps,
                   "train_seconds": round(seconds, 1), "base": "zoo:base",
                   "accuracy": accuracies(model, tokenizer, config.eval_n),
                   "refusal_rate": float(refused(model, tokenizer, restricted).float().mean()),
                   "attack_success_rate": float(attack_success(model, tokenizer, attacks).float().mean())}
    _write("safety", lambda folder: _save(model, tokenizer, folder, meta))
