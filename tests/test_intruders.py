"""Intruder analysis on tiny random models: a planted intruder found with its closed-form similarity, PEFT adapter
path == merged checkpoint path, steering by lambda, the lambda sweep, checkpoint series, results, the lens (CLI),
redraw.

The plant (as in tests/test_intruder_math.py): in layer 1's c_fc, (out, in) = (256, 64), W0 = U0 S0 V0^T; the tuned
weight is W0 + c u V0_j^T with u a unit vector orthogonal to W0's column space, so Wt's top direction mixes U0_j
and u with cosine s_j / sqrt(s_j^2 + c^2) to U0_j and 0 to every other base direction.
"""

import contextlib
import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

import interp
from analyses import intruders
from analyses.intruders import EPSILONS
from interp.app.cli import main
from interp.app.lenses import intruders as lens
from interp.prompts import PromptSet
from interp.scoring import answer_scores, loss

from conftest import random_model, word_tokenizer

C_FC = "transformer.h.1.mlp.c_fc.weight"
J = 20
TEXTS = ["w5 w6 w7 w8 w9", "w10 w11 w40", "w12 w13 w14 w15 w16 w17 w18", "w3 w70"]
TARGET = (["w20 w21 w22", "w30 w31", "w40 w41 w42 w43"], ["w22 w21", "w31", "w43 w42"])
TENSORS = ("shapes", "epsilons", "counts", "sims", "base_s", "tuned_s", "delta_s", "delta_erank", "intruder_energy")


def save(model, path):
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def plant(c_over_s: float, seed: int = 0):
    """The base GPT-2 with c = c_over_s * s_j planted in layer 1's c_fc; returns (model, expected sim, s, c)."""
    model = random_model("gpt2")
    W0 = model.transformer.h[1].mlp.c_fc.weight.detach().double().T  # (out, in)
    U0, s, Vh0 = torch.linalg.svd(W0, full_matrices=False)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(256, generator=g, dtype=torch.float64)
    u -= U0 @ (U0.T @ u)
    u /= u.norm()
    c = c_over_s * float(s[J])
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.add_((c * torch.outer(u, Vh0[J])).T.float())
    return model, float(s[J]) / math.hypot(float(s[J]), c), s, c


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny SVDs are fastest on one thread, and two OpenMP threads on busy shared cores can be 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, model_dirs):
    model, sim, s, c = plant(2.0)  # sim = 1 / sqrt(5) = 0.447
    path = save(model, tmp_path_factory.mktemp("intruders") / "planted")
    return {"base": model_dirs["gpt2"], "tuned": path, "sim": sim, "s": s, "c": c,
            "pair": interp.load_pair(model_dirs["gpt2"], path)}


@pytest.fixture(scope="module")
def gpt2(model_dirs):
    return interp.load_model(model_dirs["gpt2"])


def lora_pair(root, arch: str, base_dir: str, scale: float):
    """A random LoRA adapter (r=4, alpha=8, every attention and MLP matrix) on the base, and its merged checkpoint."""
    targets = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(random_model(arch), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       fan_in_fan_out=arch == "gpt2"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    pm.peft_config["default"].base_model_name_or_path = base_dir
    pm.save_pretrained(root / "adapter")
    return str(root / "adapter"), save(pm.merge_and_unload(), root / "merged")


@pytest.fixture(scope="module")
def lora(tmp_path_factory, model_dirs):
    root = tmp_path_factory.mktemp("lora")
    adapter, merged = lora_pair(root, "gpt2", model_dirs["gpt2"], 0.15)
    return {"adapter": adapter, "merged": merged, "model": interp.load_model(adapter, base=model_dirs["gpt2"])}


def test_planted_intruder_is_found_with_its_closed_form_similarity(planted):
    result = intruders.measure(planted["pair"], progress=False)
    sim, s, c = planted["sim"], planted["s"], planted["c"]
    assert result.names == [C_FC]  # the only matrix that changed
    assert result.kinds == ["mlp_in"] and result.layers == [1] and result.shapes.tolist() == [[256, 64]]
    assert result.counts.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1]]  # sim = 0.447
    assert result.sims[0, 0].item() == pytest.approx(sim, abs=1e-5)
    assert result.sims[0, 1:].min().item() > 1 - 1e-4
    assert result.tuned_s[0, 0].item() == pytest.approx(math.hypot(float(s[J]), c), rel=1e-5)
    torch.testing.assert_close(result.base_s[0], s.float())
    assert result.delta_s[0, 0].item() == pytest.approx(c, rel=1e-5) and result.delta_s[0, 1].item() < 1e-5
    assert result.ratio(1).item() == pytest.approx(c / float(s[0]), rel=1e-5)
    assert result.ratio(10).item() == pytest.approx(c / float(s[9]), rel=1e-5)
    assert result.delta_erank[0].item() == pytest.approx(1.0, abs=1e-3)
    assert result.intruder_energy[0].item() == pytest.approx(1 - sim**2, abs=1e-5)
    row = result.to_frame().iloc[0]
    assert (row.kind, row.layer, row.intruders, row["eps_0.4"], row["eps_0.5"]) == ("mlp_in", 1, 1, 0, 1)
    assert row.top_intruder_s == pytest.approx(math.hypot(float(s[J]), c), rel=1e-5)
    assert result.counts_frame().intruders.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert result.layer_frame().loc[1, "mlp_in"] == 1


def test_inputs_models_pair_and_svd_dtypes_agree(planted):
    pair = planted["pair"]
    a = intruders.measure(pair, progress=False)
    b = intruders.measure(pair.base, pair.tuned, dtype="float64", progress=False)
    assert a.sims.dtype == torch.float32 and b.sims.dtype == torch.float32  # results are stored in float32
    assert torch.equal(a.counts, b.counts)
    torch.testing.assert_close(a.sims, b.sims, atol=1e-5, rtol=0)
    assert a.label == "planted" and a.base == planted["base"]
    # a bfloat16 model is decomposed in float32: the plant survives the rounding
    half = intruders.measure(interp.load_pair(planted["base"], planted["tuned"], dtype="bfloat16"), progress=False)
    assert half.names == [C_FC] and half.counts[0, 4].item() == 1
    assert half.sims[0, 0].item() == pytest.approx(planted["sim"], abs=1e-2)
    with pytest.raises(ValueError, match="float32 or float64"):
        intruders.measure(pair, dtype=torch.float16, progress=False)
    with pytest.raises(interp.errors.BadModelArgument, match="load_model"):  # specs are not loaded here
        intruders.measure(planted["base"], planted["tuned"], progress=False)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_adapter_and_merged_checkpoint_give_the_same_result(arch, lora, model_dirs, tmp_path):
    if arch == "gpt2":
        adapter, merged = lora["adapter"], lora["merged"]
    else:
        adapter, merged = lora_pair(tmp_path, "llama", model_dirs["llama"], 0.2)
    base = interp.load_model(model_dirs[arch])
    adapted = interp.load_model(adapter, base=model_dirs[arch])
    assert adapted.adapter is not None  # measured from the adapter's factors, not the merged weights
    from_adapter = intruders.measure(base, adapted, progress=False)
    from_merged = intruders.measure(base, interp.load_model(merged), progress=False)
    n_matrices = 3 * 6 if arch == "gpt2" else 3 * 7  # q, k, v, o and MLP (gpt2: in, out; llama: gate, up, down)
    assert from_adapter.names == from_merged.names and len(from_adapter.names) == n_matrices
    assert torch.equal(from_adapter.counts, from_merged.counts)
    torch.testing.assert_close(from_adapter.sims, from_merged.sims, atol=1e-4, rtol=0)
    torch.testing.assert_close(from_adapter.delta_s, from_merged.delta_s, atol=1e-5, rtol=1e-4, equal_nan=True)
    totals = from_adapter.totals()
    assert 0 < totals[4] < n_matrices * 10 and (totals.diff() >= 0).all()  # not trivially equal; monotone in eps
    # only the adapter's rank: delta W has rank <= 4
    assert (from_adapter.delta_s[:, 4:].nan_to_num(0) < 1e-4).all() and (from_adapter.delta_erank <= 4).all()


def test_adapter_on_the_wrong_base_and_unmerged_models_say_what_to_do(lora, model_dirs, gpt2):
    with pytest.raises(interp.errors.IncompatibleModels, match="adapter .* the base lacks"):
        intruders.measure(interp.load_model(model_dirs["llama"]), lora["model"], progress=False)
    unmerged = interp.load_model(lora["adapter"], base=model_dirs["gpt2"], merge=False)
    with pytest.raises(interp.errors.UnsupportedAdapter, match="merge=True"):
        intruders.measure(gpt2, unmerged, progress=False)


def test_embeddings_are_analysed_on_request(gpt2, tmp_path):
    model = random_model("gpt2")
    with torch.no_grad():
        model.transformer.wte.weight.add_(0.05 * torch.randn_like(model.transformer.wte.weight))
        model.transformer.h[0].attn.c_proj.weight.mul_(1.5)
    tuned = interp.load_model(save(model, tmp_path / "tuned"))
    plain = intruders.measure(gpt2, tuned, progress=False)
    assert plain.names == ["transformer.h.0.attn.c_proj.weight"]
    both = intruders.measure(gpt2, tuned, embeddings=True, progress=False)
    assert both.names == ["transformer.wte.weight", "transformer.h.0.attn.c_proj.weight"]
    assert both.kinds == ["embed", "o"] and both.shapes[0].tolist() == [64, 96]  # (d_model, vocab)
    assert both.counts[1].sum() == 0  # scaling a matrix keeps its singular vectors


def logits_of(model):
    return interp.capture(model, TEXTS, [], logits=True, progress=False)["logits"]


def test_steer_scales_the_intruder_and_restores_the_pair_on_exit(planted, tmp_path):
    pair = planted["pair"]
    before = {n: p.clone() for n, p in pair.tuned.hf.named_parameters()}
    updates = intruders.intruder_updates(pair)
    assert list(updates) == [C_FC] and updates[C_FC].shape == (64, 256)  # stored (in, out) layout
    with intruders.steer(pair, 1.0, updates=updates) as same:
        assert same is pair.tuned  # a weight edit of the tuned model itself
        assert all(torch.equal(p, before[n]) for n, p in same.hf.named_parameters())
    # the whole V0_j column of Wt was the intruder: lambda = 0 takes the base's j-th component with it
    W0 = dict(pair.base.hf.named_parameters())[C_FC].double().T
    U0, s, Vh0 = torch.linalg.svd(W0, full_matrices=False)
    expected = W0 - s[J] * torch.outer(U0[:, J], Vh0[J])
    tuned_logits = logits_of(pair.tuned)
    with intruders.steer(pair, 0.0) as removed:
        W = {n: p.detach().clone() for n, p in removed.hf.named_parameters()}
        assert all(torch.equal(W[n], before[n]) for n in before if n != C_FC)
        torch.testing.assert_close(W[C_FC].double().T, expected, atol=2e-5, rtol=0)
        assert intruders.measure(pair.base, removed, progress=False).totals().sum() == 0
        folder = intruders.save_checkpoint(removed, tmp_path / "steered")  # a standard checkpoint
        removed_logits = logits_of(removed)
    assert all(torch.equal(p, before[n]) for n, p in pair.tuned.hf.named_parameters())  # restored exactly
    with intruders.steer(pair, 0.5) as steered:
        half = intruders.measure(pair.base, steered, progress=False)
    assert half.tuned_s[0].sub(0.5 * math.hypot(float(s[J]), planted["c"])).abs().min() < 1e-4
    with pytest.raises(RuntimeError, match="inside"), intruders.steer(pair, 0.0, updates=updates):
        raise RuntimeError("inside the block")
    assert all(torch.equal(p, before[n]) for n, p in pair.tuned.hf.named_parameters())  # restored on errors too
    # saved as a standard checkpoint, it loads back with the same weights and logits
    loaded = interp.load_model(folder)
    assert all(torch.equal(p, W[n]) for n, p in loaded.hf.named_parameters())
    loaded_logits = logits_of(loaded)
    assert (loaded_logits - removed_logits).abs().max() <= 1e-5 and (removed_logits - tuned_logits).abs().max() > 1e-3


def test_steer_on_an_adapter_model_measures_the_steered_weights(lora, gpt2):
    pair = interp.models.Pair(gpt2, lora["model"])
    adapter, tuned = lora["model"].adapter, intruders.measure(pair, progress=False)
    with intruders.steer(pair, 0.0) as removed:
        assert removed.adapter is None  # no longer base + adapter: measured from its weights
        steered = intruders.measure(pair, progress=False)
    assert lora["model"].adapter == adapter and torch.equal(intruders.measure(pair, progress=False).sims, tuned.sims)
    assert steered.count().sum() < tuned.count().sum()


def test_lambda_sweep_scores_the_steered_models(planted):
    pair = planted["pair"]
    before = {n: p.clone() for n, p in pair.tuned.hf.named_parameters()}
    sweep = intruders.lambda_sweep(pair, PromptSet(*TARGET), TEXTS, lams=[0.0, 1.0])
    assert all(torch.equal(p, before[n]) for n, p in pair.tuned.hf.named_parameters())
    assert sweep.n_intruders == 1 and sweep.lam == [0.0, 1.0]
    assert sweep.pretrain_metric == "loss on pre-training text" and sweep.pretrain_accuracy == [None, None]
    for i, steered in enumerate((intruders.steer(pair, 0.0), contextlib.nullcontext(pair.tuned))):
        with steered as model:
            assert sweep.pretrain_loss[i] == pytest.approx(float(loss(model, TEXTS).mean()), abs=1e-5)
            scores = answer_scores(model, *TARGET)
            assert sweep.target_accuracy[i] == pytest.approx(float(scores.accuracy.mean()), abs=1e-6)
            assert sweep.target_loss[i] == pytest.approx(float(scores.loss.mean()), abs=1e-5)
    assert sweep.pretrain_loss[0] != pytest.approx(sweep.pretrain_loss[1], abs=1e-4)
    assert sweep.base["pretrain_loss"] == pytest.approx(float(loss(pair.base, TEXTS).mean()), abs=1e-5)
    with_answers = intruders.lambda_sweep(pair, PromptSet(*TARGET), PromptSet(*TARGET), lams=[1.0])
    assert with_answers.pretrain_loss == with_answers.target_loss
    assert with_answers.pretrain_accuracy == with_answers.target_accuracy
    with pytest.raises(interp.errors.BadPrompts, match="need answers"):
        intruders.lambda_sweep(pair, TARGET[0], TEXTS)


def test_lambda_sweep_round_trips(planted, tmp_path):
    sweep = intruders.lambda_sweep(planted["pair"], PromptSet(*TARGET), TEXTS, lams=[0.0, 1.0])
    loaded = intruders.LambdaSweep.load(sweep.save(tmp_path / "sweep"))
    assert loaded == sweep and loaded.to_frame().equals(sweep.to_frame())


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory, model_dirs):
    """Checkpoints at steps 0 (the base), 10 (a half-grown plant: sim 0.707) and 20 (the planted intruder: 0.447)."""
    root = tmp_path_factory.mktemp("series")
    for step, c_over_s in ((0, 0.0), (10, 1.0), (20, 2.0)):
        save(plant(c_over_s)[0], root / f"step-{step}")
    return root


def test_series_counts_intruders_per_step(series_dir, gpt2):
    series = intruders.measure_series(gpt2, series_dir)
    assert [step for step, _ in series] == [0, 10, 20]
    assert series[0][1].names == []  # step 0 is the base
    assert [int(r.count(0.5).sum()) for _, r in series] == [0, 0, 1]
    assert [int(r.count(0.8).sum()) for _, r in series] == [0, 1, 1]
    assert series[1][1].sims[0, 0].item() == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    frame = intruders.series_frame(series)
    assert frame[frame.epsilon.round(2) == 0.5].intruders.tolist() == [0, 0, 1]
    assert frame[frame.epsilon.round(2) == 0.5].max_delta_over_base_s1.iloc[0] == 0.0


def test_result_round_trips(lora, gpt2, tmp_path):
    result = intruders.measure(gpt2, lora["model"], progress=False)
    loaded = intruders.IntruderResult.load(result.save(tmp_path / "r"))
    for name in TENSORS:  # NaN padding included
        torch.testing.assert_close(getattr(loaded, name), getattr(result, name), equal_nan=True, atol=0, rtol=0)
    assert (loaded.names, loaded.label, loaded.k, loaded.epsilon) == (result.names, "adapter", 10, 0.5)
    assert loaded.settings == result.settings and loaded.settings["epsilons"] == list(EPSILONS)
    assert loaded.to_frame().equals(result.to_frame())


def test_cli_writes_tables_results_figures_that_redraw_identically(lora, series_dir, model_dirs, tmp_path):
    import pandas as pd

    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(*TARGET)))
    (tmp_path / "web.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out"
    assert main(["intruders", "--base", model_dirs["gpt2"], "--tuned", lora["adapter"], "--tuned", lora["merged"],
                 "--series", str(series_dir), "--prompts", str(target), "--prompts-b",
                 str(tmp_path / "web.txt"), "--lams", "0", "1", "--out", str(out)]) == 0
    table = pd.read_csv(out / "intruders.csv")
    by_model = {m: t.drop(columns="model").reset_index(drop=True) for m, t in table.groupby("model")}
    assert sorted(by_model) == ["adapter", "merged"] and len(by_model["adapter"]) == 18
    eps_columns = [f"eps_{e:g}" for e in EPSILONS]
    assert by_model["adapter"][eps_columns].equals(by_model["merged"][eps_columns])
    counts = pd.read_csv(out / "intruder_counts.csv")
    assert len(counts) == 2 * len(EPSILONS) and counts.intruders.max() > 0
    series = pd.read_csv(out / "intruder_series.csv")
    assert series[series.epsilon.round(2) == 0.5].intruders.tolist() == [0, 0, 1]
    sweep = intruders.LambdaSweep.load(out / "results" / "lambda_sweep")
    assert sweep.lam == [0.0, 1.0] and sweep.tuned == lora["adapter"] and sweep.n_intruders > 0
    merged = interp.load_model(lora["merged"])
    assert sweep.target_accuracy[1] == pytest.approx(float(answer_scores(merged, *TARGET).accuracy.mean()))
    section = json.loads((out / "section.json").read_text())
    assert section["headline"]["intruders adapter (eps 0.5)"] == int(counts[counts.epsilon.round(2) == 0.5].intruders.iloc[0])
    assert all((out / path).is_file() for path in [*section["figures"], *section["tables"].values()])
    assert "scaled by lambda" in section["steering"]
    figures = sorted((out / "figures").iterdir())
    assert {p.suffix for p in figures} == {".pdf", ".png"} and len(figures) == 2 * (1 + 2 * 2 + 1 + 1)
    before = {p.name: p.read_bytes() for p in figures}
    assert {p.name: p.read_bytes() for p in lens.redraw(out)} == before


def test_cli_bad_input_exits_2_with_one_line(lora, model_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["intruders", "--help"])
    assert exit_info.value.code == 0 and "--tuned" in capsys.readouterr().out
    assert main(["intruders", "--base", model_dirs["gpt2"], "--out", str(tmp_path / "o")]) == 2
    assert "pass --tuned" in capsys.readouterr().err
    dora = tmp_path / "dora"
    pm = get_peft_model(random_model("gpt2"), LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True,
                                                          use_dora=True))
    pm.save_pretrained(dora)
    (tmp_path / "web.txt").write_text("\n".join(TEXTS) + "\n")
    assert main(["intruders", "--base", model_dirs["gpt2"], "--tuned", str(dora), "--prompts", str(tmp_path / "web.txt"),
                 "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[intruders")]  # progress
    assert len(err) == 1 and err[0].startswith("interp: error: ") and "use_dora" in err[0]
    assert main(["intruders", "--base", model_dirs["gpt2"], "--tuned", lora["merged"], "--prompts",
                 str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_lens_without_a_comparison_set_skips_the_sweep_and_says_why(lora, model_dirs, tmp_path):
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(*TARGET)))
    out = tmp_path / "out"
    assert main(["intruders", "--base", model_dirs["gpt2"], "--tuned", lora["merged"], "--prompts", str(target),
                 "--out", str(out)]) == 0
    section = json.loads((out / "section.json").read_text())
    assert "--prompts-b" in section["steering"] and not (out / "results" / "lambda_sweep").exists()
