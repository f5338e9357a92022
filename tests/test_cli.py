"""The command line: --help everywhere, and exit code 2 with one clear line on bad input."""

import subprocess
import sys

import pytest

from interp.app.cli import main
from interp.app.lenses import LENSES

from conftest import save_model


def test_console_script_help():
    done = subprocess.run([sys.executable, "-m", "interp.app", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in ("zoo", "capture", "report", "figures", *LENSES):
        assert command in done.stdout


@pytest.mark.parametrize("argv", [["zoo", "--help"], ["zoo", "build", "--help"], ["capture", "--help"],
                                  ["report", "--help"], ["figures", "--help"], *[[name, "--help"] for name in LENSES]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: interp" in capsys.readouterr().out


def bad_input_cases(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    model = save_model(tmp_path / "m", "gpt2")
    return {
        "missing folder": (["capture", "--model", str(tmp_path / "none"), "--sites", "resid_post.0", "--prompts",
                            str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")], "does not exist"),
        "unknown zoo name": (["capture", "--model", "zoo:gpt5", "--sites", "resid_post.0", "--out",
                              str(tmp_path / "o")], "unknown zoo model 'gpt5'"),
        "empty prompts": (["capture", "--model", str(model), "--sites", "resid_post.0", "--prompts", str(empty),
                           "--out", str(tmp_path / "o")], "is empty"),
        "bad site": (["capture", "--model", str(model), "--sites", "resid_post.9", "--prompts",
                      str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")], "layer 9 out of range"),
        "prompts needed": (["capture", "--model", str(model), "--sites", "resid_post.0", "--out",
                            str(tmp_path / "o")], "--prompts is required"),
    }


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("w2 w3\n")
    for name, (argv, expected) in bad_input_cases(tmp_path).items():
        capsys.readouterr()
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("interp: error:") and expected in err, (name, err)


def test_capture_command_writes_activations(tmp_path):
    from safetensors.torch import load_file

    model = save_model(tmp_path / "m", "llama")
    (tmp_path / "p.txt").write_text("w2 w3 w4\nw5 w6\n")
    assert main(["capture", "--model", str(model), "--sites", "resid_post.1", "blocks.0.hook_attn_out", "--prompts",
                 str(tmp_path / "p.txt"), "--positions", "last", "--out", str(tmp_path / "o")]) == 0
    saved = load_file(tmp_path / "o" / "activations.safetensors")
    assert saved["resid_post.1"].shape == (2, 64) and saved["attn_out.0"].shape == (2, 64)
