"""Intruder-dimension numerics (analyses/intruders/spectra.py), LoRA adapters read as deltas (analyses/intruders/lora.py)
and weight matrices named and paired (analyses/intruders/matrices.py).

Closed form used below. Let W0 = U0 diag(s) V0^T (out > in, so W0's column space leaves room), u a unit vector
orthogonal to col(W0), v = V0[:, j], and Wt = W0 + c u v^T. Then
    Wt = sum_{i != j} s_i U0_i V0_i^T + (s_j U0_j + c u) V0_j^T,
and the left vectors U0_i (i != j) and (s_j U0_j + c u) / sqrt(s_j^2 + c^2) are orthonormal, so this is Wt's SVD:
the new singular value is sqrt(s_j^2 + c^2) (the top one when c > s_0), with left vector mixing U0_j and u
(the 2x2 problem on span(U0_j, u)). Its cosine with U0_j is s_j / sqrt(s_j^2 + c^2) and 0 with every other
column of U0, so sim_0 = s_j / sqrt(s_j^2 + c^2); every other top direction is a base direction (sim 1).
delta W = c u v^T puts a fraction (u_0 . u)^2 = c^2 / (s_j^2 + c^2) = 1 - sim_0^2 of its energy on that direction.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from analyses.intruders.spectra import (
    EPSILONS,
    effective_rank,
    intruder_similarity,
    intruder_update,
    iter_reports,
    matrix_report,
    scale_intruders,
    svd,
    svdvals,
)
from analyses.intruders.lora import UnsupportedAdapter, lora_delta_weights
from analyses.intruders.matrices import analysis_matrices, layer_index, matrix_kind, paired_matrices
from conftest import random_model
from interp.errors import IncompatibleModels

F64 = torch.float64


def constructed_base(out: int, inn: int, seed: int = 0):
    """W0 = U0 diag(linspace(10, 1)) V0^T of shape (out, in), and a unit u orthogonal to its column space."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=F64))
    V0, _ = torch.linalg.qr(torch.randn(inn, inn, generator=g, dtype=F64))
    U0, u = Q[:, :inn], Q[:, inn]
    s = torch.linspace(10, 1, inn, dtype=F64)
    return U0 @ torch.diag(s) @ V0.T, U0, s, V0, u


def closed_form_sim(s_j: float, c: float) -> float:
    return s_j / math.sqrt(s_j**2 + c**2)


# ---------------------------------------------------------------------------------------------- constructed


def test_rank1_update_outside_column_space_is_one_intruder_with_closed_form_cosine():
    W0, U0, s, V0, u = constructed_base(96, 48)
    j, c = 20, 12.0
    Wt = W0 + c * torch.outer(u, V0[:, j])
    rep = matrix_report(W0, Wt, dtype=F64)
    expected = closed_form_sim(float(s[j]), c)  # 0.45733...
    assert 0.4 < expected < 0.5
    assert rep.intruders.tolist() == [True] + [False] * 9
    assert rep.sims[0].item() == pytest.approx(expected, abs=1e-9)
    assert rep.sims[1:].min().item() > 1 - 1e-9
    assert rep.tuned_s[0].item() == pytest.approx(math.sqrt(s[j].item() ** 2 + c**2), abs=1e-9)
    assert rep.counts.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]  # sim_0 lies between 0.4 and 0.5
    assert rep.delta_s[0].item() == pytest.approx(c, abs=1e-9)
    assert rep.delta_erank == pytest.approx(1.0, abs=1e-6)
    assert rep.intruder_energy == pytest.approx(1 - expected**2, abs=1e-9)
    torch.testing.assert_close(rep.base_s, s)
    # float32 (the default) agrees to float32 accuracy
    rep32 = matrix_report(W0.float(), Wt.float())
    assert rep32.sims[0].item() == pytest.approx(expected, abs=1e-5)
    assert rep32.intruders.sum().item() == 1


def test_small_update_along_existing_direction_is_no_intruder():
    W0, U0, s, V0, u = constructed_base(96, 48)
    Wt = W0 + 0.1 * torch.outer(U0[:, 2], V0[:, 2])
    rep = matrix_report(W0, Wt, dtype=F64)
    assert rep.counts.tolist() == [0] * len(EPSILONS)
    assert rep.sims.min().item() > 1 - 1e-9
    assert rep.intruder_energy == 0.0
    assert rep.delta_erank == pytest.approx(1.0, abs=1e-6)


def test_similarity_is_max_abs_cosine_over_all_base_columns():
    g = torch.Generator().manual_seed(1)
    U0, _ = torch.linalg.qr(torch.randn(40, 30, generator=g, dtype=F64))
    Ut, _ = torch.linalg.qr(torch.randn(40, 25, generator=g, dtype=F64))
    Ut[:, 3] = -U0[:, 29]  # sign does not matter, and the last base column counts
    sims = intruder_similarity(U0, Ut, k=7)
    loop = [max(abs(F.cosine_similarity(Ut[:, i], U0[:, j], dim=0).item()) for j in range(30)) for i in range(7)]
    assert sims.shape == (7,)
    torch.testing.assert_close(sims, torch.tensor(loop, dtype=F64))
    assert sims[3].item() == pytest.approx(1.0, abs=1e-12)


def test_effective_rank_and_svd_dtype():
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert effective_rank(torch.zeros(4)) == 0.0
    p = torch.tensor([0.75, 0.25])  # singular values, not their squares, are normalised
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(torch.exp(-(p * p.log()).sum()).item())
    W = torch.randn(12, 5, dtype=torch.bfloat16)
    for M in (W, W.mT):  # tall, and wide (decomposed through its transpose)
        U, S, Vh = svd(M, F64)
        r = min(M.shape)
        assert (U.dtype, U.shape, S.shape, Vh.shape) == (F64, (M.shape[0], r), (r,), (r, M.shape[1]))
        torch.testing.assert_close(U @ torch.diag(S) @ Vh, M.to(F64))
        torch.testing.assert_close(U.mT @ U, torch.eye(r, dtype=F64))
        torch.testing.assert_close(svdvals(M, F64), S)
    with pytest.raises(ValueError, match="float32 or float64"):
        svd(W, torch.float16)
    with pytest.raises(IncompatibleModels, match=r"mlp: base has shape \(12, 5\), tuned \(5, 12\)"):
        matrix_report(W, W.mT, name="mlp")


def test_iter_reports_is_lazy():
    W0, U0, s, V0, u = constructed_base(20, 10)
    pulled = []

    def pairs():
        for i in range(3):
            pulled.append(i)
            yield f"m{i}", W0, W0

    it = iter_reports(pairs(), k=3)
    assert next(it).name == "m0" and pulled == [0]


def test_scale_intruders():
    W0, U0, s, V0, u = constructed_base(96, 48)
    j, c = 20, 12.0
    Wt = W0 + c * torch.outer(u, V0[:, j])
    assert torch.equal(scale_intruders(W0, Wt, 1.0, dtype=F64), Wt)
    assert torch.equal(scale_intruders(W0.bfloat16(), Wt.bfloat16(), 1.0), Wt.bfloat16())
    removed = scale_intruders(W0, Wt, 0.0, dtype=F64)
    rep = matrix_report(W0, removed, dtype=F64)
    assert rep.counts.tolist() == [0] * len(EPSILONS)
    assert rep.tuned_s[0].item() == pytest.approx(s[0].item(), abs=1e-9)
    # the whole V0_j column of Wt was the intruder: removing it removes the base's j-th component too
    torch.testing.assert_close(removed, W0 - s[j] * torch.outer(U0[:, j], V0[:, j]), atol=1e-9, rtol=0)
    half = scale_intruders(W0, Wt, 0.5, dtype=F64)
    assert torch.linalg.svdvals(half)[0].item() == pytest.approx(s[0].item(), abs=1e-9)  # 0.5 * 13.49 < 10
    assert (torch.linalg.svdvals(half) - 0.5 * math.hypot(s[j].item(), c)).abs().min().item() < 1e-9
    no_intruder = W0 + 0.1 * torch.outer(U0[:, 0], V0[:, 0])
    assert torch.equal(intruder_update(W0, no_intruder, dtype=F64), torch.zeros(96, 48, dtype=F64))


# ---------------------------------------------------------------------------------------------- PEFT adapters


def tiny_gpt2():
    """2 layers, d_model 64 (c_fc: 64 -> 256), Conv1D weights stored (in, out)."""
    return random_model("gpt2", n_layer=2).eval()


def randomize_lora(peft_model, scale: float) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def merged_state(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def assert_matches_peft_merge(deltas, base, merged):
    assert deltas.keys() <= merged.keys()
    for name, delta in deltas.items():
        assert delta.shape == base[name].shape, name
        torch.testing.assert_close(base[name] + delta, merged[name], atol=1e-6, rtol=0, msg=name)


def counts_by_matrix(base, tuned, **kw) -> dict[str, list[int]]:
    return {r.name: r.counts.tolist() for r in iter_reports(paired_matrices(base, tuned, fan_in_fan_out=True), **kw)}


def test_gpt2_lora_adapter_gives_the_constructed_intruder_and_matches_peft_merge(tmp_path):
    model = tiny_gpt2()
    W0, U0, s, V0, u = constructed_base(256, 64)  # c_fc in (out, in) orientation; stored as (in, out) = (64, 256)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.copy_(W0.T)
    base = {k: v.clone() for k, v in model.state_dict().items()}

    r, alpha, j, c = 4, 8, 20, 15.0
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    pm = get_peft_model(model, config)
    randomize_lora(pm, 0.05)  # generic, non-symmetric deltas everywhere else
    c_fc = pm.base_model.model.transformer.h[0].mlp.c_fc
    with torch.no_grad():  # delta W (out, in) = (alpha / r) B A = c u v^T
        c_fc.lora_A["default"].weight.zero_()[0] = V0[:, j].float()
        c_fc.lora_B["default"].weight.zero_()[:, 0] = (c * r / alpha) * u.float()
    pm.save_pretrained(tmp_path)
    merged = merged_state(pm)

    deltas = lora_delta_weights(tmp_path)
    assert len(deltas) == 8 and deltas["transformer.h.0.mlp.c_fc.weight"].shape == (64, 256)
    assert_matches_peft_merge(deltas, base, merged)
    name = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(deltas[name].double(), c * torch.outer(u, V0[:, j]).T, atol=1e-6, rtol=0)

    tuned = {k: base[k] + d for k, d in deltas.items()}
    [(_, W0_out_in)] = analysis_matrices(name, base[name], fan_in_fan_out=True)
    [(_, Wt_out_in)] = analysis_matrices(name, tuned[name], fan_in_fan_out=True)
    rep = matrix_report(W0_out_in, Wt_out_in, dtype=F64)
    assert rep.intruders.tolist() == [True] + [False] * 9
    assert rep.sims[0].item() == pytest.approx(closed_form_sim(float(s[j]), c), abs=1e-5)  # float32 storage
    # Left singular vectors need the (out, in) orientation: in (in, out) the new direction is v, a base direction.
    assert matrix_report(base[name], tuned[name]).intruders.sum().item() == 0

    # PEFT path (W0 + delta) and merged-checkpoint path give the same intruder counts, matrix by matrix.
    peft_counts, merged_counts = counts_by_matrix(base, tuned), counts_by_matrix(base, merged)
    assert len(peft_counts) == 2 * 6  # q, k, v, o, mlp_in, mlp_out per layer
    assert peft_counts == merged_counts
    assert peft_counts[name] == [0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_rslora_rank_and_alpha_patterns_match_peft_merge(tmp_path):
    model = tiny_gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"h.0.mlp.c_fc": 2, "h.1.attn.c_proj": 3},
        alpha_pattern={"h.1.attn.c_attn": 5},
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )
    pm = get_peft_model(model, config)
    randomize_lora(pm, 0.2)
    pm.save_pretrained(tmp_path)
    deltas = lora_delta_weights(tmp_path)
    assert torch.linalg.matrix_rank(deltas["transformer.h.0.mlp.c_fc.weight"]).item() == 2
    assert torch.linalg.matrix_rank(deltas["transformer.h.1.attn.c_proj.weight"]).item() == 3
    assert_matches_peft_merge(deltas, base, merged_state(pm))


def test_linear_layout_llama_matches_peft_merge(tmp_path):
    model = random_model("llama", num_hidden_layers=2).eval()  # d_model 64, MLP 128, nn.Linear (out, in)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(pm, 0.2)
    pm.save_pretrained(tmp_path)
    deltas = lora_delta_weights(tmp_path)
    assert len(deltas) == 14 and deltas["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)
    assert_matches_peft_merge(deltas, base, merged_state(pm))
    kinds = sorted(matrix_kind(n) for n, _, _ in paired_matrices(base, deltas, fan_in_fan_out=False))
    assert kinds == sorted(["q", "k", "v", "o", "mlp_in", "mlp_in", "mlp_out"] * 2)


def write_adapter(path, **config):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    return path


@pytest.mark.parametrize(
    "config, message",
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "tuned biases"),
        ({"init_lora_weights": "pissa_niter_4"}, "changes the base weights"),
        ({}, "no adapter_model.safetensors"),
    ],
)
def test_unsupported_adapters_say_why(tmp_path, config, message):
    with pytest.raises(UnsupportedAdapter, match=message):
        lora_delta_weights(write_adapter(tmp_path / "adapter", **config))


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"base_model.model.h.0.fc.lora_A.weight": torch.zeros(4, 8)}, "has only lora_A"),
        (
            {"base_model.model.h.0.fc.lora_A.weight": torch.zeros(2, 8), "h.0.fc.lora_B.weight": torch.zeros(8, 2)},
            "config says r=4",
        ),
        ({"base_model.model.wte.lora_embedding_A": torch.zeros(4, 8)}, "not a LoRA A/B factor"),
    ],
)
def test_inconsistent_adapter_files_say_why(tmp_path, tensors, message):
    path = write_adapter(tmp_path / "adapter")
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(UnsupportedAdapter, match=message):
        lora_delta_weights(path)


def test_dora_adapter_saved_by_peft_is_refused(tmp_path):
    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True, use_dora=True))
    pm.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedAdapter, match="use_dora"):
        lora_delta_weights(tmp_path)


# ---------------------------------------------------------------------------------------------- naming, layout


def test_fused_c_attn_splits_into_q_k_v_in_out_in_orientation():
    model = tiny_gpt2()
    attn = model.transformer.h[1].attn
    x = torch.randn(3, 64)
    q, k, v = attn.c_attn(x).split(64, dim=-1)
    name = "transformer.h.1.attn.c_attn.weight"
    parts = analysis_matrices(name, attn.c_attn.weight, fan_in_fan_out=True)
    assert [n for n, _ in parts] == [f"{name}:q", f"{name}:k", f"{name}:v"]
    for (_, W), out, bias in zip(parts, (q, k, v), attn.c_attn.bias.split(64), strict=True):
        assert W.shape == (64, 64)
        torch.testing.assert_close(x @ W.T + bias, out)
    fc = model.transformer.h[1].mlp.c_fc
    [(_, W)] = analysis_matrices("transformer.h.1.mlp.c_fc.weight", fc.weight, fan_in_fan_out=True)
    assert W.shape == (256, 64)
    torch.testing.assert_close(x @ W.T + fc.bias, fc(x))


def test_matrix_kinds_and_layers():
    kinds = {
        "transformer.h.0.attn.c_attn.weight": "qkv",
        "transformer.h.0.attn.c_attn.weight:k": "k",
        "transformer.h.0.attn.c_proj.weight": "o",
        "transformer.h.0.mlp.c_fc.weight": "mlp_in",
        "transformer.h.0.mlp.c_proj.weight": "mlp_out",
        "model.layers.3.self_attn.q_proj.weight": "q",
        "model.layers.3.self_attn.o_proj.weight": "o",
        "model.layers.3.mlp.gate_proj.weight": "mlp_in",
        "model.layers.3.mlp.up_proj.weight": "mlp_in",
        "model.layers.3.mlp.down_proj.weight": "mlp_out",
        "transformer.wte.weight": None,
        "lm_head.weight": None,
        "transformer.h.0.ln_1.weight": None,
    }
    assert {n: matrix_kind(n) for n in kinds} == kinds
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("transformer.h.11.attn.c_attn.weight:q") == 11
    assert layer_index("lm_head.weight") is None
