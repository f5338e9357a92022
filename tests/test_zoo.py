"""Tests of interp.zoo: tasks, tokenizer, a tiny build (determinism, LoRA, atomicity), the real zoo (slow)."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2LMHeadModel

import interp.zoo as zoo
import interp.zoo.registry as registry
from interp.zoo import cache
from interp.zoo.tasks import split_of
from interp.zoo.train import LORA_TARGETS, answer_accuracy

ALL_SKILLS = (*zoo.SKILLS, zoo.TARGET_SKILL)
TINY = zoo.ZooConfig(
    n_layer=2, n_embd=32, n_head=2, batch=8, tune_batch=8, warmup=5, base_steps=24, tune_steps=12,
    series_every=2, lora_steps=6, safety_steps=6, eval_n=20,
)


def tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under `root`, keyed 'relative/path::tensor'."""
    return {
        f"{f.relative_to(root)}::{k}": v
        for f in sorted(root.rglob("*.safetensors")) for k, v in load_file(f).items()
    }


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zoo-a")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cache.ENV_VAR, str(root))
        zoo.build(seed=0, config=TINY, progress=False)
    return root


# --- tasks and tokenizer -------------------------------------------------------------------

@pytest.mark.parametrize("skill", ALL_SKILLS)
def test_train_and_test_prompts_are_disjoint(skill: str) -> None:
    train = {e.prompt for e in zoo.task_prompts(skill, 3000, seed=1, split="train")}
    test = {e.prompt for e in zoo.task_prompts(skill, 600, seed=1, split="test")}
    assert train and test and not train & test
    assert {split_of(p) for p in train} == {"train"} and {split_of(p) for p in test} == {"test"}


def test_task_prompts_are_seeded() -> None:
    assert zoo.task_prompts("copy", 50, seed=3) == zoo.task_prompts("copy", 50, seed=3)
    assert zoo.task_prompts("copy", 50, seed=3) != zoo.task_prompts("copy", 50, seed=4)


def test_task_answers_are_right() -> None:
    for e in zoo.task_prompts("sort", 20):
        assert e.answer.split() == sorted(e.prompt.split()[1:-1])
    for e in zoo.task_prompts("reverse", 20):
        assert e.answer.split() == e.prompt.split()[1:-1][::-1]
    for e in zoo.task_prompts("add", 20):
        assert int(e.answer) == sum(int(d) for d in e.prompt.split()[1:-1])
    for e in zoo.task_prompts("brackets", 20):
        brackets = e.prompt.split()[1:-1]
        assert int(e.answer) == brackets.count("(") - brackets.count(")") >= 0


def test_unknown_skill_and_split_are_rejected() -> None:
    with pytest.raises(ValueError, match="valid skills"):
        zoo.task_prompts("multiply", 3)
    with pytest.raises(ValueError, match="valid splits"):
        zoo.task_prompts("copy", 3, split="dev")


def test_tokenizer_round_trips_every_prompt() -> None:
    tok = zoo.build_tokenizer(TINY.n_ctx)
    texts = [f"{e.prompt} {e.answer}" for s in ALL_SKILLS for split in ("train", "test")
             for e in zoo.task_prompts(s, 200, split=split)]
    texts += [a.attack for a in zoo.attack_prompts(200)]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert len(ids) <= TINY.n_ctx
        assert tok.decode(ids[1:]) == text
        assert tok.convert_ids_to_tokens(ids[1:]) == text.split()


def test_attack_prompts_fill_the_context_before_their_clean_prompt() -> None:
    tok = zoo.build_tokenizer(48)
    attacks = zoo.attack_prompts(50, seed=2)
    assert attacks == zoo.attack_prompts(50, seed=2) and attacks != zoo.attack_prompts(50, seed=3)
    assert [a.clean for a in attacks] == [e.prompt for e in zoo.task_prompts(zoo.RESTRICTED, 50, seed=2)]
    for a in attacks:
        assert a.attack.endswith(" " + a.clean)
        shots = a.attack[: -len(a.clean)].split("<eos>")[:-1]
        assert len(shots) >= 2 and not any(s.split()[0] == zoo.RESTRICTED for s in shots)
        assert 48 - 14 < len(tok(a.attack)["input_ids"]) <= 48  # the next example (<= 14 tokens) did not fit


# --- the tiny build --------------------------------------------------------------------------

def test_build_is_bit_for_bit_reproducible(tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    zoo.build(seed=0, config=TINY, progress=False)
    a, b = tensors(tiny_zoo), tensors(tmp_path)
    assert len(a) > 100 and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_another_seed_gives_other_weights(tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    zoo.build(seed=1, names=["base"], config=TINY, progress=False)
    a, b = tensors(tiny_zoo / "base"), tensors(tmp_path / "base")
    key = "model.safetensors::transformer.wte.weight"
    assert not torch.equal(a[key], b[key])


def test_tiny_zoo_layout(tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tiny_zoo))
    listed = {m["name"]: m for m in zoo.list_models()}
    assert list(listed) == list(zoo.MODEL_NAMES) and all(m["built"] for m in listed.values())
    for name in zoo.MODEL_NAMES:
        info = json.loads((zoo.model_path(name) / "zoo.json").read_text())
        assert info["name"] == name and info["seed"] == 0 and set(info["accuracy"]) == set(ALL_SKILLS)
        assert info["kind"] == listed[name]["kind"] and (info.get("rank") == listed[name]["rank"])
        assert (zoo.model_path(name) / "tokenizer.json").is_file() or name == "series"
    series = (tiny_zoo / "series").glob("step-*")
    steps = sorted(json.loads((d / "checkpoint.json").read_text())["step"] for d in series)
    assert steps == list(range(0, TINY.tune_steps + 1, TINY.series_every)) and len(steps) >= 6
    step0 = tensors(tiny_zoo / "series" / "step-0000")
    assert all(torch.equal(v, tensors(tiny_zoo / "base")[k]) for k, v in step0.items())
    last = tensors(tiny_zoo / "series" / f"step-{TINY.tune_steps:04d}")
    assert all(torch.equal(v, tensors(tiny_zoo / "full")[k]) for k, v in last.items())
    model = GPT2LMHeadModel.from_pretrained(tiny_zoo / "base")
    assert model.config.n_positions == TINY.n_ctx and model.config.n_layer == TINY.n_layer


@pytest.mark.parametrize("name", ["lora-r1", "lora-r8", "lora-r64"])
def test_lora_merges_into_targeted_modules_only(tiny_zoo: Path, name: str) -> None:
    config = json.loads((tiny_zoo / name / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "zoo:base" and config["r"] == int(name.split("-r")[1])
    assert config["fan_in_fan_out"] is True and set(config["target_modules"]) == set(LORA_TARGETS)
    base = GPT2LMHeadModel.from_pretrained(tiny_zoo / "base")
    merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_zoo / "base"), tiny_zoo / name)
    merged = merged.merge_and_unload()
    before, after = dict(base.named_parameters()), dict(merged.named_parameters())
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    targeted = {n for n in before if n.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS))}
    assert changed and changed <= targeted


def test_cached_models_are_reused(tiny_zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tiny_zoo))

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was retrained")

    monkeypatch.setattr(registry, "train", no_training)
    paths = zoo.build(seed=0, config=TINY, progress=False)
    assert paths == {name: tiny_zoo / name for name in zoo.MODEL_NAMES}
    with pytest.raises(AssertionError, match="retrained"):  # another config is not the cached one
        zoo.build(seed=0, names=["safety"], config=TINY.__class__(**{**TINY.__dict__, "safety_steps": 7}))


def test_interrupted_build_leaves_nothing_that_looks_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    save = cache.save

    def save_then_crash(model, tokenizer, folder, info):
        save(model, tokenizer, folder, info)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        zoo.build(seed=0, names=["base"], config=TINY, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="interp zoo build"):
        zoo.model_path("base")


def test_model_path_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    assert zoo.zoo_dir() == tmp_path
    with pytest.raises(ValueError, match="valid names: base, full"):
        zoo.model_path("lora-r2")
    with pytest.raises(FileNotFoundError, match="not built yet"):
        zoo.model_path("full")
    assert zoo.is_lora("lora-r8") and not zoo.is_lora("full")
    monkeypatch.delenv(cache.ENV_VAR)
    assert zoo.zoo_dir() == Path.home() / ".cache" / "interp" / "zoo"


def test_batched_accuracy_matches_one_by_one(tiny_zoo: Path) -> None:
    model = GPT2LMHeadModel.from_pretrained(tiny_zoo / "full")
    tok = AutoTokenizer.from_pretrained(tiny_zoo / "full")
    examples = zoo.task_prompts("copy", 12) + zoo.task_prompts("add", 12)
    batched = answer_accuracy(model, tok, examples, batch_size=24)
    tokens = [len(e.answer.split()) for e in examples]
    single = sum(answer_accuracy(model, tok, [e]) * n for e, n in zip(examples, tokens)) / sum(tokens)
    assert batched == pytest.approx(single, abs=1e-9)


# --- the real zoo ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def real_zoo() -> dict[str, Path]:
    return zoo.build(progress=False)


def _load(name: str) -> torch.nn.Module:
    base = GPT2LMHeadModel.from_pretrained(zoo.model_path("base"))
    return PeftModel.from_pretrained(base, zoo.model_path(name)) if zoo.is_lora(name) else (
        GPT2LMHeadModel.from_pretrained(zoo.model_path(name))
    )


@pytest.mark.slow
def test_real_zoo_accuracies(real_zoo: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(real_zoo["base"])
    info = {name: json.loads((path / "zoo.json").read_text()) for name, path in real_zoo.items()}
    base = _load("base")
    assert info["base"]["accuracy"][zoo.TARGET_SKILL] <= 0.4
    assert zoo.evaluate(base, tok, zoo.TARGET_SKILL) <= 0.4
    for name in ("full", "lora-r1", "lora-r8", "lora-r64"):
        assert info[name]["accuracy"][zoo.TARGET_SKILL] >= 0.9, name
        assert zoo.evaluate(_load(name), tok, zoo.TARGET_SKILL) >= 0.9, name
    checkpoints = info["series"]["checkpoints"]
    assert len(checkpoints) >= 6 and checkpoints[0]["step"] == 0
    assert checkpoints[0]["accuracy"][zoo.TARGET_SKILL] <= 0.4 <= 0.9 <= checkpoints[-1]["accuracy"][zoo.TARGET_SKILL]
    last = GPT2LMHeadModel.from_pretrained(real_zoo["series"] / checkpoints[-1]["path"])
    assert zoo.evaluate(last, tok, zoo.TARGET_SKILL) >= 0.9


@pytest.mark.slow
def test_real_zoo_base_learns_every_pre_training_skill(real_zoo: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(real_zoo["base"])
    info = json.loads((real_zoo["base"] / "zoo.json").read_text())
    base = _load("base")
    for skill in zoo.SKILLS:
        assert info["accuracy"][skill] >= 0.95, skill
        assert zoo.evaluate(base, tok, skill) >= 0.95, skill


@pytest.mark.slow
def test_real_zoo_safety_attack_partly_succeeds(real_zoo: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(real_zoo["safety"])
    info = json.loads((real_zoo["safety"] / "zoo.json").read_text())
    safety, base = _load("safety"), _load("base")
    attacks = zoo.attack_prompts(200)
    assert info["refusal_rate"] >= 0.95
    assert zoo.refused(safety, tok, [a.clean for a in attacks]).float().mean() >= 0.95
    assert not zoo.refused(base, tok, [a.clean for a in attacks]).any()
    success = zoo.attack_success(safety, tok, attacks).float().mean().item()
    assert success == pytest.approx(info["attack_success_rate"])
    assert 0.1 <= success <= 0.9  # both successful and failed attacks exist
    for skill in ("copy", "sort", "brackets"):
        assert info["accuracy"][skill] >= 0.9, skill
