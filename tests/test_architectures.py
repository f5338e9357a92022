"""Every supported decoder family, site by site, through both backends.

Each family is a tiny random-weight model built from its own config class (2 layers, d_model 32, 4 heads, 2 KV heads
where the family has them, sliding windows of 4 tokens where it has them, so they cut into the 12-token prompt).
For each: capture of every site kind against Hugging Face's own forward on each prompt alone (left- and
right-padded batches), the residual identities, per-head outputs summing to attn_out, the two backends equal at
every site, under every edit kind and in gradients (attention patterns included), and edits that mean what they say
on HF's own modules.

The reference below names, per family, the HF module whose output each branch adds to the residual stream: an
independent statement of the layouts that `interp.backends.architectures` encodes for the backends.
- pre-norm (GPT-2, Llama, Mistral, Qwen2/3, Phi-3): attn_out is the attention's output, resid_mid the pre-MLP norm's input;
- sandwich norms (Gemma 2/3) and post-norms (OLMo 2): attn_out / mlp_out are the post-norms' outputs (what is added);
  head_out is each head's share of attn_out with the post-norm's scale taken from the whole attention output
  (the norm is linear once its per-position scale is fixed), so the heads still sum to attn_out exactly;
- parallel residual (GPT-NeoX): both branches read resid_pre; resid_mid is defined as resid_pre + attn_out (the
  stream after the attention branch alone), so resid_mid + mlp_out = resid_post still holds.

Prompts are token ids: transformers 5 rebuilds any qwen2-type tokenizer as byte-level BPE, which splits the
word-level test vocabulary into bytes it does not have (the word tokenizer is still saved, so loading is exercised).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import interp
from interp.intervene import ablate, add, add_nearest, blend, project_onto, project_out, replace, scale

from conftest import VOCAB, word_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ("bridge", "nnsight")
SIDES = ("left", "right")
N_LAYERS, D_MODEL, N_HEADS = 2, 32, 4
TOL = 1e-5  # relative to the reference's largest value


def _config(family: str):
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False)
    dec = dict(hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
               num_key_value_heads=2, max_position_embeddings=32, **common)
    window = dict(sliding_window=4)
    return {
        "gpt2": lambda: T.GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, n_positions=32, **common),
        "llama": lambda: T.LlamaConfig(**dec),
        "mistral": lambda: T.MistralConfig(**window, **dec),
        "qwen2": lambda: T.Qwen2Config(use_sliding_window=True, max_window_layers=1, **window, **dec),
        "qwen3": lambda: T.Qwen3Config(head_dim=8, use_sliding_window=True, max_window_layers=1, **window, **dec),
        "gemma2": lambda: T.Gemma2Config(head_dim=8, query_pre_attn_scalar=8, **window, **dec),
        "gemma3": lambda: T.Gemma3TextConfig(head_dim=8, query_pre_attn_scalar=8, **window,
                                             layer_types=["sliding_attention", "full_attention"], **dec),
        "phi3": lambda: T.Phi3Config(**window, **dec),
        "olmo2": lambda: T.Olmo2Config(**dec),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                            num_attention_heads=N_HEADS, max_position_embeddings=32, rotary_pct=0.5,
                                            use_parallel_residual=True, **common),
        "gpt_neox_sequential": lambda: T.GPTNeoXConfig(
            hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
            max_position_embeddings=32, rotary_pct=0.5, use_parallel_residual=False, **common),
    }[family]()


FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "gpt_neox",
            "gpt_neox_sequential")
PRE_NORM = ("self_attn", "mlp", "post_attention_layernorm", "self_attn.o_proj")
SANDWICH = ("post_attention_layernorm", "post_feedforward_layernorm", "pre_feedforward_layernorm", "self_attn.o_proj")
REFERENCE = {
    # family: (module whose output is attn_out, ... is mlp_out, module whose input is resid_mid (None: parallel),
    #          the attention's output projection), all relative to a decoder layer
    "gpt2": ("attn", "mlp", "ln_2", "attn.c_proj"),
    "llama": PRE_NORM, "mistral": PRE_NORM, "qwen2": PRE_NORM, "qwen3": PRE_NORM, "phi3": PRE_NORM,
    "gemma2": SANDWICH, "gemma3": SANDWICH,
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm", "mlp", "self_attn.o_proj"),
    "gpt_neox": ("attention", "mlp", None, "attention.dense"),
    "gpt_neox_sequential": ("attention", "mlp", "post_attention_layernorm", "attention.dense"),
}
POST_NORM = ("gemma2", "gemma3", "olmo2")
WINDOWED = {"mistral": [0, 1], "qwen2": [1], "qwen3": [1], "gemma2": [0], "gemma3": [0], "phi3": [0, 1]}
"""The layers whose attention is a sliding window of 4 tokens."""
CLASSES = {"GPT2Config": T.GPT2LMHeadModel, "LlamaConfig": T.LlamaForCausalLM, "MistralConfig": T.MistralForCausalLM,
           "Qwen2Config": T.Qwen2ForCausalLM, "Qwen3Config": T.Qwen3ForCausalLM, "Gemma2Config": T.Gemma2ForCausalLM,
           "Gemma3TextConfig": T.Gemma3ForCausalLM, "Phi3Config": T.Phi3ForCausalLM, "Olmo2Config": T.Olmo2ForCausalLM,
           "GPTNeoXConfig": T.GPTNeoXForCausalLM}


def build(family: str, seed: int = 0):
    """Every parameter random (biases and norm scales included, so no identity holds by accident)."""
    cfg = _config(family)
    torch.manual_seed(seed)
    model = CLASSES[type(cfg).__name__](cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
            p.normal_(1.0 if is_norm_scale else 0.0, 0.05 if p.dim() == 1 else 0.1)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        for seed in (0, 1):
            path = root / f"{family}-{seed}"
            build(family, seed).save_pretrained(path)
            word_tokenizer().save_pretrained(path)
            out[family, seed] = str(path)
    return out


@pytest.fixture(scope="module")
def loaded(folders):
    return {family: interp.load_model(folders[family, 0]) for family in FAMILIES}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 12, 1, 7)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the larger of the two tensors' largest values (and at least 1)."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0)
    return float((a - b).abs().max()) / scale


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def decoder_layers(model) -> torch.nn.ModuleList:
    return next(m for m in model.hf.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == N_LAYERS)


def reference(model, family: str, prompt: list[int]) -> dict[str, torch.Tensor]:
    """Every site of one prompt, from HF's own forward on it alone (no padding), keyed like capture."""
    attn_name, mlp_name, mid_name, o_name = REFERENCE[family]
    hf = model.hf
    layers = decoder_layers(model)
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(key, what):
        def hook(module, args, kwargs, output):
            value = {"in": args[0] if args else kwargs.get("hidden_states"), "out": _first(output)}[what]
            seen[key] = value[0].detach()
        return hook

    for layer, block in enumerate(layers):
        wanted = [(block, "resid_pre", "in"), (block, "resid_post", "out"),
                  (block.get_submodule(attn_name), "attn_out", "out"), (block.get_submodule(mlp_name), "mlp_out", "out"),
                  (block.get_submodule(o_name), "z", "in"), (block.get_submodule(o_name), "y", "out")]
        if mid_name is not None:
            wanted.append((block.get_submodule(mid_name), "resid_mid", "in"))
        for module, key, what in wanted:
            handles.append(module.register_forward_hook(keep(f"{key}.{layer}", what), with_kwargs=True))
    try:
        with torch.no_grad():
            out = hf(torch.tensor([prompt]), output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    ref = {"embed": seen["resid_pre.0"], "final": out.hidden_states[-1][0], "logits": out.logits[0]}
    for layer, block in enumerate(layers):
        for kind in ("resid_pre", "attn_out", "mlp_out", "resid_post"):
            ref[f"{kind}.{layer}"] = seen[f"{kind}.{layer}"]
        ref[f"resid_mid.{layer}"] = seen.get(f"resid_mid.{layer}", seen[f"resid_pre.{layer}"] + seen[f"attn_out.{layer}"])
        o_proj = block.get_submodule(o_name)
        w = o_proj.weight if type(o_proj).__name__ == "Conv1D" else o_proj.weight.T  # [n_heads * d_head, d_model]
        z = seen[f"z.{layer}"].reshape(len(prompt), N_HEADS, -1)
        heads = torch.einsum("phd,hdm->phm", z, w.detach().reshape(N_HEADS, -1, D_MODEL))
        if family in POST_NORM:  # the post-norm is linear given its per-position scale: attn_out / y elementwise
            heads = heads * (seen[f"attn_out.{layer}"] / seen[f"y.{layer}"])[:, None]
        ref[f"head_out.{layer}"] = heads
        ref[f"attn_pattern.{layer}"] = out.attentions[layer][0].detach()
    return ref


def bias(model, family: str, layer: int) -> torch.Tensor:
    """The attention output bias, which head_out leaves out (none on the post-norm families)."""
    o_proj = decoder_layers(model)[layer].get_submodule(REFERENCE[family][3])
    if o_proj.bias is None:
        return torch.zeros(D_MODEL)
    assert family not in POST_NORM
    return o_proj.bias.detach()


SITES = ["embed", *(f"{k}.{l}" for l in range(N_LAYERS) for k in
                    ("resid_pre", "head_out", "attn_pattern", "attn_out", "resid_mid", "mlp_out", "resid_post")),
         "final"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", SIDES)
def test_every_site_matches_hugging_face_per_prompt(loaded, prompts, family, backend, side):
    model = loaded[family]
    acts = interp.capture(model, prompts, SITES, backend=backend, padding_side=side, batch_size=5, logits=True,
                          progress=False)
    worst: dict[str, float] = {}
    for i, prompt in enumerate(prompts):
        ref, n = reference(model, family, prompt), len(prompt)
        for key in [*SITES, "logits"]:
            ours = acts[key][i, :, :n, :n] if key.startswith("attn_pattern") else acts[key][i, :n]
            worst[key] = max(worst.get(key, 0.0), rel(ours, ref[key]))
    bad = {k: f"{v:.2g}" for k, v in worst.items() if v > TOL}
    assert not bad, f"{family} through {backend}, {side}-padded: relative error {bad}"


@pytest.mark.parametrize("family", list(WINDOWED))
def test_sliding_windows_cut_into_the_prompts(loaded, prompts, family):
    """On the 12-token prompt HF's own attention is zero 4 or more tokens back at exactly the windowed layers, so
    the capture test above checks windows (and their padding) through both backends."""
    ref = reference(loaded[family], family, prompts[2])
    cut = [layer for layer in range(N_LAYERS)
           if bool((torch.tril(ref[f"attn_pattern.{layer}"], diagonal=-4) == 0).all())]
    assert len(prompts[2]) == 12 and cut == WINDOWED[family]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_identities_and_head_sums(loaded, prompts, family, backend):
    """resid_pre + attn_out = resid_mid, resid_mid + mlp_out = resid_post, head_out summed + bias = attn_out."""
    model = loaded[family]
    acts = interp.capture(model, prompts, SITES, backend=backend, progress=False)
    mask = acts.mask[..., None]
    for layer in range(N_LAYERS):
        pre, attn, mid, mlp, post = (acts[f"{k}.{layer}"] for k in
                                     ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"))
        heads = acts[f"head_out.{layer}"]
        assert heads.shape[2] == N_HEADS
        assert rel(pre + attn, mid) <= TOL, f"resid_pre + attn_out vs resid_mid at layer {layer}"
        assert rel(mid + mlp, post) <= TOL, f"resid_mid + mlp_out vs resid_post at layer {layer}"
        summed = (heads.sum(2) + bias(model, family, layer)) * mask
        assert rel(summed, attn) <= TOL, f"head_out summed + bias vs attn_out at layer {layer}: {rel(summed, attn):.2g}"
    assert torch.equal(acts["resid_post.0"], acts["resid_pre.1"])
    assert torch.equal(acts["embed"], acts["resid_pre.0"])


@pytest.mark.parametrize("family", FAMILIES)
def test_backends_agree_at_every_site(loaded, prompts, family):
    model = loaded[family]
    a = interp.capture(model, prompts, SITES, backend="bridge", padding_side="left", logits=True, progress=False)
    b = interp.capture(model, prompts, SITES, backend="nnsight", padding_side="right", logits=True, progress=False)
    bad = {k: f"{rel(a[k], b[k]):.2g}" for k in [*SITES, "logits"] if rel(a[k], b[k]) > TOL}
    assert not bad, f"{family}: bridge vs nnsight, relative difference {bad}"


def logits(model, prompts, edits=(), backend=None, side="right"):
    return interp.capture(model, prompts, [], edits=edits, logits=True, backend=backend, padding_side=side,
                          progress=False)["logits"]


def edit_kinds(model, other, clean) -> dict[str, list]:
    """One or more edits of every kind, at every site kind that takes edits."""
    g = torch.Generator().manual_seed(2)
    v, w = torch.randn(D_MODEL, generator=g), torch.randn(D_MODEL, generator=g)
    basis = torch.randn(D_MODEL, 3, generator=g)
    centroids = torch.stack([clean["resid_pre.1"][0, 0], clean["resid_pre.1"][2, 3], torch.randn(D_MODEL, generator=g)])
    return {
        "add resid_post.0": [add("resid_post.0", v, scale=2.0)],
        "add_nearest resid_pre.1": [add_nearest("resid_pre.1", centroids, torch.randn(3, D_MODEL, generator=g))],
        "scale head_out.1.2": [scale("head_out.1.2", 3.0)],
        "ablate head_out.0.1 to a mean": [ablate("head_out.0.1", mean=w)],
        "ablate attn_out.0": [ablate("attn_out.0")],
        "ablate mlp_out.1 to a mean": [ablate("mlp_out.1", mean=v)],
        "add resid_mid.1": [add("resid_mid.1", v)],
        "project_out resid_pre.1": [project_out("resid_pre.1", basis)],
        "project_onto resid_mid.0": [project_onto("resid_mid.0", basis)],
        "replace mlp_out.0": [replace("mlp_out.0", clean["mlp_out.1"])],
        "add final": [add("final", w, scale=0.5)],
        "positions": [add("attn_out.0", v, positions="last"), scale("resid_mid.1", 0.5, positions=[0, 2])],
        "stacked at one layer": [add("resid_pre.1", v), scale("head_out.1", 0.5), add("attn_out.1", w),
                                 add("resid_mid.1", v), scale("mlp_out.1", 2.0), add("resid_post.1", w)],
        "blend block 1": [blend(1, other, 0.5)],
        "blend embed, final, unembed": [blend("embed", other, 0.3), blend("final", other, 0.6),
                                        blend("unembed", other, 0.2)],
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_backends_apply_every_edit_alike(loaded, folders, prompts, family):
    model = loaded[family]
    other = interp.load_model(folders[family, 1])
    clean = interp.capture(model, prompts, ["resid_pre.1", "mlp_out.1"], logits=True, progress=False)
    for name, edits in edit_kinds(model, other, clean).items():
        a = logits(model, prompts, edits, "bridge", side="left")
        b = logits(model, prompts, edits, "nnsight", side="right")
        assert rel(a, b) <= TOL, f"{family}, {name}: bridge vs nnsight logits {rel(a, b):.2g}"
        assert rel(a, clean["logits"]) > 1e-3, f"{family}, {name}: the edit changes nothing"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_replacing_every_site_with_its_clean_value_changes_nothing(loaded, prompts, family, backend):
    model = loaded[family]
    editable = [s for s in SITES if not s.startswith("attn_pattern")]
    clean = interp.capture(model, prompts, editable, logits=True, backend=backend, progress=False)
    for s in editable:
        patched = logits(model, prompts, [replace(s, clean[s])], backend, side="left")
        assert rel(patched, clean["logits"]) <= TOL, f"{family}, replace {s}"


def hf_logits_with(model, family: str, prompt: list[int], layer: int, branch: str, change) -> torch.Tensor:
    """HF's logits on one prompt with `change(output)` applied to the output of the module a branch adds."""
    name = REFERENCE[family][0 if branch == "attn" else 1]
    layers = decoder_layers(model)
    module = layers[layer].get_submodule(name)

    def hook(m, args, output):
        if isinstance(output, tuple):
            return (change(output[0]), *output[1:])
        return change(output)

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.hf(torch.tensor([prompt])).logits[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edits_change_the_tensors_hugging_face_adds(loaded, prompts, family, backend):
    """add at attn_out / resid_mid / mlp_out and scaling one head are the same change to HF's own branch outputs."""
    model = loaded[family]
    v = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(3))
    cases = [("attn_out.1", add("attn_out.1", v), "attn", lambda x, ref: x + v),
             ("resid_mid.0", add("resid_mid.0", v), "attn", lambda x, ref: x + v),
             ("mlp_out.0", add("mlp_out.0", v), "mlp", lambda x, ref: x + v),
             ("head_out.1.3", scale("head_out.1.3", 4.0), "attn", lambda x, ref: x + 3.0 * ref["head_out.1"][:, 3])]
    for name, edit, branch, change in cases:
        ours = logits(model, prompts, [edit], backend, side="left")
        layer = int(name.split(".")[1])
        for i, prompt in enumerate(prompts):
            ref = reference(model, family, prompt)
            expected = hf_logits_with(model, family, prompt, layer, branch, lambda x, c=change, r=ref: c(x, r))
            assert rel(ours[i, :len(prompt)], expected) <= TOL, f"{family}, {name} through {backend}, prompt {i}"


def metric(logits, batch):
    """The logit of token 7 after each prompt's last real token (logits come in the batch's own padding layout)."""
    return batch.to_canonical(logits)[torch.arange(len(batch.lengths)), batch.lengths - 1, 7].sum()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_agree_between_backends_and_with_hugging_face(loaded, prompts, family):
    model = loaded[family]
    a = interp.capture(model, prompts, SITES, metric=metric, backend="bridge", padding_side="left", progress=False)
    b = interp.capture(model, prompts, SITES, metric=metric, backend="nnsight", padding_side="right", progress=False)
    bad = {s: f"{rel(a.grad(s), b.grad(s)):.2g}" for s in SITES if rel(a.grad(s), b.grad(s)) > TOL}
    assert not bad, f"{family}: gradients, bridge vs nnsight {bad}"
    assert float(a.grad("attn_pattern.1").abs().max()) > 0
    layers = decoder_layers(model)
    for i, prompt in enumerate(prompts):  # d metric / d resid_pre.1 by autograd on HF's own forward
        leaf = {}

        def swap(module, args, kwargs, leaf=leaf):
            x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
            leaf["x"] = x
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        handle = layers[1].register_forward_pre_hook(swap, with_kwargs=True)
        try:
            out = model.hf(torch.tensor([prompt])).logits[0, -1, 7]
            out.backward()
        finally:
            handle.remove()
        assert rel(a.grad("resid_pre.1")[i, :len(prompt)], leaf["x"].grad[0]) <= TOL, f"{family}, prompt {i}"


def test_an_unsupported_family_is_refused_at_load_by_name(tmp_path):
    cfg = T.GPTJConfig(n_layer=1, n_embd=32, n_head=4, n_positions=32, rotary_dim=4, vocab_size=VOCAB)
    T.GPTJForCausalLM(cfg).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(interp.errors.UnsupportedArchitecture, match="gptj") as info:
        interp.load_model(tmp_path)
    assert "GPT-NeoX" in str(info.value) and "architectures.py" in str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_logit_lens_of_the_last_residual_is_the_models_own_logits(loaded, prompts, family):
    """interp.readout.logit_lens applies the family's final norm, unembedding and logit soft-capping (Gemma 2)."""
    from interp.readout import logit_lens

    model = loaded[family]
    last = f"resid_post.{model.n_layers - 1}"
    acts = interp.capture(model, prompts, [last], logits=True, progress=False)
    assert rel(logit_lens(model, acts[last])[acts.mask], acts["logits"][acts.mask]) <= 1e-5
