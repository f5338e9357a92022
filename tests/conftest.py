"""Shared fixtures: tiny random-weight local models of three architectures researchers use."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

VOCAB = 96
CONTEXT = 32


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, with the reason, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); run on a GPU machine: pytest -m gpu tests/test_gpu.py")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<bos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<bos>",
                                   unk_token="<pad>")


def random_model(arch: str, seed: int = 0, **overrides):
    """A small HF causal LM with every parameter random (biases included, so no identity holds by accident)."""
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=CONTEXT, **common)
        cls = GPT2LMHeadModel
    else:
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=CONTEXT, tie_word_embeddings=False, **common)
        cfg, cls = (LlamaConfig(**kw), LlamaForCausalLM) if arch == "llama" else (Qwen2Config(**kw), Qwen2ForCausalLM)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
            p.normal_(1.0 if is_norm_scale else 0.0, 0.05 if p.dim() == 1 else 0.1)
    return model


def save_model(path, arch: str, seed: int = 0, **overrides):
    model = random_model(arch, seed, **overrides)
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


ARCHS = ("gpt2", "llama", "qwen2")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {arch: str(save_model(root / arch, arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Token-id prompts of different lengths, so batches carry padding."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 12, 1, 7)]


@pytest.fixture(scope="session")
def zoo_built():
    """The embedded zoo, built once (about 5 minutes on 2 cores) or reused from the cache."""
    from interp import zoo

    zoo.build(progress=False)
    return zoo


@pytest.fixture(scope="session")
def smol_zoo():
    """The real zoo (SmolLM2-135M-Instruct and its fine-tunes), built once (about 15 minutes on 2 cores) or reused
    from the cache; skipped, with the install command, when the `real` extra is not installed."""
    from interp.zoo import smol
    from interp.zoo.smol_source import missing_extra

    message = missing_extra()
    if message is not None:
        pytest.skip(message)
    return smol.build_real(progress=False)


@pytest.fixture(scope="session")
def organisms_zoo(smol_zoo):
    """The model organisms of zoo:smol (and zorbish, `smol-lora-r8`), built once (18 minutes on 2 idle cores) or
    reused from the cache: {name: folder}."""
    from interp.zoo.organisms import build_organisms

    return build_organisms(progress=False)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a test module (tiny matrices are fastest so, and two OpenMP threads on busy shared cores
    can be 100x slower); restored after it. Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
