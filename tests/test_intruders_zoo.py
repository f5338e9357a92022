"""Intruder dimensions on the zoo: the paper's comparison in miniature. Run with -s to see the numbers.

Reported, not tuned: the intruder counts over epsilon of the full fine-tune and LoRA r=1, 8, 64 (k=10), the size of
each update against the base's spectrum (||delta W||_2 / s1(W0) and / s10(W0): intruders need an update that
reaches the base's top singular values, DESIGN.md's calibration), intruders along the full fine-tune's checkpoint
series, and lambda sweeps on the LoRA models. Asserted: the PEFT-adapter path equals the
merged-checkpoint path on the zoo, and sanity (integer counts in range, monotone in epsilon, sorted spectra,
lambda = 1 is the tuned model).
"""

import dataclasses
import math

import pytest
import torch

import interp
from analyses import intruders
from analyses.intruders.matrices import paired_matrices
from analyses.intruders.spectra import intruder_directions
from interp.prompts import PromptSet
from interp.scoring import answer_scores

pytestmark = pytest.mark.slow

TUNED = ("full", "lora-r1", "lora-r8", "lora-r64")


@pytest.fixture(scope="module")
def results(zoo_built):
    base = interp.load_model("zoo:base")
    return base, {name: intruders.measure(interp.load_pair(base, f"zoo:{name}"), progress=False) for name in TUNED}


def test_intruder_counts_full_vs_lora(results):
    base, res = results
    print(f"\nintruders among the top k=10 over all {len(res['lora-r8'].names)} attention/MLP matrices of zoo:base")
    print(intruders.counts_table(res))
    for name, r in res.items():
        kinds = r.to_frame().groupby("kind").intruders.sum().to_dict()
        print(f"{name:<10} at eps 0.5 by kind: {kinds}; intruder energy (mean over matrices) "
              f"{float(r.intruder_energy.mean()):.3f}; delta effective rank median {float(r.delta_erank.median()):.1f}")
    verdict = "reproduced" if min(int(res[n].count().sum()) for n in ("lora-r1", "lora-r8")) > \
        int(res["full"].count().sum()) else "NOT reproduced"
    print(f"paper's finding (LoRA r=1, 8 have more intruders than full fine-tuning at eps 0.5): {verdict}")
    for name, r in res.items():
        n = len(r.names)
        assert n > 0 and r.counts.dtype == torch.long
        assert ((r.counts >= 0) & (r.counts <= r.k)).all() and (r.counts.diff(dim=1) >= 0).all(), name
        for spectrum in (r.base_s, r.tuned_s, r.delta_s):
            assert (spectrum.diff(dim=1) <= 1e-6).all(), name
        assert torch.isfinite(r.ratio(1)).all() and ((r.intruder_energy >= 0) & (r.intruder_energy <= 1 + 1e-6)).all()


def test_adapter_path_equals_merged_checkpoint_on_the_zoo(results):
    base, res = results
    merged = dataclasses.replace(interp.load_model("zoo:lora-r8"), adapter=None)  # its PEFT-merged weights
    from_merged = intruders.measure(base, merged, progress=False)
    assert from_merged.names == res["lora-r8"].names
    assert torch.equal(from_merged.counts, res["lora-r8"].counts)
    torch.testing.assert_close(from_merged.sims, res["lora-r8"].sims, atol=1e-4, rtol=0)


def test_intruders_along_the_checkpoint_series(zoo_built):
    series = intruders.measure_series(interp.load_model("zoo:base"), "zoo:series")
    print("\nzoo:series (the full fine-tune), intruders at eps 0.3 / 0.5 / 0.7 and max ||dW||2/s1 per step")
    for step, r in series:
        ratio = float(r.ratio(1).max()) if r.names else 0.0
        print(f"step {step:>5}: {int(r.count(0.3).sum()):>4} {int(r.count(0.5).sum()):>4} "
              f"{int(r.count(0.7).sum()):>4}   {ratio:.3f}")
    assert [s for s, _ in series] == sorted(s for s, _ in series) and len(series) >= 2
    assert series[0][1].count().sum() == 0  # the first checkpoint is the base itself or next to it


def removed_energy(pair, epsilon: float = 0.5) -> tuple[float, float, float]:
    """Over all intruders: sum s_i^2 (what lambda = 0 removes), and the parts of it that are W0's and delta W's
    (||U_I^T W0||_F^2 and ||U_I^T delta W||_F^2; the cross term makes up the rest)."""
    params = [{n: p.detach() for n, p in m.hf.named_parameters()} for m in pair.models]
    total = of_base = of_delta = 0.0
    for _, W0, Wt in paired_matrices(*params, fan_in_fan_out=True):
        U, S, _ = intruder_directions(W0, Wt, epsilon)
        total += float(S.square().sum())
        of_base += float((U.mT @ W0).square().sum())
        of_delta += float((U.mT @ (Wt - W0)).square().sum())
    return total, of_base, of_delta


def test_lambda_sweeps_on_the_lora_models(results, zoo_built):
    zoo = zoo_built
    base, res = results
    target = zoo.task_prompts(zoo.TARGET_SKILL, 96, split="test")
    pre = [e for skill in zoo.SKILLS for e in zoo.task_prompts(skill, 48, split="test")]
    lams = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
    print(f"\nintruders (eps 0.5) scaled by lambda: pre-training skills (answer loss, accuracy; 192 prompts) vs the "
          f"target skill {zoo.TARGET_SKILL} (accuracy; 96 prompts)")
    for name in ("lora-r1", "lora-r8", "lora-r64"):
        pair = interp.load_pair(base, f"zoo:{name}")
        sweep = intruders.lambda_sweep(pair, PromptSet([e.prompt for e in target], [e.answer for e in target]),
                                       PromptSet([e.prompt for e in pre], [e.answer for e in pre]), lams=lams)
        total, of_base, of_delta = removed_energy(pair)
        print(f"zoo:{name}: {sweep.n_intruders} intruders; their components carry sum s_i^2 = {total:.1f}, of "
              f"which W0's ||U_I^T W0||^2 = {of_base:.1f} and delta W's {of_delta:.1f}")
        for i, lam in enumerate(lams):
            print(f"  lambda {lam:4.2f}: pre-training loss {sweep.pretrain_loss[i]:.4f} acc "
                  f"{sweep.pretrain_accuracy[i]:.3f}   target acc {sweep.target_accuracy[i]:.3f} "
                  f"loss {sweep.target_loss[i]:.4f}")
        b = sweep.base
        print(f"  base       : pre-training loss {b['pretrain_loss']:.4f} acc {b['pretrain_accuracy']:.3f}   target "
              f"acc {b['target_accuracy']:.3f} loss {b['target_loss']:.4f}")
        lower = [lam for lam, v in zip(lams, sweep.pretrain_loss) if lam < 1 and v < sweep.pretrain_loss[-1]]
        print(f"  lambdas < 1 with a lower pre-training-skill loss than lambda = 1: {lower or 'none'}")
        tuned = answer_scores(pair.tuned, [e.prompt for e in target], [e.answer for e in target])
        assert sweep.target_accuracy[-1] == pytest.approx(float(tuned.accuracy.mean()), abs=1e-6)
        assert all(math.isfinite(v) for key in ("pretrain_loss", "target_loss") for v in getattr(sweep, key))
