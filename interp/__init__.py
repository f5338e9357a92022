"""interp: mechanistic interpretability of fine-tuning.

    import interp
    pair = interp.load_pair("zoo:base", "zoo:lora-r8")
    acts = interp.capture(pair.tuned, prompts, interp.every_layer("resid_post", pair.tuned.n_layers))
    with pair.tuned.edit(interp.add("resid_post.2", v, scale=2.0)):
        interp.generate(pair.tuned, prompts, max_new_tokens=5)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("interp")
except PackageNotFoundError:  # a source tree that was not installed
    __version__ = "0+unknown"

from interp.capture import Activations, capture
from interp.errors import InterpError
from interp.generation import generate
from interp.intervene import ablate, add, project_onto, project_out, replace, scale
from interp.models import CheckpointSeries, Model, Pair, load_model, load_pair, load_series
from interp.prompts import PromptSet, read_prompt_set, read_prompts, tokenize
from interp.scoring import answer_scores, loss
from interp.sites import EMBED, FINAL, Site, every_layer, site

__all__ = [
    "Activations", "capture", "InterpError", "generate", "ablate", "add", "project_onto", "project_out", "replace", "scale",
    "CheckpointSeries", "Model", "Pair", "load_model", "load_pair", "load_series", "PromptSet", "read_prompt_set", "read_prompts", "tokenize", "answer_scores", "loss",
    "EMBED", "FINAL", "Site", "every_layer", "site",
]
