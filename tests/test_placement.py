"""Placement: a device and a dtype per model, device maps that shard one model or offload part of it (accelerate's
dispatch), and results on the CPU in float32 whatever the placement. On the CPU every layer of a map is "cpu" (or
"disk", which offloads it: its weights are meta placeholders between forwards, loaded for each one); the GPU tests at
the end (marked gpu) place models on two GPUs and split one between a GPU and CPU offload."""

import json

import pytest
import torch

import interp
from analyses import diffing, tuco
from analyses.circuits.cmap import cmap
from interp.app.args import model_options, pair_options
from interp.app.cli import build_parser, main
from interp.errors import BadOption
from interp.models import Pair, load_model
from interp.prompts import tokenize
from interp.sites import every_layer

from conftest import save_model

pytestmark = pytest.mark.usefixtures("single_thread")
BACKENDS = ("bridge", "nnsight")
SITES = ["embed", "resid_pre.1", "head_out.1", "head_out.1.2", "attn_pattern.1", "attn_out.1", "resid_mid.1",
         "mlp_out.1", "resid_post.2", "final"]
WORD_PROMPTS = ["w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14 w15 w16 w17 w18"]
ZOO_PROMPTS = ["copy a b c d =", "sort c a b =", "reverse a b c =", "add 3 4 =", "brackets ( ( ) ) ="]
BF16 = 3e-2  # relative tolerance of a bfloat16 forward against float32 (8 bits of mantissa, a few layers)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|, in float32 on the CPU."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def layer_map(model, where=lambda layer: "cpu", outside: str = "cpu") -> dict:
    """A device map naming every layer (`where(layer)`) and every module outside the layers (`outside`)."""
    layers = model.architecture.layers
    parent = layers.rpartition(".")[0]
    names = [f"{parent}.{n}" for n, _ in model.hf.get_submodule(parent).named_children() if f"{parent}.{n}" != layers]
    names += [n for n, _ in model.hf.named_children() if n != parent]
    return {**{n: outside for n in names}, **{f"{layers}.{i}": where(i) for i in range(model.n_layers)}}


def metric(logits, batch):
    return logits[..., 3].float().sum()


@pytest.fixture(scope="module")
def whole(model_dirs):
    return {arch: load_model(model_dirs[arch], device="cpu") for arch in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def zoo_pairs(zoo_built):
    """zoo:base / zoo:full all in float32, and with the tuned model in bfloat16."""
    return {"float32": interp.load_pair("zoo:base", "zoo:full", device="cpu"),
            "mixed": interp.load_pair("zoo:base", "zoo:full", device="cpu", tuned_dtype="bfloat16")}


# ------------------------------------------------------------------------------------------- device maps

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("offload", [False, True], ids=["all-cpu", "layer-1-on-disk"])
def test_a_device_map_naming_every_layer_gives_the_unsharded_capture(model_dirs, whole, prompts, arch, offload):
    ref = whole[arch]
    plan = layer_map(ref, lambda layer: "disk" if offload and layer == 1 else "cpu")
    mapped = load_model(model_dirs[arch], device_map=plan)
    layer = mapped.hf.get_submodule(f"{mapped.architecture.layers}.1")
    assert mapped.hf.hf_device_map == plan and hasattr(layer, "_hf_hook")  # dispatched by accelerate's hooks
    weight = (layer.mlp.up_proj if arch == "llama" else layer.mlp.c_fc).weight
    assert mapped.offloaded == offload and weight.is_meta == offload  # a meta placeholder between forwards
    assert ("disk (offloaded) x 1" in repr(mapped)) == offload and "device map: cpu x" in repr(mapped)
    for backend in BACKENDS:
        a = interp.capture(mapped, prompts, SITES, logits=True, backend=backend, progress=False)
        b = interp.capture(ref, prompts, SITES, logits=True, backend=backend, progress=False)
        for key in SITES + ["logits"]:
            assert a[key].device.type == "cpu" and a[key].dtype == torch.float32
            assert rel(a[key], b[key]) <= 1e-6, (backend, key)
        ga = interp.capture(mapped, prompts, ["resid_post.0", "head_out.1"], metric=metric, backend=backend,
                            progress=False)
        gb = interp.capture(ref, prompts, ["resid_post.0", "head_out.1"], metric=metric, backend=backend,
                            progress=False)
        for key in ("resid_post.0", "head_out.1"):
            assert rel(ga.grad(key), gb.grad(key)) <= 1e-6, (backend, key)
    assert mapped.fingerprint() == ref.fingerprint() and Pair(ref, mapped).changed_parameters() == {}


def test_an_accelerate_strategy_places_the_model_and_changes_nothing(model_dirs, whole, prompts):
    mapped = load_model(model_dirs["llama"], device_map="sequential")  # CPU-only here: every module on "cpu"
    assert set(mapped.hf.hf_device_map.values()) == {"cpu"} and mapped.placement.startswith("device map: cpu x")
    a = interp.capture(mapped, prompts, ["resid_post.2"], logits=True, progress=False)
    b = interp.capture(whole["llama"], prompts, ["resid_post.2"], logits=True, progress=False)
    assert torch.equal(a["resid_post.2"], b["resid_post.2"]) and torch.equal(a["logits"], b["logits"])


def test_bad_placements_are_refused_with_the_fix(model_dirs, whole):
    plan = layer_map(whole["llama"])
    cases = [
        (dict(device_map={**plan, "model.layers.7": "cpu"}), "'model.layers.7', not modules of LlamaForCausalLM"),
        (dict(device_map={k: v for k, v in plan.items() if k != "lm_head"}), "does not give any device"),
        (dict(device="cpu", device_map=plan), "pass one of them"),
        (dict(max_memory={"cpu": "1GiB"}), "max_memory needs a device map"),
        (dict(device_map=plan, max_memory={"cpu": "1GiB"}), "an explicit device map already says"),
        (dict(device_map="everywhere"), "use one of auto, balanced"),
        (dict(device_map={**plan, "model.layers.0": f"cuda:{torch.cuda.device_count()}"}), "is not on this machine"),
    ]
    for options, message in cases:
        with pytest.raises(BadOption, match=message):
            load_model(model_dirs["llama"], **options)


# -------------------------------------------------------------------------------- a device and dtype each

def test_load_pair_places_and_casts_each_model_on_its_own(model_dirs, whole, tmp_path):
    tuned_dir = save_model(tmp_path / "tuned", "llama", seed=4)
    pair = interp.load_pair(model_dirs["llama"], tuned_dir, base_device="cpu", tuned_dtype="bfloat16",
                            tuned_device_map=layer_map(whole["llama"]))
    assert (pair.base.dtype, pair.tuned.dtype) == (torch.float32, torch.bfloat16)
    assert pair.base.placement == "cpu" and pair.tuned.placement.startswith("device map")
    shared = interp.load_pair(model_dirs["llama"], tuned_dir, device_map="sequential", base_device="cpu")
    assert not hasattr(shared.base.hf, "hf_device_map") and hasattr(shared.tuned.hf, "hf_device_map")
    changed = pair.changed_parameters()  # across dtypes, in float32
    assert set(changed) == {n for n, _ in pair.base.hf.named_parameters()}  # every weight of another seed


def test_a_float32_bfloat16_pair_captures_in_float32_on_the_cpu(zoo_pairs):
    full, mixed = zoo_pairs["float32"], zoo_pairs["mixed"]
    assert (mixed.base.dtype, mixed.tuned.dtype) == (torch.float32, torch.bfloat16)
    sites = every_layer("resid_post", mixed.tuned.n_layers) + ["head_out.2"]
    for backend in BACKENDS:
        a = interp.capture(mixed.tuned, ZOO_PROMPTS, sites, logits=True, backend=backend, progress=False)
        b = interp.capture(full.tuned, ZOO_PROMPTS, sites, logits=True, backend=backend, progress=False)
        for key in [*map(str, sites), "logits"]:
            assert a[key].dtype == torch.float32 and a[key].device.type == "cpu"
            assert 0 < rel(a[key], b[key]) <= BF16, (backend, key)  # rounded, but within bfloat16's precision
        kept = interp.capture(mixed.tuned, ZOO_PROMPTS, sites, logits=True, dtype=torch.bfloat16, backend=backend,
                              progress=False)  # the model's own values, in its own dtype
        assert all(kept[k].dtype == torch.bfloat16 and torch.equal(kept[k].float(), a[k]) for k in kept.keys())


@pytest.mark.parametrize("tuned_dtype", ["bfloat16", "float32"])
def test_tuco_of_a_mixed_dtype_pair_agrees_with_float32_and_keeps_its_identity(zoo_built, zoo_pairs, tuned_dtype):
    full = zoo_pairs["float32"]
    mixed = zoo_pairs["mixed"] if tuned_dtype == "bfloat16" else interp.load_pair(
        "zoo:base", "zoo:full", device="cpu", base_dtype="bfloat16")
    ref = tuco.measure(full, ZOO_PROMPTS, progress=False)
    res = tuco.measure(mixed, ZOO_PROMPTS, progress=False)
    assert res.ptc_norm.dtype == torch.float32 and res.tuco().dtype == torch.float32
    assert torch.allclose(res.tuco(), ref.tuco(), atol=BF16) and not torch.equal(res.tuco(), ref.tuco())
    assert rel(res.ftc_norm, ref.ftc_norm) <= 2 * BF16
    tokens = tokenize(mixed.tuned.tokenizer, ZOO_PROMPTS)
    c = tuco.components(mixed.base, mixed.tuned, tokens)
    last = f"resid_post.{mixed.tuned.n_layers - 1}"
    final = interp.capture(mixed.tuned, tokens, [last], progress=False)[last]
    rebuilt = c["x"][:, 0] + c["ptc"].sum(1) + c["ftc"].sum(1)
    assert rel(rebuilt * tokens.mask[..., None], final * tokens.mask[..., None]) <= 1e-6  # exact in float32


def test_steering_a_mixed_dtype_pair_runs_the_other_model_in_its_own_dtype(zoo_pairs):
    full, mixed = zoo_pairs["float32"], zoo_pairs["mixed"]

    def last_logits(pair, alpha, backend):
        with tuco.steer(pair, alpha):
            return interp.capture(pair.tuned, ZOO_PROMPTS, [], logits=True, positions="last", backend=backend,
                                  progress=False)["logits"]

    own = interp.capture(mixed.tuned, ZOO_PROMPTS, [], logits=True, positions="last", progress=False)["logits"]
    assert torch.equal(last_logits(mixed, 1.0, "bridge"), own)
    for backend in BACKENDS:
        for alpha in (0.0, 0.5):
            assert rel(last_logits(mixed, alpha, backend), last_logits(full, alpha, backend)) <= BF16


def test_cross_model_patching_and_the_diffing_lens_on_a_mixed_dtype_pair(zoo_built, zoo_pairs):
    full, mixed = zoo_pairs["float32"], zoo_pairs["mixed"]
    examples = zoo_built.task_prompts(zoo_built.TARGET_SKILL, 8)
    texts, answers = [e.prompt for e in examples], [e.answer for e in examples]
    sites = [interp.site(s) for s in ("embed", "mlp_out.1", "head_out.3.0", "mlp_out.3")]
    a, b = (cmap(p, texts, answers, sites=sites, max_set=1) for p in (mixed, full))
    assert torch.allclose(a.gain, b.gain, atol=0.01) and a.m_tuned == pytest.approx(b.m_tuned, abs=0.01)
    ka, kb = (diffing.measure_kl(p, ZOO_PROMPTS) for p in (mixed, full))
    assert ka.kl.dtype == torch.float32 and abs(ka.mean_kl() - kb.mean_kl()) <= BF16 * kb.mean_kl() + 1e-3
    la, lb = (diffing.measure_adl(p, ZOO_PROMPTS, positions=3) for p in (mixed, full))
    assert rel(la.delta, lb.delta) <= 2 * BF16


def test_tuco_and_steering_with_an_offloaded_tuned_model_change_nothing(model_dirs, whole, tmp_path):
    tuned_dir = save_model(tmp_path / "tuned", "llama", seed=4)
    ref = interp.load_pair(model_dirs["llama"], tuned_dir, device="cpu")
    split = interp.load_pair(whole["llama"], tuned_dir,
                             device_map=layer_map(whole["llama"], lambda layer: "disk" if layer == 1 else "cpu"))
    assert split.tuned.offloaded and not split.base.offloaded
    for backend in BACKENDS:
        a, b = (tuco.measure(p, WORD_PROMPTS, backend=backend, progress=False) for p in (split, ref))
        assert rel(a.ftc_norm, b.ftc_norm) <= 1e-6 and rel(a.tuco(), b.tuco()) <= 1e-6
        with tuco.steer(split, 0.5):
            steered = interp.capture(split.tuned, WORD_PROMPTS, [], logits=True, backend=backend, progress=False)
        with tuco.steer(ref, 0.5):
            expected = interp.capture(ref.tuned, WORD_PROMPTS, [], logits=True, backend=backend, progress=False)
        assert rel(steered["logits"], expected["logits"]) <= 1e-6


# ------------------------------------------------------------------------------------------------- the CLI

def test_the_cli_places_each_model(tmp_path):
    plan = tmp_path / "map.json"
    plan.write_text(json.dumps({"model.layers.0": 0}))
    args = build_parser().parse_args(["tuco", "--out", str(tmp_path / "o"), "--dtype", "bfloat16",
                                      "--tuned-device", "balanced", "--max-memory", "0=20GiB,cpu=64GiB",
                                      "--base-device", "cpu", "--base-dtype", "float32"])
    assert pair_options(args) == {
        "base": {"device": "cpu", "dtype": "float32"},
        "tuned": {"device_map": "balanced", "dtype": "bfloat16", "max_memory": {0: "20GiB", "cpu": "64GiB"}}}
    args = build_parser().parse_args(["capture", "--sites", "resid_post.0", "--out", "o", "--device", str(plan)])
    assert model_options(args) == {"device_map": {"model.layers.0": 0}, "dtype": "float32"}


def test_capture_command_with_a_device_map_file_writes_the_same_activations(whole, model_dirs, tmp_path):
    from safetensors.torch import load_file

    plan = tmp_path / "map.json"
    plan.write_text(json.dumps(layer_map(whole["llama"], lambda layer: "disk" if layer == 2 else "cpu")))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(WORD_PROMPTS))
    for name, device in (("map", str(plan)), ("cpu", "cpu")):
        assert main(["capture", "--model", model_dirs["llama"], "--sites", "resid_post.2", "head_out.2",
                     "--prompts", str(prompts), "--out", str(tmp_path / name), "--device", device]) == 0
    a, b = (load_file(tmp_path / name / "activations.safetensors") for name in ("map", "cpu"))
    assert a.keys() == b.keys() and all(rel(a[k], b[k]) <= 1e-6 for k in a)


# ------------------------------------------------------------------------------------------------- on GPUs

def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")


@pytest.fixture(scope="module")
def gpu_pairs(model_dirs, tmp_path_factory):
    tuned = save_model(tmp_path_factory.mktemp("gpu") / "tuned", "llama", seed=4)
    return tuned, {"one": interp.load_pair(model_dirs["llama"], tuned, device="cuda:0"),
                   "cpu": interp.load_pair(model_dirs["llama"], tuned, device="cpu")}


def _same_capture_and_tuco(pair, ref, tol: float):
    for backend in BACKENDS:
        for a_model, b_model in zip(pair.models, ref.models):
            a = interp.capture(a_model, WORD_PROMPTS, SITES, logits=True, backend=backend, progress=False)
            b = interp.capture(b_model, WORD_PROMPTS, SITES, logits=True, backend=backend, progress=False)
            for key in SITES + ["logits"]:
                assert a[key].device.type == "cpu" and rel(a[key], b[key]) <= tol, (backend, key)
        a, b = (tuco.measure(p, WORD_PROMPTS, backend=backend, progress=False) for p in (pair, ref))
        assert a.tuco().device.type == "cpu" and rel(a.ftc_norm, b.ftc_norm) <= tol
        assert torch.allclose(a.tuco(), b.tuco(), atol=tol)
        with tuco.steer(pair, 0.5):
            steered = interp.capture(pair.tuned, WORD_PROMPTS, [], logits=True, backend=backend, progress=False)
        with tuco.steer(ref, 0.5):
            expected = interp.capture(ref.tuned, WORD_PROMPTS, [], logits=True, backend=backend, progress=False)
        assert rel(steered["logits"], expected["logits"]) <= tol


@pytest.mark.gpu
def test_a_pair_on_two_gpus_matches_one_gpu(model_dirs, gpu_pairs):
    two_gpus()
    tuned, pairs = gpu_pairs
    pair = interp.load_pair(model_dirs["llama"], tuned, base_device="cuda:0", tuned_device="cuda:1")
    assert (pair.base.device, pair.tuned.device) == (torch.device("cuda:0"), torch.device("cuda:1"))
    _same_capture_and_tuco(pair, pairs["one"], 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_split_between_a_gpu_and_cpu_offload_matches_one_gpu(model_dirs, gpu_pairs, whole, dtype):
    tuned, pairs = gpu_pairs
    plan = layer_map(whole["llama"], lambda layer: 0 if layer == 0 else "cpu", outside=0)
    pair = interp.load_pair(model_dirs["llama"], tuned, base_device="cuda:0", tuned_device_map=plan, dtype=dtype)
    assert pair.tuned.offloaded and pair.tuned.device == torch.device("cuda:0")
    ref = pairs["one"] if dtype == "float32" else interp.load_pair(model_dirs["llama"], tuned, device="cuda:0",
                                                                    dtype=dtype)
    _same_capture_and_tuco(pair, ref, 1e-5 if dtype == "float32" else BF16)
    kept = interp.capture(pair.tuned, WORD_PROMPTS, SITES, device="cuda:0", progress=False)
    host = interp.capture(pair.tuned, WORD_PROMPTS, SITES, progress=False)
    assert all(kept[k].device.type == "cuda" and torch.equal(kept[k].cpu(), host[k]) for k in SITES)


@pytest.mark.gpu
def test_a_model_split_over_two_gpus_matches_one_gpu(model_dirs, gpu_pairs, whole):
    two_gpus()
    tuned, pairs = gpu_pairs
    plan = layer_map(whole["llama"], lambda layer: 0 if layer < 2 else 1, outside=1) | {"model.embed_tokens": 0}
    pair = interp.load_pair(model_dirs["llama"], tuned, device_map=plan)
    assert {str(module.weight.device) for module in (pair.tuned.hf.model.layers[0].mlp.up_proj,
                                                     pair.tuned.hf.model.layers[2].mlp.up_proj)} == {"cuda:0",
                                                                                                     "cuda:1"}
    _same_capture_and_tuco(pair, pairs["one"], 1e-5)


@pytest.mark.gpu
def test_a_balanced_map_under_a_memory_cap_offloads_and_matches(model_dirs, gpu_pairs):
    tuned, pairs = gpu_pairs
    pair = interp.load_pair(model_dirs["llama"], tuned, device_map="sequential",
                            max_memory={0: 400_000, "cpu": "4GiB"})
    assert "cpu" in pair.tuned.hf.hf_device_map.values() and pair.tuned.offloaded
    _same_capture_and_tuco(pair, pairs["cpu"], 1e-5)
