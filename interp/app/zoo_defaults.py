"""What a zoo model is run with when the user names no prompts, fine-tunes or series: the only place that
knows the zoo's tasks. Everything else takes prompt sets and models from its caller."""

from __future__ import annotations

from interp.errors import BadPrompts
from interp.models import ZOO_PREFIX
from interp.prompts import PromptSet

ZOO_TUNED = ("zoo:full", "zoo:lora-r1", "zoo:lora-r8")
"""The tiny zoo's fine-tunes a report compares by default."""
REAL_TUNED = ("zoo:smol-full", "zoo:smol-lora-r1", "zoo:smol-lora-r8", "zoo:smol-lora-r64")
"""The real zoo's (zoo:smol's) fine-tunes."""
REAL_SECTIONS = ("tuco", "intruders", "lid", "organisms")
"""The lenses of the report's real-model part (`interp report --real`)."""


def is_zoo(spec) -> bool:
    return str(spec).startswith(ZOO_PREFIX)


def in_real(spec) -> bool:
    from interp.zoo import in_real_zoo

    return in_real_zoo(str(spec))


def in_tiny(spec) -> bool:
    from interp.zoo import in_tiny_zoo

    return in_tiny_zoo(str(spec))


def tuned_and_series(base: str) -> tuple[tuple[str, ...], str | None]:
    """(fine-tunes, checkpoint series) a zoo base is run with by default; ((), None) for other bases."""
    if not in_tiny(base) and not in_real(base):  # not a zoo model, or one without fine-tunes (zoo:gemma3)
        return (), None
    return (REAL_TUNED, "zoo:smol-series") if in_real(base) else (ZOO_TUNED, "zoo:series")


def prompt_sets(spec: str, n: int) -> dict[str, PromptSet]:
    """The zoo's target set (first, with answers) and its comparison set for zoo model `spec`: the tiny zoo's
    target skill and pre-training skills, the real zoo's zorbish and prose."""
    if not is_zoo(spec):
        raise BadPrompts(f"--prompts is required for {spec} (zoo models default to the zoo's own prompts)")
    from interp.zoo import default_prompts

    return {label: PromptSet(p, a, label) for label, (p, a) in default_prompts(spec, n).items()}


def target_prompts(spec: str, n: int) -> list[str]:
    """The zoo's target-task prompts for zoo model `spec` (what `interp capture` runs without --prompts)."""
    return next(iter(prompt_sets(spec, n).values())).prompts


def build(specs, progress: bool = True) -> None:
    """Build (or reuse) exactly the zoo models among `specs` and what they need."""
    from interp import zoo

    names = [str(s).removeprefix(ZOO_PREFIX) for s in specs if s and is_zoo(s)]
    tiny = [n for n in names if n in zoo.MODEL_NAMES]
    real = [n for n in names if n in zoo.REAL_NAMES]
    organisms = [n for n in names if n in zoo.ORGANISM_NAMES]
    if tiny:
        zoo.build(names=tiny, progress=progress)
    if real:
        from interp.zoo import smol

        smol.build_real(names=real, progress=progress)
    if organisms:
        from interp.zoo.organisms import build_organisms

        build_organisms(names=organisms, progress=progress)
    if any(n in zoo.GEMMA_NAMES for n in names):
        from interp.zoo.gemma3 import build_gemma3

        build_gemma3(progress=progress)


# ------------------------------------------------------------------------------------------------ circuits

def circuit_pairs(skill: str = "copy", n: int = 64, *, given: int = 1, seed: int = 0, split: str = "test"):
    """Clean/corrupt `PromptPairs` of a tiny-zoo skill: the prompt followed by its first `given` answer words; the
    answer is answer word `given`. The corrupt prompt is another example of the skill with the same number of
    words whose answer word differs (for copy: the sequence resampled), so clean and corrupt tokenise to the same
    length."""
    import random

    from analyses.circuits import PromptPairs
    from interp.zoo.tasks import task_prompts

    rng = random.Random(f"pairs/{skill}/{seed}")
    pool = task_prompts(skill, 8 * n, seed=seed + 1, split=split)
    out = PromptPairs([], [], [], [])
    for ex in task_prompts(skill, n, seed=seed, split=split):
        words = ex.answer.split()
        if len(words) <= given:
            raise BadPrompts(f"zoo skill {skill!r}: answers have {len(words)} words, cannot give {given}")
        match = [e for e in pool if len(e.prompt.split()) == len(ex.prompt.split())
                 and len(e.answer.split()) > given and e.answer.split()[given] != words[given]]
        other = rng.choice(match)
        out.clean.append(" ".join([ex.prompt, *words[:given]]))
        out.corrupt.append(" ".join([other.prompt, *other.answer.split()[:given]]))
        out.answer.append(words[given])
        out.wrong.append(other.answer.split()[given])
    return out


def circuit_prompts(base: str, n: int = 64, skill: str = "copy", seed: int = 0) -> dict | None:
    """`circuits.measure`'s prompts on a tiny-zoo base: `skill` pairs (copy: induction) and the target skill's
    (reverse) pairs, with their held-out prompts and answers as task and target; None for other bases (the real
    zoo's zorbish comes in as the prompt sets themselves)."""
    if not in_tiny(base):
        return None
    from interp.zoo.tasks import TARGET_SKILL, task_prompts

    def prompt_set(name: str) -> PromptSet:
        ex = task_prompts(name, n, seed=seed, split="test")
        return PromptSet([e.prompt for e in ex], [e.answer for e in ex], name)

    return {"pairs": circuit_pairs(skill, n, seed=seed), "target_pairs": circuit_pairs(TARGET_SKILL, n, seed=seed),
            "task": prompt_set(skill), "target": prompt_set(TARGET_SKILL)}


def lofit_examples(spec: str, tokenizer, n: int = 512) -> PromptSet | None:
    """LoFiT training data on a zoo model: `n` train-split examples of its target task (the tiny zoo's reverse, the
    real zoo's zorbish); None outside the zoo."""
    if in_real(spec):
        from interp.zoo.smol_task import TASK, task_examples

        examples, label = task_examples(tokenizer, n, split="train"), TASK
    elif in_tiny(spec):
        from interp.zoo.tasks import TARGET_SKILL, task_prompts

        examples, label = task_prompts(TARGET_SKILL, n, split="train"), TARGET_SKILL
    else:
        return None
    return PromptSet([e.prompt for e in examples], [e.answer for e in examples], f"{label} (train)")


# ------------------------------------------------------------------------------------------------ diffing

def diffing_neutral_prompt(spec: str) -> str | None:
    """The neutral prompt the diffing lens' Patchscope injects into on a tiny-zoo model (a copy example cut before
    its last answer word, in the zoo's own words); None elsewhere (the lens' default, an identity prompt)."""
    return "copy a b c = a b" if in_tiny(spec) else None
