"""LID on the zoo: per layer on the fine-tuning data vs pre-training data, along the checkpoint series with the
target-skill accuracy, and on-manifold vs raw steering. Reported, not tuned; run with -s to see the numbers."""

import math

import pytest
import torch

import interp
from analyses import lid
from interp.prompts import PromptSet

pytestmark = pytest.mark.slow

N_PROMPTS = 512


@pytest.fixture(scope="module")
def sets(zoo_built):
    zoo = zoo_built
    target = zoo.task_prompts(zoo.TARGET_SKILL, N_PROMPTS)
    pre = [e for skill in zoo.SKILLS for e in zoo.task_prompts(skill, N_PROMPTS // len(zoo.SKILLS))]
    return {"target": target, "pre-training": pre}


def test_lid_per_layer_base_vs_full_on_target_and_pre_training_prompts(sets, tmp_path):
    pair = interp.load_pair("zoo:base", "zoo:full")
    layers = [*range(pair.base.n_layers), "final"]
    results = [lid.measure(pair, [e.prompt for e in examples], layers, label=label, progress=False)
               for label, examples in sets.items()]
    print()
    for r in results:
        print(f"{r.label} prompts ({len(r.lid['base', r.sites[-1]])} tokens after de-duplication): mean LID")
        for s in r.sites:
            base, full = r.mean("base", s), r.mean("full", s)
            change, error = paired_change(r, s)
            print(f"  {s:<13} base {base:6.2f}  full {full:6.2f}  change per token {change:+6.2f} +- {2 * error:.2f} "
                  f"(global TwoNN base {r.global_id['base', s]:.2f}, full {r.global_id['full', s]:.2f})")
    for r in results:
        for (model, s), values in r.lid.items():
            assert values.isfinite().float().mean() > 0.99 and 0 < r.mean(model, s) < pair.base.d_model
    lid.save_figures(results, None, None, tmp_path)


def paired_change(result, site: str) -> tuple[float, float]:
    """Mean over tokens of LID(full) - LID(base) for the same token, and its standard error."""
    def by_token(model):
        keys = zip(result.prompt[model, site].tolist(), result.position[model, site].tolist())
        return dict(zip(keys, result.lid[model, site].tolist()))

    base, full = by_token("base"), by_token("full")
    diff = torch.tensor([full[t] - base[t] for t in base.keys() & full.keys()])
    diff = diff[diff.isfinite()]
    return float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))


def test_lid_along_the_checkpoint_series_with_target_accuracy(sets, tmp_path):
    zoo_target = sets["target"]
    base = interp.load_model("zoo:base")
    prompts, answers = [e.prompt for e in zoo_target], [e.answer for e in zoo_target]
    task = PromptSet(prompts, answers, "reverse")
    series = lid.measure_series(base, interp.load_series("zoo:series"), task, [1, -1], task=task)
    print("\nzoo:series on target (reverse) prompts:")
    for i, step in enumerate(series.steps):
        cells = "  ".join(f"{s} mean {series.mean[i, j]:.2f} (median {series.median[i, j]:.2f})"
                          for j, s in enumerate(series.sites))
        print(f"  step {step:>4}: {cells}  accuracy {series.accuracy[i]:.3f}  loss {series.loss[i]:.3f}")
    drop = series.mean[1:, -1] - series.mean[:-1, -1]
    gain = series.accuracy[1:] - series.accuracy[:-1]
    print(f"  mean LID change vs accuracy change between checkpoints (last layer): "
          + ", ".join(f"{d:+.2f}/{g:+.3f}" for d, g in zip(drop.tolist(), gain.tolist())))
    assert series.steps[0] == 0 and len(series.steps) >= 3
    assert series.accuracy[-1] > series.accuracy[0] + 0.3  # the series learns its skill
    assert series.mean.isfinite().all()
    lid.save_figures([], series, None, tmp_path)


def test_tangent_vs_raw_steering_with_the_fine_tuning_shift(sets):
    pair = interp.load_pair("zoo:base", "zoo:full")
    target = [e.prompt for e in sets["target"]]
    steered, reference = target[:128], target[128:] + [e.prompt for e in sets["pre-training"]]
    site = pair.base.n_layers // 2
    vector = lid.mean_shift(pair, steered, site)
    result = lid.compare_steering(pair.base, site, vector, steered, reference, effects=[0.05, 0.2, 0.5])
    print(f"\nsteering zoo:base at resid_post.{site} with the mean fine-tuning shift (|v| = {vector.norm():.2f}):")
    print(result.to_frame().to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    rows = [r for r in result.table if r["method"] != "none" and not math.isnan(r["scale"])]
    assert rows and all(abs(r["effect"] - r["target_effect"]) <= 0.02 * r["target_effect"] + 1e-9 for r in rows)
    assert all(math.isfinite(r["nn_distance"]) for r in rows)
    assert torch.isfinite(vector).all()
