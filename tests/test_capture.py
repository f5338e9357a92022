"""Capture: agreement with Hugging Face's own forward, between backends, across padding, shards, gradients."""

import sys

import pytest
import torch

import interp
from interp.backends.nnsight_backend import architecture
from interp.sites import every_layer

from conftest import ARCHS

BACKENDS = ("bridge", "nnsight")


@pytest.fixture(scope="module")
def loaded(model_dirs):
    return {arch: interp.load_model(model_dirs[arch]) for arch in ARCHS}


def unpadded_reference(model, prompt: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """resid_post of every layer and the final-norm output, from HF run on the prompt alone."""
    layers = model.hf.get_submodule(architecture(model.hf).layers)
    seen = []
    handle = layers[-1].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hidden = model.hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    handle.remove()
    return [h[0] for h in hidden[1:-1]] + [seen[0][0]], hidden[-1][0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ("left", "right"))
def test_resid_post_matches_unpadded_hf(loaded, prompts, arch, backend, side):
    model = loaded[arch]
    acts = interp.capture(model, prompts, every_layer("resid_post", model.n_layers) + ["final"],
                          backend=backend, padding_side=side, batch_size=5, progress=False)
    worst = 0.0
    for i, prompt in enumerate(prompts):
        per_layer, final = unpadded_reference(model, prompt)
        n = len(prompt)
        for layer, ref in enumerate(per_layer):
            worst = max(worst, (acts[f"resid_post.{layer}"][i, :n] - ref).abs().max().item())
        worst = max(worst, (acts["final"][i, :n] - final).abs().max().item())
        assert acts[f"resid_post.0"][i, n:].abs().max() == 0 if n < acts["final"].shape[1] else True
    assert worst <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_sum_to_attn_out(loaded, prompts, arch, backend):
    model = loaded[arch]
    acts = interp.capture(model, prompts, ["head_out.1", "attn_out.1"], backend=backend, progress=False)
    o_proj = model.hf.get_submodule(f"{architecture(model.hf).layers}.1.{architecture(model.hf).o_proj}")
    bias = o_proj.bias if o_proj.bias is not None else torch.zeros(model.d_model)
    mask = acts.mask[..., None]
    diff = (acts["head_out.1"].sum(2) + bias - acts["attn_out.1"]) * mask
    assert acts["head_out.1"].shape[2] == model.n_heads
    assert diff.abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_backends_agree_on_every_site_kind(loaded, prompts, arch):
    model = loaded[arch]
    sites = ["embed", "resid_pre.1", "head_out.1", "attn_pattern.1", "attn_out.1", "resid_mid.1", "mlp_out.1",
             "resid_post.2", "final"]
    a = interp.capture(model, prompts, sites, backend="bridge", padding_side="left", logits=True, progress=False)
    b = interp.capture(model, prompts, sites, backend="nnsight", padding_side="right", logits=True, progress=False)
    for key in sites + ["logits"]:
        assert (a[key] - b[key]).abs().max() <= 1e-5, key
    pattern = a["attn_pattern.1"]
    assert pattern.shape == (len(prompts), model.n_heads, acts_width(a), acts_width(a))
    rows = pattern.sum(-1)  # each real query's attention sums to one, pads are zero
    assert torch.allclose(rows, a.mask[:, None, :].float().expand_as(rows), atol=1e-5)


def acts_width(acts) -> int:
    return acts.mask.shape[1]


def test_residual_identities(loaded, prompts):
    model = loaded["llama"]
    acts = interp.capture(model, prompts, ["resid_pre.1", "attn_out.1", "resid_mid.1", "mlp_out.1", "resid_post.1",
                                           "resid_pre.2", "embed", "resid_pre.0"], progress=False)
    assert torch.allclose(acts["resid_pre.1"] + acts["attn_out.1"], acts["resid_mid.1"], atol=1e-5)
    assert torch.allclose(acts["resid_mid.1"] + acts["mlp_out.1"], acts["resid_post.1"], atol=1e-5)
    assert torch.equal(acts["resid_post.1"], acts["resid_pre.2"])
    assert torch.equal(acts["embed"], acts["resid_pre.0"])


def test_position_selections_agree_with_all(loaded, prompts):
    model = loaded["gpt2"]
    lengths = torch.tensor([len(p) for p in prompts])
    full = interp.capture(model, prompts, ["resid_post.1", "attn_pattern.0"], progress=False)
    last = interp.capture(model, prompts, ["resid_post.1", "attn_pattern.0"], positions="last", progress=False)
    first_last = interp.capture(model, prompts, ["resid_post.1"], positions=[0, -1], progress=False)
    mask = torch.zeros(full.mask.shape, dtype=torch.bool)
    mask[:, 2] = True
    picked = interp.capture(model, prompts, ["resid_post.1"], positions=mask, progress=False)
    rows = torch.arange(len(prompts))
    assert torch.equal(last["resid_post.1"], full["resid_post.1"][rows, lengths - 1])
    assert torch.equal(last["attn_pattern.0"], full["attn_pattern.0"][rows, :, lengths - 1])
    assert torch.equal(first_last["resid_post.1"][:, 0], full["resid_post.1"][:, 0])
    assert torch.equal(first_last["resid_post.1"][:, 1], last["resid_post.1"])
    keep = lengths > 2  # prompts shorter than 3 tokens have no position 2
    assert torch.equal(picked["resid_post.1"], full["resid_post.1"][keep, 2])
    assert picked.selected.tolist() == [[int(i), 2] for i in rows[keep]]
    assert full.tokens_of("resid_post.1").shape == (int(lengths.sum()), model.d_model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_finite_differences(loaded, prompts, backend):
    model = loaded["gpt2"]
    target = 7

    def metric(logits, batch):
        return logits[torch.arange(len(batch.lengths)), batch.lengths - 1, target].sum()

    sites = ["resid_pre.1", "head_out.0", "resid_mid.2"]
    acts = interp.capture(model, prompts, sites, metric=metric, backend=backend, progress=False)
    other = interp.capture(model, prompts, sites, metric=metric,
                           backend=[b for b in BACKENDS if b != backend][0], progress=False)
    for s in sites:
        assert (acts.grad(s) - other.grad(s)).abs().max() <= 1e-5
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    eps = 1e-3
    plus = interp.capture(model, prompts, [], edits=[interp.add("resid_pre.1", direction, eps, positions=[0])],
                          positions="last", logits=True, progress=False)["logits"][:, target].sum()
    minus = interp.capture(model, prompts, [], edits=[interp.add("resid_pre.1", direction, -eps, positions=[0])],
                           positions="last", logits=True, progress=False)["logits"][:, target].sum()
    numeric = (plus - minus) / (2 * eps)
    analytic = (acts.grad("resid_pre.1")[:, 0] @ direction).sum()
    assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(float(analytic)))


def test_streams_to_shards_and_resumes(loaded, prompts, tmp_path, monkeypatch):
    model = loaded["gpt2"]
    sites = ["resid_post.0", "head_out.1"]
    in_memory = interp.capture(model, prompts, sites, batch_size=2, progress=False)
    with pytest.raises(MemoryError, match="shard_dir"):
        interp.capture(model, prompts, sites, batch_size=2, memory_budget=1000, progress=False)
    sharded = interp.capture(model, prompts, sites, batch_size=2, memory_budget=1000, shard_dir=tmp_path,
                             progress=False)
    assert sharded.shard_dir is not None and len(list(tmp_path.glob("shard-*"))) == 3
    for s in sites:
        assert torch.equal(sharded[s], in_memory[s])
    # interrupted capture: one shard lost; the rerun computes only that batch
    (tmp_path / "shard-00000002.safetensors").unlink()
    capture_module = sys.modules["interp.capture"]
    calls = []
    real_run = capture_module.run
    monkeypatch.setattr(capture_module, "run", lambda *a, **k: calls.append(a[1].index.tolist()) or real_run(*a, **k))
    resumed = interp.capture(model, prompts, sites, batch_size=2, memory_budget=1000, shard_dir=tmp_path,
                             progress=False)
    assert calls == [[2, 3]]
    assert torch.equal(resumed["head_out.1"], in_memory["head_out.1"])
    # a different capture into the same folder starts afresh instead of mixing shards
    calls.clear()
    interp.capture(model, prompts, ["resid_post.1"], batch_size=2, memory_budget=1000, shard_dir=tmp_path,
                   progress=False)
    assert len(calls) == 3


def test_memory_estimate_of_a_mask_counts_real_tokens_only(loaded, prompts):
    """A position mask as wide as the context (as steering builds them) is sized by the real tokens it selects:
    a budget just over that size captures in memory, one just under asks for a shard folder."""
    model = loaded["gpt2"]
    tokens = interp.tokenize(model.tokenizer, prompts, max_length=model.n_ctx)
    mask = torch.ones(len(prompts), model.n_ctx, dtype=torch.bool)
    n_real = int(tokens.lengths.sum())
    size = n_real * model.d_model * 4  # float32, one resid_post site
    acts = interp.capture(model, tokens, ["resid_post.0"], positions=mask, memory_budget=size, progress=False)
    assert acts["resid_post.0"].shape == (n_real, model.d_model)
    with pytest.raises(MemoryError, match="shard_dir"):
        interp.capture(model, tokens, ["resid_post.0"], positions=mask, memory_budget=size - 1, progress=False)


def test_resume_key_tells_apart_edits_that_differ_only_inside_a_large_tensor(loaded, prompts, tmp_path):
    """torch abbreviates large tensors in repr with '...'; two replace edits that differ only there must not share
    a resume key (the old key hashed repr(edit) and returned the first run's shards, off by up to 5.0)."""
    model = loaded["gpt2"]
    first = interp.capture(model, prompts, ["resid_pre.1"], progress=False)["resid_pre.1"]
    second = first.clone()
    second[..., 3:-3] += 5.0  # the middle of every row, which repr prints as "..."
    assert repr(interp.replace("resid_pre.1", first)) == repr(interp.replace("resid_pre.1", second))
    kw = dict(batch_size=2, memory_budget=1000, shard_dir=tmp_path, progress=False)
    interp.capture(model, prompts, ["resid_post.1"], edits=[interp.replace("resid_pre.1", first)], **kw)
    resumed = interp.capture(model, prompts, ["resid_post.1"], edits=[interp.replace("resid_pre.1", second)], **kw)
    fresh = interp.capture(model, prompts, ["resid_post.1"], edits=[interp.replace("resid_pre.1", second)],
                           batch_size=2, progress=False)
    assert torch.equal(resumed["resid_post.1"], fresh["resid_post.1"])


def test_resume_key_tells_apart_metrics(loaded, prompts, tmp_path):
    """A resume with another metric recomputes the gradients (the old key hashed only whether a metric was given)."""
    model = loaded["gpt2"]

    def metric_of(token: int):
        return lambda logits, batch: logits[:, -1, token].sum()

    kw = dict(batch_size=2, memory_budget=1000, shard_dir=tmp_path, progress=False)
    interp.capture(model, prompts, ["resid_post.0"], metric=metric_of(3), **kw)
    resumed = interp.capture(model, prompts, ["resid_post.0"], metric=metric_of(7), **kw)
    fresh = interp.capture(model, prompts, ["resid_post.0"], metric=metric_of(7), batch_size=2, progress=False)
    assert torch.equal(resumed.grad("resid_post.0"), fresh.grad("resid_post.0"))


def test_a_truncated_shard_is_computed_again_on_resume(loaded, prompts, tmp_path):
    model = loaded["gpt2"]
    kw = dict(batch_size=2, memory_budget=1000, shard_dir=tmp_path, progress=False)
    first = interp.capture(model, prompts, ["resid_post.1"], **kw)["resid_post.1"].clone()
    shard = tmp_path / "shard-00000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])  # a shard cut short (a full disk, a killed copy)
    resumed = interp.capture(model, prompts, ["resid_post.1"], **kw)
    assert torch.equal(resumed["resid_post.1"], first)


def test_the_memory_budget_is_read_when_capture_runs(loaded, prompts, monkeypatch):
    monkeypatch.setenv("INTERP_MEMORY_BUDGET", "1000")
    with pytest.raises(interp.InterpError, match="over the memory budget"):
        interp.capture(loaded["gpt2"], prompts, ["resid_post.1"], progress=False)
    monkeypatch.setenv("INTERP_MEMORY_BUDGET", "lots")
    with pytest.raises(interp.InterpError, match="INTERP_MEMORY_BUDGET"):
        interp.capture(loaded["gpt2"], prompts, ["resid_post.1"], progress=False)


def test_a_nan_activation_is_named_where_it_first_appears(model_dirs, prompts):
    """A NaN planted in one weight of layer 1: capture names layer 1's first affected site and the first prompt,
    not a later layer, instead of returning NaN activations (or warns and keeps them with nonfinite='warn')."""
    from conftest import random_model

    model = interp.load_model(model_dirs["gpt2"])
    with torch.no_grad():
        model.hf.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    sites = ["resid_post.0", "resid_post.2", "attn_out.1", "mlp_out.1"]
    with pytest.raises(interp.InterpError, match=r"NaN or inf at mlp_out\.1, first for prompt 0"):
        interp.capture(model, prompts, sites, progress=False)
    with pytest.warns(UserWarning, match="mlp_out.1"):
        acts = interp.capture(model, prompts, sites, progress=False, nonfinite="warn")
    assert torch.isfinite(acts["resid_post.0"]).all() and not torch.isfinite(acts["resid_post.2"]).all()
    assert random_model  # the fixture module is importable here
