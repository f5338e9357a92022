"""The same computations on CUDA as on the CPU: capture, edits, the TuCo identity, intruder SVDs, LID, and a bfloat16
capture. Marked `gpu`: skipped without CUDA (conftest), run on a GPU machine with `pytest -m gpu tests/test_gpu.py`."""

import pytest
import torch

import interp
from analyses import intruders, lid, tuco
from interp.prompts import tokenize
from interp.sites import every_layer

from conftest import ARCHS, save_model

pytestmark = pytest.mark.gpu
BACKENDS = ("bridge", "nnsight")
SITES = ["embed", "head_out.1", "attn_pattern.1", "attn_out.1", "mlp_out.1", "resid_post.2", "final"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b| (both moved to the CPU in float32)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def models(model_dirs):
    return {(arch, device): interp.load_model(model_dirs[arch], device=device) for arch in ARCHS
            for device in ("cpu", "cuda")}


@pytest.fixture(scope="module")
def llama_pair(model_dirs, tmp_path_factory):
    tuned = save_model(tmp_path_factory.mktemp("gpu") / "tuned", "llama", seed=4)
    return {device: interp.load_pair(model_dirs["llama"], tuned, device=device) for device in ("cpu", "cuda")}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_on_cuda_matches_the_cpu(models, prompts, arch, backend):
    gpu, cpu = models[arch, "cuda"], models[arch, "cpu"]
    assert gpu.device.type == "cuda" and next(gpu.hf.parameters()).device.type == "cuda"
    a = interp.capture(gpu, prompts, SITES, backend=backend, logits=True, progress=False)
    b = interp.capture(cpu, prompts, SITES, backend=backend, logits=True, progress=False)
    for key in SITES + ["logits"]:
        assert rel(a[key], b[key]) <= 1e-4, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_edits_and_metric_gradients_on_cuda_match_the_cpu(models, prompts, backend):
    out = {}
    for device in ("cpu", "cuda"):
        model = models["llama", device]
        vector = torch.linspace(-1, 1, model.d_model, device=model.device)
        edits = [interp.add("resid_post.0", vector), interp.scale("head_out.1.2", 0.5),
                 interp.ablate("mlp_out.2")]
        out[device] = interp.capture(model, prompts, ["resid_post.2"], edits=edits, logits=True, backend=backend,
                                     metric=lambda logits, batch: logits[..., 3].sum(), progress=False)
    assert rel(out["cuda"]["logits"], out["cpu"]["logits"]) <= 1e-4
    assert rel(out["cuda"].grad("resid_post.2"), out["cpu"].grad("resid_post.2")) <= 1e-4


def test_tuco_components_sum_to_the_tuned_forward_on_cuda(llama_pair):
    pair = llama_pair["cuda"]
    tokens = tokenize(pair.tuned.tokenizer, ["w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14 w15 w16 w17 w18"])
    c = tuco.components(pair.base, pair.tuned, tokens)
    last = f"resid_post.{pair.tuned.n_layers - 1}"
    final = interp.capture(pair.tuned, tokens, [last], progress=False)[last]
    rebuilt = c["x"][:, 0] + c["ptc"].sum(1) + c["ftc"].sum(1)
    assert rel(rebuilt * tokens.mask[..., None], final * tokens.mask[..., None]) <= 1e-5
    cpu = tuco.measure(llama_pair["cpu"], ["w5 w6 w7 w8 w9", "w10 w11"], progress=False).tuco()
    gpu = tuco.measure(pair, ["w5 w6 w7 w8 w9", "w10 w11"], progress=False).tuco()
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)


def test_intruder_svds_on_cuda_match_the_cpu(llama_pair):
    cpu = intruders.measure(llama_pair["cpu"].base, llama_pair["cpu"].tuned, device="cpu", progress=False)
    gpu = intruders.measure(llama_pair["cuda"].base, llama_pair["cuda"].tuned, device="cuda", progress=False)
    assert gpu.names == cpu.names
    assert torch.allclose(gpu.sims, cpu.sims, atol=1e-4, equal_nan=True) and torch.equal(gpu.counts, cpu.counts)
    assert torch.allclose(gpu.delta_s, cpu.delta_s, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_lid_on_cuda_matches_the_cpu(models):
    texts = [" ".join(f"w{(7 * i + j) % 60 + 2}" for j in range(12)) for i in range(24)]
    layers = [0, 2]
    cpu = lid.measure(models["gpt2", "cpu"], texts, layers, k=12, progress=False)
    gpu = lid.measure(models["gpt2", "cuda"], texts, layers, k=12, progress=False)
    for key, values in cpu.lid.items():
        assert torch.allclose(gpu.lid[key].cpu(), values, rtol=1e-3, atol=1e-3), key


def test_bfloat16_capture_on_cuda_stays_close_to_float32(model_dirs, prompts):
    half = interp.load_model(model_dirs["llama"], device="cuda", dtype="bfloat16")
    full = interp.load_model(model_dirs["llama"], device="cuda", dtype="float32")
    sites = every_layer("resid_post", half.n_layers)
    a = interp.capture(half, prompts, sites, progress=False)
    b = interp.capture(full, prompts, sites, progress=False)
    assert next(half.hf.parameters()).dtype == torch.bfloat16
    for site in sites:
        assert rel(a[site], b[site]) <= 3e-2, site
