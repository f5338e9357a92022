"""Concept shifts: dictionaries on planted clusters, a constructed shift recovered and steered back, I/O, CLI."""

import json

import pytest
import torch

import interp
from analyses import shift

from conftest import save_model

LAYER = 1
# two groups that cluster apart: disjoint token ranges, a shared last token within each group
GROUP_A = [" ".join(f"w{t}" for t in (2 + i, 10 + i, 20 + i, 30 + i, 3)) for i in range(12)]
GROUP_B = [" ".join(f"w{t}" for t in (50 + i, 65 + i, 80 + i, 90)) for i in range(12)]
PROMPTS = GROUP_A + GROUP_B


def clusters(seed: int = 0, n: int = 30, k: int = 3, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(k, d, generator=g)
    labels = torch.arange(k).repeat_interleave(n)
    return centres[labels] + 0.3 * torch.randn(k * n, d, generator=g), labels, centres


def same_partition(a, b) -> bool:
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def test_dictionaries_find_planted_clusters_and_kmeans_is_stable_across_seeds():
    x, labels, centres = clusters()
    for method in shift.METHODS:
        if method == "pca":
            continue
        concepts = shift.learn_concepts(x, 3, method, seed=0)
        assert same_partition(concepts.assign, labels), method
    semi = shift.learn_concepts(x, 3, "semi-nmf")
    assert semi.activations.min() >= 0
    assert (semi.activations @ semi.vectors - x).norm() / x.norm() < 0.1
    pca = shift.learn_concepts(x, 2, "pca")
    assert torch.allclose(pca.vectors @ pca.vectors.T, torch.eye(2), atol=1e-5)
    top = torch.linalg.svd(x.double() - x.double().mean(0)).Vh[:2].float()
    assert (pca.vectors * top).sum(-1).abs().min() > 0.999
    a, b = (shift.learn_concepts(x, 3, "kmeans", seed=s).vectors for s in (0, 1))
    match, cos = shift.match_concepts(a, b)
    assert sorted(match.tolist()) == [0, 1, 2] and cos.mean() >= 0.99
    assert shift.match_concepts(a, centres)[1].min() > 0.99
    assert shift.stability(x, 3, seeds=(0, 1, 2)) >= 0.999  # the planted K: every seed finds the centres
    noise = torch.randn(90, 16, generator=torch.Generator().manual_seed(1))  # no clusters: any split is arbitrary
    assert shift.stability(noise, 3) < 0.9
    with pytest.raises(ValueError, match="at least two"):
        shift.stability(x, 3, seeds=(0,))
    with pytest.raises(ValueError, match="semi-nmf"):
        shift.learn_concepts(x, 3, "ica")
    with pytest.raises(ValueError, match="k=500"):
        shift.learn_concepts(x, 500)
    with pytest.raises(ValueError, match="k <= 16"):
        shift.learn_concepts(x, 20, "pca")


@pytest.fixture(scope="module")
def constructed(model_dirs):
    """Tuned = base with v added to resid_post.LAYER at every position of group A's prompts."""
    base = interp.load_model(model_dirs["gpt2"])
    tuned = interp.load_model(model_dirs["gpt2"])
    v = torch.randn(base.d_model, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(len(PROMPTS), 8, dtype=torch.bool)
    mask[: len(GROUP_A)] = True
    with tuned.edit(interp.add(f"resid_post.{LAYER}", v, positions=mask)):
        yield interp.load_pair(base, tuned), v, mask


def test_a_constructed_shift_is_recovered_for_its_group_only(constructed):
    pair, v, _ = constructed
    result = shift.measure(pair, PROMPTS, k=2, progress=False)
    i = result.layer_index(LAYER)
    group_a = result.assign[i, : len(GROUP_A)]
    assert (group_a == group_a[0]).all() and (result.assign[i, len(GROUP_A):] != group_a[0]).all()
    concept_a, concept_b = int(group_a[0]), 1 - int(group_a[0])
    shift_a, shift_b = result.shift(LAYER, concept_a), result.shift(LAYER, concept_b)
    assert torch.nn.functional.cosine_similarity(shift_a, v, dim=0) >= 0.99
    assert shift_b.norm() <= 1e-4 * v.norm()
    assert result.shifts[result.layer_index(0)].norm() <= 1e-5  # before the edit nothing moves
    assert result.rel_error[i, concept_a, 2] <= 1e-5  # h_base + Delta_k is h_tuned exactly
    assert result.rel_error[i, concept_a, 2] < result.rel_error[i, concept_a, 1] < result.rel_error[i, concept_a, 0]
    assert torch.allclose(result.global_shift[i], v / 2, atol=1e-4)
    frame = result.to_frame()
    assert len(frame) == 3 * 2 and frame.top_prompt.str.contains(r"\[w(?:3|90)\]").all()


def test_the_mean_difference_moves_one_group_onto_the_other(constructed):
    pair, _, _ = constructed
    site = f"resid_post.{LAYER}"
    towards_a = shift.mean_difference(pair.base, GROUP_A, GROUP_B, site)
    mean_a = interp.capture(pair.base, GROUP_A, [site], positions="last", progress=False)[site].mean(0)
    with shift.steer(pair.base, towards_a, LAYER, positions="last") as steered:
        moved = interp.capture(steered, GROUP_B, [site], positions="last", progress=False)[site].mean(0)
    assert towards_a.norm() > 1 and torch.allclose(moved, mean_a, atol=1e-5)


def test_steering_the_base_with_the_shift_reaches_the_tuned_model_and_back(constructed):
    pair, v, mask = constructed
    result = shift.measure(pair, PROMPTS, layers=[LAYER], k=2, progress=False)
    vector = result.shift(LAYER, int(result.assign[0, 0]))
    held_out = (GROUP_B[:4], ["w91 w92"] * 4)
    sweep = shift.strength_sweep(pair.base, pair.tuned, GROUP_A, vector, LAYER, [0.0, 0.5, 1.0],
                                 held_out=held_out)
    assert sweep.kl[0] == pytest.approx(sweep.kl_unsteered) and sweep.kl[0] > 1e-3
    assert sweep.kl[2] <= 1e-8 and sweep.closure[2] == pytest.approx(1.0) and sweep.kl[1] < sweep.kl[0]
    assert len(sweep.accuracy) == 3 and pair.base.edits == []
    with shift.steer(pair.base, vector, LAYER, positions=mask) as steered:  # generation, same positions as tuned
        assert ([g.tolist() for g in interp.generate(steered, PROMPTS, 4)]
                == [g.tolist() for g in interp.generate(pair.tuned, PROMPTS, 4)])
    with shift.steer(pair.tuned, vector, LAYER, strength=-1.0, positions=mask) as steered:  # the tuned back to base
        assert shift.next_token_kl(steered, pair.base, PROMPTS).max() <= 1e-8


def test_steering_positions_name_the_last_prompt_token_and_what_follows():
    assert shift.prompt_positions("all", [3, 1], 5) is None
    assert shift.prompt_positions("last", [3, 1], 5).int().tolist() == [[0, 0, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert shift.prompt_positions("from-last", [3, 1], 5).int().tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="from-last"):
        shift.prompt_positions("first", [3], 5)


def test_concept_wise_steering_reproduces_a_group_specific_shift_that_no_single_vector_can(model_dirs):
    """Tuned = base + v at the last token of group A's prompts only: the concept shifts (v for A's concept,
    0 for B's) steer the base onto the tuned model at that layer; the global shift v/2 cannot."""
    base, tuned = interp.load_model(model_dirs["gpt2"]), interp.load_model(model_dirs["gpt2"])
    v = 3 * torch.randn(base.d_model, generator=torch.Generator().manual_seed(4))
    lengths = interp.tokenize(base.tokenizer, PROMPTS).lengths
    last_a = shift.prompt_positions("last", lengths, 8) & (torch.arange(len(PROMPTS)) < len(GROUP_A))[:, None]
    with tuned.edit(interp.add(f"resid_post.{LAYER}", v, positions=last_a)):
        pair = interp.load_pair(base, tuned)
        curve = shift.steering_curve(pair, PROMPTS, PROMPTS, mode="concept", positions="last",
                                     layers=[0, LAYER, "final"], k=2, strengths=[0.0, 1.0])
        result = shift.measure(pair, PROMPTS, layers=[LAYER], k=2, progress=False)
        vector, centroids = shift.steering_vectors(result, LAYER, "global")
        one = shift.strength_sweep(base, tuned, PROMPTS, vector, LAYER, [1.0], positions="last")
    assert centroids is None and torch.allclose(vector, v / 2, atol=1e-4)
    assert curve.layer == LAYER and curve.layer_kl[str(LAYER)] <= 1e-8 < curve.layer_kl["0"]
    assert curve.kl[1] <= 1e-8 and curve.closure[1] == pytest.approx(1.0) and curve.mode == "concept"
    assert one.kl[0] > 1e-3 and base.edits == []
    with pytest.raises(ValueError, match="kmeans"):
        shift.steering_vectors(shift.measure(pair, PROMPTS, layers=[LAYER], k=2, method="pca", progress=False),
                               LAYER, "concept")


@pytest.mark.parametrize("method", ("pca", "semi-nmf"))
def test_other_dictionaries_and_fitting_on_the_tuned_model(constructed, method):
    pair, v, _ = constructed
    result = shift.measure(pair, PROMPTS, layers=[LAYER], method=method, k=2, fit_on="tuned", progress=False)
    assert result.counts.sum() == len(PROMPTS) and result.match.sort().values.tolist() == [[0, 1]]
    assert torch.allclose(result.global_shift[0], v / 2, atol=1e-4)
    # the per-concept means always reproduce the global mean
    assert torch.allclose((result.counts[0, :, None] * result.shifts[0]).sum(0) / len(PROMPTS), v / 2, atol=1e-4)


def test_final_norm_site_and_mask_positions(constructed):
    pair, _, _ = constructed
    result = shift.measure(pair, PROMPTS, site="final", k=2, progress=False)
    assert result.layers == [pair.base.n_layers - 1] and result.concepts.shape == (1, 2, pair.base.d_model)
    every = torch.ones(len(PROMPTS), 8, dtype=torch.bool)
    result = shift.measure(pair, PROMPTS, layers=[0], positions=every, k=3, progress=False)
    assert result.assign.shape[1] == 12 * 5 + 12 * 4
    assert result.highlighted(0) == "[w2] w10 w20 w30 w3"


def test_result_round_trips_and_figures_redraw_identically(constructed, tmp_path):
    pair, v, _ = constructed
    result = shift.measure(pair, PROMPTS, k=3, progress=False)
    loaded = shift.ShiftResult.load(result.save(tmp_path / "r"))
    assert torch.equal(loaded.shifts, result.shifts) and loaded.tokens == result.tokens
    assert loaded.to_frame().equals(result.to_frame())
    assert loaded.settings == result.settings and loaded.settings["k"] == 3
    sweep = shift.StrengthSweep("g", "b", "t", 1, None, [0.0, 1.0], [1.0, 0.2], 1.0, [0.0, 0.8], [0.9, 0.8])
    loaded_sweep = shift.StrengthSweep.load(sweep.save(tmp_path / "s"))
    assert loaded_sweep == sweep
    first = shift.save_figures(result, sweep, tmp_path / "a")
    second = shift.save_figures(loaded, loaded_sweep, tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second] and len(first) == 8
    for p, q in zip(first, second):
        assert p.read_bytes() == q.read_bytes()


def test_cli_writes_results_tables_and_figures_that_redraw_identically(model_dirs, tmp_path):
    import pandas as pd

    from interp.app.cli import main
    from interp.app.lenses import shift as shift_lens

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    tuned = str(save_model(tmp_path / "tuned", "gpt2", seed=4))
    assert main(["shift", "--base", model_dirs["gpt2"], "--tuned", tuned,
                 "--prompts", str(tmp_path / "p.txt"), "--layers", "1", "2", "--k", "3", "--strengths", "0", "1",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out / "shift.csv")
    assert len(table) == 2 * 3 and table.n.groupby(table.layer).sum().eq(len(PROMPTS)).all()
    sweep = shift.SteeringCurve.load(out / "results" / "tuned" / "steering")
    assert sweep.strength == [0.0, 1.0] and sweep.accuracy is None and sweep.layer in (1, 2, "final")
    assert sweep.mode == "concept" and set(sweep.layer_kl) == {"1", "2", "final"}
    assert json.loads((out / "section.json").read_text())["error"] is None
    before = {p.name: p.read_bytes() for p in (out / "figures").iterdir()}
    assert len(before) == 12  # 4 figures of the model, 2 across models; PDF and PNG each
    assert {p.name: p.read_bytes() for p in shift_lens.redraw(out)} == before
    assert main(["shift", "--base", model_dirs["gpt2"], "--tuned", model_dirs["gpt2"], "--prompts",
                 str(tmp_path / "p.txt"), "--layers", "7", "--out", str(out)]) == 2


def test_k_by_stability_finds_the_two_planted_groups_and_the_cli_takes_k_auto(model_dirs, tmp_path):
    """The two prompt groups end in two shared tokens: at K = 2 every seed finds the same concepts (stability 1),
    more concepts split a group in seed-dependent ways. `--k auto` writes the table and uses its K."""
    import pandas as pd

    from interp.app.cli import main

    base = interp.load_model(model_dirs["gpt2"])
    stability = shift.choose_k(base, PROMPTS, (2, 4, 6, 8), progress=False)
    k, table = stability.k, stability.table()
    assert shift.KStability.load(stability.save(tmp_path / "k")).table() == table
    assert k == 2 and min(table[2].values()) >= 0.999 and min(table[8].values()) < 0.99
    with pytest.raises(ValueError, match="exceeds the 4 inputs"):
        shift.choose_k(base, PROMPTS[:4], (8,), progress=False)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    tuned = str(save_model(tmp_path / "tuned", "gpt2", seed=4))
    argv = ["shift", "--base", model_dirs["gpt2"], "--tuned", tuned, "--prompts", str(tmp_path / "p.txt"),
            "--layers", "1", "--strengths", "0", "1", "--steer-layer", "1", "--out", str(out)]
    assert main([*argv, "--k", "auto"]) == 0
    stability = pd.read_csv(out / "k_stability.csv")
    assert list(stability.columns) == ["k", "resid_post.1"] and stability.k.tolist() == [8, 12, 16, 20, 24]
    chosen = int(stability.k[stability["resid_post.1"].idxmax()])
    assert pd.read_csv(out / "shift.csv").concept.nunique() == chosen
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and one error line
        main([*argv, "--k", "0"])
    assert exit_info.value.code == 2
