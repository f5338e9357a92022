"""Interventions: identities that must hold exactly, and agreement between backends."""

import pytest
import torch

import interp
from interp.generation import generate
from interp.intervene import ablate, add, project_out, replace, scale

from conftest import ARCHS

BACKENDS = ("bridge", "nnsight")


@pytest.fixture(scope="module")
def loaded(model_dirs):
    return {arch: interp.load_model(model_dirs[arch]) for arch in ARCHS}


def logits(model, prompts, edits=(), backend=None, side="right"):
    return interp.capture(model, prompts, [], edits=edits, logits=True, backend=backend, padding_side=side,
                          progress=False)["logits"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_replacing_with_own_clean_activations_changes_nothing(loaded, prompts, arch, backend):
    model = loaded[arch]
    sites = ["resid_pre.0", "head_out.1", "attn_out.1", "resid_mid.1", "mlp_out.2", "resid_post.2", "final"]
    clean = interp.capture(model, prompts, sites, logits=True, backend=backend, progress=False)
    for s in sites:
        patched = logits(model, prompts, [replace(s, clean[s])], backend, side="left")
        assert (patched - clean["logits"]).abs().max() <= 1e-5, s


@pytest.mark.parametrize("arch", ("llama", "qwen2"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_ablating_all_heads_equals_zeroing_attn_out(loaded, prompts, arch, backend):
    model = loaded[arch]  # no output bias in these architectures, so the two are the same edit
    heads = [ablate(f"head_out.1.{h}") for h in range(model.n_heads)]
    whole = logits(model, prompts, [ablate("attn_out.1")], backend)
    assert (logits(model, prompts, heads, backend) - whole).abs().max() <= 1e-5
    assert (whole - logits(model, prompts, backend=backend)).abs().max() > 1e-2  # the edit does something


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_an_output_bias_ablating_all_heads_leaves_the_bias(loaded, prompts, backend):
    model = loaded["gpt2"]
    bias = model.hf.transformer.h[1].attn.c_proj.bias.detach()
    heads = [ablate(f"head_out.1.{h}") for h in range(model.n_heads)]
    to_bias = logits(model, prompts, [ablate("attn_out.1", mean=bias)], backend)
    assert (logits(model, prompts, heads, backend) - to_bias).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edit_at_resid_mid_reaches_the_residual_stream(loaded, prompts, arch, backend):
    model = loaded[arch]
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    via_mid = interp.capture(model, prompts, ["resid_post.1"], edits=[add("resid_mid.1", v)], backend=backend,
                             progress=False)
    via_attn = interp.capture(model, prompts, ["resid_post.1"], edits=[add("attn_out.1", v)], backend=backend,
                              progress=False)
    assert (via_mid["resid_post.1"] - via_attn["resid_post.1"]).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_backends_apply_every_edit_alike(loaded, prompts, arch):
    model = loaded[arch]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(model.d_model, generator=g)
    basis = torch.randn(model.d_model, 3, generator=g)
    edits = [
        [add("resid_post.0", v, scale=2.0)],
        [scale("head_out.1.2", 3.0)],
        [ablate("mlp_out.1", mean=v)],
        [project_out("resid_pre.2", basis)],
        [add("attn_out.0", v, positions="last"), scale("resid_mid.2", 0.5, positions=[0, 2])],
    ]
    clean = logits(model, prompts)
    for edit in edits:
        a = logits(model, prompts, edit, "bridge", side="left")
        b = logits(model, prompts, edit, "nnsight", side="right")
        assert (a - b).abs().max() <= 1e-5, edit
        assert (a - clean).abs().max() > 1e-3, edit


def test_project_out_removes_the_subspace_and_positions_are_respected(loaded, prompts):
    model = loaded["gpt2"]
    basis = torch.randn(model.d_model, 2, generator=torch.Generator().manual_seed(2))
    acts = interp.capture(model, prompts, ["resid_post.1"], edits=[project_out("resid_post.1", basis, positions=[1])],
                          progress=False)
    clean = interp.capture(model, prompts, ["resid_post.1"], progress=False)
    q, _ = torch.linalg.qr(basis)
    long = torch.tensor([len(p) > 1 for p in prompts])
    assert (acts["resid_post.1"][long, 1] @ q).abs().max() <= 1e-5
    assert torch.equal(acts["resid_post.1"][:, 0], clean["resid_post.1"][:, 0])


def test_edit_context_applies_inside_only(loaded, prompts):
    model = loaded["qwen2"]
    v = torch.ones(model.d_model)
    clean = logits(model, prompts)
    with model.edit(add("resid_post.1", v)):
        inside = logits(model, prompts)
    assert (inside - clean).abs().max() > 1e-3
    assert torch.equal(logits(model, prompts), clean)
    assert model.edits == []


def test_patching_across_models_of_one_architecture(model_dirs, tmp_path, prompts):
    from conftest import save_model

    base = interp.load_model(model_dirs["llama"])
    other = interp.load_model(save_model(tmp_path / "other", "llama", seed=5))
    donor = interp.capture(other, prompts, ["resid_pre.2"], progress=False)
    patched = interp.capture(base, prompts, ["final"], edits=[replace("resid_pre.2", donor["resid_pre.2"])],
                             progress=False)
    reference = interp.capture(other, prompts, ["final"], progress=False)
    assert (patched["final"] - reference["final"]).abs().max() > 1e-2  # final layer differs between the two
    later = interp.capture(other, prompts, ["final"], edits=[replace("resid_pre.2", donor["resid_pre.2"])],
                           progress=False)
    assert (later["final"] - reference["final"]).abs().max() <= 1e-5


def test_edits_refuse_read_only_sites():
    with pytest.raises(interp.InterpError, match="read-only"):
        ablate("attn_pattern.0")


def test_greedy_generation_matches_hugging_face(loaded):
    model = loaded["gpt2"]
    prompt = [5, 6, 7, 8, 9, 10]
    ours = generate(model, [prompt], 20)[0]
    with torch.no_grad():
        reference = model.hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
    assert ours.tolist() == reference[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_under_edits_agrees_between_backends(loaded, prompts, arch):
    model = loaded[arch]
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(3))
    with model.edit(add("resid_post.0", v, scale=3.0)):
        a = generate(model, prompts[:3], 10, backend="bridge")
        b = generate(model, prompts[:3], 10, backend="nnsight")
    clean = generate(model, prompts[:3], 10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, clean))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_matches_hugging_face_and_follows_edits(loaded, prompts, backend):
    from interp.scoring import loss

    model = loaded["llama"]
    ours = loss(model, prompts, batch_size=2, backend=backend)
    for i, p in enumerate(prompts):
        if len(p) < 2:
            continue
        ids = torch.tensor([p])
        with torch.no_grad():
            reference = model.hf(ids, labels=ids).loss
        assert abs(float(ours[i]) - float(reference)) <= 1e-5
    with model.edit(ablate("mlp_out.0")):
        edited = loss(model, prompts, batch_size=2, backend=backend)
    assert (edited - ours).abs().max() > 1e-3


def test_answer_scores_count_only_answer_tokens(loaded):
    from interp.scoring import answer_scores

    model = loaded["gpt2"]
    prompts, answers = ["w5 w6 w7", "w9 w10"], ["w11 w12", "w13"]
    scores = answer_scores(model, prompts, answers)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids = torch.tensor([model.tokenizer(f"{p} {a}")["input_ids"]])
        n_prompt = len(model.tokenizer(p)["input_ids"])
        with torch.no_grad():
            logits = model.hf(ids).logits[0]
        predicted = logits[n_prompt - 1: -1].argmax(-1)
        expected_acc = (predicted == ids[0, n_prompt:]).float().mean()
        expected_loss = torch.nn.functional.cross_entropy(logits[n_prompt - 1: -1], ids[0, n_prompt:])
        assert abs(float(scores.accuracy[i]) - float(expected_acc)) < 1e-6
        assert abs(float(scores.loss[i]) - float(expected_loss)) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_blending_every_part_swaps_in_the_other_model(model_dirs, tmp_path, prompts, arch, backend):
    from conftest import save_model
    from interp.intervene import blend

    model = interp.load_model(model_dirs[arch])
    other = interp.load_model(save_model(tmp_path / "other", arch, seed=9))
    parts = [*range(model.n_layers), "embed", "final", "unembed"]
    swapped = logits(model, prompts, [blend(p, other, 0.0) for p in parts], backend)
    assert (swapped - logits(other, prompts)).abs().max() <= 1e-5
    kept = logits(model, prompts, [blend(p, other, 1.0) for p in parts], backend)
    assert (kept - logits(model, prompts)).abs().max() <= 1e-5
    half = logits(model, prompts, [blend(1, other, 0.5)], backend)
    # one block half-blended: its update is the mean of both blocks' updates on the same input
    acts = interp.capture(model, prompts, ["resid_pre.1", "resid_post.1"], edits=[blend(1, other, 0.5)],
                          backend=backend, progress=False)
    alone = interp.capture(other, prompts, ["resid_post.1"], edits=[replace("resid_pre.1", acts["resid_pre.1"])],
                           progress=False)
    own = interp.capture(model, prompts, ["resid_post.1"], progress=False)
    expected = 0.5 * own["resid_post.1"] + 0.5 * alone["resid_post.1"]
    assert (acts["resid_post.1"] - expected).abs().max() <= 1e-5
    assert (half - swapped).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_edits_at_resid_pre_and_resid_mid_of_one_layer_read_alike(loaded, prompts, arch):
    model = loaded[arch]
    g = torch.Generator().manual_seed(4)
    u, w = torch.randn(model.d_model, generator=g), torch.randn(model.d_model, generator=g)
    edits = [add("resid_pre.1", u), add("resid_mid.1", w)]
    sites = ["resid_pre.1", "attn_out.1", "resid_mid.1", "resid_post.1"]
    a = interp.capture(model, prompts, sites, edits=edits, backend="bridge", progress=False)
    b = interp.capture(model, prompts, sites, edits=edits, backend="nnsight", progress=False)
    for s in sites:
        assert (a[s] - b[s]).abs().max() <= 1e-5, s
    # attn_out is the attention's own output on the edited input; resid_mid carries both edits
    assert torch.allclose(a["resid_mid.1"], (a["resid_pre.1"] + a["attn_out.1"] + w) * a.mask[..., None], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_nearest_adds_the_vector_of_each_positions_nearest_centroid(loaded, prompts, backend):
    from interp.intervene import add_nearest

    model = loaded["gpt2"]
    clean = interp.capture(model, prompts, ["resid_post.1"], progress=False)["resid_post.1"]  # [prompt, pos, d]
    g = torch.Generator().manual_seed(5)
    centroids = torch.stack([clean[0, 0], clean[-1, 1], 10 * torch.randn(model.d_model, generator=g)])
    vectors = torch.randn(3, model.d_model, generator=g)
    edit = add_nearest("resid_post.1", centroids, vectors, 2.0)
    edited = interp.capture(model, prompts, ["resid_post.1"], edits=[edit], backend=backend, padding_side="left",
                            progress=False)["resid_post.1"]
    nearest = torch.cdist(clean.double(), centroids.double()).argmin(-1)
    real = torch.arange(clean.shape[1])[None] < torch.tensor([len(p) for p in prompts])[:, None]
    assert nearest[real].unique().tolist() == [0, 1]  # both data centroids are used, the far one never
    assert (edited - clean - 2.0 * vectors[nearest])[real].abs().max() <= 1e-4
    one = add_nearest("resid_post.1", centroids[:1], vectors[:1], positions="last")
    plain = add("resid_post.1", vectors[0], positions="last")
    assert (logits(model, prompts, [one], backend) - logits(model, prompts, [plain], backend)).abs().max() <= 1e-5
    with pytest.raises(interp.errors.UnsupportedEdit, match="same shape"):
        add_nearest("resid_post.1", centroids, vectors[:2])
