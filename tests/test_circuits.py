"""Circuits: patching identities, attribution identities, EAP-IG completeness, faithfulness end points, CMAP on a
planted change, detector indexing on constructed patterns, differentiable edits for LoFiT, results and CLI."""

import dataclasses
import json

import pytest
import torch
from conftest import VOCAB, random_model, word_tokenizer

import interp
from analyses import circuits
from analyses.circuits import cmap, lofit
from analyses.circuits import edges as ce
from analyses.circuits import heads as head_detectors
from analyses.circuits import patching as cp
from analyses.circuits import plots as circuit_plots
from interp.app import zoo_defaults
from interp.errors import BadPrompts
from interp.prompts import PromptSet
from interp.sites import Site

LENGTHS = (6, 9, 4, 7, 5)


def words(ids):
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def gpt2(model_dirs):
    return interp.load_model(model_dirs["gpt2"])


@pytest.fixture(scope="module")
def pairs() -> cp.PromptPairs:
    g = torch.Generator().manual_seed(0)
    clean = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    corrupt = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    answer = torch.randint(2, VOCAB, (len(LENGTHS),), generator=g).tolist()
    return cp.PromptPairs([words(c) for c in clean], [words(c) for c in corrupt], [f"w{a}" for a in answer],
                          [f"w{(a + 7) % (VOCAB - 2) + 2}" for a in answer])


@pytest.fixture(scope="module")
def tp(gpt2, pairs):
    return cp.tokenize_pairs(gpt2, pairs)


def test_pairs_roundtrip_and_checks(gpt2, pairs, tmp_path):
    back = cp.read_pairs(pairs.save(tmp_path / "pairs.jsonl"))
    assert back == pairs
    bad = cp.PromptPairs(pairs.clean[:1], ["w3 w4"], pairs.answer[:1], pairs.wrong[:1])
    with pytest.raises(BadPrompts, match="equal lengths"):
        cp.tokenize_pairs(gpt2, bad)
    (tmp_path / "broken.jsonl").write_text('{"clean": "w2"}\n')
    with pytest.raises(BadPrompts, match="corrupt"):
        cp.read_pairs(tmp_path / "broken.jsonl")


def test_zoo_pairs_have_equal_lengths_and_different_answers():
    zp = zoo_defaults.circuit_pairs("copy", 20)
    for clean, corrupt, a, w in zip(zp.clean, zp.corrupt, zp.answer, zp.wrong):
        assert len(clean.split()) == len(corrupt.split()) and a != w
        assert clean.split()[1 + 1] == a  # "copy x1 x2 ... = x1" -> answer x2


def test_pairs_from_a_prompt_set_with_answers(gpt2):
    prompts = ["w2 w3 w4", "w5 w6 w7", "w8 w9 w10", "w11 w12", "w13"]
    answers = ["w20 w21", "w22", "w20", "w23", "w24"]
    made = cp.pairs_from_answers(gpt2, prompts, answers)
    assert made.clean == ["w2 w3 w4", "w5 w6 w7", "w8 w9 w10"]  # the two short prompts have no partner
    assert made.answer == ["w20", "w22", "w20"] and made.wrong[0] == "w22" and made.wrong[1] in ("w20",)
    assert made.wrong[2] == "w22"
    tp = cp.tokenize_pairs(gpt2, made)
    assert torch.equal(tp.clean.lengths, tp.corrupt.lengths)
    with pytest.raises(BadPrompts, match="partner"):
        cp.pairs_from_answers(gpt2, prompts[3:], answers[3:])


def test_patching_own_clean_activation_changes_nothing(gpt2, tp):
    same = cp.TokenPairs(tp.clean, tp.clean, tp.answer, tp.wrong)
    sites = cp.component_sites(gpt2, ("embed", "resid", "head", "attn", "mlp"))
    effect = cp.activation_patching(gpt2, same, sites, normalise=False)
    assert effect.abs().max() <= 1e-5
    per_pos = cp.activation_patching(gpt2, same, sites[:3], normalise=False, per_position=True)
    assert per_pos.shape == (3, max(LENGTHS)) and per_pos.abs().max() <= 1e-5


@pytest.mark.parametrize("direction", cp.DIRECTIONS)
def test_all_heads_of_a_layer_equal_the_attention_output(gpt2, tp, direction):
    heads = tuple(Site("head_out", 1, h) for h in range(gpt2.n_heads))
    effect = cp.activation_patching(gpt2, tp, [heads, Site("attn_out", 1)], direction=direction)
    assert abs(effect[0] - effect[1]) <= 1e-5 and effect[0].abs() > 1e-3


def test_patching_everything_reaches_the_other_run(gpt2, tp):
    last = Site("resid_post", gpt2.n_layers - 1)
    assert torch.allclose(cp.activation_patching(gpt2, tp, [last], direction="noising"), torch.tensor([-1.0]), atol=1e-5)
    assert torch.allclose(cp.activation_patching(gpt2, tp, [last], direction="denoising"), torch.tensor([1.0]), atol=1e-5)


def test_edge_scores_sum_to_node_attribution(gpt2, tp):
    edges = ce.edge_attribution(gpt2, tp)
    sites = [ce.upstream_site(u) for u in edges.upstream]
    nodes = cp.attribution_patching(gpt2, tp, sites)
    assert torch.allclose(edges.scores.sum(1), nodes, atol=1e-4)
    assert edges.scores[~edges.valid].abs().max() == 0
    assert not edges.valid[edges.upstream.index("a1.0"), edges.downstream.index("attn1")]
    assert edges.valid[edges.upstream.index("a1.0"), edges.downstream.index("mlp1")]


def test_eap_ig_is_complete_at_the_embedding(gpt2, tp):
    """IG completeness: the embedding's edges sum to (m_corrupt - m_clean) / gap = -1."""
    edges = ce.edge_attribution(gpt2, tp, ig_steps=24)
    assert abs(float(edges.scores[0].sum()) + 1) <= 0.02


def test_faithfulness_end_points_and_circuits(gpt2, tp):
    edges = ce.edge_attribution(gpt2, tp)
    assert abs(ce.faithfulness(gpt2, tp, edges, edges.valid) - 1) <= 1e-5
    assert abs(ce.faithfulness(gpt2, tp, edges, torch.zeros_like(edges.valid))) <= 1e-5
    curve = ce.faithfulness_curve(gpt2, tp, edges, (0, int(edges.valid.sum())))
    assert abs(curve[0]) <= 1e-5 and abs(curve[int(edges.valid.sum())] - 1) <= 1e-5
    keep = edges.circuit(top_n=7)
    assert int(keep.sum()) == 7 and (keep <= edges.valid).all()
    smallest_kept = edges.scores.abs()[keep].min()
    assert torch.equal(edges.circuit(threshold=float(smallest_kept)), keep)
    assert edges.top(3)[0][2] == edges.scores.flatten()[edges.scores.abs().flatten().argmax()]


def test_backends_agree(model_dirs, gpt2, tp):
    other = interp.load_model(model_dirs["gpt2"], backend="nnsight")
    sites = [Site("head_out", 0, 1), Site("mlp_out", 1), Site("resid_pre", 2)]
    for fn in (cp.activation_patching, cp.attribution_patching):
        assert torch.allclose(fn(gpt2, tp, sites), fn(other, tp, sites), atol=1e-4), fn.__name__
    a, b = (ce.edge_attribution(m, tp, ig_steps=2).scores for m in (gpt2, other))
    assert torch.allclose(a, b, atol=1e-4)


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """Tuned = base with only layer 1's MLP changed."""
    root = tmp_path_factory.mktemp("circuits")
    tuned = random_model("gpt2")
    with torch.no_grad():
        w = tuned.transformer.h[1].mlp.c_fc.weight
        w.add_(0.5 * torch.randn_like(w))
    tuned.save_pretrained(root / "tuned")
    word_tokenizer().save_pretrained(root / "tuned")
    return root / "tuned"


@pytest.fixture(scope="module")
def planted(planted_dir, model_dirs):
    return interp.load_pair(model_dirs["gpt2"], planted_dir)


def test_cmap_finds_a_planted_mlp(planted, pairs):
    res = cmap.cmap(planted, pairs.clean, pairs.answer, max_set=3)
    gain = dict(zip(res.components, res.gain.tolist()))
    assert abs(gain["mlp_out.1"] - 1) <= 1e-4
    upstream = ["embed", "mlp_out.0"] + [f"head_out.{layer}.{h}" for layer in (0, 1) for h in range(4)]
    assert max(abs(gain[c]) for c in upstream) <= 1e-4
    assert res.greedy == [(["mlp_out.1"], pytest.approx(1.0, abs=1e-4))]


def test_detector_indexing_on_constructed_patterns():
    half, width = 5, 11  # bos + x + x
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 10, 11, 12, 13, 14]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    prev = torch.zeros(1, 1, 1, width, width)
    induction = torch.zeros_like(prev)
    q = torch.arange(1, width)
    prev[..., q, q - 1] = 1
    induction[..., q, 0] = 1
    induction[..., torch.arange(1 + half, width), :] = 0
    induction[..., torch.arange(1 + half, width), torch.arange(2, half + 2)] = 1
    p = head_detectors.scores_from_patterns(prev, ids, mask)
    i = head_detectors.scores_from_patterns(induction, ids, mask)
    assert p["previous_token"].item() == 1 and p["induction"].item() == 0 and p["duplicate_token"].item() == 0
    assert i["induction"].item() == 1 and i["duplicate_token"].item() == 0
    # the same scores from the generic definition on a prompt whose repeat is not a whole copy, with a pad
    ids = torch.tensor([[1, 10, 11, 10, 12, 11, 0]])
    mask = torch.tensor([[True] * 6 + [False]])
    dup = torch.zeros(1, 1, 1, 7, 7)
    dup[..., 3, 1] = 1  # w10 at 3 -> its duplicate at 1
    dup[..., 5, 2] = dup[..., 5, 3] = 0.5  # w11 at 5: half to its duplicate at 2, half to the token after it
    s = head_detectors.scores_from_patterns(dup, ids, mask)
    assert s["duplicate_token"].item() == 0.75 and s["induction"].item() == 0.25
    assert abs(s["previous_token"].item() - 0) <= 1e-9


def test_detectors_on_a_model_are_attention_fractions(gpt2):
    scores = head_detectors.detector_scores(gpt2, n=4, length=6)
    for s in scores.values():
        assert s.shape == (gpt2.n_layers, gpt2.n_heads) and s.min() >= 0 and s.max() <= 1


def test_edits_with_tensors_that_require_grad_train(gpt2, pairs):
    """d metric / d v of an `add` edit on one head = the head's activation gradient summed over positions."""
    v = torch.zeros(gpt2.d_model, requires_grad=True)
    tokens, start = lofit.answer_tokens(gpt2, pairs.clean, pairs.answer)
    acts = interp.capture(gpt2, tokens, ["head_out.1.2"], edits=[interp.add("head_out.1.2", v)],
                          metric=lofit.answer_loss(start), batch_size=len(tokens), progress=False)
    assert torch.allclose(v.grad, acts.grad("head_out.1.2").sum((0, 1)), atol=1e-6)
    assert v.grad.abs().max() > 0


def test_lofit_lowers_the_loss_and_reloads(gpt2, pairs, tmp_path):
    tokens, start = lofit.answer_tokens(gpt2, pairs.clean, pairs.answer)

    def loss(edits=()):
        return interp.capture(gpt2, tokens, [], edits=edits, metric=lofit.answer_loss(start), progress=False)

    fitted = lofit.train(gpt2, pairs.clean, pairs.answer, steps=(10, 30), lr=(0.05, 0.05), batch_size=5)
    assert len(fitted.heads) == max(1, int(0.1 * gpt2.n_layers * gpt2.n_heads)) == 1
    assert fitted.s.abs().flatten().argmax() == fitted.heads[0][0] * gpt2.n_heads + fitted.heads[0][1]
    loaded = lofit.LoFiT.load(fitted.save(tmp_path / "lofit"))
    before = interp.answer_scores(gpt2, pairs.clean, pairs.answer).loss.mean()
    with circuits.steer(gpt2, lofit=loaded):
        after = interp.answer_scores(gpt2, pairs.clean, pairs.answer).loss.mean()
    assert after < before - 0.1
    assert loaded.heads == fitted.heads and torch.equal(loaded.offsets, fitted.offsets)


def test_steering_heads(gpt2, pairs):
    base = interp.answer_scores(gpt2, pairs.clean, pairs.answer).loss
    with circuits.steer(gpt2, [(1, 2)], mode="scale", factor=1.0):
        assert torch.allclose(interp.answer_scores(gpt2, pairs.clean, pairs.answer).loss, base, atol=1e-6)
    with circuits.steer(gpt2, [(1, 2)], mode="zero"):
        zero = interp.answer_scores(gpt2, pairs.clean, pairs.answer).loss
    with circuits.steer(gpt2, [(1, 2)], mode="scale", factor=0.0):
        assert torch.allclose(interp.answer_scores(gpt2, pairs.clean, pairs.answer).loss, zero, atol=1e-6)
    assert (zero - base).abs().max() > 1e-4
    assert gpt2.edits == []


def assert_same_result(a, b):
    """Every field of two results equal: tensors (and dicts of tensors) exactly, the rest and the settings by ==."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f.name
        elif isinstance(x, dict) and x and all(isinstance(v, torch.Tensor) for v in x.values()):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name
        else:
            assert x == y, f.name


@pytest.mark.slow
def test_measure_saves_loads_and_redraws(planted, pairs, tmp_path):
    task = PromptSet(pairs.clean, pairs.answer, "skill")
    result = circuits.measure(planted, pairs, pairs, task=task, target=task, ig_steps=2, circuit_sizes=(3,),
                              lofit=task)
    back = circuits.CircuitsResult.load(result.save(tmp_path / "results"))
    assert_same_result(back, result)
    frame = back.to_frame()
    assert len(frame) == 2 * 3 * 4 and "patching.skill" in frame
    assert len(back.emergent(3)) == 3
    first = {p.name: p.read_bytes() for p in circuit_plots.save_figures(result, tmp_path / "figures")}
    assert {"circuit.pdf", "heads_target.png", "cmap.pdf", "ablation.png"} <= set(first)
    assert {p.name: p.read_bytes() for p in circuit_plots.save_figures(back, tmp_path / "again")} == first
    offsets = lofit.LoFiT.load(back.fitted().save(tmp_path / "lofit"))
    assert (tmp_path / "lofit" / "tensors.safetensors").is_file()
    assert offsets.heads == [tuple(h) for h in result.lofit["heads"]] and torch.equal(offsets.offsets,
                                                                                      result.lofit_offsets)
    again = circuits.measure(planted, pairs, pairs, task=task, target=task, cmap=False, reuse=result)
    for key, value in {**result.importance, **result.detectors}.items():
        if key.endswith((".tuned", ".base")):
            assert torch.allclose({**again.importance, **again.detectors}[key], value, atol=1e-5), key
    assert torch.allclose(again.edges, result.edges, atol=1e-5)
    assert again.ablation == result.ablation
    fast = circuits.measure(planted, pairs, pairs, task=task, target=task, cmap=False, ablation=False,
                            patching=False, ig_steps=1, circuit_sizes=(3,))
    assert fast.method == "attribution" and "patching.skill.base" not in fast.importance
    assert torch.allclose(fast.importance["attribution.skill.tuned"], result.importance["attribution.skill.tuned"],
                          atol=1e-5)
    assert len(fast.emergent(2)) == 2
    names = {p.name for p in circuit_plots.save_figures(fast, tmp_path / "fast")}
    assert "heads_target.png" in names and "attribution_vs_patching.png" not in names


def test_measure_pairs_a_prompt_set_with_answers(gpt2):
    prompts = PromptSet(["w2 w3 w4", "w5 w6 w7", "w8 w9 w10", "w11 w12", "w13"], ["w20 w21", "w22", "w20", "w23", "w24"],
                        "task")
    made = circuits.as_pairs(gpt2, prompts)
    assert made == cp.pairs_from_answers(gpt2, prompts.prompts, prompts.answers)
    assert circuits.as_task(prompts, "x") is prompts and circuits.as_task(made, "x").answers == made.answer
    with pytest.raises(BadPrompts, match="answers"):
        circuits.as_pairs(gpt2, PromptSet(prompts.prompts))


def task_file(path, n=12, length=5, seed=0):
    """A jsonl prompt set with answers whose prompts share one token length (so every prompt has a partner)."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"prompt": words(torch.randint(2, VOCAB, (length,), generator=g).tolist()),
             "answer": f"w{int(torch.randint(2, VOCAB, (1,), generator=g))}"} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_cli_writes_results_tables_and_figures_that_redraw_identically(model_dirs, planted_dir, tmp_path):
    from interp.app.cli import main
    from interp.app.lenses import circuits as lens

    out = tmp_path / "out"
    assert main(["circuits", "--base", model_dirs["gpt2"], "--tuned", str(planted_dir), "--prompts",
                 str(task_file(tmp_path / "task.jsonl")), "--out", str(out), "--ig-steps", "1", "--circuit-sizes", "3",
                 "--cmap-max-set", "1", "--n-random", "2", "--lofit"]) == 0
    section = json.loads((out / "section.json").read_text())
    assert section["error"] is None and "top emergent head, tuned" in section["headline"]
    result = circuits.CircuitsResult.load(out / "results" / "tuned")
    assert result.skill == result.target == "task" and result.lofit is not None
    assert result.settings["ig_steps"] == 1 and result.settings["circuit_sizes"] == [3]
    assert (out / "heads.csv").is_file() and (out / "circuits_models.csv").is_file()
    figures = sorted((out / "figures").iterdir())
    assert {p.stem for p in figures} == {"circuit", "attribution_vs_patching", "ablation", "heads_target_tuned",
                                         "heads_skill_tuned", "cmap_tuned"}
    assert all((out / p).is_file() for p in section["figures"])
    before = {p.name: p.read_bytes() for p in figures}
    assert {p.name: p.read_bytes() for p in lens.redraw(out)} == before


def test_cli_is_registered_and_needs_prompts_with_answers_outside_the_zoo(model_dirs, tmp_path, capsys):
    from interp.app.cli import main
    from interp.app.lenses import LENSES

    assert "circuits" in LENSES
    code = main(["circuits", "--base", model_dirs["gpt2"], "--tuned", model_dirs["gpt2"], "--out", str(tmp_path)])
    assert code == 2 and "--prompts" in capsys.readouterr().err
    (tmp_path / "plain.txt").write_text("w2 w3\nw4 w5\n")
    code = main(["circuits", "--base", model_dirs["gpt2"], "--tuned", model_dirs["gpt2"], "--prompts",
                 str(tmp_path / "plain.txt"), "--out", str(tmp_path / "out")])
    assert code == 2 and "--pairs" in capsys.readouterr().err
