"""TuCo on the zoo: the paper's findings in miniature. Run with -s to see the numbers."""

import pytest
import torch
from scipy.stats import mannwhitneyu

import interp
from analyses import tuco

pytestmark = pytest.mark.slow


def test_tuco_is_higher_on_the_target_skill_than_on_pre_training_skills(zoo_built):
    zoo = zoo_built
    pair = interp.load_pair("zoo:base", "zoo:full")
    target = tuco.measure(pair, [e.prompt for e in zoo.task_prompts(zoo.TARGET_SKILL, 128)], progress=False)
    pre = tuco.measure(pair, [e.prompt for s in zoo.SKILLS for e in zoo.task_prompts(s, 32)], progress=False)
    t, p = target.tuco(), pre.tuco()
    test = mannwhitneyu(t.numpy(), p.numpy(), alternative="greater")
    print(f"\nzoo:full TuCo, last token: target skill mean {t.mean():.3f} (n={len(t)}), pre-training skills mean "
          f"{p.mean():.3f} (n={len(p)}); Mann-Whitney U={test.statistic:.0f}, one-sided p={test.pvalue:.2g}")
    assert t.mean() > p.mean() and test.pvalue < 0.01


def test_tuco_on_successful_vs_failed_prefix_attacks(zoo_built):
    """Reported, not tuned: the paper finds lower TuCo where the attack succeeds."""
    zoo = zoo_built
    pair = interp.load_pair("zoo:base", "zoo:safety")
    attacks = zoo.attack_prompts(256)
    success = zoo.attack_success(pair.tuned.hf, pair.tuned.tokenizer, attacks)
    attacked = tuco.measure(pair, [a.attack for a in attacks], progress=False).tuco()
    clean = tuco.measure(pair, [a.clean for a in attacks], progress=False).tuco()
    won, lost = attacked[success], attacked[~success]
    print(f"\nzoo:safety: attack success {float(success.float().mean()):.1%} of {len(attacks)}; TuCo clean "
          f"{clean.mean():.3f}, attacked {attacked.mean():.3f}; attacked TuCo where the attack succeeded "
          f"{won.mean():.3f} (n={len(won)}) vs failed {lost.mean():.3f} (n={len(lost)})", end="")
    if len(won) and len(lost):
        test = mannwhitneyu(won.numpy(), lost.numpy(), alternative="less")
        print(f"; Mann-Whitney U={test.statistic:.0f}, one-sided p={test.pvalue:.2g}")
    assert 0 < len(won) < len(attacks), "the miniature needs both successful and failed attacks"
    assert torch.isfinite(attacked).all() and attacked.max() <= 1
