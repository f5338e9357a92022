"""The weight-space lens on the tiny zoo: LiNeS against uniform scaling on zoo:full, the reset maps of zoo:full and
zoo:lora-r8, task arithmetic of zoo:full and zoo:safety. Run with -s to see the tables. Only what holds for a reason
is asserted (identities, what a LoRA cannot touch, the first-order effect of negating a task vector); the frontier is
reported whatever it shows."""

import pandas as pd
import pytest

import interp
from analyses import weights
from interp.app import zoo_defaults
from interp.prompts import PromptSet

pytestmark = pytest.mark.usefixtures("single_thread")
N = 48
pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 20)


@pytest.fixture(scope="module")
def zoo(zoo_built):
    sets = zoo_defaults.prompt_sets("zoo:base", N)
    target, other = sets.values()
    base = interp.load_model("zoo:base")
    models = {name: interp.load_model(f"zoo:{name}") for name in ("full", "lora-r8", "safety")}
    refusal = zoo_built.task_prompts(zoo_built.RESTRICTED, N, split="test")
    refuse = PromptSet([e.prompt for e in refusal], [zoo_built.REFUSAL] * N, "refuse add")
    return {"base": base, **models, "target": target, "other": other, "refuse": refuse}


def test_lines_frontier_against_uniform_scaling_on_the_full_fine_tune(zoo):
    pair = interp.Pair(zoo["base"], zoo["full"])
    sweep = weights.lines_sweep(pair, zoo["target"], zoo["other"])
    print("\nLiNeS sweep, zoo:full (target: reverse accuracy; other: pre-training skills accuracy)")
    print(sweep.to_frame().to_string(index=False))
    compare = sweep.compare()
    print(compare.to_string(index=False))
    print(sweep.paired().to_string(index=False))
    grid = dict(zip(zip(sweep.alpha, sweep.beta), zip(sweep.target, sweep.other)))
    assert grid[0.0, 0.0] == (sweep.base["target"], sweep.base["other"])  # (0, 0) is the base, exactly
    assert grid[1.0, 0.0] == (sweep.tuned_scores["target"], sweep.tuned_scores["other"])  # (1, 0) the fine-tune
    assert sweep.tuned_scores["target"] > sweep.base["target"] and sweep.tuned_scores["other"] < sweep.base["other"]
    assert compare["uniform other"].notna().all()  # the uniform curve runs from the base to the fine-tune


def reset_table(result):
    frame = result.to_frame()
    return frame[frame.kind != "cell"][["unit", "target", "other", "target_lost_fraction",
                                        "forgetting_recovered_fraction"]]


@pytest.mark.parametrize("name", ["full", "lora-r8"])
def test_reset_map(zoo, name):
    pair = interp.Pair(zoo["base"], zoo[name])
    result = weights.reset_map(pair, zoo["target"], zoo["other"])
    print(f"\nreset map, zoo:{name} (fractions of the target gain lost and of the forgetting recovered)")
    print(reset_table(result).to_string(index=False))
    print(result.cell_table("target_lost_fraction").round(2))
    print(result.cell_table("forgetting_recovered_fraction").round(2))
    everything = result.units.index("all")
    assert (result.target[everything], result.other[everything]) == (result.base["target"], result.base["other"])
    if name == "lora-r8":  # the adapter touches only c_attn, c_proj and c_fc: resetting anything else does nothing
        untouched = [i for i, (kind, module) in enumerate(zip(result.kind, result.module))
                     if kind == "outside" or (module or "").endswith("norm")]
        assert untouched and all((result.target[i], result.other[i]) == (result.tuned_scores["target"],
                                                                          result.tuned_scores["other"])
                                 for i in untouched)


def test_anatomy_of_the_lora_lives_in_its_adapted_modules(zoo):
    lora = weights.measure(zoo["base"], zoo["lora-r8"])
    full = weights.measure(zoo["base"], zoo["full"])
    print("\nshare of the update's energy per layer:", {r.label: [round(float(x), 3) for x in r.layer_share()]
                                                         for r in (full, lora)})
    print(lora.grid("share").round(3))
    outside = [i for i, layer in enumerate(lora.layer) if layer is None or lora.module[i].endswith("norm")]
    assert all(lora.delta_fro[i] == 0 for i in outside)
    assert float(lora.layer_share().sum()) == pytest.approx(1.0, abs=1e-9)
    adapted = [i for i, m in enumerate(lora.module) if m in ("q", "k", "v", "o", "mlp_in", "mlp_out")]
    assert all(0 < lora.erank[i] <= 8 + 1e-6 for i in adapted if lora.delta_fro[i] > 0)  # rank <= r = 8


def test_task_arithmetic_of_the_full_and_the_safety_fine_tunes(zoo):
    sets = [zoo["target"], zoo["other"], zoo["refuse"]]
    result = weights.task_arithmetic(zoo["base"], {"full": zoo["full"], "safety": zoo["safety"]}, sets,
                                     lines=(0.5, 0.5))
    print("\ntask arithmetic (answer accuracy)")
    print(result.table().round(3).to_string())
    for label in ("base", "full", "safety"):
        model = zoo["base"] if label == "base" else zoo[label]
        assert [result.value(label, s.label) for s in sets] == [weights.score(model, s) for s in sets]
    # -tau moves against the task to first order: the negated fine-tune does worse on its own task than the base
    assert result.value("-full", "reverse") < result.value("base", "reverse")
    assert result.value("-safety", "refuse add") <= result.value("base", "refuse add")
