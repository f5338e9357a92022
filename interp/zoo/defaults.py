"""The prompts an analysis uses on a zoo model when it is given no prompt file.

Tiny zoo (`zoo:base` and its fine-tunes): the target skill's held-out prompts, then the pre-training skills'
(equal shares). Real zoo (`zoo:smol...`): held-out zorbish prompts, then English prose paragraphs (the forgetting
probe, no answers). Both give answers where the task has them. `zoo:gemma3` has no task: English prose only.
"""

from __future__ import annotations

from interp.zoo.cache import GEMMA_NAMES, REAL_NAMES, model_path
from interp.zoo.tasks import SKILLS, TARGET_SKILL, task_prompts

PromptSets = dict[str, tuple[list[str], list[str] | None]]
"""label -> (prompts, answers or None); the first set is the target task."""


def default_prompts(spec: str, n: int) -> PromptSets:
    """The target set (`n` prompts) and the comparison set (`n`, prose: at most `smol_task.PROSE_N`) of zoo `spec`."""
    name = str(spec).removeprefix("zoo:")
    if name in GEMMA_NAMES:  # a base model with no task of its own
        from interp.zoo.smol_task import prose_texts

        return {"prose": (list(prose_texts()[:n]), None)}
    if name in REAL_NAMES:
        from transformers import AutoTokenizer

        from interp.zoo.smol_task import TASK, prose_texts, task_examples

        target = task_examples(AutoTokenizer.from_pretrained(model_path("smol")), n)
        return {TASK: ([e.prompt for e in target], [e.answer for e in target]),
                "prose": (list(prose_texts()[:n]), None)}
    target = task_prompts(TARGET_SKILL, n, split="test")
    mixed = [e for skill in SKILLS for e in task_prompts(skill, n // len(SKILLS), split="test")]
    return {TARGET_SKILL: ([e.prompt for e in target], [e.answer for e in target]),
            "pre-training": ([e.prompt for e in mixed], [e.answer for e in mixed])}
