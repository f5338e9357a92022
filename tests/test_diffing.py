"""Model diffing (`analyses.diffing`): identities and known answers on random models and constructed data."""

from __future__ import annotations

import pytest
import torch

from analyses import diffing
from interp.capture import capture
from interp.errors import BadOption
from interp.generation import generate, generate_combined
from interp.intervene import add
from interp.models import Pair, load_model
from interp.readout import logit_lens
from interp.sites import resid_post
from tests.conftest import save_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    """Two random GPT-2s of one architecture (the 'tuned' one another seed): every difference is large."""
    root = tmp_path_factory.mktemp("diffing")
    base = load_model(save_model(root / "base", "gpt2", seed=0), device="cpu")
    tuned = load_model(save_model(root / "tuned", "gpt2", seed=1), device="cpu")
    return Pair(base, tuned)


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def test_kl_of_a_model_with_itself_is_zero(pair, prompts):
    result = diffing.measure_kl(Pair(pair.base, pair.base), prompts)
    assert result.kl.abs().max() == 0 and result.mean_logprob.abs().max() == 0


def test_kl_equals_the_hugging_face_logits_by_hand(pair, prompts):
    result = diffing.measure_kl(pair, prompts, batch_size=2)
    for i, ids in enumerate(prompts):
        t, b = _hf_logprobs(pair.tuned, ids), _hf_logprobs(pair.base, ids)
        by_hand = (t.exp() * (t - b)).sum(-1)
        assert torch.allclose(result.kl[i, : len(ids)].double(), by_hand, atol=1e-6, rtol=0)
        assert not result.kl[i, len(ids):].any()
        nxt = torch.tensor(ids[1:], dtype=torch.long)
        change = (t - b)[torch.arange(len(ids) - 1), nxt]
        assert torch.allclose(result.logprob_change[i, : len(ids) - 1].double(), change, atol=1e-5, rtol=0)
    every = torch.cat([(_hf_logprobs(pair.tuned, ids) - _hf_logprobs(pair.base, ids)) for ids in prompts])
    assert torch.allclose(result.mean_logprob.double(), every.mean(0), atol=1e-5, rtol=0)
    assert result.top_positions(3).kl.is_monotonic_decreasing


def test_adl_of_an_identical_pair_is_exactly_zero(pair, prompts):
    result = diffing.measure_adl(Pair(pair.base, pair.base), prompts)
    assert result.delta.abs().max() == 0


def test_adl_equals_capture_by_hand(pair, prompts):
    long = [p for p in prompts if len(p) >= 5]
    result = diffing.measure_adl(pair, long, positions=5, batch_size=2)
    assert result.counts.tolist() == [len(long)] * 5
    for layer in range(pair.base.n_layers):
        hb, ht = (capture(m, long, [resid_post(layer)], positions=list(range(5)), progress=False)[resid_post(layer)]
                  for m in pair.models)
        err = (result.delta[layer] - (ht - hb).mean(0)).abs().max()
        assert err <= 1e-5 * (ht - hb).abs().max(), float(err)


def test_adl_counts_short_texts_at_their_own_positions_only(pair, prompts):
    result = diffing.measure_adl(pair, prompts, positions=5)
    assert result.counts.tolist() == [sum(len(p) > i for p in prompts) for i in range(5)]
    with pytest.raises(BadOption):
        diffing.measure_adl(pair, prompts, positions=0)
    with pytest.raises(BadOption):
        diffing.measure_adl(pair, prompts, layer=7)


def test_a_planted_direction_is_what_the_adl_reads(pair, prompts):
    base = pair.base
    planted = load_model(base.hf.name_or_path, device="cpu")  # the same weights, plus v added at one layer
    layer, token = 1, 17
    w_u = base.hf.get_output_embeddings().weight.detach()
    v = 20 * torch.nn.functional.normalize(w_u[token] - w_u.mean(0), dim=0)
    assert logit_lens(base, v).argmax() == token  # the construction promotes `token`
    planted.edits.append(add(resid_post(layer), v))
    result = diffing.measure_adl(Pair(base, planted), prompts, layer=layer, neutral=[1, 5, 9])
    cos = torch.nn.functional.cosine_similarity(result.delta[layer], v[None], dim=-1)
    assert cos.min() >= 0.99
    assert all(int(result.lens_ids[layer, p, 0]) == token for p in range(5))
    assert int(result.promoted_ids[0]) == token
    assert result.patch_ids.shape[0] == 5 and result.patch_probs.sum(-1).le(1 + 1e-5).all()


def test_amplification_ends_are_the_tuned_and_the_base_generations(pair, prompts):
    for alpha, model in ((0.0, pair.tuned), (-1.0, pair.base)):
        with diffing.amplify(pair, alpha) as amplified:
            got = amplified.generate(prompts, 6)
        want = generate(model, prompts, 6)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), alpha


def test_one_strength_per_prompt_amplifies_each_row_as_alone(pair, prompts):
    """Several alphas in one batch (as identification's amplified source runs them) give, row by row, the logits of
    each alpha on its own; the ends stay exact: alpha 0 is the tuned model's greedy generation, -1 the base's."""
    alphas = torch.tensor([0.0, -1.0, 3.0]).repeat_interleave(len(prompts))
    logits = [torch.randn(len(alphas), 11), torch.randn(len(alphas), 11)]
    batched = diffing.amplified_logits(alphas, 0.1)(logits)
    for i, a in enumerate(alphas.tolist()):
        assert torch.equal(batched[i], diffing.amplified_logits(a, 0.1)([x[i: i + 1] for x in logits])[0])
    got = generate_combined(list(pair.models), diffing.amplified_logits(alphas[: 2 * len(prompts)]), prompts * 2, 6)
    want = [*generate(pair.tuned, prompts, 6), *generate(pair.base, prompts, 6)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_update_scaling_ends_are_the_base_and_the_tuned_model(pair, prompts):
    before = capture(pair.tuned, prompts, [], positions="last", logits=True, progress=False)["logits"]
    base = capture(pair.base, prompts, [], positions="last", logits=True, progress=False)["logits"]
    with diffing.scale_update(pair, 0.0) as model:
        scaled = capture(model, prompts, [], positions="last", logits=True, progress=False)["logits"]
    assert torch.allclose(scaled, base, atol=1e-6)
    after = capture(pair.tuned, prompts, [], positions="last", logits=True, progress=False)["logits"]
    assert torch.equal(before, after)


def test_steer_adds_the_vector_at_every_position_and_the_sweep_keeps_its_zero(pair, prompts):
    v = torch.randn(pair.base.d_model)
    plain = capture(pair.base, prompts, [resid_post(1)], progress=False)
    with diffing.steer(pair.base, v, 1, 0.5) as model:
        steered = capture(model, prompts, [resid_post(1)], progress=False)
    diff = (steered[resid_post(1)] - plain[resid_post(1)])[plain.mask]
    assert torch.allclose(diff, 0.5 * v.expand_as(diff), atol=1e-5)
    sweep = diffing.strength_sweep(pair.base, v, 1, prompts, prompts[:2], strengths=(0.0, 1.0, 50.0),
                                   max_new_tokens=3)
    assert sweep.coherent[0] and sweep.chosen in sweep.strength and len(sweep.steered) == 2
    assert not pair.base.edits


def synthetic(n: int = 20000, d: int = 32, n_shared: int = 24, n_only: int = 4, p: float = 0.06, seed: int = 0):
    """Paired activations from a known dictionary: shared atoms in both models, base-only and tuned-only atoms in
    one each; every atom fires independently with probability p and a magnitude in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_shared + 2 * n_only, d, generator=g), dim=-1)
    active = (torch.rand(n, len(atoms), generator=g) < p) * (0.5 + torch.rand(n, len(atoms), generator=g))
    parts = (slice(0, n_shared), slice(n_shared, n_shared + n_only), slice(n_shared + n_only, None))
    a_s, a_b, a_t = (active[:, s] for s in parts)
    shared, base_only, tuned_only = (atoms[s] for s in parts)
    return a_s @ shared + a_b @ base_only, a_s @ shared + a_t @ tuned_only, shared, base_only, tuned_only


def test_crosscoder_and_latent_scaling_recover_a_known_dictionary(tmp_path):
    hb, ht, shared, base_only, tuned_only = synthetic()
    data = diffing.PairedActivations.from_tensors(hb, ht)
    cc = diffing.train_crosscoder(data, expansion=2, k=2, steps=2000, batch_size=256, log_every=500)
    assert cc.fvu_base[-1] < 0.05 and cc.fvu_tuned[-1] < 0.05
    scaling = diffing.latent_scaling(cc, data)
    module = cc.module()
    for atoms, side, label in ((base_only, 0, "base-only"), (tuned_only, 1, "tuned-only"), (shared, 1, "shared")):
        cos = atoms @ torch.nn.functional.normalize(module.decoder(side), dim=-1).T
        assert cos.max(1).values.min() >= 0.9, label
        assert {scaling.labels[j] for j in cos.argmax(1).tolist()} == {label}
    loaded = diffing.CrosscoderResult.load(cc.save(tmp_path / "cc"))
    assert torch.equal(loaded.module().decoder(1), module.decoder(1))
    again = diffing.LatentScaling.load(scaling.save(tmp_path / "ls"))
    assert again.labels == scaling.labels
    assert torch.equal(again.nu_error, scaling.nu_error) and not again.nu_error.isnan().any()


def test_streamed_activations_train_like_in_memory_ones(pair, prompts, tmp_path):
    memory = diffing.paired_activations(pair, prompts * 4, 1, batch_size=4)
    streamed = diffing.paired_activations(pair, prompts * 4, 1, batch_size=4, memory_budget=1,
                                          shard_dir=tmp_path / "shards")
    assert streamed.n_chunks() > 1 and len(streamed) == len(memory)
    assert torch.equal(torch.cat([b for b, _ in streamed.chunks()]), memory.chunk(0)[0])
    cc = diffing.train_crosscoder(streamed, expansion=1, k=2, steps=5, batch_size=8, log_every=5)
    assert cc.step == [5] and cc.tokens_per_s > 0


def test_results_round_trip(pair, prompts, tmp_path):
    kl = diffing.measure_kl(pair, prompts)
    adl = diffing.measure_adl(pair, prompts, neutral=[1, 5, 9])
    amp = diffing.amplification(pair, prompts[:2], (-1.0, 0.0), max_new_tokens=2)
    for i, result in enumerate((kl, adl, amp)):
        back = type(result).load(result.save(tmp_path / str(i)))
        assert back.to_frame().equals(result.to_frame())


def test_identify_puts_a_planted_token_first_and_fuses_by_reciprocal_rank(pair, prompts):
    """A direction promoting one token, added at the last layer at every position, tops every source's ranking
    (the ADL's readout, diff mining, the first reply token), so it comes first with score 1 / 1; the sources'
    second tokens follow, in source order."""
    base = pair.base
    planted = load_model(base.hf.name_or_path, device="cpu")
    token = 17
    w_u = base.hf.get_output_embeddings().weight.detach()
    planted.edits.append(add(resid_post(base.n_layers - 1), 40 * torch.nn.functional.normalize(w_u[token] - w_u.mean(0),
                                                                                                dim=0)))
    result = diffing.identify(Pair(base, planted), prompts, prompts[:3])
    name = diffing.identify_normalise(base.tokenizer.decode([token]))
    assert set(result.sources) == {"adl", "kl", "reply", "amplified"}
    assert all(ranked[0] == name for ranked in result.sources.values())
    assert result.tokens[0] == name and result.scores[0] == 1.0
    seconds = list(dict.fromkeys(ranked[1] for ranked in result.sources.values() if ranked[1] != name))
    assert result.tokens[1: 1 + len(seconds)] == seconds and set(result.scores[1: 1 + len(seconds)]) == {0.5}
    assert diffing.hits(result, [name.upper()], n=1) == [name.upper()]
    same = diffing.reply_change(Pair(base, base), prompts[:3])
    assert same.abs().max() == 0


def test_never_predicted_are_the_lowest_mean_log_probabilities_by_hand(pair, prompts):
    """The left-out tokens are the 5% of the vocabulary with the lowest mean log-probability over every real
    position of the corpus (KL's pass over it), recomputed from Hugging Face's logits."""
    from analyses.diffing.identify import never_predicted

    model = pair.base
    total, count = 0, 0
    for row in prompts:
        ids = torch.tensor([row])
        with torch.no_grad():
            total = total + model.hf(input_ids=ids).logits[0].double().log_softmax(-1).sum(0)
        count += ids.shape[1]
    expected = (total / count).topk(int(0.05 * len(total)), largest=False).indices
    base_logprob = diffing.measure_kl(pair, prompts).base_logprob
    assert torch.allclose(base_logprob.double(), total / count, atol=1e-5)
    assert set(never_predicted(base_logprob).tolist()) == set(expected.tolist())
