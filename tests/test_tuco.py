"""TuCo: the decomposition's identities, a planted change, steering at alpha 0 and 1, backend agreement."""

import pytest
import torch

import interp
from analyses import tuco
from interp.prompts import tokenize

from conftest import random_model, save_model, word_tokenizer

TEXTS = ["w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14 w15 w16 w17 w18", "w3"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, model_dirs):
    """Tuned = base with only layer 1's MLP input weights changed."""
    root = tmp_path_factory.mktemp("tuco")
    tuned = random_model("gpt2")
    with torch.no_grad():
        tuned.transformer.h[1].mlp.c_fc.weight.add_(0.2 * torch.randn_like(tuned.transformer.h[1].mlp.c_fc.weight))
    tuned.save_pretrained(root / "tuned")
    word_tokenizer().save_pretrained(root / "tuned")
    return interp.load_pair(model_dirs["gpt2"], root / "tuned")


@pytest.fixture(scope="module")
def unrelated(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("tuco-llama")
    return interp.load_pair(model_dirs["llama"], save_model(root / "tuned", "llama", seed=4))


def test_components_sum_to_the_tuned_forward_and_match_one_block_at_a_time(unrelated):
    pair = unrelated
    tokens = tokenize(pair.tuned.tokenizer, TEXTS)
    c = tuco.components(pair.base, pair.tuned, tokens)
    final = interp.capture(pair.tuned, tokens, [f"resid_post.{pair.tuned.n_layers - 1}"])
    mask = tokens.mask[..., None]
    rebuilt = c["x"][:, 0] + c["ptc"].sum(1) + c["ftc"].sum(1)
    assert ((rebuilt - final[f"resid_post.{pair.tuned.n_layers - 1}"]) * mask).abs().max() <= 1e-5
    for layer in range(pair.tuned.n_layers):  # the one-pass trick equals running each base block alone
        alone = interp.capture(pair.base, tokens, [f"resid_post.{layer}"],
                               edits=[interp.replace(f"resid_pre.{layer}", c["x"][:, layer])], progress=False)
        expected = alone[f"resid_post.{layer}"] - c["x"][:, layer]
        assert ((c["ptc"][:, layer] - expected) * mask).abs().max() <= 1e-5


def test_tuco_is_a_fraction_and_zero_for_an_unchanged_model(unrelated, model_dirs):
    result = tuco.measure(unrelated, TEXTS, progress=False)
    values = result.tuco_tokens()[result.mask]
    assert values.min() >= 0 and values.max() <= 1 and values.mean() > 0.1
    same = interp.load_pair(model_dirs["llama"], model_dirs["llama"])
    assert tuco.measure(same, TEXTS, progress=False).tuco_tokens().abs().max() == 0


def test_a_planted_change_shows_only_in_its_layer(planted):
    result = tuco.measure(planted, TEXTS, sublayers=True, progress=False)
    ftc = result.ftc_norm[:, :, 0]  # first token
    assert ftc[:, 1].min() > 1e-2
    assert ftc[:, [0, 2]].abs().max() <= 1e-5  # layer 0 sees an unchanged input; layer 2 the tuned one
    assert result.sublayer["ftc_attn"].abs().max() <= 1e-5  # only the MLP changed
    assert result.sublayer["ftc_mlp"][:, 1][result.mask].min() > 1e-3
    assert (result.embed_shift == 0).all()


@pytest.mark.parametrize("backend", ("bridge", "nnsight"))
def test_steering_at_alpha_0_and_1_is_base_and_tuned(unrelated, backend):
    pair = unrelated
    def logits(model):
        return interp.capture(model, TEXTS, [], logits=True, backend=backend, progress=False)["logits"]
    base_logits, tuned_logits = logits(pair.base), logits(pair.tuned)
    assert (base_logits - tuned_logits).abs().max() > 0.1
    with tuco.steer(pair, 0.0) as steered:
        assert (logits(steered) - base_logits).abs().max() <= 1e-4
        gen0 = interp.generate(steered, TEXTS, 20, backend=backend)
    with tuco.steer(pair, 1.0) as steered:
        assert (logits(steered) - tuned_logits).abs().max() <= 1e-4
        gen1 = interp.generate(steered, TEXTS, 20, backend=backend)
    assert [g.tolist() for g in gen0] == [g.tolist() for g in interp.generate(pair.base, TEXTS, 20)]
    assert [g.tolist() for g in gen1] == [g.tolist() for g in interp.generate(pair.tuned, TEXTS, 20)]
    assert pair.tuned.edits == []


def test_steering_per_layer_and_amplification(unrelated):
    pair = unrelated
    x = interp.capture(pair.tuned, TEXTS, ["resid_post.0"], progress=False)["resid_post.0"]
    with tuco.steer(pair, [2.0, 1.0, 1.0]) as steered:  # only layer 0's fine-tuning component doubled
        doubled = interp.capture(steered, TEXTS, ["resid_pre.0", "resid_post.0"], progress=False)
    c = tuco.components(pair.base, pair.tuned, tokenize(pair.tuned.tokenizer, TEXTS))
    expected = c["x"][:, 0] + c["ptc"][:, 0] + 2.0 * c["ftc"][:, 0]
    assert (doubled["resid_post.0"] - expected).abs().max() <= 1e-5
    assert (doubled["resid_post.0"] - x).abs().max() > 1e-2


def test_backends_give_the_same_tuco(unrelated):
    a = tuco.measure(unrelated, TEXTS, backend="bridge", progress=False)
    b = tuco.measure(unrelated, TEXTS, backend="nnsight", progress=False)
    assert (a.tuco_tokens() - b.tuco_tokens()).abs().max() <= 1e-5
    assert (a.ftc_norm - b.ftc_norm).abs().max() <= 1e-5


def test_result_round_trips_and_figures_redraw_identically(unrelated, tmp_path):
    result = tuco.measure(unrelated, TEXTS, label="task", progress=False)
    loaded = tuco.TuCoResult.load(result.save(tmp_path / "r"))
    assert torch.equal(loaded.tuco(), result.tuco()) and loaded.prompts == TEXTS and loaded.label == "task"
    sweep = tuco.AlphaSweep("tuned", [0.0, 1.0], "m", [0.1, 0.9], settings={"prompts": 3})
    swept = tuco.AlphaSweep.load(sweep.save(tmp_path / "s"))
    assert swept == sweep and swept.settings == {"prompts": 3}
    first = tuco.save_figures([result, loaded], sweep, tmp_path / "a")
    second = tuco.save_figures([loaded, loaded], swept, tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    for p, q in zip(first, second):
        assert p.read_bytes() == q.read_bytes()


def test_a_result_saved_without_a_field_of_this_version_is_refused_with_its_name(tmp_path):
    import json

    from interp.errors import ResultNotFound

    folder = tuco.AlphaSweep("tuned", [0.0, 1.0], "m", [0.1, 0.9]).save(tmp_path / "s")
    meta = next(p for p in folder.iterdir() if p.suffix == ".json")
    saved = json.loads(meta.read_text())
    del saved["fields"]["metric"]
    meta.write_text(json.dumps(saved))
    with pytest.raises(ResultNotFound, match="without metric; run the analysis again"):
        tuco.AlphaSweep.load(folder)


def test_cli_writes_results_tables_and_figures_that_redraw_identically(unrelated, model_dirs, tmp_path):
    import pandas as pd

    from interp.app.cli import main
    from interp.app.lenses import tuco as tuco_lens
    from interp.models import model_label

    (tmp_path / "task.txt").write_text("\n".join(TEXTS[:3]) + "\n")
    (tmp_path / "web.txt").write_text("w20 w21 w22\nw30 w31\n")
    tuned_dir = unrelated.tuned.name
    out = tmp_path / "out"
    assert main(["tuco", "--base", model_dirs["llama"], "--tuned", tuned_dir, "--prompts", str(tmp_path / "task.txt"),
                 "--prompts-b", str(tmp_path / "web.txt"), "--alphas", "0", "1", "--out", str(out)]) == 0
    table = pd.read_csv(out / "tuco.csv")
    assert sorted(table.label.unique()) == ["task", "web"] and len(table) == 5
    assert table.tuco.between(0, 1).all()
    sweep = tuco.AlphaSweep.load(out / "results" / model_label(tuned_dir) / "alpha_sweep")
    own = interp.capture(unrelated.tuned, TEXTS[:3], [], positions="last", logits=True)["logits"].softmax(-1)
    assert sweep.alpha == [0.0, 1.0] and abs(sweep.value[1] - float(own.max(-1).values.mean())) < 1e-5
    figures = sorted((out / "figures").iterdir())
    assert {p.suffix for p in figures} == {".pdf", ".png"} and len(figures) == 10  # 3 of the model, 2 across models
    before = {p.name: p.read_bytes() for p in figures}
    redrawn = tuco_lens.redraw(out)
    assert {p.name: p.read_bytes() for p in redrawn} == before
