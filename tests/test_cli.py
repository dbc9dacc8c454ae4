import subprocess
import sys

import pytest

from banklm.cli import main

SUBCOMMANDS = [["run"], ["corpus"], ["corpus", "build"], ["corpus", "scrub"], ["train"], ["distill"], ["eval"],
               ["export"], ["plan"], ["verify"], ["compare"], ["task"], ["task", "check"]]


def _banklm(*args):
    return subprocess.run([sys.executable, "-m", "banklm.cli", *args], capture_output=True, text=True)


def test_top_level_help_lists_every_subcommand():
    out = _banklm("--help")
    assert out.returncode == 0
    for name in ("run", "corpus", "train", "distill", "eval", "export", "plan", "verify", "compare", "task"):
        assert name in out.stdout


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=lambda c: " ".join(c))
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: banklm " + " ".join(cmd) in capsys.readouterr().out


def test_bad_recipe_is_one_clear_line_exit_2(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nbase: {path: /m}\ntrain: {lr: fast}\n", encoding="utf-8")
    assert main(["run", str(p), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr = 'fast'" in err[0] and str(p) in err[0]


def test_bad_override_exit_2(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nbase: {path: /m}\n", encoding="utf-8")
    assert main(["train", str(p), "train.lr"]) == 2
    assert "bad override" in capsys.readouterr().err


def test_no_command_prints_help_exit_2(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_eval_needs_recipe_or_model(capsys):
    assert main(["eval"]) == 2
    assert "RECIPE.yaml or --model" in capsys.readouterr().err


def test_verify_missing_folder_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2




@pytest.mark.parametrize("argv,msg", [
    (["export", "--model", "nope", "--format", "onnx"], "--model nope: model folder not found"),
    (["export", "--model", "m"], "needs --format gguf|onnx"),
    (["export", "--quant", "q8_0", "--model", "m"], "--quant needs --format"),
    (["export"], "needs RECIPE.yaml or --model DIR"),
    (["export", "--model", "m", "--out", "nowhere", "--verify-only"], "nowhere: export folder not found"),
])
def test_export_usage_errors_exit_2(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("models,msg", [
    (["runs/a/merged", "runs/b/merged"], "two models are named 'merged' (runs/a/merged and runs/b/merged); "
                                         "name them with --model NAME=PATH"),
    (["x=one", "x=two"], "two models are named 'x'"),
    (["my model=m"], "'my model' is not a usable model name"),
    (["notes.txt"], "--model notes.txt: a file must be a .gguf export"),
    (["base=nope", "lora=m"], "--model nope: model folder not found"),
])
def test_eval_model_list_usage_errors_exit_2(models, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    argv = ["eval"] + [a for m in models for a in ("--model", m)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("banklm: error: ") and msg in err[0]
    assert not (tmp_path / "eval").exists()  # refused before anything was scored or written


def test_eval_help_documents_model_comparison(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model [NAME=]PATH" in out and "comparison.md" in out and ".gguf" in out


def test_export_quant_help_and_defaults_are_exports(capsys):
    """`--quant` lists the quants export defines (one tuple, one default each), and the parser is split per group."""
    import ast
    import inspect

    from banklm.export.gguf import DEFAULT_GGUF_QUANT, GGUF_QUANTS
    from banklm.export.onnx import DEFAULT_ONNX_QUANT, DEFAULT_OPSET, ONNX_QUANTS

    from banklm import cli

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for q in (*GGUF_QUANTS, *ONNX_QUANTS):
        assert q in text
    assert f"default {','.join(DEFAULT_GGUF_QUANT)}" in text and f"default {','.join(DEFAULT_ONNX_QUANT)}" in text
    assert cli._DEFAULT_QUANT == {"gguf": DEFAULT_GGUF_QUANT, "onnx": DEFAULT_ONNX_QUANT}
    assert cli.build_parser().parse_args(["export", "--model", "m"]).opset == DEFAULT_OPSET
    node = ast.parse(inspect.getsource(cli.build_parser)).body[0]
    assert node.end_lineno - node.lineno + 1 <= 150


def test_output_piped_into_a_reader_that_stops_is_not_an_error():
    """`banklm task check ... | head`: the reader closes the pipe early; banklm stops quietly with exit 0."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "banklm.cli", "task", "check", "credit", "--examples", "400"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(100)  # more than a pipe buffer follows: the writer meets the closed pipe
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Broken pipe" not in err and "Traceback" not in err, err
