"""Building the tiny zoo: the base model and its fine-tunes, dependencies first, each written atomically into the
cache (`interp.zoo.cache`). The LoRA names hold PEFT adapter folders whose `base_model_name_or_path` is "zoo:base";
`series` holds `step-XXXX/` checkpoint folders (each with `checkpoint.json`) along the `full` fine-tune.
"""

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm
from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase

from interp.zoo import cache
from interp.zoo.cache import (LORA_RANKS, MODEL_NAMES, check_name, model_path, read_info, seeded, zoo_dir)
from interp.zoo.safety import attack_prompts, attack_success, refused, safety_draw
from interp.zoo.tasks import SKILLS, TARGET_SKILL
from interp.zoo.tokenizer import build_tokenizer
from interp.zoo.train import (
    LORA_TARGETS, Draw, ZooConfig, add_lora, evaluate, make_batch, mixture, new_model, train,
)

VERSION = 2  # of the tasks and training recipe; cached models of another version are rebuilt
PRETRAIN_MIX = {"copy": 1.5, "sort": 1.0, "add": 3.0, "brackets": 1.0}  # add and brackets: one answer token


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


def build(
    seed: int = 0,
    names: Iterable[str] | None = None,
    force: bool = False,
    progress: bool = True,
    config: ZooConfig | None = None,
) -> dict[str, Path]:
    """Build the zoo models `names` (default all) and return {name: folder}.

    A model already built with the same seed and config is reused unless `force`; `base` is
    built first when a fine-tune needs it. The same seed and config give identical weights. One progress bar
    counts the training steps of everything to build, with an ETA.
    """
    config = config or ZooConfig()
    wanted = list(MODEL_NAMES if names is None else names)
    for name in wanted:
        check_name(name)

    def stale(name: str) -> bool:
        info = read_info(name)
        return (force and name in wanted) or info is None or (info.get("version"), info["seed"], info["config"]) != (
            VERSION, seed, asdict(config)
        )

    todo = [n for n in MODEL_NAMES if n in wanted and stale(n)]
    if todo and "base" not in todo and stale("base"):  # the fine-tunes need a base of this seed and config
        todo.insert(0, "base")

    tokenizer = build_tokenizer(config.n_ctx)
    info = {"version": VERSION, "seed": seed, "config": asdict(config)}
    steps = {"base": config.base_steps, "full": config.tune_steps, "series": config.tune_steps,
             "safety": config.safety_steps} | {n: config.lora_steps for n in LORA_RANKS}
    runs = [n for n in todo if not (n == "series" and "full" in todo)]  # full and series are one training run
    bar = tqdm(total=sum(steps[n] for n in runs), desc="zoo build", unit="step", disable=not progress or not runs)
    with cache.quiet_threads(), bar:
        base = None if "base" in todo or not todo else GPT2LMHeadModel.from_pretrained(zoo_dir() / "base").eval()
        for name in runs:
            if name == "base":
                base = _build_base(config, seed, tokenizer, info, bar)
            elif name in ("full", "series"):
                _build_full_and_series(base, config, seed, tokenizer, info, bar, todo)
            elif name in LORA_RANKS:
                _build_lora(name, base, config, seed, tokenizer, info, bar)
            elif name == "safety":
                _build_safety(base, config, seed, tokenizer, info, bar)
    return {name: model_path(name) for name in wanted}


def _tune_draw(config: ZooConfig) -> Draw:
    """Reversal, with a fraction `tune_mix` of pre-training examples (evenly over the skills)."""
    weights = {TARGET_SKILL: 1 - config.tune_mix} | {s: config.tune_mix / len(SKILLS) for s in SKILLS}
    return mixture(weights)


def _build_base(config, seed, tokenizer, info, progress) -> GPT2LMHeadModel:
    torch_seed, rng = seeded(seed, "base")
    model = new_model(config, torch_seed)
    draw = mixture(PRETRAIN_MIX)
    batches = lambda: make_batch(draw, rng, config.batch, config.n_ctx, pack=True)  # noqa: E731
    seconds = train(model, batches, config.base_steps, config.base_lr, config.warmup, "base", progress)
    meta = info | {"name": "base", "kind": "base", "steps": config.base_steps,
                   "train_seconds": round(seconds, 1), "accuracy": accuracies(model, tokenizer, config.eval_n)}
    cache.write("base", lambda folder: cache.save(model, tokenizer, folder, meta))
    return model


def _build_full_and_series(base, config, seed, tokenizer, info, progress, todo) -> None:
    _, rng = seeded(seed, "full")  # full fine-tuning draws no torch random numbers
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
        cache.write("full", lambda folder: cache.save(model, tokenizer, folder, meta | {"name": "full"}))
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

    cache.write("series", fill)


def _build_lora(name, base, config, seed, tokenizer, info, progress) -> None:
    torch_seed, rng = seeded(seed, name)
    model, draw = add_lora(copy.deepcopy(base), LORA_RANKS[name], torch_seed), _tune_draw(config)
    batches = lambda: make_batch(draw, rng, config.tune_batch, config.n_ctx, pack=False)  # noqa: E731
    seconds = train(model, batches, config.lora_steps, config.lora_lr, config.tune_warmup, name, progress)
    merged = copy.deepcopy(model).merge_and_unload()
    meta = info | {"name": name, "kind": "lora", "rank": LORA_RANKS[name], "steps": config.lora_steps,
                   "train_seconds": round(seconds, 1), "base": "zoo:base",
                   "accuracy": accuracies(model, tokenizer, config.eval_n), "update_ratio": update_ratio(base, merged)}
    cache.write(name, lambda folder: cache.save(model, tokenizer, folder, meta))


def _build_safety(base, config, seed, tokenizer, info, progress) -> None:
    _, rng = seeded(seed, "safety")
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
    cache.write("safety", lambda folder: cache.save(model, tokenizer, folder, meta))
