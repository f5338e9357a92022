"""Circuits on the zoo: the issue's acceptance numbers, printed (run with -s) and asserted where they hold."""

import pytest
import torch
from scipy.stats import spearmanr

import interp
from analyses import circuits
from analyses.circuits import cmap, lofit
from analyses.circuits import edges as ce
from analyses.circuits import heads as head_detectors
from analyses.circuits import patching as cp
from interp.app import zoo_defaults

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(zoo_built):
    return interp.load_pair("zoo:base", "zoo:full")


@pytest.fixture(scope="module")
def copy_pairs(pair):
    return cp.tokenize_pairs(pair.base, zoo_defaults.circuit_pairs("copy", 64))


@pytest.fixture(scope="module")
def copy_importance(pair, copy_pairs):
    sites = cp.component_sites(pair.base, ("head",))
    shape = (pair.base.n_layers, pair.base.n_heads)
    act = -cp.activation_patching(pair.base, copy_pairs, sites).reshape(shape)
    att = -cp.attribution_patching(pair.base, copy_pairs, sites).reshape(shape)
    return act, att


def test_attribution_patching_agrees_with_activation_patching_on_copy(copy_importance):
    act, att = copy_importance
    rho = spearmanr(act.flatten().numpy(), att.flatten().numpy()).statistic
    print(f"\nzoo:base copy, 16 heads: Spearman(attribution, activation patching) = {rho:.3f}; "
          f"top head by patching {circuits.top_heads(act, 1)}, by attribution {circuits.top_heads(att, 1)}")
    assert rho >= 0.8


def test_top_copy_heads_are_induction_like_and_ablating_them_breaks_copy(pair, copy_importance):
    act, _ = copy_importance
    top = circuits.top_heads(act, 3)
    ex = interp.zoo.task_prompts("copy", 64)
    prompts, answers = [e.prompt for e in ex], [e.answer for e in ex]
    on_task = head_detectors.detector_scores(pair.base, [f"{p} {a}" for p, a in zip(prompts, answers)])
    on_random = head_detectors.detector_scores(pair.base)
    print(f"\nzoo:base top-3 copy heads {top}: induction score on copy prompts "
          f"{[round(float(on_task['induction'][h]), 3) for h in top]}, on repeated random sequences "
          f"{[round(float(on_random['induction'][h]), 3) for h in top]} (max over heads on random sequences "
          f"{float(on_random['induction'].max()):.3f}; the zoo never saw random repeats)")
    assert float(on_task["induction"][top[0]]) >= 0.5
    assert float(on_task["induction"][top[0]]) == float(on_task["induction"].max())
    effect = circuits.ablation_effect(pair.base, top, prompts, answers, n_random=8)
    print(f"copy accuracy {effect['clean_accuracy']:.3f}; mean-ablating the top-3 heads drops it by "
          f"{effect['top_drop']:.3f}, 3 random heads by {effect['random_drop']:.3f} on average over 8 draws "
          f"(drops {[round(effect['clean_accuracy'] - a, 3) for a in effect['random_accuracy']]})")
    assert effect["top_drop"] >= 0.5 and effect["top_drop"] >= 3 * effect["random_drop"]


def test_eap_ig_circuit_faithfulness(pair, copy_pairs):
    edges = ce.edge_attribution(pair.base, copy_pairs, ig_steps=5)
    faith = ce.faithfulness_curve(pair.base, copy_pairs, edges, (5, 10, 20, 40))
    print(f"\nzoo:base copy, EAP-IG (5 steps) top edges {edges.top(5)}; node-level faithfulness by circuit size "
          f"{ {n: round(f, 3) for n, f in faith.items()} } of {int(edges.valid.sum())} edges")
    assert max(faith.values()) >= 0.8


def test_cmap_recovers_half_of_the_fine_tuning_gain(pair):
    ex = interp.zoo.task_prompts(interp.zoo.TARGET_SKILL, 64)
    res = cmap.cmap(pair, [e.prompt for e in ex], [e.answer for e in ex], max_set=3)
    order = res.gain.argsort(descending=True)[:5].tolist()
    print(f"\nzoo:full vs base on reverse, mean answer log-prob base {res.m_base:.3f}, tuned {res.m_tuned:.3f}; "
          f"best single components {[(res.components[i], round(float(res.gain[i]), 3)) for i in order]}; "
          f"greedy sets {[(s, round(g, 3)) for s, g in res.greedy]}")
    assert any(g >= 0.5 for _, g in res.greedy)


def test_emergent_heads_on_the_target_skill(pair):
    target = zoo_defaults.circuit_pairs(interp.zoo.TARGET_SKILL, 64)
    sites = cp.component_sites(pair.base, ("head",))
    maps = {}
    for name, model in zip(("base", "tuned"), pair.models):
        tp = cp.tokenize_pairs(model, target)
        maps[name] = -cp.attribution_patching(model, tp, sites, normalise=False).reshape(model.n_layers, model.n_heads)
    diff = maps["tuned"] - maps["base"]
    heads = circuits.top_heads(diff, 3)
    print(f"\nreverse head importance (logit-difference units) base max {float(maps['base'].max()):.3f}, tuned max "
          f"{float(maps['tuned'].max()):.3f}; emergent heads {[(h, round(float(diff[h]), 3)) for h in heads]}")
    assert float(diff[heads[0]]) > 0.5


def test_lofit_on_the_target_skill(pair):
    base = pair.base
    train = interp.zoo.task_prompts(interp.zoo.TARGET_SKILL, 512, split="train")
    test = interp.zoo.task_prompts(interp.zoo.TARGET_SKILL, 128, split="test")
    fitted = lofit.train(base, [e.prompt for e in train], [e.answer for e in train], steps=(40, 100), l1=0.05,
                         lr=(0.05, 0.05))
    summary = circuits.lofit_summary(base, fitted, [e.prompt for e in test], [e.answer for e in test])
    print(f"\nLoFiT on {summary['k']} of {summary['n_heads']} heads {summary['heads']}: held-out reverse accuracy "
          f"{summary['base_accuracy']:.3f} (base) -> {summary['lofit_accuracy']:.3f}")
    assert summary["k"] <= 0.1 * summary["n_heads"]
    assert torch.isfinite(fitted.offsets).all() and summary["lofit_accuracy"] >= summary["base_accuracy"] - 0.01
    # control beyond the 10% cap: can constant per-head offsets do the target skill with more heads?
    for k, steps in ((4, (40, 100)), (summary["n_heads"], (40, 400))):
        more = lofit.train(base, [e.prompt for e in train], [e.answer for e in train], k=k, steps=steps, l1=0.05,
                           lr=(0.05, 0.05))
        control = circuits.lofit_summary(base, more, [e.prompt for e in test], [e.answer for e in test])
        print(f"control, LoFiT on {k} heads, {steps[1]} offset steps: {control['base_accuracy']:.3f} (base) -> "
              f"{control['lofit_accuracy']:.3f}")
        assert torch.isfinite(more.offsets).all() and control["lofit_accuracy"] >= control["base_accuracy"] - 0.01


def test_lofit_finds_a_refusal_offset(pair):
    """Known answer: the safety fine-tune's change (answer `refuse` to every add prompt) is a constant push toward
    one token, which a per-head offset can carry. LoFiT on at most 10% of the heads must make the base refuse most
    held-out add prompts (the base never does); the side effect on copy is printed."""
    base = pair.base
    train = interp.zoo.task_prompts(interp.zoo.RESTRICTED, 512, split="train")
    test = interp.zoo.task_prompts(interp.zoo.RESTRICTED, 128, split="test")
    refuse = [interp.zoo.REFUSAL] * len(train)
    fitted = lofit.train(base, [e.prompt for e in train], refuse, steps=(40, 100), l1=0.05, lr=(0.05, 0.05))
    summary = circuits.lofit_summary(base, fitted, [e.prompt for e in test], refuse[: len(test)])
    side = interp.zoo.task_prompts("copy", 128, split="test")
    copy = circuits.lofit_summary(base, fitted, [e.prompt for e in side], [e.answer for e in side])
    print(f"\nLoFiT toward refusal on {summary['k']} of {summary['n_heads']} heads {summary['heads']}: held-out add "
          f"prompts refused {summary['base_accuracy']:.3f} (base) -> {summary['lofit_accuracy']:.3f}; copy accuracy "
          f"{copy['base_accuracy']:.3f} -> {copy['lofit_accuracy']:.3f}")
    assert summary["k"] <= 0.1 * summary["n_heads"]
    assert summary["base_accuracy"] == 0 and summary["lofit_accuracy"] >= 0.8
