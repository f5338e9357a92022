"""Model loading, pairs, adapters, checkpoint series, and the clear error for each kind of bad input."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import interp
from interp.errors import (BadPrompts, CorruptWeights, IncompatibleModels, ModelNotFound, PromptTooLong,
                           UnknownSite)
from interp.models import load_series

from conftest import CONTEXT, random_model, save_model, word_tokenizer


def test_pair_of_different_architectures_names_every_field(model_dirs, tmp_path):
    wide = save_model(tmp_path / "wide", "gpt2", n_layer=4, n_embd=96)
    with pytest.raises(IncompatibleModels) as err:
        interp.load_pair(model_dirs["gpt2"], wide)
    message = str(err.value)
    assert "num_hidden_layers: base 3, tuned 4" in message
    assert "hidden_size: base 64, tuned 96" in message
    assert "pass a tuned model fine-tuned from this base" in message
    with pytest.raises(IncompatibleModels, match="model_type: base gpt2, tuned llama"):
        interp.load_pair(model_dirs["gpt2"], model_dirs["llama"])


def test_pair_repr_shows_what_differs(model_dirs, tmp_path):
    tuned = random_model("gpt2")
    with torch.no_grad():
        tuned.transformer.h[2].mlp.c_fc.weight.mul_(1.5)
    tuned.save_pretrained(tmp_path / "tuned")
    word_tokenizer().save_pretrained(tmp_path / "tuned")
    pair = interp.load_pair(model_dirs["gpt2"], tmp_path / "tuned")
    assert set(pair.changed_parameters()) == {"transformer.h.2.mlp.c_fc.weight"}
    assert abs(pair.changed_parameters()["transformer.h.2.mlp.c_fc.weight"] - 0.5) < 1e-5
    text = repr(pair)
    assert "differs in 1/" in text and "3 layers" in text and "transformer.h.2.mlp.c_fc.weight" in text


def test_missing_folder_unknown_zoo_name_and_corrupt_weights(tmp_path, model_dirs, monkeypatch):
    with pytest.raises(ModelNotFound, match="does not exist"):
        interp.load_model(tmp_path / "nowhere")
    with pytest.raises(ModelNotFound, match="unknown zoo model 'nope'.*zoo has base"):
        interp.load_model("zoo:nope")
    monkeypatch.setenv("INTERP_ZOO_DIR", str(tmp_path / "empty-zoo"))
    with pytest.raises(ModelNotFound, match="not built yet; run `interp zoo build`"):
        interp.load_model("zoo:base")
    broken = save_model(tmp_path / "broken", "gpt2")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CorruptWeights, match="cannot be read"):
        interp.load_model(broken)
    with pytest.raises(ModelNotFound, match="no config.json"):
        interp.load_model(tmp_path)


def test_prompt_errors(tmp_path, model_dirs):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(BadPrompts, match="is empty"):
        interp.read_prompts(empty)
    with pytest.raises(BadPrompts, match="does not exist"):
        interp.read_prompts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w2 w3"}\n{"other": 1}\n')
    with pytest.raises(BadPrompts, match="bad.jsonl:2 has no string field"):
        interp.read_prompts(bad)
    model = interp.load_model(model_dirs["gpt2"])
    too_long = " ".join(["w5"] * (CONTEXT + 1))
    with pytest.raises(PromptTooLong, match=f"prompt 1 has {CONTEXT + 1} tokens but the model's context is {CONTEXT}"):
        interp.capture(model, ["w2 w3", too_long], ["resid_post.0"], progress=False)
    with pytest.raises(UnknownSite, match="layer 7 out of range, the model has 3 layers"):
        interp.capture(model, ["w2 w3"], ["resid_post.7"], progress=False)


def test_sites_parse_canonical_and_transformerlens_names():
    assert interp.site("blocks.3.hook_resid_post") == interp.Site("resid_post", 3)
    assert interp.site("blocks.2.attn.hook_result") == interp.Site("head_out", 2)
    assert interp.site("head_out.2.1") == interp.Site("head_out", 2, 1)
    assert str(interp.site("head_out.2.1")) == "head_out.2.1"
    with pytest.raises(UnknownSite):
        interp.site("resid_post")
    with pytest.raises(UnknownSite):
        interp.site("mlp_out.1.2")


def make_adapter(base_dir, out_dir, seed=0):
    """A PEFT LoRA adapter on the GPT-2 base with non-zero B (so it changes the model)."""
    base = random_model("gpt2")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out_dir)
    config_path = out_dir / "adapter_config.json"
    config_json = json.loads(config_path.read_text())
    config_json["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config_json))
    return model.merge_and_unload()


def test_peft_adapter_merged_and_unmerged(model_dirs, tmp_path, prompts):
    merged_reference = make_adapter(model_dirs["gpt2"], tmp_path / "adapter")
    pair = interp.load_pair(model_dirs["gpt2"], tmp_path / "adapter")
    for name, p in merged_reference.named_parameters():
        assert torch.allclose(dict(pair.tuned.hf.named_parameters())[name], p, atol=1e-6), name
    assert any("c_attn" in name for name in pair.changed_parameters())
    unmerged = interp.load_model(tmp_path / "adapter", merge=False, backend="nnsight")
    a = interp.capture(pair.tuned, prompts, ["resid_post.2"], progress=False)
    b = interp.capture(unmerged, prompts, ["resid_post.2"], progress=False)
    assert (a["resid_post.2"] - b["resid_post.2"]).abs().max() <= 1e-5
    with pytest.raises(interp.InterpError, match="merged adapter"):
        interp.capture(unmerged, prompts, ["resid_post.2"], backend="bridge", progress=False)


def test_checkpoint_series_loads_lazily_in_step_order(tmp_path, monkeypatch):
    root = tmp_path / "run"
    for step, seed in ((100, 1), (0, 0), (50, 2)):
        save_model(root / f"step-{step:04d}", "gpt2", seed=seed)
    series = load_series(root)
    assert series.steps == [0, 50, 100]
    loaded = []
    import interp.models as models_module
    real = models_module.load_model
    monkeypatch.setattr(models_module, "load_model", lambda *a, **k: loaded.append(a[0]) or real(*a, **k))
    walk = series.models()
    step, model = next(walk)
    assert step == 0 and len(loaded) == 1  # nothing past the first checkpoint is loaded yet
    assert [s for s, _ in walk] == [50, 100] and len(loaded) == 3
    with pytest.raises(ModelNotFound, match="holds no checkpoint folders"):
        load_series(tmp_path / "run" / "step-0000")


def test_device_and_dtype(model_dirs):
    model = interp.load_model(model_dirs["llama"], dtype="bfloat16", device="auto")
    assert model.dtype == torch.bfloat16
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not any(p.requires_grad for p in model.hf.parameters()) and not model.hf.training
    assert "bfloat16" in repr(model) and "3 layers" in repr(model)
