"""The real model's fine-tuning task and its forgetting probes, all built offline from what is installed.

Task (``zorbish``): a made-up word cipher. A fixed dictionary maps `N_WORDS` word tokens of SmolLM2's vocabulary to
`N_WORDS` other word tokens (both drawn, seeded, from the tokenizer's whole-word tokens), and a prompt asks for the
word-by-word translation of 3 to 5 distinct dictionary words: ``"Translate to Zorbish: dog red tree ="`` ->
``"lamp cup wor"``. Nothing in pre-training teaches the dictionary, so the base model scores about 0; learning it is
memorisation (each of the `N_WORDS` pairs must be written into the weights), which keeps the loss up for longer than
a text transformation the model already half knows. Held-out prompts are new combinations of the dictionary words;
train and test are split by the CRC32 of the prompt (`interp.zoo.tasks.split_of`).

Replay: `replay_texts()`, prose paragraphs of other standard-library modules, mixed into fine-tuning batches.

Forgetting probes: `prose_texts()` (paragraphs of English documentation from the docstrings of the installed Python
standard library, a fixed selection) scored by `prose_loss` (nats per token), and `CHAT_QUESTIONS` (simple factual
questions asked through the chat template, answered greedily) scored by `chat_answers`.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from interp.zoo.tasks import Example, split_of
from interp.zoo.train import IGNORE

TASK = "zorbish"
N_WORDS = 64
LENGTHS = (3, 5)  # words per prompt, inclusive
SEP = "="
PREFIX = "Translate to Zorbish:"
DICTIONARY_POOL = 1500  # the first (most frequent) whole-word tokens the dictionary is drawn from

CHAT_QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (  # simple questions the base model answers right
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of England?", ("london",)),
    ("How many days are in a week?", ("seven", "7")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the chemical symbol for water?", ("h2o",)),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is the boiling point of water in Celsius?", ("100",)),
    ("Which planet is known as the Red Planet?", ("mars",)),
    ("What is the largest ocean on Earth?", ("pacific",)),
    ("Who painted the Mona Lisa?", ("leonardo", "da vinci")),
    ("What is the tallest mountain in the world?", ("everest",)),
    ("What language is spoken in Brazil?", ("portuguese",)),
    ("What is the main language spoken in France?", ("french",)),
)
PROSE_MODULES = ("argparse", "collections", "contextlib", "dataclasses", "functools", "heapq", "inspect", "json",
                 "logging", "pathlib", "pickle", "random", "shutil", "string", "subprocess", "tarfile", "textwrap",
                 "threading", "typing", "unittest", "uuid", "zipfile")
REPLAY_MODULES = ("abc", "asyncio", "calendar", "codecs", "configparser", "copy", "csv", "datetime", "decimal",
                  "difflib", "doctest", "email", "enum", "fnmatch", "fractions", "glob", "gzip", "hashlib", "io",
                  "ipaddress", "itertools", "locale", "mailbox", "mimetypes", "operator", "os", "pdb", "queue", "re",
                  "sched", "secrets", "selectors", "socket", "statistics", "tempfile", "timeit", "trace",
                  "traceback", "warnings", "weakref")
PROSE_N = 24  # paragraphs
PROSE_WORDS = (30, 90)  # a paragraph's length in words, inclusive
CODE = "()[]{}=<>_*`"  # a paragraph with any of these is code or markup, not prose


# --------------------------------------------------------------------------------------------------- the task

@lru_cache(maxsize=4)
def _dictionary(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """word -> code: 2 N_WORDS distinct whole-word tokens (space + 3 to 7 lowercase letters, each one token)."""
    vocab = tokenizer.get_vocab()
    space = tokenizer.convert_ids_to_tokens(tokenizer(" a", add_special_tokens=False)["input_ids"])[0][0]
    words = sorted((i, t[1:]) for t, i in vocab.items() if re.fullmatch(f"{re.escape(space)}[a-z]{{3,7}}", t))
    pool = [w for _, w in words[:DICTIONARY_POOL] if len(tokenizer(f" {w}", add_special_tokens=False)["input_ids"]) == 1]
    chosen = random.Random("zorbish/dictionary").sample(pool, 2 * N_WORDS)
    return dict(zip(chosen[:N_WORDS], chosen[N_WORDS:]))


def dictionary(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """The cipher: `N_WORDS` source words -> their code words (a fixed function of the tokenizer's vocabulary)."""
    return dict(_dictionary(tokenizer))


def sample(tokenizer: PreTrainedTokenizerBase, rng: random.Random, split: str) -> Example:
    """One task example of `split`, drawn with `rng` (rejection on the split)."""
    cipher = _dictionary(tokenizer)
    words = list(cipher)
    while True:
        seq = rng.sample(words, k=rng.randint(*LENGTHS))
        prompt = f"{PREFIX} {' '.join(seq)} {SEP}"
        if split_of(prompt) == split:
            return Example(TASK, prompt, " ".join(cipher[w] for w in seq))


def task_examples(tokenizer: PreTrainedTokenizerBase, n: int, seed: int = 0, split: str = "test") -> list[Example]:
    """`n` task examples of `split` ('train' or 'test'); the same arguments give the same list."""
    rng = random.Random(f"{TASK}/{split}/{seed}")
    return [sample(tokenizer, rng, split) for _ in range(n)]


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, end_id: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of `prompt answer <end>`: labels are IGNORE except on the answer and the end token.
    The answer follows the prompt after one space, as `interp.scoring.answer_scores` joins them."""
    prompt = tokenizer(example.prompt)["input_ids"]
    full = tokenizer(f"{example.prompt} {example.answer}")["input_ids"] + [end_id]
    return full, [IGNORE] * len(prompt) + full[len(prompt):]


# ------------------------------------------------------------------------------------------- forgetting probes

def _paragraphs(modules: tuple[str, ...]) -> list[str]:
    """The prose paragraphs of the docstrings of `modules` (and of their classes and functions), in order, unique.

    A paragraph is kept when it has `PROSE_WORDS` words and reads as prose (no code, no tables: letters and spaces
    make up at least 85% of it, and none of the characters of code or markup `CODE`)."""
    paragraphs = []
    for name in modules:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""] + [inspect.getdoc(obj) or "" for _, obj in sorted(vars(module).items())
                                                  if inspect.isclass(obj) or inspect.isfunction(obj)]
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(para.split())
                words = text.split()
                prose = sum(c.isalpha() or c == " " for c in text) >= 0.85 * len(text) and not set(text) & set(CODE)
                if PROSE_WORDS[0] <= len(words) <= PROSE_WORDS[1] and prose:
                    paragraphs.append(text)
    return list(dict.fromkeys(paragraphs))


@lru_cache(maxsize=1)
def prose_texts() -> tuple[str, ...]:
    """`PROSE_N` paragraphs of English prose (one line each) from the docstrings of `PROSE_MODULES`, in a fixed
    order. The text depends on the Python version; the selection rule does not."""
    unique = _paragraphs(PROSE_MODULES)
    return tuple(random.Random("prose").sample(unique, min(PROSE_N, len(unique))))


@lru_cache(maxsize=1)
def replay_texts() -> tuple[str, ...]:
    """English prose mixed into fine-tuning (replay, against forgetting): the paragraphs of `REPLAY_MODULES`, none of
    which is a forgetting probe (`prose_texts`)."""
    probes = set(prose_texts())
    return tuple(p for p in _paragraphs(REPLAY_MODULES) if p not in probes)


@torch.no_grad()
def prose_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: tuple[str, ...] | None = None,
               batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over `texts` (default `prose_texts()`)."""
    texts = prose_texts() if texts is None else texts
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for i in range(0, len(texts), batch_size):
        seqs = [tokenizer(t)["input_ids"] for t in texts[i : i + batch_size]]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
        total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / count


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """`question` as one user turn in the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


@torch.no_grad()
def chat_replies(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str],
                 max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy replies to `questions`, each asked as one user turn of the chat template (left-padded batches of
    `batch_size`, KV-cached Hugging Face generation): the decoded new text, stripped, one per question."""
    was_training, out = model.training, []
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for i in range(0, len(questions), batch_size):
            texts = [chat_prompt(tokenizer, q) for q in questions[i : i + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            new = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[:, batch["input_ids"].shape[1]:]
            out += [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    model.train(was_training)
    return out


def chat_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 max_new_tokens: int = 16) -> list[dict]:
    """Greedy answers to `CHAT_QUESTIONS`: one dict per question with the answer text and whether it is right
    (an accepted answer occurs in it, case-insensitive)."""
    replies = chat_replies(model, tokenizer, [q for q, _ in CHAT_QUESTIONS], max_new_tokens)
    return [{"question": q, "answer": answer, "right": any(a in answer.lower() for a in accepted)}
            for (q, accepted), answer in zip(CHAT_QUESTIONS, replies)]
