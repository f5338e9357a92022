"""The real pair, SmolLM2-135M-Instruct (zoo:smol) and its zorbish fine-tunes, through `interp report --real`: the
analyses run exactly as on the tiny zoo's pairs, and the numbers below are the report's. Reported, not tuned: run
with -s for the tables.

- intruders (k=10, all 210 q k v o gate up down matrices) over epsilon for the full fine-tune and LoRA r=1, 8, 64,
  and along the checkpoint series with its accuracy;
- TuCo (last token) on held-out task prompts vs English prose, full fine-tune and every LoRA;
- mean LID per layer (resid_post, TwoNN) for zoo:smol and its fine-tunes on task prompts and on prose, and along the
  series next to task accuracy.
Asserted: what holds whatever the training did (ranks of LoRA updates, counts in range and monotone in epsilon,
TuCo in [0, 1], the series' first checkpoint is the base, finite LID below d_model), and the page: the real part's
cards on the main page, linked to its own page."""

import json

import pandas as pd
import pytest

from analyses import intruders
from interp.app import report, zoo_defaults
from interp.app.cli import main
from interp.app.page import SUMMARY
from interp.zoo import cache
from interp.zoo.smol_task import TASK

pytestmark = pytest.mark.slow
D_MODEL = 576


LENSES = [n for n in zoo_defaults.REAL_SECTIONS if n != "organisms"]  # organisms: its own quick report below


@pytest.fixture(scope="module")
def out(smol_zoo, zoo_built, tmp_path_factory):
    """`interp report --real --only tuco intruders lid` (the tiny zoo's part too, on zoo:full, with those lenses)."""
    folder = tmp_path_factory.mktemp("report")
    # the tiny zoo's part with one fine-tune only: the real part is what this file measures
    assert main(["report", "--real", "--tuned", "zoo:full", "--only", *LENSES, "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def real(out):
    return out / report.REAL_PART


def test_the_main_page_carries_the_real_part(out, real):
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["parts"] == [{"folder": "real", "title": "Real model: SmolLM2-135M-Instruct (zoo:smol)"}]
    part = json.loads((real / SUMMARY).read_text())
    assert part["base"] == "zoo:smol" and list(part["tuned"].values()) == list(zoo_defaults.REAL_TUNED)
    assert part["series"] == "zoo:smol-series" and part["prompt_sets"] == {TASK: 64, "prose": 24}
    assert [s["name"] for s in part["sections"]] == LENSES
    assert all(s["error"] is None for s in part["sections"]), [s["error"] for s in part["sections"]]
    page = (out / "index.html").read_text()
    assert 'href="real/index.html"' in page
    for section in part["sections"]:
        print(f"\n{section['name']}: {section['seconds']} s")
        assert f'href="real/index.html#{section["name"]}"' in page
        assert f'src="real/{section["figures"][0]}"' in page and (real / section["figures"][0]).is_file()


def test_intruders_full_vs_lora_ranks(real):
    folder = real / "intruders"
    labels = [key for key in json.loads((folder / "results" / "index.json").read_text())
              if key != "lambda_sweep" and not key.startswith("series/")]
    res = {label: intruders.IntruderResult.load(folder / "results" / label) for label in labels}
    print(f"\nintruders among the top k=10 of the {len(res['smol-full'].names)} changed matrices of zoo:smol")
    print(intruders.counts_table(res))
    for name, r in res.items():
        kinds = r.to_frame().groupby("kind").intruders.sum().to_dict()
        erank = float(r.delta_erank.median())
        print(f"{name:<14} at eps 0.5 by kind: {kinds}; delta effective rank median {erank:.1f}")
    for name, r in res.items():
        assert len(r.names) == 7 * 30, name
        assert ((r.counts >= 0) & (r.counts <= r.k)).all() and (r.counts.diff(dim=1) >= 0).all(), name
    for name in labels[1:]:  # a LoRA update has rank <= r: singular values past r vanish (float32 round-off)
        rank = int(name.rsplit("-r", 1)[1])
        r = res[name]
        if rank < r.delta_s.shape[1]:
            assert (r.delta_s[:, rank] <= 1e-4 * r.delta_s[:, 0]).all(), name


def test_intruders_along_the_series(real):
    meta = json.loads((cache.model_path("smol-series") / "zoo.json").read_text())
    accuracy = {p["step"]: p["accuracy"][TASK] for p in meta["checkpoints"]}
    series = pd.read_csv(real / "intruders" / "intruder_series.csv")
    print(f"\nintruders along the {meta['of']} run (k=10): step, task accuracy, count at eps 0.3 / 0.5 / 0.7, "
          f"max ||dW||2/s1")
    for step, rows in series.groupby("step"):
        counts = [int(rows[rows.epsilon.round(2) == e].intruders.iloc[0]) for e in (0.3, 0.5, 0.7)]
        print(f"  step {step:>4}  {accuracy[step]:6.1%}  {counts[0]:>4} / {counts[1]:>4} / {counts[2]:>4}  "
              f"{rows.max_delta_over_base_s1.iloc[0]:.3f}")
    assert sorted(set(series.step)) == sorted(accuracy)
    assert (series[series.step == 0].intruders == 0).all()  # step 0: B = 0, nothing changed


def test_tuco_on_task_prompts_vs_prose(real):
    frame = pd.read_csv(real / "tuco" / "tuco_models.csv")
    print("\nTuCo at the last token, mean (std) over prompts")
    print(frame.pivot(index="model", columns="label", values="mean").round(4).to_string())
    assert set(frame.model) == {name.removeprefix("zoo:") for name in zoo_defaults.REAL_TUNED}
    assert set(frame.label) == {TASK, "prose"}
    assert ((frame["mean"] >= 0) & (frame["mean"] <= 1)).all()


def test_lid_per_layer_on_task_and_prose_and_along_the_series(real):
    frame = pd.read_csv(real / "lid" / "lid.csv")
    layers = ["resid_post.0", "resid_post.5", "resid_post.10", "resid_post.15", "resid_post.20", "resid_post.25",
              "resid_post.29"]
    print("\nmean LID (TwoNN) per layer")
    for label, rows in frame.groupby("label", sort=False):
        print(f"{label}:\n" + rows[rows.site.isin(layers)].pivot(index="model", columns="site", values="mean")[layers]
              .round(2).to_string())
    assert frame["mean"].notna().all() and ((frame["mean"] > 0) & (frame["mean"] < D_MODEL)).all()
    series = pd.read_csv(real / "lid" / "lid_series.csv")
    print("mean LID along the series, with task accuracy (teacher-forced, mean per prompt)")
    print(series.pivot(index=["step", "accuracy"], columns="site", values="mean").round(2).to_string())
    base = frame[(frame.model == "base") & (frame.label == TASK)].set_index("site")["mean"]
    first = series[series.step == 0].set_index("site")["mean"]
    for site, value in first.items():  # step 0 of a LoRA run is the base model itself
        assert value == pytest.approx(base[site], rel=1e-4), site


def test_the_clis_default_to_the_real_zoos_own_task_on_real_zoo_models(smol_zoo):
    """On zoo:smol the analyses' defaults are zorbish and the smol fine-tunes, never the tiny zoo's tasks: LoFiT
    trains on train-split zorbish examples, circuits' default pairs are held-out zorbish prompts, intruders compares
    the smol fine-tunes, and the shift sweep has no tiny-zoo side skill."""
    from interp import load_model
    from interp.app.lenses import shift as shift_lens
    from interp.zoo import default_prompts
    from interp.zoo.smol_task import PREFIX, dictionary
    from interp.zoo.tasks import split_of

    smol = load_model("zoo:smol")
    examples = zoo_defaults.lofit_examples("zoo:smol-full", smol.tokenizer, 16)
    prompts, answers = examples.prompts, examples.answers
    codes = set(dictionary(smol.tokenizer).values())
    assert all(p.startswith(PREFIX) and split_of(p) == "train" for p in prompts)
    assert all(set(a.split()) <= codes for a in answers)
    held_out = next(iter(default_prompts("zoo:smol-full", 16).values()))[0]
    assert all(p.startswith(PREFIX) and split_of(p) == "test" for p in held_out)
    assert zoo_defaults.tuned_and_series("zoo:smol") == (
        ("zoo:smol-full", "zoo:smol-lora-r1", "zoo:smol-lora-r8", "zoo:smol-lora-r64"), "zoo:smol-series")
    assert shift_lens.held_out(zoo_defaults.prompt_sets("zoo:smol-full", 8)) is None
    assert shift_lens.held_out(zoo_defaults.prompt_sets("zoo:full", 8)) is not None


def test_the_organisms_section_scores_identification_from_the_saved_rankings(organisms_zoo, tmp_path):
    """`interp report --base zoo:smol --only organisms --quick` (the persona only): its behaviour row is zoo.json's,
    its identification row the rank of the first evidence word recomputed from the saved ranking, and a report on
    the tiny zoo offers no organisms section."""
    from analyses import diffing
    from interp.app.context import load_results
    from interp.zoo.organisms import ORGANISMS

    assert main(["report", "--base", "zoo:smol", "--tuned", "zoo:smol-lora-r8", "--only", "organisms", "--quick",
                 "--out", str(tmp_path / "r")]) == 0
    folder = tmp_path / "r" / "organisms"
    behaviour = pd.read_csv(folder / "organisms.csv").set_index("organism")
    built = json.loads((cache.model_path("smol-persona") / "zoo.json").read_text())
    assert behaviour.loc["smol-persona", "organism_rate"] == built["behaviour"]["style_rate"] == 1.0
    assert behaviour.loc["smol-persona", "base_rate"] == built["base_behaviour"]["style_rate"] == 0.0
    found = pd.read_csv(folder / "identification.csv").set_index("organism")
    result = load_results(folder, diffing.Identification)["smol-persona"]
    rank = diffing.evidence_rank(result.tokens, ORGANISMS["smol-persona"].evidence)
    assert found.loc["smol-persona", "fused"] == rank and rank <= 20 and found.loc["smol-persona", "top20"]
    assert (folder / "figures" / "organisms_identify.png").is_file()
    assert report.redraw(tmp_path / "r") and pd.read_csv(folder / "identification.csv").equals(found.reset_index())
    assert main(["report", "--tuned", "zoo:full", "--only", "organisms", "--quick", "--out",
                 str(tmp_path / "tiny")]) == 0
    assert json.loads((tmp_path / "tiny" / SUMMARY).read_text())["sections"] == []
