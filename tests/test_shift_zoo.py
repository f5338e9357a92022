"""Concept shifts on the zoo's full fine-tune: recovery, steering toward the tuned model, seed stability.
Run with -s to see the numbers."""

import pytest
import torch

import interp
from analyses import shift

pytestmark = pytest.mark.slow
ENOUGH = 5  # concepts with fewer inputs are left out of the per-concept claims


@pytest.fixture(scope="module")
def zoo_pair(zoo_built):
    return zoo_built, interp.load_pair("zoo:base", "zoo:full")


def mixed_prompts(zoo, split: str = "test") -> list[str]:
    """The target skill and every pre-training skill."""
    return [e.prompt for skill in (zoo.TARGET_SKILL, *zoo.SKILLS) for e in zoo.task_prompts(skill, 80, split=split)]


def test_concept_shifts_recover_the_tuned_representations(zoo_pair):
    zoo, pair = zoo_pair
    result = shift.measure(pair, mixed_prompts(zoo), k=20, progress=False)
    frame = result.to_frame()
    enough = frame[frame.n >= ENOUGH]
    with __import__("pandas").option_context("display.width", 200, "display.max_rows", 200):
        print("\n" + enough[["layer", "concept", "n", "shift_norm", "match_cos", "rel_error_base",
                             "rel_error_global", "rel_error_concept", "cos_base", "cos_concept",
                             "top_prompt"]].round(3).to_string(index=False))
        print(enough.groupby("layer")[["rel_error_base", "rel_error_global", "rel_error_concept"]].mean().round(4))
    assert (enough.rel_error_concept < enough.rel_error_base).all()
    assert (enough.cos_concept > enough.cos_base).all()
    means = enough.groupby("layer")[["rel_error_global", "rel_error_concept"]].mean()
    assert (means.rel_error_concept < means.rel_error_global).all()


def test_steering_the_base_with_the_shift_toward_the_tuned_model(zoo_pair):
    """Reported, not asserted: the issue expects the global shift at the best layer to close at least half of
    the KL gap on target-skill prompts; on the zoo it did not (see the printed curve)."""
    zoo, pair = zoo_pair
    train = [e.prompt for e in zoo.task_prompts(zoo.TARGET_SKILL, 128, split="train")]
    test = [e.prompt for e in zoo.task_prompts(zoo.TARGET_SKILL, 128, split="test")]
    side = zoo.task_prompts(zoo.SKILLS[0], 64, split="test")
    result = shift.measure(pair, train, k=4, progress=False)  # shifts from training prompts, KL on test prompts
    layer = shift.best_layer(pair, train, result)
    held_out = ([e.prompt for e in side], [e.answer for e in side])
    sweep = shift.strength_sweep(pair.base, pair.tuned, test, result.shift(layer), layer,
                                 [0.0, 0.5, 1.0, 1.5, 2.0, 4.0], held_out=held_out, label="global shift")
    base_acc = float(interp.answer_scores(pair.base, *held_out).accuracy.mean())
    tuned_acc = float(interp.answer_scores(pair.tuned, *held_out).accuracy.mean())
    print(f"\nsteering zoo:base with the global shift of {zoo.TARGET_SKILL} (train prompts) at layer {layer}, all "
          f"positions; KL(base || tuned) on test prompts {sweep['kl_unsteered']:.3f}; {zoo.SKILLS[0]} accuracy: "
          f"base {base_acc:.3f}, tuned {tuned_acc:.3f}")
    for s, kl, c, a in zip(sweep["strength"], sweep["kl"], sweep["closure"], sweep["accuracy"]):
        print(f"  strength {s:4.2f}  KL {kl:.4f}  gap closed {c:7.1%}  {zoo.SKILLS[0]} accuracy {a:.3f}")
    assert sweep["kl_unsteered"] > 0 and all(kl >= 0 for kl in sweep["kl"]) and sweep["closure"][0] == 0
    assert sweep["accuracy"][0] == pytest.approx(base_acc)


def test_kmeans_concepts_across_seeds(zoo_pair):
    """Reported, not asserted: the issue expects a mean matched cosine >= 0.9 between seeds (K-means, K=20);
    on the zoo it held at layers 0-2 but not at the last layer."""
    zoo, pair = zoo_pair
    prompts = mixed_prompts(zoo)
    runs = [shift.measure(pair, prompts, k=20, seed=seed, progress=False) for seed in (0, 1)]
    for i, layer in enumerate(runs[0].layers):
        a, b = runs[0].concepts[i], runs[1].concepts[i]
        match, cos = shift.match_concepts(a, b)
        centre = torch.cat([a, b]).mean(0)  # cosines of centred centroids: the stricter comparison
        _, centred = shift.match_concepts(a - centre, b - centre)
        print(f"\nlayer {layer}: matched concepts, mean cosine {cos.mean():.4f} (min {cos.min():.4f}); "
              f"centred {centred.mean():.4f} (min {centred.min():.4f})", end="")
        assert sorted(match.tolist()) == list(range(20)) and cos.max() <= 1 + 1e-5
        assert cos.mean() > 0.5  # far from chance, which is what a broken dictionary or matching would give
