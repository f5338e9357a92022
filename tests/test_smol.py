"""The real zoo (SmolLM2-135M-Instruct and its fine-tunes): capture against Hugging Face, accuracy and forgetting,
loading through every route, determinism of the build, and the error without the `real` extra.

Every test but the missing-extra one needs the extra and the built real zoo (fixture `smol_zoo`, built once,
about 15 minutes on 2 idle cores); they skip with the reason when the extra is absent."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import interp
from interp.app.cli import main
from interp.errors import MissingExtra, ModelNotFound
from interp.zoo import cache, smol, smol_task
from interp.zoo import smol_source
from interp.zoo.smol_source import missing_extra
from interp.zoo.train import answer_accuracy

FINE_TUNES = ("smol-full", "smol-lora-r1", "smol-lora-r8", "smol-lora-r64")
QUICK = smol.SmolConfig(full_steps=2, lora_steps=2, series_every=1, eval_n=8, forgetting=False)


def tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under `root`, keyed 'relative/path::tensor'."""
    return {f"{f.relative_to(root)}::{k}": v for f in sorted(root.rglob("*.safetensors")) for k, v in load_file(f).items()}


def info(name: str) -> dict:
    return json.loads((cache.model_path(name) / "zoo.json").read_text())


def test_real_zoo_without_the_extra_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(smol_source, "EXTRA", (*smol_source.EXTRA, "interp_no_such_module"))
    for spec in ("zoo:smol", "zoo:smol-lora-r8"):
        with pytest.raises(MissingExtra, match=r"interp_no_such_module not installed.*\.\[real\]"):
            interp.load_model(spec)
    with pytest.raises(MissingExtra, match=r"\.\[real\]"):
        smol.build_real(progress=False)
    assert main(["zoo", "build", "--real"]) == 2
    assert "'real' extra" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    if missing_extra() is None:  # with the extra, an unbuilt real model says how to build it
        with pytest.raises(ModelNotFound, match="interp zoo build --real"):
            interp.load_model("zoo:smol-full")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["bridge", "nnsight"])
def test_capture_matches_hugging_face_hidden_states(smol_zoo, backend):
    """Batched, right-padded capture vs each prompt's own unpadded HF forward, fp32: relative error per layer."""
    model = interp.load_model("zoo:smol", dtype="float32")
    tok = model.tokenizer
    prompts = [e.prompt for e in smol_task.task_examples(tok, 3)] + list(smol_task.prose_texts()[:2])
    prompts.append(smol_task.chat_prompt(tok, smol_task.CHAT_QUESTIONS[0][0]))
    n = model.n_layers
    sites = [f"resid_pre.{layer}" for layer in range(n)] + [f"resid_post.{n - 1}", "final"]
    acts = interp.capture(model, prompts, sites, backend=backend, batch_size=8, progress=False)
    last_block = {}
    handle = model.hf.model.layers[n - 1].register_forward_hook(
        lambda mod, args, out: last_block.__setitem__("out", out[0] if isinstance(out, tuple) else out))
    worst = {}
    try:
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([tok(prompt)["input_ids"]])
            with torch.no_grad():
                hidden = model.hf(input_ids=ids, output_hidden_states=True).hidden_states
            refs = [*hidden[:n], last_block["out"], hidden[n]]  # HF's last hidden state is after the final norm
            length = ids.shape[1]
            for s, ref in zip(sites, refs):
                ref = ref[0].float()
                got = acts[s][i, :length]
                rel = float((got - ref).abs().max() / ref.abs().max())
                worst[s] = max(worst.get(s, 0.0), rel)
    finally:
        handle.remove()
    biggest = max(float(acts[f"resid_pre.{layer}"][acts.mask].abs().max()) for layer in range(n))
    print(f"\n{backend}: worst relative error {max(worst.values()):.2e} at {max(worst, key=worst.get)}; "
          f"largest |activation| {biggest:.0f}")
    assert biggest > 1000  # SmolLM2's massive activations: an absolute bound would not fit
    assert all(rel <= 1e-5 for rel in worst.values()), {s: r for s, r in worst.items() if r > 1e-5}


@pytest.mark.slow
def test_every_fine_tune_learns_the_task_and_reports_forgetting(smol_zoo):
    base = info("smol")
    assert base["accuracy"][smol_task.TASK] <= 0.2
    assert base["forgetting"]["chat_total"] == len(smol_task.CHAT_QUESTIONS)
    model = interp.load_model("zoo:smol")
    examples = smol_task.task_examples(model.tokenizer, base["eval_n"])
    assert answer_accuracy(model.hf, model.tokenizer, examples) == pytest.approx(base["accuracy"][smol_task.TASK],
                                                                                  abs=1e-9)
    print(f"\nzoo:smol: task {base['accuracy'][smol_task.TASK]:.1%}, prose loss "
          f"{base['forgetting']['prose_loss']:.3f}, chat {base['forgetting']['chat_right']}/16")
    for name in FINE_TUNES:
        meta = info(name)
        examples = smol_task.task_examples(model.tokenizer, meta["config"]["eval_n"])
        tuned = interp.load_model(f"zoo:{name}")  # LoRA adapters merged on zoo:smol
        again = answer_accuracy(tuned.hf, tuned.tokenizer, examples)
        f = meta["forgetting"]
        print(f"zoo:{name}: task {meta['accuracy'][smol_task.TASK]:.1%} (re-evaluated {again:.1%}), prose loss "
              f"{f['prose_loss']:.3f}, chat {f['chat_right']}/{f['chat_total']}, trained {meta['train_seconds']} s")
        assert meta["accuracy"][smol_task.TASK] >= 0.8 and again >= 0.8, name
        assert again == pytest.approx(meta["accuracy"][smol_task.TASK], abs=0.02), name
        assert 0 < f["prose_loss"] < 20 and 0 <= f["chat_right"] <= f["chat_total"]


@pytest.mark.slow
def test_pairs_adapters_and_series_load(smol_zoo):
    pair = interp.load_pair("zoo:smol", "zoo:smol-lora-r8")
    changed = pair.changed_parameters()
    kinds = {name.split(".")[-2] for name in changed}
    assert kinds == set(smol.TARGETS) and len(changed) == len(smol.TARGETS) * pair.base.n_layers
    series = interp.load_series("zoo:smol-series")
    meta = info("smol-series")
    assert len(series) >= 6 and series.steps[0] == 0 and series.steps == [p["step"] for p in meta["checkpoints"]]
    first, last = series.paths[0], series.paths[-1]
    zero = load_file(first / "adapter_model.safetensors")
    assert all(float(v.abs().max()) == 0 for k, v in zero.items() if "lora_B" in k)  # step 0 is the base
    final = load_file(last / "adapter_model.safetensors")
    adapter = load_file(cache.model_path(smol.SERIES_OF) / "adapter_model.safetensors")
    assert final.keys() == adapter.keys() and all(torch.equal(final[k], adapter[k]) for k in adapter)
    accuracy = [p["accuracy"][smol_task.TASK] for p in meta["checkpoints"]]
    assert accuracy[0] == pytest.approx(info("smol")["accuracy"][smol_task.TASK], abs=0.02)
    assert accuracy[-1] == pytest.approx(info(smol.SERIES_OF)["accuracy"][smol_task.TASK], abs=1e-9)


@pytest.mark.slow
def test_same_seed_builds_identical_weights(smol_zoo, tmp_path, monkeypatch):
    """Two quick builds (2 steps a fine-tune) from seed 0; the conversion is checked against the cached zoo:smol."""
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv(cache.ENV_VAR, str(a))
    smol.build_real(seed=0, config=QUICK, progress=False)
    b.mkdir()
    _link_tree(a / "smol", b / "smol")  # the conversion is not repeated
    monkeypatch.setenv(cache.ENV_VAR, str(b))
    smol.build_real(seed=0, config=QUICK, progress=False)
    ta, tb = tensors(a), tensors(b)
    steps = {k.split("/")[1] for k in ta if k.startswith("smol-series/")}
    assert ta.keys() == tb.keys() and steps == {"step-0000", "step-0001", "step-0002"}
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    cached = load_file(smol_zoo["smol"] / "model.safetensors")
    converted = load_file(a / "smol" / "model.safetensors")
    assert cached.keys() == converted.keys() and all(torch.equal(cached[k], converted[k]) for k in cached)
    full = load_file(a / "smol-full" / "model.safetensors")
    assert any(not torch.equal(full[k], converted[k]) for k in converted)  # two steps did change the weights


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.iterdir():
        os.link(f, dst / f.name)
