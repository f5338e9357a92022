"""The embedded default zoo: procedural skills, a word-level tokenizer, and tiny GPT-2 models.

`build()` trains (deterministically, on CPU) and caches a pre-trained `base` and its fine-tunes
on the held-out `reverse` skill: `full`, LoRA adapters `lora-r1/-r8/-r64`, a checkpoint `series`,
and a `safety`-style fine-tune that refuses `add` prompts, with a prefix attack that can undo it
(`attack_prompts`, `attack_success`). `model_path(name)` finds a built model. The real zoo (SmolLM2-135M-Instruct,
`zoo:smol`, and its fine-tunes: `REAL_NAMES`) is built by `interp.zoo.smol.build_real` with the `real` extra;
Gemma-3-270m (`zoo:gemma3`, `GEMMA_NAMES`) by `interp.zoo.gemma3.build_gemma3` with the `gemma3` extra; the model
organisms of `zoo:smol` (`ORGANISM_NAMES`, fine-tunes with known objectives) by `interp.zoo.organisms`.
"""

from interp.zoo.cache import (ALL_NAMES, GEMMA_NAMES, MODEL_NAMES, ORGANISM_NAMES, REAL_NAMES, base_of, in_real_zoo, in_tiny_zoo,
                              is_lora, list_models, model_path, zoo_dir)
from interp.zoo.registry import build
from interp.zoo.defaults import default_prompts
from interp.zoo.safety import RESTRICTED, Attack, attack_prompts, attack_success, refused
from interp.zoo.tasks import REFUSAL, SKILLS, TARGET_SKILL, Example, task_prompts
from interp.zoo.tokenizer import build_tokenizer
from interp.zoo.train import ZooConfig, answer_accuracy, evaluate

__all__ = [
    "MODEL_NAMES", "REAL_NAMES", "GEMMA_NAMES", "ORGANISM_NAMES", "ALL_NAMES", "base_of", "SKILLS", "TARGET_SKILL", "REFUSAL",
    "RESTRICTED", "Example", "Attack", "ZooConfig",
    "zoo_dir", "model_path", "default_prompts", "in_tiny_zoo", "in_real_zoo", "is_lora", "build", "list_models",
    "task_prompts", "evaluate", "answer_accuracy",
    "attack_prompts", "attack_success", "refused", "build_tokenizer",
]
