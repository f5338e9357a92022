"""Training and evaluation of the zoo models: GPT-2 init, batches, one AdamW loop, LoRA, accuracy.

Pre-training packs examples into rows of `n_ctx` tokens (`<bos> ex <eos> ex <eos> ...`, like
documents in a real corpus), so every position is trained and a prompt may follow other text.
Fine-tuning uses one example per row, right-padded. Loss is on answer tokens and their `<eos>`.
"""

import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from interp.zoo.tasks import Example, sample, task_prompts
from interp.zoo.tokenizer import BOS, EOS, PAD, VOCAB

IGNORE = -100
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
LORA_ALPHA = 1.0
Draw = Callable[[random.Random], Example]


@dataclass(frozen=True)
class ZooConfig:
    """Sizes, steps and learning rates of a zoo build (the defaults build the real zoo)."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 256  # MLP width
    n_ctx: int = 48  # positions; also the width of the packed pre-training rows
    batch: int = 32  # packed rows per pre-training step
    tune_batch: int = 64  # single-example rows per fine-tuning step
    warmup: int = 100  # pre-training warm-up steps
    tune_warmup: int = 20  # fine-tuning warm-up steps
    base_steps: int = 1400
    base_lr: float = 3e-3
    tune_steps: int = 200  # full fine-tune on reversal (and the series along it)
    tune_lr: float = 1e-3
    tune_mix: float = 0.2  # fraction of pre-training examples mixed into every fine-tune
    series_every: int = 40
    lora_steps: int = 400
    lora_lr: float = 4e-2
    safety_steps: int = 60
    safety_lr: float = 3e-4
    eval_n: int = 200


def new_model(config: ZooConfig, seed: int) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (no dropout) over the zoo vocabulary, seeded with `seed`."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=len(VOCAB), n_positions=config.n_ctx, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, n_inner=config.n_inner, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=VOCAB.index(BOS), eos_token_id=VOCAB.index(EOS), pad_token_id=VOCAB.index(PAD),
    ))


def mixture(weights: dict[str, float]) -> Draw:
    """Draws a train-split example of a skill picked with probability proportional to `weights`."""
    skills, w = zip(*weights.items())
    return lambda rng: sample(rng.choices(skills, w)[0], rng, "train")


def make_batch(draw: Draw, rng: random.Random, rows: int, n_ctx: int, pack: bool) -> tuple[Tensor, Tensor]:
    """input_ids and labels, both [rows, width <= n_ctx]; labels are IGNORE except on answers and <eos>.

    With `pack`, each row holds as many examples as fit (an example that does not fit is dropped);
    without, one example per row. Padding is on the right and never labelled.
    """
    ids_of = {w: i for i, w in enumerate(VOCAB)}
    seqs = []
    for _ in range(rows):
        ids, labels = [ids_of[BOS]], [IGNORE]
        while True:
            ex = draw(rng)
            prompt = [ids_of[w] for w in ex.prompt.split()]
            answer = [ids_of[w] for w in ex.answer.split()] + [ids_of[EOS]]
            if len(ids) + len(prompt) + len(answer) > n_ctx:
                break
            ids += prompt + answer
            labels += [IGNORE] * len(prompt) + answer
            if not pack:
                break
        seqs.append((ids, labels))
    return pad_rows(seqs, ids_of[PAD])


def pad_rows(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input ids, labels) lists right-padded into two [rows, width] tensors (`pad_id`, IGNORE)."""
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in seqs])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in seqs])
    return input_ids, labels


def train(
    model: torch.nn.Module,
    batches: Callable[[], tuple[Tensor, Tensor]],
    steps: int,
    lr: float,
    warmup: int,
    desc: str,
    progress: bool | tqdm = True,
    on_step: Callable[[int], None] | None = None,
    pad_id: int = VOCAB.index(PAD),
) -> float:
    """AdamW on the trainable parameters, linear warm-up then linear decay to 0, grad-norm clip 1.

    `on_step(step)` is called after every update (step counts from 1); tokens `pad_id` are masked out of
    attention. `progress`: a bar of its own (True), none (False), or a shared bar (a tqdm) that every step
    advances by one, labelled `desc`. Returns the wall time, s.
    """
    start = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    warmup = min(warmup, steps // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: max(0.0, min((s + 1) / max(warmup, 1), (steps - s) / max(steps - warmup, 1)))
    )
    model.train()
    shared = progress if isinstance(progress, tqdm) else None
    if shared is not None:
        shared.set_postfix_str(desc)
    for step in tqdm(range(1, steps + 1), desc=desc, disable=shared is not None or not progress, leave=False):
        input_ids, labels = batches()
        logits = model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long()).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(step)
        if shared is not None:
            shared.update(1)
    model.eval()
    return time.perf_counter() - start


def add_lora(model: torch.nn.Module, rank: int, seed: int, targets: tuple[str, ...] = LORA_TARGETS,
             base: str = "zoo:base", alpha: float = LORA_ALPHA) -> PeftModel:
    """`model` wrapped with LoRA on the `targets` modules (default: every GPT-2 Conv1D), adapter pointing at `base`.

    rsLoRA scaling, ΔW = (alpha / sqrt(rank)) B A, so that one learning rate suits every rank.
    """
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=True, target_modules=list(targets),
        fan_in_fan_out=isinstance(model, GPT2LMHeadModel), lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def _forward_padded(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, seqs: list[list[int]]
) -> Tensor:
    """Logits [batch, width, vocab] of right-padded token lists."""
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    return model(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def answer_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example], batch_size: int = 100
) -> float:
    """Fraction of answer tokens whose teacher-forced argmax prediction is right, pooled over `examples`.
    The answer tokens are those of `prompt + " " + answer` past the prompt's own tokens."""
    was_training, correct, total = model.training, 0, 0
    model.eval()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [tokenizer(e.prompt)["input_ids"] for e in chunk]
        fulls = [tokenizer(f"{e.prompt} {e.answer}")["input_ids"] for e in chunk]  # as interp.scoring joins them
        answers = [f[len(p):] for p, f in zip(prompts, fulls)]
        logits = _forward_padded(model, tokenizer, fulls)
        for row, p, a in zip(logits, prompts, answers):
            pred = row[len(p) - 1 : len(p) - 1 + len(a)].argmax(-1).cpu()
            correct += int((pred == torch.tensor(a)).sum())
            total += len(a)
    model.train(was_training)
    return correct / total


def evaluate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, skill: str, n: int = 200, seed: int = 0
) -> float:
    """Answer-token accuracy (teacher forcing, 0..1) on `n` held-out prompts of `skill`."""
    return answer_accuracy(model, tokenizer, task_prompts(skill, n, seed, "test"))


@torch.no_grad()
def next_tokens(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> Tensor:
    """The argmax next token id after each prompt, [len(prompts)]."""
    was_training = model.training
    model.eval()
    seqs = [tokenizer(p)["input_ids"] for p in prompts]
    logits = _forward_padded(model, tokenizer, seqs)
    model.train(was_training)
    return torch.stack([row[len(s) - 1].argmax(-1) for row, s in zip(logits, seqs)]).cpu()
