"""Every analysis on the real pair, SmolLM2-135M-Instruct (zoo:smol) and its zorbish fine-tunes, called exactly as
on the tiny zoo's pairs. Reported, not tuned: run with -s for the tables.

- intruders (k=10, all 210 q k v o gate up down matrices) over epsilon for the full fine-tune and LoRA r=1, 8, 64,
  with ||delta W||_2 against the base's s1 and s10, and along the checkpoint series with its accuracy;
- TuCo (last token) on held-out task prompts vs English prose, full fine-tune and every LoRA;
- mean LID per layer (resid_post, TwoNN, k=128) for zoo:smol and its fine-tunes on task prompts and on prose, and
  along the series next to task accuracy.
Asserted: what holds whatever the training did (ranks of LoRA updates, counts in range and monotone in epsilon,
TuCo in [0, 1], the series' first checkpoint is the base, finite LID below d_model)."""

import json

import pytest
import torch

import interp
from analyses import intruders, lid, tuco
from interp.prompts import read_prompts
from interp.zoo import registry, smol
from interp.zoo.smol_task import TASK

pytestmark = pytest.mark.slow

TUNED = ("smol-full", "smol-lora-r1", "smol-lora-r8", "smol-lora-r64")
LAYERS = (0, 5, 10, 15, 20, 25, 29)


@pytest.fixture(scope="module")
def prompt_sets(smol_zoo, tmp_path_factory):
    """label -> (prompts, answers or None), from the files the CLI analyses take (`interp zoo prompts`)."""
    files = smol.write_prompts(tmp_path_factory.mktemp("smol-prompts"), n=64)
    records = [json.loads(line) for line in files[TASK].read_text().splitlines()]
    return {TASK: ([r["prompt"] for r in records], [r["answer"] for r in records]),
            "prose": (read_prompts(files["prose"]), None)}


@pytest.fixture(scope="module")
def base(smol_zoo):
    return interp.load_model("zoo:smol")


def test_intruders_full_vs_lora_ranks(base):
    res = {name: intruders.measure(base, f"zoo:{name}", progress=False) for name in TUNED}
    print(f"\nintruders among the top k=10 of the {len(res['smol-full'].names)} changed matrices of zoo:smol")
    print(intruders.counts_table(res))
    for name, r in res.items():
        kinds = r.to_frame().groupby("kind").intruders.sum().to_dict()
        print(f"{name:<14} at eps 0.5 by kind: {kinds}; delta effective rank median {float(r.delta_erank.median()):.1f}")
    for name, r in res.items():
        assert len(r.names) == 7 * base.n_layers, name
        assert ((r.counts >= 0) & (r.counts <= r.k)).all() and (r.counts.diff(dim=1) >= 0).all(), name
    for name in TUNED[1:]:  # a LoRA update has rank <= r: singular values past r vanish (float32 round-off)
        rank = int(name.rsplit("-r", 1)[1])
        r = res[name]
        if rank < r.delta_s.shape[1]:
            assert (r.delta_s[:, rank] <= 1e-4 * r.delta_s[:, 0]).all(), name


def test_intruders_along_the_series(base):
    meta = json.loads((registry.model_path("smol-series") / "zoo.json").read_text())
    accuracy = {p["step"]: p["accuracy"][TASK] for p in meta["checkpoints"]}
    series = intruders.measure_series(base, "zoo:smol-series")
    print(f"\nintruders along the {meta['of']} run (k=10): step, task accuracy, count at eps 0.3 / 0.5 / 0.7, "
          f"max ||dW||2/s10")
    for step, r in series:
        counts = [int(r.count(e).sum()) if r.names else 0 for e in (0.3, 0.5, 0.7)]
        ratio = float(r.ratio(10).max()) if r.names else 0.0
        print(f"  step {step:>4}  {accuracy[step]:6.1%}  {counts[0]:>4} / {counts[1]:>4} / {counts[2]:>4}  {ratio:.3f}")
    assert series[0][0] == 0 and not series[0][1].names  # step 0: B = 0, nothing changed
    assert all(len(r.names) == 7 * base.n_layers for _, r in series[1:])


def test_tuco_on_task_prompts_vs_prose(base, prompt_sets):
    print("\nTuCo at the last token (mean over prompts, [q25, q75])")
    for name in TUNED:
        pair = interp.load_pair(base, f"zoo:{name}")
        for label, (prompts, _) in prompt_sets.items():
            values = tuco.measure(pair, prompts, label=label, progress=False).tuco()
            q25, q75 = values.quantile(0.25), values.quantile(0.75)
            print(f"  {name:<14} {label:<8} {float(values.mean()):.4f}  [{float(q25):.4f}, {float(q75):.4f}]")
            assert values.isfinite().all() and ((values >= 0) & (values <= 1)).all()


def test_lid_per_layer_on_task_and_prose(base, prompt_sets):
    models = {"zoo:smol": base} | {f"zoo:{n}": interp.load_model(f"zoo:{n}") for n in TUNED}
    print("\nmean LID (TwoNN, k=128) per layer, resid_post")
    for label, (prompts, _) in prompt_sets.items():
        result = lid.measure(models, prompts, list(LAYERS), label=label, progress=False)
        n = len(result.lid["zoo:smol", result.sites[0]])
        print(f"{label} ({n} tokens): " + "  ".join(f"{s:>14}" for s in result.sites))
        for m in result.models:
            print(f"  {m:<18}" + "  ".join(f"{result.mean(m, s):>14.2f}" for s in result.sites))
        for key, values in result.lid.items():
            assert values.isfinite().float().mean() > 0.99 and 0 < result.mean(*key) < base.d_model


def test_lid_along_the_series_with_accuracy(base, prompt_sets):
    prompts, answers = prompt_sets[TASK]
    series = interp.load_series("zoo:smol-series")
    result = lid.measure_series(base, series, prompts, list(LAYERS), task=(prompts, answers), task_name=TASK,
                                label=TASK)
    print(f"\nmean LID on {TASK} prompts along the series, with task accuracy (teacher-forced, mean per prompt)")
    print(f"{'step':>6} {'accuracy':>9} " + " ".join(f"{s:>14}" for s in result.sites))
    for i, step in enumerate(result.steps):
        print(f"{step:>6} {float(result.accuracy[i]):>9.1%} " + " ".join(f"{float(v):>14.2f}" for v in result.mean[i]))
    assert result.steps == series.steps and torch.isfinite(result.mean).all()
    unchanged = lid.measure(base, prompts, list(LAYERS), label=TASK, progress=False)
    for j, s in enumerate(result.sites):  # step 0 of a LoRA run is the base model itself
        assert float(result.mean[0, j]) == pytest.approx(unchanged.mean("zoo:smol", s), rel=1e-4)
