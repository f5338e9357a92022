"""The weight-space lens on tiny random models: the identities of LiNeS, reset, merge and the anatomy of a PEFT folder;
the known answer of an update planted in two layers; statistics against their definitions; the sweeps; results; the
lens (CLI) and its redraw.

Pairs: `tuned` is the random base with random noise added to every parameter (so no identity holds by accident);
`planted` is the base with a large update in blocks 0 and 2 only (every parameter of those blocks), plus, in `noisy`,
a tiny one (1e-3 of it) everywhere else.
"""

import json
import math

import pytest
import torch
from conftest import random_model, word_tokenizer
from peft import LoraConfig, get_peft_model

import interp
from analyses import weights
from interp.app.cli import main
from interp.app.lenses import weights as lens
from interp.capture import capture
from interp.errors import BadModelArgument, BadOption
from interp.prompts import PromptSet

pytestmark = pytest.mark.usefixtures("single_thread")
TEXTS = ["w5 w6 w7 w8 w9", "w10 w11 w40", "w12 w13 w14 w15 w16 w17 w18", "w3 w70", "w33 w34 w35 w36"]
PLANTED = (0, 2)
N_LAYERS = 4


def save(model, path):
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def perturbed(arch: str, scale: float, layers=None, seed: int = 3, **overrides):
    """The random base of `arch` with `scale` x N(0, 1) added to every parameter (of blocks `layers` only, if given)."""
    model = random_model(arch, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            layer = weights.parts.layer_index(name)
            if layers is None or (layer is not None and layer in layers):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def logits(model, texts=TEXTS):
    return capture(model, texts, [], logits=True, progress=False)["logits"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"weights-{request.param}")
    base = save(random_model(request.param), root / "base")
    tuned = save(perturbed(request.param, 0.03), root / "tuned")
    return interp.load_pair(base, tuned)


def params(model):
    return {n: p.detach().clone() for n, p in model.hf.named_parameters()}


def test_lines_at_1_0_is_the_tuned_model_and_at_0_0_the_base_and_weights_come_back_exactly(pair):
    tuned_logits, base_logits, before = logits(pair.tuned), logits(pair.base), params(pair.tuned)
    with weights.lines(pair, 1.0, 0.0) as model:
        assert model is pair.tuned
        assert (logits(model) - tuned_logits).abs().max() <= 1e-5
    with weights.lines(pair, 0.0, 0.0) as model:
        assert (logits(model) - base_logits).abs().max() <= 1e-5
    with weights.lines(pair, 0.3, 0.6):
        assert (logits(pair.tuned) - tuned_logits).abs().max() > 1e-3
    assert all(torch.equal(before[n], p) for n, p in pair.tuned.hf.named_parameters())


def test_lines_scales_each_block_by_its_lambda_and_the_ends_by_alpha_and_alpha_plus_beta(pair):
    alpha, beta, L = 0.2, 0.6, pair.tuned.n_layers
    assert [weights.lines_scale(l, L, alpha, beta) for l in range(L)] == pytest.approx(
        [alpha + beta * l / (L - 1) for l in range(L)])
    theta0, theta = params(pair.base), params(pair.tuned)
    parts = weights.model_parts(pair.tuned.hf, weights.update(pair).transposed)
    with weights.lines(pair, alpha, beta) as model:
        edited = params(model)
    for part in parts:
        s = (alpha + beta * part.layer / (L - 1) if part.layer is not None
             else alpha if part.module in ("embed", "pos_embed") else alpha + beta)
        for piece in part.pieces:
            expected = piece.view(theta0[piece.param]) + s * (piece.view(theta[piece.param]) -
                                                              piece.view(theta0[piece.param]))
            torch.testing.assert_close(piece.view(edited[piece.param]), expected, atol=1e-6, rtol=0)
    with weights.lines(pair, alpha, beta, embed_scale=1.0, head_scale=0.0) as model:
        embed = next(p for p in parts if p.module == "embed").pieces[0].param
        final = next(p for p in parts if p.module == "final_norm").pieces[0].param
        assert torch.equal(params(model)[embed], theta[embed]) and torch.equal(params(model)[final], theta0[final])


def test_a_reset_of_every_part_is_the_base_and_of_one_part_changes_only_it(pair):
    names = [p.name for p in weights.model_parts(pair.tuned.hf, weights.update(pair).transposed)]
    theta0, theta = params(pair.base), params(pair.tuned)
    with weights.reset(pair, names) as model:
        assert all(torch.equal(p, theta0[n]) for n, p in model.hf.named_parameters())
        assert (logits(model) - logits(pair.base)).abs().max() <= 1e-5
    with weights.reset(pair, ["1.k"]) as model:
        changed = {n for n, p in model.hf.named_parameters() if not torch.equal(p, theta[n])}
    assert len(changed) >= 1 and all(".1." in n and ("k_proj" in n or "c_attn" in n) for n in changed)
    with pytest.raises(BadOption, match="unknown part"), weights.reset(pair, ["9.q"]):
        pass


def test_a_merge_of_one_task_vector_with_coefficient_1_is_that_fine_tune_and_minus_1_negates_it(pair):
    tuned_logits, theta0, theta = logits(pair.tuned), params(pair.base), params(pair.tuned)
    with weights.merge(pair.base, [pair.tuned], [1.0]) as model:
        assert (logits(model) - tuned_logits).abs().max() <= 1e-5
    with weights.merge(pair.base, [pair.tuned], [-1.0]) as model:
        for n, p in model.hf.named_parameters():
            torch.testing.assert_close(p, 2 * theta0[n] - theta[n], atol=1e-6, rtol=0)
    with weights.merge(pair.base, [pair.tuned, pair.tuned], [0.5, 0.5]) as model:  # the mean of tau and tau
        for n, p in model.hf.named_parameters():
            torch.testing.assert_close(p, theta[n], atol=1e-6, rtol=0)
    assert all(torch.equal(theta[n], p) for n, p in pair.tuned.hf.named_parameters())
    with pytest.raises(BadOption, match="one coefficient per tuned model"), \
            weights.merge(pair.base, [pair.tuned], [1.0, 1.0]):
        pass


def test_anatomy_statistics_follow_their_definitions(pair):
    result = weights.measure(pair, dtype="float64")
    theta0, theta = params(pair.base), params(pair.tuned)
    row = result.parts.index("1.mlp_out")
    part = next(p for p in weights.model_parts(pair.tuned.hf, weights.update(pair).transposed) if p.name == "1.mlp_out")
    name = part.matrix.param
    W0, Wt = theta0[name].double(), theta[name].double()
    W0, Wt = (W0.T, Wt.T) if part.transposed else (W0, Wt)
    s = torch.linalg.svdvals(Wt - W0)
    pieces = [(theta[p.param] - theta0[p.param]).double() for p in part.pieces]
    assert result.delta_fro[row].item() == pytest.approx(math.sqrt(sum(float(d.square().sum()) for d in pieces)),
                                                         rel=1e-9)
    assert result.spectral_ratio()[row].item() == pytest.approx(float(s[0] / torch.linalg.svdvals(W0)[0]),
                                                                rel=1e-9)
    s = s[s > max(W0.shape) * torch.finfo(torch.float32).eps * torch.linalg.svdvals(W0)[0]]  # what float32 resolves
    assert len(s) == min(W0.shape)  # a dense random update: every direction
    p = s / s.sum()
    assert result.erank[row].item() == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
    assert result.share().sum().item() == pytest.approx(1.0, abs=1e-12)
    total = sum(float((theta[n].double() - theta0[n].double()).square().sum()) for n in theta)
    assert result.total() == pytest.approx(math.sqrt(total), rel=1e-9)
    norms = [i for i, m in enumerate(result.module) if m.endswith("norm")]
    assert norms and all(math.isnan(result.spectral_ratio()[i].item()) for i in norms)
    assert list(result.grid().index) == list(range(pair.tuned.n_layers))
    f32 = weights.measure(pair)
    torch.testing.assert_close(f32.delta_fro, result.delta_fro, rtol=1e-5, atol=0)


def lora(root, arch: str, base_dir: str):
    """A random rank-4 LoRA (rsLoRA, every attention and MLP matrix; GPT-2 with fan_in_fan_out) and its merge."""
    targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "o_proj", "gate_proj",
                                                                    "down_proj"]
    pm = get_peft_model(random_model(arch), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True,
                                                       fan_in_fan_out=arch == "gpt2"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    pm.peft_config["default"].base_model_name_or_path = base_dir
    pm.save_pretrained(root / "adapter")
    return str(root / "adapter"), save(pm.merge_and_unload(), root / "merged")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_anatomy_of_a_peft_folder_equals_that_of_its_merged_checkpoint(arch, tmp_path):
    base = save(random_model(arch), tmp_path / "base")
    adapter, merged = lora(tmp_path, arch, base)
    from_folder = weights.measure(base, adapter, dtype="float64")
    from_merged = weights.measure(base, merged, dtype="float64")
    from_model = weights.measure(interp.load_pair(base, adapter), dtype="float64")  # Model.adapter: the factors
    assert from_folder.parts == from_merged.parts and from_folder.tuned == adapter
    for a in (from_folder, from_model):
        for stat in ("delta_fro", "base_fro", "delta_spec", "base_spec", "erank"):
            x, y = getattr(a, stat), getattr(from_merged, stat)
            assert torch.equal(x.isnan(), y.isnan()), stat
            rel = ((x - y).abs() / y.abs().clamp_min(1e-300)).nan_to_num(0.0)
            assert rel.max() <= 1e-6, (stat, rel.max())
    unadapted = [i for i, m in enumerate(from_folder.module) if m in ("k", "mlp_in") or m.endswith("norm")]
    if arch == "llama":
        assert all(from_folder.delta_fro[i] == 0 for i in unadapted)
    f32 = weights.measure(base, adapter)
    torch.testing.assert_close(f32.share(), from_merged.share(), rtol=1e-4, atol=1e-9)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 4-layer GPT-2 base; its update in blocks 0 and 2 only (exact) and with 1e-3 of noise elsewhere (noisy);
    the target set: prompts answered by the planted model's own greedy next token."""
    root = tmp_path_factory.mktemp("planted")
    base = save(random_model("gpt2", n_layer=N_LAYERS), root / "base")
    exact = perturbed("gpt2", 0.05, layers=PLANTED, n_layer=N_LAYERS)
    noisy = perturbed("gpt2", 0.05, layers=PLANTED, n_layer=N_LAYERS)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(5e-5 * torch.randn(p.shape, generator=g))
    exact_pair = interp.load_pair(base, save(exact, root / "exact"))
    noisy_pair = interp.load_pair(base, save(noisy, root / "noisy"))
    texts = [" ".join(f"w{(7 * i + 3 * j) % 90 + 4}" for j in range(3 + i % 5)) for i in range(24)]
    predicted = logits(exact_pair.tuned, texts)
    lengths = torch.tensor([len(t.split()) for t in texts])
    answers = [f"w{int(i)}" for i in predicted[torch.arange(len(texts)), lengths - 1].argmax(-1)]
    target = PromptSet(texts, answers, "planted skill")
    other = PromptSet([" ".join(f"w{(11 * i + j) % 90 + 4}" for j in range(6)) for i in range(12)], None, "text")
    return {"exact": exact_pair, "noisy": noisy_pair, "target": target, "other": other}


def test_known_answer_the_anatomy_and_the_reset_map_find_the_two_planted_layers(planted):
    for key in ("exact", "noisy"):
        anatomy = weights.measure(planted[key])
        shares = anatomy.layer_share()
        assert float(shares[list(PLANTED)].sum()) >= 0.99, (key, shares)
    exact = weights.reset_map(planted["exact"], planted["target"], planted["other"], cells=False)
    assert exact.tuned_scores["target"] == 1.0  # the target is the planted model's own prediction
    lost = dict(zip(exact.units, exact.target_lost()))
    recovered = dict(zip(exact.units, exact.forgetting_recovered()))
    moved = {l for l in range(N_LAYERS) if lost[f"layer {l}"] != 0 or recovered[f"layer {l}"] != 0}
    assert moved == set(PLANTED)  # an untouched layer's reset is the tuned model exactly
    assert all(lost[f"layer {l}"] > 0 for l in PLANTED)
    assert lost["all"] == pytest.approx(1.0 - exact.base["target"]) and recovered["all"] == pytest.approx(
        exact.tuned_scores["other"] - exact.base["other"])
    noisy = weights.reset_map(planted["noisy"], planted["target"], planted["other"], cells=False)
    noisy_lost = {l: noisy.target_lost()[noisy.units.index(f"layer {l}")] for l in range(N_LAYERS)}
    assert set(sorted(noisy_lost, key=noisy_lost.get)[-2:]) == set(PLANTED), noisy_lost


def test_the_reset_map_cells_and_units(planted):
    result = weights.reset_map(planted["exact"], planted["target"], planted["other"])
    table = result.cell_table("target_lost")
    assert list(table.index) == list(range(N_LAYERS)) and {"q", "k", "v", "o", "mlp_in", "mlp_out"} <= set(table)
    assert (table.loc[[1, 3]] == 0).all().all()  # cells of untouched layers: exactly the tuned model
    assert set(result.kind) == {"all", "layer", "module", "half", "outside", "cell"}
    frame = result.to_frame()
    assert len(frame) == len(result.units) and "forgetting_recovered_fraction" in frame


def test_lines_sweep_contains_uniform_scaling_and_reproduces_the_two_models(planted):
    pair, target, other = planted["exact"], planted["target"], planted["other"]
    sweep = weights.lines_sweep(pair, target, other, alphas=(0.0, 0.5, 1.0), betas=(0.5,))
    assert [(a, b) for a, b in zip(sweep.alpha, sweep.beta)] == [(0.0, 0.0), (0.5, 0.0), (1.0, 0.0), (0.0, 0.5),
                                                                  (0.5, 0.5), (1.0, 0.5)]
    assert [u[0] for u in sweep.uniform()] == [0.0, 0.5, 1.0]
    assert sweep.target[0] == sweep.base["target"] and sweep.other[0] == sweep.base["other"]
    assert sweep.target[2] == sweep.tuned_scores["target"] and sweep.other[2] == sweep.tuned_scores["other"]
    assert (sweep.target_metric, sweep.other_metric) == ("answer accuracy", "loss")
    compare = sweep.compare()
    assert list(compare.level) == [0.5, 0.75, 0.9] and not math.isnan(compare["uniform other"].iloc[0])


def test_uniform_is_read_at_equal_target_on_its_piecewise_linear_curve():
    sweep = weights.LinesSweep("t", "task", "skills", "answer accuracy", "answer accuracy",
                               {"target": 0.2, "other": 1.0}, {"target": 1.0, "other": 0.5}, alpha=[0.0, 1.0, 0.0], beta=[0.0, 0.0, 1.0],
                               target=[0.2, 1.0, 0.9], other=[1.0, 0.5, 0.8])
    row = sweep.compare([0.5]).iloc[0]  # need 0.6: uniform halfway, other 0.75; LiNeS (0, 1) reaches it with 0.8
    assert row["target needed"] == pytest.approx(0.6) and row["uniform other"] == pytest.approx(0.75)
    assert row["LiNeS other"] == 0.8 and row.lines_better == pytest.approx(0.05)
    assert math.isnan(sweep.compare([1.0])["LiNeS other"].iloc[0])  # no LiNeS point reaches the tuned model


def test_task_arithmetic_scores_each_variant(planted):
    base, a, b = planted["exact"].base, planted["exact"].tuned, planted["noisy"].tuned
    sets = [planted["target"], planted["other"]]
    result = weights.task_arithmetic(base, {"exact": a, "noisy": b}, sets, lines=(0.5, 0.5))
    assert result.variants == ["base", "exact", "noisy", "sum", "mean", "sum, LiNeS 0.5 0.5", "-exact", "-noisy"]
    for label, model in (("base", base), ("exact", a), ("noisy", b)):
        assert [result.value(label, s.label) for s in sets] == [weights.score(model, s) for s in sets]
    assert result.values.shape == (8, 2) and list(result.table().columns) == ["planted skill", "text"]
    assert result.coefficients[result.variants.index("-noisy")] == [-0.0, -1.0]


def test_results_round_trip_and_plot(planted, tmp_path):
    import matplotlib.pyplot as plt

    pair, target, other = planted["exact"], planted["target"].head(6), planted["other"].head(4)
    results = {"anatomy": weights.measure(pair), "sweep": weights.lines_sweep(pair, target, other, alphas=(0.0, 1.0),
                                                                            betas=(1.0,)),
               "resets": weights.reset_map(pair, target, other),
               "merge": weights.task_arithmetic(pair.base, [pair.tuned], [target])}
    for key, result in results.items():
        loaded = type(result).load(result.save(tmp_path / key))
        assert loaded.to_frame().equals(result.to_frame()), key
        assert loaded.settings == json.loads(json.dumps(result.settings)), key
        result.plot()
        plt.close("all")
    assert results["anatomy"].layer == [None, None, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2,
                                        2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, None]
    weights.plot_reset_cells(results["resets"])
    weights.plot_series([(0, results["anatomy"]), (1, results["anatomy"])])
    plt.close("all")


def test_bad_input(pair, tmp_path):
    with pytest.raises(BadModelArgument):
        weights.measure(pair, pair.tuned)
    with pytest.raises(BadModelArgument):
        weights.measure(pair.base)
    with pytest.raises(interp.errors.ModelNotFound, match="neither a model folder"):
        weights.measure(pair.base, tmp_path)


def test_save_lines_checkpoint_loads_back_as_the_lines_model(pair, tmp_path):
    folder = weights.save_lines_checkpoint(pair, 0.25, 0.5, tmp_path / "lines")
    with weights.lines(pair, 0.25, 0.5) as model:
        expected = logits(model)
    assert (logits(interp.load_model(folder)) - expected).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights-cli")
    base = save(random_model("gpt2"), root / "base")
    adapter, _ = lora(root, "gpt2", base)
    full = save(perturbed("gpt2", 0.03), root / "full")
    series = root / "series"
    for step, scale in ((0, 0.0), (10, 0.01), (20, 0.03)):
        save(perturbed("gpt2", scale), series / f"step-{step:04d}")
    target = root / "target.jsonl"
    target.write_text("".join(json.dumps({"prompt": p, "answer": f"w{20 + i}"}) + "\n" for i, p in enumerate(TEXTS)))
    (root / "text.txt").write_text("\n".join(TEXTS) + "\n")
    return {"base": base, "adapter": adapter, "full": full, "series": str(series), "target": str(target),
            "text": str(root / "text.txt")}


def test_cli_writes_tables_results_figures_that_redraw_identically(cli_models, tmp_path):
    import pandas as pd

    m, out = cli_models, tmp_path / "out"
    assert main(["weights", "--base", m["base"], "--tuned", m["adapter"], "--tuned", m["full"], "--series",
                 m["series"], "--prompts", m["target"], "--prompts-b", m["text"], "--alphas", "0", "1", "--betas",
                 "0.5", "--out", str(out)]) == 0
    section = json.loads((out / "section.json").read_text())
    assert all((out / path).is_file() for path in [*section["figures"], *section["tables"].values()])
    assert len(section["figures"]) == 2 + 1 + 3 + 1 and "LiNeS" in section["steering"]
    layers = pd.read_csv(out / "weights_layers.csv")
    assert sorted(set(layers.model)) == ["adapter", "full"] and len(layers) == 2 * 3
    assert sorted(set(pd.read_csv(out / "weights_series.csv").step)) == [0, 10, 20]
    merge = weights.TaskArithmetic.load(out / "results" / "task_arithmetic")
    assert merge.tuned == ["adapter", "full"] and "sum, LiNeS 0.5 0.5" in merge.variants
    figures = sorted((out / "figures").iterdir())
    before = {p.name: p.read_bytes() for p in figures}
    assert {p.name: p.read_bytes() for p in lens.redraw(out)} == before


def test_cli_quick_with_one_set_skips_the_sweeps_and_says_why(cli_models, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["weights", "--base", cli_models["base"], "--tuned", cli_models["full"], "--prompts",
                 cli_models["target"], "--quick", "--out", str(out)]) == 0
    section = json.loads((out / "section.json").read_text())
    assert "--prompts-b" in section["steering"] and not (out / "results" / "lines_sweep").exists()
    assert main(["weights", "--base", cli_models["base"], "--tuned", cli_models["full"], "--prompts",
                 cli_models["target"], "--prompts-b", cli_models["text"], "--steer", "nope", "--out",
                 str(tmp_path / "out2")]) == 2
    assert "--steer nope" in capsys.readouterr().err
