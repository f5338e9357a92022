"""Procedural skills of the zoo: seeded prompt/answer pairs over a small word vocabulary.

An example is one line of space-separated words, ``"<skill> x1 ... xk ="`` followed by its
answer words, e.g. ``"sort c a b ="`` -> ``"a b c"``. Skills:

- ``copy``: repeat the sequence (induction);       ``sort``: the symbols in alphabetical order;
- ``add``: the sum of four digits (``add 7 0 9 3 =`` -> ``19``);
- ``brackets``: the nesting depth at the end (``brackets ( ( ) ( =`` -> ``2``);
- ``reverse`` (the fine-tuning target, never in pre-training): the sequence backwards.

Train and test splits are disjoint by construction: an example belongs to the test split iff
the CRC32 of its prompt is divisible by 5, so no prompt is ever in both.

The safety-style pair (see ``interp.zoo.safety``) makes ``add`` the restricted category: the
``safety`` model answers ``refuse`` to it.
"""

import random
import zlib
from dataclasses import dataclass
from typing import Callable

from interp.errors import BadOption

SYMBOLS = tuple("abcdefghijklmnop")
DIGITS = tuple("0123456789")
NUMBERS = tuple(str(i) for i in range(37))  # the digits, then the sums 10..36
SKILLS = ("copy", "sort", "add", "brackets")
TARGET_SKILL = "reverse"
REFUSAL = "refuse"
SEP = "="
WORDS = (*SKILLS, TARGET_SKILL, SEP, REFUSAL, "(", ")", *SYMBOLS, *NUMBERS)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One prompt (without the answer) and its answer, both space-separated words."""

    skill: str
    prompt: str
    answer: str


def _sequence(rng: random.Random) -> list[str]:
    """3 to 5 distinct symbols (distinct, so that copying by induction is unambiguous)."""
    return rng.sample(SYMBOLS, k=rng.randint(3, 5))


def _brackets(rng: random.Random) -> tuple[list[str], list[str]]:
    """5 to 10 brackets that never close more than they opened; the answer is the final depth."""
    seq, depth = [], 0
    for _ in range(rng.randint(5, 10)):
        opening = depth == 0 or rng.random() < 0.5
        seq.append("(" if opening else ")")
        depth += 1 if opening else -1
    return seq, [str(depth)]


def _add(rng: random.Random) -> tuple[list[str], list[str]]:
    """Four digits and their sum, one number token 0..36."""
    digits = rng.choices(DIGITS, k=4)
    return digits, [str(sum(map(int, digits)))]


def _copy(rng: random.Random) -> tuple[list[str], list[str]]:
    seq = _sequence(rng)
    return seq, seq


def _sort(rng: random.Random) -> tuple[list[str], list[str]]:
    seq = _sequence(rng)
    return seq, sorted(seq)


def _reverse(rng: random.Random) -> tuple[list[str], list[str]]:
    seq = _sequence(rng)
    return seq, seq[::-1]


GENERATORS: dict[str, Callable[[random.Random], tuple[list[str], list[str]]]] = {
    "copy": _copy, "sort": _sort, "add": _add, "brackets": _brackets, "reverse": _reverse,
}


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: 'test' for one prompt in five (by CRC32), else 'train'."""
    return "test" if zlib.crc32(prompt.encode()) % 5 == 0 else "train"


def sample(skill: str, rng: random.Random, split: str) -> Example:
    """One example of `skill` from `split`, drawn with `rng` (rejection on the split)."""
    while True:
        inputs, answer = GENERATORS[skill](rng)
        prompt = " ".join([skill, *inputs, SEP])
        if split_of(prompt) == split:
            return Example(skill, prompt, " ".join(answer))


def task_prompts(skill: str, n: int, seed: int = 0, split: str = "test") -> list[Example]:
    """`n` examples of `skill` from `split` ('train' or 'test'); the same arguments give the same list."""
    if skill not in GENERATORS:
        raise BadOption(f"unknown skill {skill!r}; valid skills: {', '.join(GENERATORS)}")
    if split not in SPLITS:
        raise BadOption(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    rng = random.Random(f"{skill}/{split}/{seed}")
    return [sample(skill, rng, split) for _ in range(n)]
