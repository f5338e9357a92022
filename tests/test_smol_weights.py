"""The weight-space lens on the real zoo: zoo:smol (SmolLM2-135M-Instruct, 30 layers) against its zorbish fine-tunes
zoo:smol-full and zoo:smol-lora-r8. Reported, not tuned: run with -s for the tables.

- the anatomy of the full fine-tune's update (share of its energy per block);
- the LiNeS frontier against uniform scaling, zorbish accuracy (target) against prose loss (forgetting), for both
  fine-tunes on a small grid;
- the reset map of both, blocks reset five at a time, module types and halves.
Few prompts (8 zorbish, 4 prose texts cut to 24 words) keep it under about 3 minutes on 2 cores. Asserted: only the
identities (the grid's (0, 0) and (1, 0) points are the two models, resetting everything is the base) and what a LoRA
cannot touch."""

import pandas as pd
import pytest

import interp
from analyses import weights
from interp.app import zoo_defaults
from interp.prompts import PromptSet

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]  # 2 threads on busy shared cores: 2.5x slower
pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 20)


@pytest.fixture(scope="module")
def real(smol_zoo):
    sets = zoo_defaults.prompt_sets("zoo:smol", 8)
    target, prose = sets.values()
    prose = PromptSet([" ".join(p.split()[:24]) for p in prose.prompts[:4]], None, "prose")
    base = interp.load_model("zoo:smol")
    return {"base": base, "target": target, "prose": prose,
            "tuned": {name: interp.load_model(f"zoo:{name}") for name in ("smol-full", "smol-lora-r8")}}


def test_anatomy_of_the_full_fine_tune(real):
    anatomy = weights.measure(real["base"], real["tuned"]["smol-full"])
    shares = anatomy.layer_share()
    print("\nzoo:smol-full, share of the update's energy per block:", [round(float(s), 3) for s in shares])
    print(f"outside the blocks: {1 - float(shares.sum()):.4f}; ||dtheta|| = {anatomy.total():.3f}")
    print(anatomy.grid("relative").round(4).iloc[::5].to_string())
    assert float(anatomy.share().sum()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("name", ["smol-full", "smol-lora-r8"])
def test_lines_frontier_and_reset_map(real, name):
    pair = interp.Pair(real["base"], real["tuned"][name])
    target, prose = real["target"], real["prose"]
    sweep = weights.lines_sweep(pair, target, prose, alphas=(0.0, 0.5, 1.0), betas=(1.0,))
    print(f"\nLiNeS sweep, zoo:{name} (zorbish accuracy, prose loss)")
    print(sweep.to_frame().to_string(index=False))
    print(sweep.compare().to_string(index=False))
    print(sweep.paired().to_string(index=False))
    grid = dict(zip(zip(sweep.alpha, sweep.beta), zip(sweep.target, sweep.other)))
    assert grid[0.0, 0.0] == (sweep.base["target"], sweep.base["other"])
    assert grid[1.0, 0.0] == (sweep.tuned_scores["target"], sweep.tuned_scores["other"])
    resets = weights.reset_map(pair, target, prose, cells=False, layers_per_unit=5)
    frame = resets.to_frame()
    print(f"reset map, zoo:{name}")
    print(frame[["unit", "target", "other", "target_lost_fraction", "forgetting_recovered_fraction"]]
          .to_string(index=False))
    everything = resets.units.index("all")
    assert (resets.target[everything], resets.other[everything]) == (resets.base["target"], resets.base["other"])
    if name == "smol-lora-r8":  # the adapter leaves norms and embeddings alone
        untouched = [i for i, (k, m) in enumerate(zip(resets.kind, resets.module)) if k == "outside" or
                     (m or "").endswith("norm")]
        assert all(resets.target[i] == resets.tuned_scores["target"] for i in untouched)


def test_lines_vs_uniform_on_chat_answers(real):
    """The second forgetting probe of the real zoo: the 16 chat questions answered greedily through the chat
    template (`smol_task.chat_answers`), at uniform scalings and at LiNeS points of zoo:smol-lora-r8, next to zorbish
    accuracy. Reported, not asserted beyond the identities: (0, 0) and (1, 0) answer as many questions as the build
    measured for the base and the fine-tune (their zoo.json)."""
    import json

    from interp.scoring import answer_scores
    from interp.zoo import cache
    from interp.zoo.smol_task import chat_answers

    pair = interp.Pair(real["base"], real["tuned"]["smol-lora-r8"])
    rows = []
    for alpha, beta in ((0.0, 0.0), (0.75, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 1.0)):
        with weights.lines(pair, alpha, beta) as model:
            right = sum(a["right"] for a in chat_answers(model.hf, model.tokenizer))
            accuracy = float(answer_scores(model, real["target"].prompts, real["target"].answers).accuracy.mean())
        rows.append({"alpha": alpha, "beta": beta, "kind": "uniform" if beta == 0 else "LiNeS",
                     "zorbish accuracy": accuracy, "chat right (of 16)": right})
    frame = pd.DataFrame(rows)
    print("\nzoo:smol-lora-r8, chat answers along uniform scaling and LiNeS")
    print(frame.to_string(index=False))
    built = {name: json.loads((cache.model_path(name) / "zoo.json").read_text()) for name in ("smol", "smol-lora-r8")}
    assert rows[0]["chat right (of 16)"] == built["smol"]["forgetting"]["chat_right"]
    assert rows[2]["chat right (of 16)"] == built["smol-lora-r8"]["forgetting"]["chat_right"]
