"""KV-cached generation: the same tokens as full recompute and as Hugging Face's `generate` under the same edits
(on tiny random models of every family, the tiny zoo and zoo:smol), prompts of different lengths in one batch, both
backends, blends and model-diff amplification; how edit positions are counted; seeded sampling; stop strings."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.errors import BadOption, BadPositions, PromptTooLong, UnsupportedEdit
from interp.generation import _Cached, _pick, _Recompute, _resolve, generate, generate_combined
from interp.intervene import ablate, add, blend, replace, scale
from interp.prompts import as_tokens

from conftest import ARCHS, save_model, word_tokenizer
from test_architectures import FAMILIES, build

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ("bridge", "nnsight")
ZOO_PROMPTS = ["reverse a b c d =", "copy k e =", "sort d a c b e f ="]


@pytest.fixture(scope="module")
def loaded(model_dirs):
    return {arch: interp.load_model(model_dirs[arch]) for arch in ARCHS}


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    """A second random model per architecture, to blend with."""
    root = tmp_path_factory.mktemp("others")
    return {arch: interp.load_model(save_model(root / arch, arch, seed=5)) for arch in ARCHS}


def _vector(model, seed: int) -> torch.Tensor:
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed))


def _edit_sets(model, other) -> dict[str, list]:
    """Edits of every kind of position: all, prompt positions, an absolute mask into the generated tokens, blends."""
    mask = torch.zeros(5, 40, dtype=torch.bool)
    mask[:, 10:14] = True  # inside some prompts, past others' ends: generated tokens
    return {
        "all": [add("resid_post.0", _vector(model, 3), scale=3.0)],
        "prompt": [add("resid_post.1", _vector(model, 4), scale=6.0, positions="last"), ablate("head_out.1.2"),
                   scale("resid_mid.2", 0.2, positions=[0, -2])],
        "mask": [add("attn_out.1", _vector(model, 5), scale=6.0, positions=mask)],
        "blend": [blend(layer, other, 0.3) for layer in range(model.n_layers)] +
                 [blend(part, other, 0.4) for part in ("embed", "final", "unembed")],
    }


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_full_recompute_under_edits_on_both_backends(loaded, others, prompts, arch):
    model = loaded[arch]
    clean = generate(model, prompts, 12)
    for name, edits in _edit_sets(model, others[arch]).items():
        with model.edit(*edits):
            got = {(b, c): generate(model, prompts, 12, backend=b, cache=c) for b in BACKENDS for c in (True, False)}
        reference = got["bridge", False]
        assert all(_same(g, reference) for g in got.values()), name
        assert not _same(reference, clean), f"{name}: the edits should change the generation"
    assert model.edits == []


def _teacher_forced_logits(stepper, ids: torch.Tensor, lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """Next-token logits [step, prompt, vocab] of one stepper along a fixed continuation `ids`."""
    return torch.stack([stepper.next_logits(ids, lengths + t) for t in range(steps)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_logits_equal_recomputed_logits_at_every_step(loaded, others, prompts, backend):
    model = loaded["llama"]
    tokens = as_tokens(model, prompts)
    continuation = generate(model, prompts, 10).ids
    width = int(tokens.lengths.max()) + 10
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, continuation)):
        ids[i, : len(p) + 10] = torch.tensor(p + c.tolist())
    edits = _resolve([e for es in _edit_sets(model, others["llama"]).values() for e in es], tokens.lengths, width)
    with torch.no_grad():
        cached = _teacher_forced_logits(_Cached(model, edits, 0, backend), ids, tokens.lengths, 10)
        full = _teacher_forced_logits(_Recompute(model, edits, 0, backend), ids, tokens.lengths, 10)
    assert (cached - full).abs().max() <= 1e-5 * full.abs().max()


def _hf_generate(model, prompts: list[list[int]], n: int, every: dict[int, torch.Tensor],
                 last: dict[int, torch.Tensor]) -> list[list[int]]:
    """Hugging Face's own greedy `generate` (left-padded, KV-cached) with `every[l]` added to layer l's output at
    every position and `last[l]` at each prompt's last token only: forward hooks on HF's modules."""
    layers = model.hf.get_submodule(model.architecture.layers)

    def hook(vector, prompt_only):
        def add_to(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if prompt_only:  # the prompt's forward: every prompt's last token is the last column
                if h.shape[1] == 1:
                    return output
                h = torch.cat([h[:, :-1], h[:, -1:] + vector], dim=1)
            else:
                h = h + vector
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return add_to

    handles = [layers[l].register_forward_hook(hook(v, False)) for l, v in every.items()]
    handles += [layers[l].register_forward_hook(hook(v, True)) for l, v in last.items()]
    width, pad = max(map(len, prompts)), as_tokens(model, prompts).pad_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    try:
        with torch.no_grad():
            out = model.hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad,
                                    eos_token_id=None)
    finally:
        for h in handles:
            h.remove()
    return out[:, width:].tolist()


def _check_against_hugging_face(model, prompts: list[list[int]], n: int) -> None:
    v, w = 3.0 * _vector(model, 3), 6.0 * _vector(model, 4)
    reference = _hf_generate(model, prompts, n, {0: v}, {1: w})
    with model.edit(add("resid_post.0", v), add("resid_post.1", w, positions="last")):
        for backend in BACKENDS:
            assert [g.tolist() for g in generate(model, prompts, n, backend=backend)] == reference, backend
    assert [g.tolist() for g in generate(model, prompts, n)] != reference  # the edits matter


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_hugging_face_generate_under_the_same_edits(loaded, prompts, arch):
    _check_against_hugging_face(loaded[arch], [p for p in prompts if len(p) > 1], 12)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        build(family).save_pretrained(root / family)
        word_tokenizer().save_pretrained(root / family)
        out[family] = interp.load_model(root / family)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates_the_same_cached_and_recomputed_on_both_backends(families, prompts, family):
    """Sliding windows (4 tokens) included: the generated tokens run past them."""
    model = families[family]
    edits = [add("resid_post.0", 2.0 * _vector(model, 3)), ablate("head_out.1.1", positions="last"),
             scale("resid_mid.1", 0.5)]
    with model.edit(*edits):
        got = [generate(model, prompts, 16, backend=b, cache=c) for b in BACKENDS for c in (True, False)]
    assert all(_same(g, got[0]) for g in got[1:])


def test_edit_positions_count_from_each_prompts_first_token(loaded, prompts):
    """"last" and negative ints name prompt positions only; a boolean mask names absolute positions, generated
    ones included; an int past a prompt's end selects nothing there."""
    from analyses.shift import prompt_positions

    model = loaded["qwen2"]
    lengths = as_tokens(model, prompts).lengths
    v = 6.0 * _vector(model, 7)

    def under(positions):
        with model.edit(add("resid_post.1", v, positions=positions)):
            return generate(model, prompts, 8)

    last = under("last")
    assert _same(last, under(-1)) and _same(last, under(prompt_positions("last", lengths, 32)))
    assert not _same(last, under(prompt_positions("from-last", lengths, 32)))
    assert not _same(last, generate(model, prompts, 8))
    assert _same(under(12), generate(model, prompts, 8))  # no prompt has 13 tokens
    beyond = torch.zeros(len(prompts), 32, dtype=torch.bool)
    beyond[:, 12] = True  # the first generated token of the longest prompt, later ones of the others
    assert not _same(under(beyond), generate(model, prompts, 8))


def test_replace_needs_values_at_every_position_it_reaches(loaded, others, prompts):
    model, other = loaded["llama"], others["llama"]
    donor = interp.capture(other, prompts, ["resid_pre.2"], progress=False)["resid_pre.2"]
    with model.edit(replace("resid_pre.2", donor, positions="last")):
        cached, full = generate(model, prompts, 8), generate(model, prompts, 8, cache=False)
    assert _same(cached, full) and not _same(cached, generate(model, prompts, 8))
    with model.edit(replace("resid_pre.2", donor)), pytest.raises(UnsupportedEdit, match="values cover 12"):
        generate(model, prompts, 2)


def test_sampling_is_reproducible_with_a_seed(loaded, prompts):
    model = loaded["gpt2"]
    runs = {(seed, c): generate(model, prompts, 12, temperature=1.5, seed=seed, cache=c)
            for seed in (0, 1) for c in (True, False)}
    again = generate(model, prompts, 12, temperature=1.5, seed=0)
    assert _same(runs[0, True], again) and _same(runs[0, True], runs[0, False]) and _same(runs[1, True], runs[1, False])
    assert not _same(runs[0, True], runs[1, True])
    assert not _same(runs[0, True], generate(model, prompts, 12))
    assert _same(generate(model, prompts, 12, temperature=1.5, top_p=1e-9), generate(model, prompts, 12))


def test_top_p_draws_from_the_nucleus_in_proportion():
    """p = (0.5, 0.3, 0.15, 0.05): top_p 0.7 keeps the first two, drawn 5:3."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20_000, 4)
    draws = _pick(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    share = torch.bincount(draws, minlength=4) / len(draws)
    assert share[2:].sum() == 0 and abs(float(share[0]) - 0.625) < 0.01
    full = torch.bincount(_pick(logits, 1.0, 1.0, torch.Generator().manual_seed(0)), minlength=4) / len(draws)
    assert (full - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.01


def test_stop_strings_cut_the_text_and_the_ids(loaded, prompts):
    model = loaded["gpt2"]
    decode = model.tokenizer.decode
    full = generate(model, prompts, 12)
    word = decode([int(full[0][4])])
    stop = f" {word} "  # a whole word of the first row's continuation, not a prefix of another word
    cut = generate(model, prompts, 12, stop=stop)
    for i, ids in enumerate(full):
        text = decode(ids.tolist())
        if stop not in text:
            assert cut.stops[i] is None and torch.equal(cut[i], ids) and cut.texts[i] == text
            continue
        n = next(k for k in range(1, 13) if stop in decode(ids[:k].tolist()))
        assert cut.stops[i] == stop and torch.equal(cut[i], ids[:n])
        assert cut.texts[i] == text[: text.index(stop)] and stop not in cut.texts[i]
    assert cut.stops[0] == stop and len(cut[0]) <= 6
    assert full.texts == [decode(ids.tolist()) for ids in full] and full.stops == [None] * len(prompts)


def test_bad_options_and_a_generation_past_the_context_say_what_to_do(loaded, prompts):
    model = loaded["gpt2"]
    for kwargs in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"stop": [""]}):
        with pytest.raises(BadOption):
            generate(model, prompts, 2, **kwargs)
    with pytest.raises(BadOption):
        generate(model, prompts, -1)
    with pytest.raises(PromptTooLong, match="context of 32"):
        generate(model, prompts, 21)  # the longest prompt has 12 tokens
    two_rows = torch.ones(2, 9, dtype=torch.bool)
    with model.edit(add("resid_post.0", _vector(model, 1), positions=two_rows)), pytest.raises(BadPositions):
        generate(model, prompts, 2)
    assert [len(g) for g in generate(model, prompts, 0)] == [0] * len(prompts)


def test_model_diff_amplification_is_cached_too(loaded, others, prompts):
    from analyses.diffing.amplify import amplified_logits

    base, tuned = others["gpt2"], loaded["gpt2"]
    with tuned.edit(add("resid_post.0", _vector(tuned, 2), scale=2.0)):
        for alpha in (-1.0, 0.0, 1.5):
            got = [generate_combined([base, tuned], amplified_logits(alpha), prompts, 10, cache=c, backend=b)
                   for c in (True, False) for b in BACKENDS]
            assert all(_same(g, got[0]) for g in got[1:])
        assert _same(generate_combined([base, tuned], amplified_logits(0.0), prompts, 10), generate(tuned, prompts, 10))
    assert _same(generate_combined([base, tuned], amplified_logits(-1.0), prompts, 10), generate(base, prompts, 10))


def test_amplification_keeps_only_the_tuned_models_plausible_tokens():
    """Contrastive decoding's constraint: tokens with p_tuned < plausible * max p_tuned are at -inf, the others
    carry (1 + alpha) l_tuned - alpha l_base unchanged; the tuned argmax is always kept."""
    from analyses.diffing.amplify import amplified_logits

    torch.manual_seed(0)
    base, tuned = torch.randn(3, 50), torch.randn(3, 50) * 3
    free, constrained = amplified_logits(2.0)([base, tuned]), amplified_logits(2.0, 0.1)([base, tuned])
    p = tuned.softmax(-1)
    kept = p >= 0.1 * p.max(-1, keepdim=True).values
    assert torch.equal(constrained[kept], free[kept]) and torch.isinf(constrained[~kept]).all()
    assert kept[torch.arange(3), tuned.argmax(-1)].all() and 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(amplified_logits(2.0, 0.0)([base, tuned]), 3 * tuned - 2 * base)


def test_tiny_zoo_steered_generation_matches_recompute_and_hugging_face(zoo_built):
    from analyses import tuco

    pair = interp.load_pair("zoo:base", "zoo:full")
    ids = [pair.base.tokenizer(p)["input_ids"] for p in ZOO_PROMPTS]
    _check_against_hugging_face(pair.base, ids, 8)
    with tuco.steer(pair, alpha=0.5) as steered:
        got = [generate(steered, ZOO_PROMPTS, 8, backend=b, cache=c) for b in BACKENDS for c in (True, False)]
    assert all(_same(g, got[0]) for g in got[1:])
    unmerged = interp.load_model("zoo:lora-r8", merge=False, backend="nnsight")
    assert _same(generate(unmerged, ZOO_PROMPTS, 8), generate(unmerged, ZOO_PROMPTS, 8, cache=False))


@pytest.fixture(scope="module")
def smol(smol_zoo):
    return interp.load_model("zoo:smol")


def test_smol_cached_generation_matches_recompute_and_hugging_face(smol):
    prompts = [smol.tokenizer(p)["input_ids"] for p in
               ("The capital of France is", "Water boils at a temperature of", "1, 2, 3,")]
    _check_against_hugging_face(smol, prompts, 12)
    with smol.edit(add("resid_post.12", 3.0 * _vector(smol, 3), positions="last"), scale("mlp_out.20", 0.5)):
        cached = {b: generate(smol, prompts, 12, backend=b) for b in BACKENDS}
        full = generate(smol, prompts, 12, cache=False)
    assert _same(cached["bridge"], full) and _same(cached["nnsight"], full)


def test_smol_samples_reproducibly_and_stops_at_a_stop_string(smol):
    prompt = ["Here is a list of three fruits: apple,"]
    a, b = (generate(smol, prompt, 16, temperature=0.8, top_p=0.9, seed=3) for _ in range(2))
    assert _same(a, b) and not _same(a, generate(smol, prompt, 16, temperature=0.8, top_p=0.9, seed=4))
    full = generate(smol, prompt, 16)
    stopped = generate(smol, prompt, 16, stop=",")
    assert "," in full.texts[0] and stopped.stops == [","]
    assert stopped.texts[0] == full.texts[0][: full.texts[0].index(",")]
