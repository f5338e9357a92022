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
    """Shifts, concepts and the layer (every resid_post layer and `final`) from train prompts of the target
    skill, the curve on test prompts, the side effect on `copy`. Concept-wise steering at the last prompt
    token closes more of the KL gap than the global shift (all positions, the paper's setting); the issue's
    "at least half" is NOT met (about 0.3 here; see the report): the tuned model answers with the last symbol,
    the base with the first, and no additive vector per concept (nor any single vector) carries that."""
    zoo, pair = zoo_pair
    train = [e.prompt for e in zoo.task_prompts(zoo.TARGET_SKILL, 512, split="train")]
    test = [e.prompt for e in zoo.task_prompts(zoo.TARGET_SKILL, 128, split="test")]
    side = zoo.task_prompts(zoo.SKILLS[0], 64, split="test")
    held_out = ([e.prompt for e in side], [e.answer for e in side])
    base_acc = float(interp.answer_scores(pair.base, *held_out).accuracy.mean())
    tuned_acc = float(interp.answer_scores(pair.tuned, *held_out).accuracy.mean())
    print(f"\n{zoo.SKILLS[0]} accuracy: base {base_acc:.3f}, tuned {tuned_acc:.3f}")
    curves = {}
    for mode, positions in (("global", "all"), ("global", "last"), ("concept", "last"), ("concept", "from-last")):
        sweep = shift.steering_curve(pair, train, test, mode=mode, positions=positions, held_out=held_out,
                                     strengths=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
        curves[mode, positions] = sweep
        print(f"{mode} shift at {positions} positions; train closure per layer "
              + " ".join(f"{layer}:{c:.3f}" for layer, c in sweep.layer_closure.items())
              + f"; steering at {sweep.layer}, test KL(base || tuned) {sweep.kl_unsteered:.3f}")
        for s, kl, c, a in zip(sweep.strength, sweep.kl, sweep.closure, sweep.accuracy):
            print(f"  strength {s:4.2f}  KL {kl:.4f}  gap closed {c:7.1%}  {zoo.SKILLS[0]} accuracy {a:.3f}")
        assert sweep.kl_unsteered > 1 and sweep.closure[0] == 0
        assert sweep.accuracy[0] == pytest.approx(base_acc)
    best = {key: max(sweep.closure) for key, sweep in curves.items()}
    assert best["concept", "last"] > best["global", "all"] + 0.05 and best["concept", "last"] > best["global", "last"]
    assert best["concept", "last"] >= 0.2


def test_kmeans_concepts_are_stable_across_seeds(zoo_pair):
    """K chosen by stability on seeds 0, 1 and 2 (`shift.choose_k`, the CLI's `--k auto`); at that K two
    other seeds (3, 4) must match concepts (Hungarian on cosine) with mean cosine >= 0.9 at every layer. The
    stability table is printed: the K at which the last layer's representations split in many ways of almost the
    same inertia are the ones `choose_k` avoids (the paper's default K = 20 gives about 0.85-0.88 there)."""
    zoo, pair = zoo_pair
    prompts = mixed_prompts(zoo)
    chosen = shift.choose_k(pair.base, prompts, progress=False)
    k, table = chosen.k, chosen.table()
    print("\nstability (seeds 0, 1, 2), mean matched cosine per layer:")
    for candidate, row in table.items():
        print(f"  K = {candidate:2d}: " + " ".join(f"{v:.3f}" for v in row.values()))
    print(f"chosen K = {k}; checked on seeds 3 and 4:", end="")
    runs = [shift.measure(pair, prompts, k=k, seed=seed, progress=False) for seed in (3, 4)]
    for i, layer in enumerate(runs[0].layers):
        a, b = runs[0].concepts[i], runs[1].concepts[i]
        match, cos = shift.match_concepts(a, b)
        centre = torch.cat([a, b]).mean(0)  # cosines of centred centroids: the stricter comparison
        _, centred = shift.match_concepts(a - centre, b - centre)
        print(f"\nlayer {layer}: matched concepts, mean cosine {cos.mean():.4f} (min {cos.min():.4f}); "
              f"centred {centred.mean():.4f} (min {centred.min():.4f})", end="")
        assert sorted(match.tolist()) == list(range(k)) and cos.max() <= 1 + 1e-5
        assert cos.mean() >= 0.9
    assert k in table and min(table[k].values()) == max(min(row.values()) for row in table.values())


def test_steering_the_base_toward_the_safety_fine_tune(zoo_built):
    """Known answer: the safety fine-tune's change on add prompts (answer `refuse`) is one push toward one token,
    which the concept shifts at the last prompt token carry: steering the base with them at strength 1 closes most of
    the KL gap to the safety model on held-out add prompts. The curve and the side effect on copy are printed."""
    zoo = zoo_built
    pair = interp.load_pair("zoo:base", "zoo:safety")
    train = [e.prompt for e in zoo.task_prompts(zoo.RESTRICTED, 256, split="train")]
    test = [e.prompt for e in zoo.task_prompts(zoo.RESTRICTED, 128, split="test")]
    side = zoo.task_prompts(zoo.SKILLS[0], 64, split="test")
    sweep = shift.steering_curve(pair, train, test, mode="concept", positions="last", strengths=[0.0, 0.5, 1.0, 1.5],
                                 held_out=([e.prompt for e in side], [e.answer for e in side]))
    print(f"\nbase -> safety on {zoo.RESTRICTED}, concept shifts at the last token, layer {sweep.layer}: test "
          f"KL {sweep.kl_unsteered:.3f} unsteered; " + ", ".join(
              f"strength {s:g}: {c:.1%} closed, {zoo.SKILLS[0]} {a:.3f}"
              for s, c, a in zip(sweep.strength, sweep.closure, sweep.accuracy)))
    assert sweep.kl_unsteered > 1 and sweep.closure[sweep.strength.index(1.0)] >= 0.5
