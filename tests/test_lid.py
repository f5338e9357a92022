"""LID analysis: point clouds (padding, sampling, de-duplication), estimates on them, tangent projection on
planted manifolds, the on-manifold steering edit, series, results, figures and the CLI."""

import math

import pytest
import torch

import interp
from analyses import lid
from analyses.lid.estimators import levina_bickel_local, twonn_global, twonn_local
from analyses.lid.steering import _scale_for_effect
from interp.errors import BadPrompts
from interp.prompts import PromptSet, tokenize

from conftest import VOCAB, random_model, save_model, word_tokenizer


def word_prompts(n: int, seed: int, shortest: int = 4, longest: int = 20) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=g)
    return [" ".join(f"w{i}" for i in torch.randint(2, VOCAB, (int(n),), generator=g)) for n in lengths]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("lid")
    return interp.load_pair(model_dirs["gpt2"], save_model(root / "tuned", "gpt2", seed=5))


# ------------------------------------------------------------------------------------------- point clouds

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_never_enters_the_cloud(model_dirs, prompts, arch):
    model = interp.load_model(model_dirs[arch])
    batched = lid.point_cloud(model, prompts, 1, n_tokens=None, deduplicate=False, progress=False)
    alone = [lid.point_cloud(model, [p], 1, n_tokens=None, deduplicate=False, progress=False) for p in prompts]
    assert len(batched) == sum(len(p) for p in prompts)
    torch.testing.assert_close(batched.points, torch.cat([c.points for c in alone]), atol=1e-5, rtol=1e-5)
    assert batched.prompt.tolist() == [i for i, p in enumerate(prompts) for _ in p]
    assert batched.position.tolist() == [j for p in prompts for j in range(len(p))]
    assert batched.points.norm(dim=-1).min() > 1e-2  # no zeroed pad row


def test_sampling_is_seeded_and_draws_distinct_prefixes_only(model_dirs):
    model = interp.load_model(model_dirs["gpt2"])
    texts = ["w5 w6 w7 w8", "w5 w6 w9", "w5 w6 w7 w8", "w10"]  # 4 + 1 + 0 + 1 distinct prefixes
    tokens = tokenize(model.tokenizer, texts)
    every = lid.sample_tokens(tokens, None, deduplicate=True)
    assert every.sum() == 6 and every[2].sum() == 0 and every[1].tolist() == [False, False, True, False]
    assert lid.sample_tokens(tokens, None, deduplicate=False).sum() == 12
    many = word_prompts(40, seed=1)
    tokens = tokenize(model.tokenizer, many)
    a, b = lid.sample_tokens(tokens, 50, seed=3), lid.sample_tokens(tokens, 50, seed=3)
    assert a.sum() == 50 and torch.equal(a, b) and not torch.equal(a, lid.sample_tokens(tokens, 50, seed=4))
    assert not (a & ~tokens.mask).any()
    once = lid.point_cloud(model, many, 0, n_tokens=None, progress=False)
    twice = lid.point_cloud(model, many + many, 0, n_tokens=None, progress=False)
    assert torch.equal(once.points, twice.points) and torch.equal(once.prompt, twice.prompt)
    assert len(torch.unique(once.points, dim=0)) == len(once)


def test_layer_sites_and_the_final_norm(model_dirs):
    model = interp.load_model(model_dirs["gpt2"])
    assert str(lid.layer_site(model)) == "resid_post.2" and str(lid.layer_site(model, -2)) == "resid_post.1"
    assert str(lid.layer_site(model, "final")) == "final" and str(lid.layer_site(model, 0)) == "resid_post.0"
    clouds = lid.point_clouds(model, word_prompts(6, seed=2), [-1, "final"], n_tokens=None, progress=False)
    last, final = clouds["resid_post.2"], clouds["final"]
    assert torch.equal(last.prompt, final.prompt)
    with torch.no_grad():
        expected = model.hf.transformer.ln_f(last.points)
    torch.testing.assert_close(final.points, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- measure

def test_measure_is_the_estimators_on_each_cloud_and_round_trips(pair, tmp_path):
    texts = word_prompts(30, seed=3)
    result = lid.measure(pair, texts, [0, "final"], k=20, n_tokens=250, label="words", progress=False)
    assert result.models == ["gpt2", "tuned"] and result.sites == ["resid_post.0", "final"]
    for name, model in zip(result.models, pair.models):
        cloud = lid.point_cloud(model, texts, "final", n_tokens=250, progress=False)
        assert len(cloud) == 250 and torch.equal(result.prompt[name, "final"], cloud.prompt)
        torch.testing.assert_close(result.lid[name, "final"], twonn_local(cloud.points, 20), rtol=1e-5, atol=0)
        assert result.global_id[name, "final"] == pytest.approx(twonn_global(cloud.points), rel=1e-5)
    mle = lid.measure(pair.base, texts, 0, k=20, n_tokens=250, estimator="mle", progress=False)
    cloud = lid.point_cloud(pair.base, texts, 0, n_tokens=250, progress=False)
    torch.testing.assert_close(mle.lid["gpt2", "resid_post.0"], levina_bickel_local(cloud.points, 20))
    frame = result.to_frame()
    row = frame[(frame.model == "tuned") & (frame.site == "final")].iloc[0]
    assert row["mean"] == pytest.approx(float(result.lid["tuned", "final"].mean()), rel=1e-6) and row.n == 250
    loaded = lid.LIDResult.load(result.save(tmp_path / "r"))
    assert loaded.models == result.models and loaded.label == "words" and loaded.prompts == texts
    assert torch.equal(loaded.lid["tuned", "final"], result.lid["tuned", "final"])
    assert loaded.global_id == result.global_id and loaded.settings["n_tokens"] == 250
    assert len(result.points_frame()) == 4 * 250


def test_a_small_memory_budget_gives_the_same_estimates(pair):
    cloud = lid.point_cloud(pair.tuned, word_prompts(30, seed=16), -1, n_tokens=300, progress=False)
    for estimator in lid.ESTIMATORS:
        whole = lid.estimate(cloud.points, 24, estimator)
        chunked = lid.estimate(cloud.points, 24, estimator, memory_budget=200_000)  # chunks of tens of rows
        torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=0)
        assert chunked[1] == pytest.approx(whole[1], rel=1e-6)


def test_float64_mode_agrees_and_too_small_clouds_are_refused(pair):
    texts = word_prompts(20, seed=4)
    single = lid.measure(pair.base, texts, 1, k=16, n_tokens=150, progress=False)
    double = lid.measure(pair.base, texts, 1, k=16, n_tokens=150, dtype=torch.float64, progress=False)
    assert double.lid["gpt2", "resid_post.1"].dtype == torch.float64
    torch.testing.assert_close(single.lid["gpt2", "resid_post.1"].double(), double.lid["gpt2", "resid_post.1"],
                               rtol=1e-3, atol=0)
    with pytest.raises(BadPrompts, match="not more than k=128"):
        lid.measure(pair.base, ["w5 w6 w7"], 0, progress=False)


# --------------------------------------------------------------------------------------- tangent spaces

def test_tangent_projection_keeps_the_in_plane_part_and_removes_the_normal_part():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 3, generator=g))[0].T  # a random 3-D plane in R^64
    reference = (2 * torch.rand(4000, 3, generator=g) - 1) @ basis + 3.0 + 1e-4 * torch.randn(4000, 64, generator=g)
    points = (torch.rand(50, 3, generator=g) - 0.5) @ basis + 3.0  # new points on the plane, inside the cloud
    in_plane = torch.randn(3, generator=g) @ basis
    normal = torch.randn(64, generator=g)
    normal = 3 * (normal - basis.T @ (basis @ normal))
    ref = lid.prepare_reference(reference, 64)
    projected = lid.tangent_projection(ref, points, in_plane + normal)
    _, dims = lid.tangent_basis(ref, points)
    assert (dims == 3).float().mean() >= 0.9
    error = (projected - in_plane).norm(dim=-1) / in_plane.norm()
    assert error.median() < 5e-3 and error.max() < 0.05
    assert (projected @ normal).abs().max() / normal.norm() ** 2 < 1e-3
    forced = lid.tangent_projection(ref, points, in_plane, dimension=1)  # one direction of three
    assert (forced.norm(dim=-1) < 0.99 * in_plane.norm()).all()


def test_tangent_projection_on_a_sphere_follows_the_curvature():
    g = torch.Generator().manual_seed(2)
    sphere = torch.nn.functional.normalize(torch.randn(4000, 3, generator=g, dtype=torch.float64), dim=-1)
    lift = torch.linalg.qr(torch.randn(32, 3, generator=g, dtype=torch.float64))[0].T  # R^3 -> R^32 isometry
    at = torch.nn.functional.normalize(torch.randn(20, 3, generator=g, dtype=torch.float64), dim=-1)
    radial = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    projected = lid.tangent_projection(sphere @ lift, at @ lift, radial @ lift, 48, dimension=2)
    expected = radial - (at @ radial)[:, None] * at  # the tangent part at each point
    torch.testing.assert_close(projected @ lift.T, expected, atol=0.03, rtol=0)
    _, dims = lid.tangent_basis(sphere @ lift, at @ lift, 48)
    assert (dims == 2).float().mean() >= 0.9


@pytest.mark.parametrize("backend", ["bridge", "nnsight"])
def test_tangent_add_adds_the_projection_at_real_steered_positions(pair, backend):
    model = pair.base
    texts, others = word_prompts(6, seed=5), word_prompts(40, seed=6)
    reference = lid.prepare_reference(lid.point_cloud(model, others, 0, progress=False), 24)
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    before = interp.capture(model, texts, ["resid_post.0"], backend=backend, progress=False)
    x = before["resid_post.0"]
    with lid.steer(model, 0, v, reference, scale=2.0) as steered:
        after = interp.capture(steered, texts, ["resid_post.0"], backend=backend, progress=False)
    mask = before.mask
    expected = x[mask] + 2.0 * lid.tangent_projection(reference, x[mask], v)
    torch.testing.assert_close(after["resid_post.0"][mask], expected, atol=1e-5, rtol=1e-5)
    assert model.edits == []
    with model.edit(lid.tangent_add("resid_post.0", v, reference, 2.0, positions="last")):
        last = interp.capture(model, texts, ["resid_post.0"], backend=backend, progress=False)["resid_post.0"]
    moved = (last - x).norm(dim=-1) > 1e-6
    assert moved.sum(1).tolist() == [1] * len(texts) and moved[torch.arange(len(texts)), mask.sum(1) - 1].all()


@pytest.fixture(scope="module")
def flat_model(tmp_path_factory):
    """A GPT-2 whose layer-0 output is its embedding, which lies on a plane (2-dimensional subspace)."""
    model = random_model("gpt2", seed=7)
    g = torch.Generator().manual_seed(8)
    plane = torch.linalg.qr(torch.randn(64, 2, generator=g))[0].T
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.randn(VOCAB, 2, generator=g) @ plane)
        model.transformer.wpe.weight.copy_(torch.randn(model.config.n_positions, 2, generator=g) @ plane)
        block = model.transformer.h[0]
        for layer in (block.attn.c_proj, block.mlp.c_proj):
            layer.weight.zero_()
            layer.bias.zero_()
    path = tmp_path_factory.mktemp("flat") / "model"
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return interp.load_model(path), plane


def test_tangent_steering_stays_on_a_planted_manifold_at_equal_effect(flat_model):
    model, plane = flat_model
    cloud = lid.point_cloud(model, word_prompts(120, seed=9), 0, progress=False)
    assert (cloud.points - cloud.points @ plane.T @ plane).norm(dim=-1).max() < 1e-4  # the planted plane
    g = torch.Generator().manual_seed(10)
    normal = torch.randn(64, generator=g)
    v = torch.randn(2, generator=g) @ plane + 2 * (normal - plane.T @ (plane @ normal))
    result = lid.compare_steering(model, 0, v, word_prompts(24, seed=11), word_prompts(120, seed=9),
                                  effects=[0.1], k=32)
    frame = result.to_frame().set_index(["method", "site"])
    assert len(frame) == 3 * 2 and set(frame.index.get_level_values("site")) == {"resid_post.0", "resid_post.2"}
    for method in ("raw", "tangent"):
        assert frame.loc[(method, "resid_post.0"), "effect"] == pytest.approx(0.1, rel=0.02)
    for site in ("resid_post.0", "resid_post.2"):  # the steered layer, and the last one downstream
        unsteered, raw, tangent = (frame.loc[(m, site)] for m in ("none", "raw", "tangent"))
        print(f"\nplanted plane, KL 0.1, {site}: nearest-reference distance unsteered {unsteered.nn_distance:.3f}, "
              f"raw {raw.nn_distance:.3f} (scale {raw.scale:.3g}), tangent {tangent.nn_distance:.3f} "
              f"(scale {tangent.scale:.3g})", end="")
        assert tangent.nn_distance < 0.5 * raw.nn_distance
    assert frame.loc[("tangent", "resid_post.0"), "lid"] == pytest.approx(2.0, rel=0.15)


# ---------------------------------------------------------------------------------------- checkpoint series

@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    for i, step in enumerate((0, 10, 20)):
        save_model(root / f"step-{step:04d}", "gpt2", seed=20 + i)
    return root


def test_series_reports_lid_and_task_scores_per_checkpoint(pair, series_dir):
    texts = word_prompts(20, seed=12)
    answers = ["w3 w4"] * len(texts)
    series = lid.measure_series(None, interp.load_series(series_dir), texts, [0, -1],
                                task=PromptSet(texts, answers, "task"), k=16, n_tokens=200)
    assert series.steps == [0, 10, 20] and series.sites == ["resid_post.0", "resid_post.2"]
    first = interp.load_model(series_dir / "step-0000")
    alone = lid.measure(first, texts, -1, k=16, n_tokens=200, progress=False)
    assert float(series.mean[0, 1]) == pytest.approx(alone.mean("step-0000", "resid_post.2"), rel=1e-9)
    scores = interp.answer_scores(first, texts, answers)
    assert float(series.accuracy[0]) == pytest.approx(float(scores.accuracy.mean()))
    assert float(series.loss[0]) == pytest.approx(float(scores.loss.mean()))
    assert len(set(series.mean[:, 1].tolist())) == 3 and (series.q25 <= series.median).all()
    frame = series.to_frame()
    assert len(frame) == 6 and frame.accuracy.between(0, 1).all()


# --------------------------------------------------------------------------------- figures, CLI, redraw

def test_figures_redraw_byte_identically_from_saved_results(pair, tmp_path):
    texts = word_prompts(25, seed=13)
    results = [lid.measure(pair, texts, [0, 1], k=16, n_tokens=150, label=label, progress=False)
               for label in ("a", "b")]
    series = lid.SeriesResult([0, 5], ["resid_post.1"], *(torch.tensor([[4.0], [3.0]]) + d for d in (0, 0, -1, 1)),
                              accuracy=torch.tensor([0.1, 0.9]), loss=torch.tensor([2.0, 0.5]))
    steering = lid.SteeringResult("resid_post.0", "kl", [
        {"method": m, "target_effect": e, "scale": 1.0, "effect": e, "added_norm": 1.0, "site": "resid_post.0",
         "nn_distance": d, "lid": 5.0 + d} for m, e, d in (("none", 0, 1.0), ("raw", 0.1, 3.0), ("tangent", 0.1, 2.0))])
    first = lid.save_figures(results, series, steering, tmp_path / "a")
    loaded = ([lid.LIDResult.load(r.save(tmp_path / "r" / r.label)) for r in results],
              lid.SeriesResult.load(series.save(tmp_path / "s")),
              lid.SteeringResult.load(steering.save(tmp_path / "t")))
    second = lid.save_figures(*loaded, tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second] and len(first) == 8
    for p, q in zip(first, second):
        assert p.read_bytes() == q.read_bytes()


def test_cli_writes_tables_results_and_figures_that_redraw_identically(pair, model_dirs, series_dir, tmp_path):
    import pandas as pd

    from interp.app.cli import main
    from interp.app.context import load_results
    from interp.app.lenses import lid as lid_lens

    (tmp_path / "task.txt").write_text("\n".join(word_prompts(30, seed=14)) + "\n")
    (tmp_path / "web.txt").write_text("\n".join(word_prompts(20, seed=15)) + "\n")
    out = tmp_path / "out"
    assert main(["lid", "--base", model_dirs["gpt2"], "--tuned", pair.tuned.name, "--prompts",
                 str(tmp_path / "task.txt"), "--prompts-b", str(tmp_path / "web.txt"), "--layers", "0", "-1",
                 "--k", "16", "--n-tokens", "200", "--series", str(series_dir), "--effects", "0.05",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out / "lid.csv")
    assert sorted(table.label.unique()) == ["task", "web"] and len(table) == 2 * 2 * 2
    saved = lid.LIDResult.load(out / "results" / "lid" / "task")
    assert table[table.label == "task"]["mean"].iloc[0] == pytest.approx(saved.mean("base", "resid_post.0"))
    points = pd.read_csv(out / "lid_points.csv")
    assert len(points.query("label == 'task'")) == sum(len(v) for v in saved.lid.values())
    series = pd.read_csv(out / "lid_series.csv")
    assert series.step.unique().tolist() == [0, 10, 20]
    assert series.site.unique().tolist() == ["resid_post.0", "resid_post.2"]
    steering = pd.read_csv(out / "lid_steering.csv")
    assert set(steering.method) == {"none", "raw", "tangent"}
    assert steering[steering.method != "none"].effect.sub(0.05).abs().max() <= 0.05 * 0.02 + 1e-12
    figures = sorted((out / "figures").iterdir())
    assert {p.suffix for p in figures} == {".pdf", ".png"} and len(figures) == 8
    before = {p.name: p.read_bytes() for p in figures}
    assert {p.name: p.read_bytes() for p in lid_lens.redraw(out)} == before
    saved_all = load_results(out, lid.LIDResult, lid.SeriesResult, lid.SteeringResult)
    assert list(saved_all) == ["lid/task", "lid/web", "series", "steering"]
    assert [r.label for k, r in saved_all.items() if k.startswith("lid/")] == ["task", "web"]


def test_cli_refuses_a_prompt_set_too_small_for_k(model_dirs, tmp_path, capsys):
    from interp.app.cli import main

    (tmp_path / "tiny.txt").write_text("w5 w6 w7\n")
    code = main(["lid", "--base", model_dirs["gpt2"], "--tuned", model_dirs["gpt2"], "--prompts",
                 str(tmp_path / "tiny.txt"), "--k", "128", "--no-steer", "--out", str(tmp_path / "out")])
    assert code == 2 and "not more than k=128" in capsys.readouterr().err


def test_summary_ignores_undefined_estimates():
    stats = lid.summary(torch.tensor([1.0, 2.0, 3.0, math.nan, math.inf]))
    assert stats["n"] == 3 and stats["mean"] == 2.0 and stats["median"] == 2.0


@pytest.mark.parametrize(("effect", "wanted", "expected"), [
    (lambda s: 0.3 * s * s, 0.1, math.sqrt(0.1 / 0.3)),  # KL-like
    (lambda s: 0.002 * s, 0.5, 250.0),  # linear, far from scale 1
    (lambda s: math.tanh(s) ** 2, 0.81, math.atanh(0.9)),  # saturating but reachable
    (lambda s: 1 - math.exp(-s), 1.5, math.nan),  # never reaches it
])
def test_scale_for_effect_finds_the_scale_or_says_it_cannot(effect, wanted, expected):
    calls = []
    scale, reached = _scale_for_effect(lambda s: calls.append(s) or effect(s), wanted, tolerance=0.01)
    if math.isnan(expected):
        assert math.isnan(scale)
        return
    assert reached == pytest.approx(wanted, rel=0.01) and scale == pytest.approx(expected, rel=0.05)
    assert len(calls) <= 12
