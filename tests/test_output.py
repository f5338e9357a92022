"""Bad weights, mismatched pairs and output folders: one clear line and exit 2, nothing silently wrong, and no
earlier result lost (issue: errors and resuming)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import interp
from interp.app import lenses, report
from interp.app.cli import main
from interp.app.output import LOCK, OutputInUse, claimed
from interp.errors import IncompatibleModels, NonFiniteValues
from interp.results import write_json

from conftest import random_model, save_model, word_tokenizer


def _one_line_exit_2(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines()[-1].startswith("interp: error:") and "Traceback" not in err, err
    return err.splitlines()[-1]


def test_a_nan_weight_is_named_at_load(tmp_path, capsys):
    model = random_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    word_tokenizer().save_pretrained(tmp_path / "nan")
    with pytest.raises(NonFiniteValues, match=r"transformer\.h\.1\.attn\.c_attn\.weight holds 1 NaN"):
        interp.load_model(tmp_path / "nan")
    (tmp_path / "p.txt").write_text("w2 w3\n")
    line = _one_line_exit_2(["capture", "--model", str(tmp_path / "nan"), "--sites", "resid_post.0", "--prompts",
                             str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")], capsys)
    assert "h.1.attn.c_attn.weight" in line


@pytest.mark.parametrize("overrides, field", [({"n_positions": 16}, "max_position_embeddings: base 32, tuned 16"),
                                              ({"activation_function": "relu"}, "activation_function"),
                                              ({"layer_norm_epsilon": 1e-3}, "layer_norm_epsilon")])
def test_a_pair_that_computes_differently_is_refused_naming_the_field(model_dirs, tmp_path, overrides, field):
    other = save_model(tmp_path / "other", "gpt2", **overrides)
    with pytest.raises(IncompatibleModels, match=field.replace("(", r"\(")):
        interp.load_pair(model_dirs["gpt2"], other)


def test_a_model_path_that_is_a_file_or_a_missing_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(interp.InterpError, match="is a file"):
        interp.load_model(tmp_path / "weights.safetensors")
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(interp.InterpError, match="does not exist"):
        interp.load_model("m/missing-model")


def test_only_safetensors_weights_are_loaded(model_dirs, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in Path(model_dirs["gpt2"]).iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(interp.InterpError, match="only pickled weights.*save_pretrained"):
        interp.load_model(folder)


def test_a_used_output_folder_is_refused_and_kept(model_dirs, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("w2 w3 w4\nw5 w6\n")
    argv = ["tuco", "--base", model_dirs["gpt2"], "--tuned", model_dirs["gpt2"], "--prompts", str(tmp_path / "p.txt"),
            "--alphas", "0", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert "already holds results" in _one_line_exit_2(argv, capsys)
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    assert main([*argv, "--overwrite"]) == 0 and not (tmp_path / "out" / LOCK).exists()


def test_an_output_folder_that_cannot_be_created_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = _one_line_exit_2(["tuco", "--out", str(tmp_path / "file" / "out")], capsys)
    assert "cannot create the output folder" in line


def test_a_second_writer_is_stopped_and_a_stale_lock_is_taken_over(tmp_path):
    with claimed(tmp_path / "out"):
        with pytest.raises(OutputInUse, match=f"process {os.getpid()}"):
            with claimed(tmp_path / "out"):
                pass
    (tmp_path / "out" / LOCK).write_text("999999999")  # a process that does not run
    with claimed(tmp_path / "out") as out:
        assert (out / LOCK).read_text() == str(os.getpid())


def test_a_killed_report_leaves_page_and_summary_agreeing(model_dirs, tmp_path, monkeypatch):
    from types import SimpleNamespace

    def good(ctx):
        ctx.out.mkdir(parents=True, exist_ok=True)
        return report.Section(ctx.out.name, "Good", {"x": 1.0})

    def killed(ctx):
        raise KeyboardInterrupt

    fakes = {"good": SimpleNamespace(TITLE="Good", run=good), "killed": SimpleNamespace(TITLE="Killed", run=killed)}
    monkeypatch.setattr(lenses, "LENSES", ("good", "killed"))
    monkeypatch.setattr(lenses, "lens", fakes.__getitem__)
    (tmp_path / "p.txt").write_text("w2 w3\n")
    with pytest.raises(KeyboardInterrupt):
        report.run_report(tmp_path / "r", model_dirs["gpt2"], [model_dirs["gpt2"]], prompts=tmp_path / "p.txt")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    page = (tmp_path / "r" / "index.html").read_text()
    assert [s["name"] for s in summary["sections"]] == ["good"] and summary["complete"] is False
    assert 'id="good"' in page and 'id="killed"' not in page and "incomplete" in page
    assert not list((tmp_path / "r").glob(".*.tmp")) and not (tmp_path / "r" / LOCK).exists()


def test_a_capture_resumed_with_other_sites_leaves_no_stale_file(model_dirs, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("w2 w3 w4\nw5 w6\nw7 w8 w9\n")
    base = ["capture", "--model", model_dirs["gpt2"], "--prompts", str(tmp_path / "p.txt"), "--out",
            str(tmp_path / "o")]
    assert main([*base, "--sites", "resid_post.0"]) == 0 and (tmp_path / "o" / "activations.safetensors").is_file()
    assert "already holds results" in _one_line_exit_2([*base, "--sites", "resid_post.1"], capsys)
    assert main([*base, "--sites", "resid_post.1", "--resume", "--memory-budget", "1e-6", "--batch-size", "1"]) == 0
    meta = json.loads((tmp_path / "o" / "capture.json").read_text())
    assert meta["sites"] == ["resid_post.1"] and meta["sharded"] is True
    assert not (tmp_path / "o" / "activations.safetensors").exists()
    assert len(list((tmp_path / "o" / "shards").glob("shard-*.safetensors"))) == 3


def test_result_files_are_strict_json(tmp_path):
    write_json(tmp_path / "r.json", {"mean": float("nan"), "values": (1.0, float("inf"))})

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse) == {"mean": None,
                                                                                   "values": [1.0, None]}


def test_intruders_records_the_k_it_used(model_dirs):
    from analyses import intruders

    base = interp.load_model(model_dirs["gpt2"])
    tuned = random_model("gpt2", seed=1)
    model = interp.Model(tuned, base.tokenizer, "tuned")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = intruders.measure(interp.Pair(base, model), k=1000, progress=False)
    assert result.k == max(result.settings["k_used"]) <= 256 and result.settings["k"] == 1000
    assert any("k=1000 exceeds the rank" in str(w.message) for w in caught)
