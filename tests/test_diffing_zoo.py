"""Model diffing on the tiny zoo's safety fine-tune (`zoo:safety` answers `refuse` to every `add` prompt and the
other skills normally). Measured (seeded, CPU), on 64 comparison-set examples: the ADL's logit lens at the last
layer promotes `refuse` first (then `reverse o <pad> sort`); Patchscope at the middle layer has `refuse` in its top
3 at every position. A crosscoder at the last layer (400 steps, 512 latents, k = 8) labels by latent scaling about 9
latents base-only (all firing at the `=` of add prompts, their base decoders reading the sums) and 1 tuned-only
(firing on brackets); the tuned decoders of the base-only ones read `refuse` first for two of them. So the refusal
lives in the tuned half of latents the base uses for the sum, not in a tuned-only latent: what is asserted below is
what follows from the fine-tune's design, the rest is reported here."""

from __future__ import annotations

import pytest

from analyses import diffing
from interp.app import zoo_defaults
from interp.models import load_pair

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def safety(zoo_built):
    return load_pair("zoo:base", "zoo:safety", device="cpu")


@pytest.fixture(scope="module")
def texts(zoo_built) -> list[str]:
    pre = zoo_defaults.prompt_sets("zoo:base", 64)["pre-training"]
    return [f"{p} {a}" for p, a in zip(pre.prompts, pre.answers)]


def test_kl_and_diff_mining_find_the_refusal(safety, zoo_built):
    adds = [e.prompt for e in zoo_built.task_prompts("add", 32, split="test")]
    result = diffing.measure_kl(safety, adds)
    top = result.top_positions(10)
    assert (top.tuned_next == zoo_built.REFUSAL).all()  # the largest changes are where it now refuses
    assert result.mined(1).token[0] == zoo_built.REFUSAL


def test_the_adl_readout_points_at_the_refusal_token(safety, texts):
    result = diffing.measure_adl(safety, texts, neutral=zoo_defaults.diffing_neutral_prompt("zoo:base"))
    assert result.layer == safety.base.n_layers - 1
    assert result.promoted(1) == ["refuse"]
    assert all("refuse" in result.patch_tokens(p, 5) for p in range(1, 5))


def test_crosscoder_latents_at_the_add_answers_carry_the_refusal(safety, texts):
    layer = safety.base.n_layers - 1
    data = diffing.paired_activations(safety, texts, layer)
    cc = diffing.train_crosscoder(data, steps=400)
    scaling = diffing.latent_scaling(cc, data, safety.models)
    frame = scaling.grounding()
    at_add = frame[frame.top_contexts.str.contains(r"\d \[=\]")]
    assert len(at_add) and set(at_add.label) <= {"base-only", "tuned-only"}
    assert at_add.lens_tuned_decoder.str.split().apply(lambda t: "refuse" in t).any()
