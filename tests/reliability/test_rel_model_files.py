"""Bad base model folders are refused before anything runs (no corpus built, no training started), with one
line naming ``base.path`` and the problem; pickled weights only with ``base.allow_pickle`` and the risk said."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from banklm.cli import main
from tests.reliability.relutil import banklm, base_path_recipe, ledger_stages


def _copy(tiny_model: Path, dst: Path) -> Path:
    shutil.copytree(tiny_model, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")


def _pickled(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _truncated(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _lost_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")


def _no_chat_template(folder: Path) -> None:
    """A tokenizer.json-only folder (as many downloaded bases ship) whose config has no chat template."""
    from banklm.finetune.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    tok.chat_template = None
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")


CASES = {
    "pickles_only": (_pickled, "only pickled weights"),
    "truncated_safetensors": (_truncated, "truncated"),
    "missing_shard": (_lost_shard, "model-00002-of-00002.safetensors listed in model.safetensors.index.json is missing"),
    "config_more_layers": (lambda f: _edit_config(f, num_hidden_layers=3), "is missing from the checkpoint"),
    "config_fewer_layers": (lambda f: _edit_config(f, num_hidden_layers=1), "which the config does not describe"),
    "config_other_width": (lambda f: _edit_config(f, intermediate_size=96), "has shape [32, 64] in the checkpoint "
                                                                           "but [32, 96] in the config"),
    "config_not_json": (lambda f: (f / "config.json").write_text("{model_type: llama", encoding="utf-8"),
                        "invalid JSON"),
    "no_chat_template": (_no_chat_template, "no chat template"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_base_is_refused_before_any_stage(tiny_model, tmp_path, capsys, case):
    make_bad, message = CASES[case]
    folder = _copy(tiny_model, tmp_path / "model")
    make_bad(folder)
    recipe = base_path_recipe(tmp_path / "r.yaml", folder)
    rc = main(["run", str(recipe), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("banklm: error: base.path: ") and str(folder) in err[0] and message in err[0], err[0]
    if case == "pickles_only":
        assert "arbitrary code" in err[0] and "allow_pickle" in err[0]
    assert not (tmp_path / "run").exists()  # nothing ran: no corpus, no training


def test_the_good_folder_passes_the_same_check(tiny_model):
    from banklm.finetune.models import check_model_folder

    assert check_model_folder(tiny_model) == {"pickled": False, "tensors": 20}


@pytest.mark.parametrize("case", ["config_more_layers", "config_fewer_layers", "config_other_width",
                                  "truncated_safetensors"])
def test_loading_refuses_what_transformers_would_silently_reinitialise(tiny_model, tmp_path, case):
    """The second line of defence, for model folders that bypass the recipe check (banklm eval --model)."""
    from banklm.finetune.models import ModelFolderError, load_model

    folder = _copy(tiny_model, tmp_path / "model")
    CASES[case][0](folder)
    with pytest.raises(ModelFolderError, match="weights do not"):
        load_model(folder, device="cpu")


@pytest.mark.slow
def test_allowed_pickle_is_converted_once_with_the_risk_stated(tiny_model, tmp_path):
    folder = _copy(tiny_model, tmp_path / "model")
    _pickled(folder)
    recipe = base_path_recipe(tmp_path / "r.yaml", folder, base={"allow_pickle": True},
                              train={"max_steps": 2, "save_steps": None},
                              eval={"enabled": False}, export={"gguf": {"enabled": False}}, report={"enabled": False})
    run_dir = tmp_path / "run"
    out = banklm("run", recipe, "--run-dir", run_dir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "arbitrary code" in out.stderr  # the risk, said when the pickle is accepted
    assert ledger_stages(run_dir) == [("corpus", "done"), ("base", "done"), ("train", "done")]
    base_entry = json.loads((run_dir / "ledger.jsonl").read_text(encoding="utf-8").splitlines()[1])
    assert base_entry["notes"]["converted_from_pickle"] == str(folder)
    assert [i["path"] for i in base_entry["inputs"]] == [str((folder / n).resolve()) for n in
                                                          sorted(p.name for p in folder.iterdir())]
    assert (run_dir / "base" / "model.safetensors").is_file() and not list((run_dir / "base").glob("*.bin"))
    adapter_free = json.loads((run_dir / "sft" / "train_summary.json").read_text(encoding="utf-8"))
    assert adapter_free["steps"] == 2
    # the converted weights are the pickled ones
    import torch
    from safetensors.torch import load_file

    pickled = torch.load(folder / "pytorch_model.bin", weights_only=True)
    converted = load_file(run_dir / "base" / "model.safetensors")
    assert set(converted) == set(pickled) and all(torch.equal(converted[k], pickled[k]) for k in pickled)


@pytest.mark.slow
def test_allowed_pickled_student_is_converted_once_into_distill_init(tiny_model, tmp_path):
    """``distill.student.from: path`` with pickled weights and ``allow_pickle``: converted to safetensors in
    distill/init (the risk stated in the ledger), and the student trains from that copy."""
    student = _copy(tiny_model, tmp_path / "student")
    _pickled(student)
    recipe = base_path_recipe(tmp_path / "r.yaml", tiny_model, train={"max_steps": 2, "save_steps": None},
                              distill={"enabled": True, "method": "logit", "baseline": False,
                                       "student": {"from": "path", "path": str(student), "allow_pickle": True},
                                       "train": {"method": "full", "max_steps": 2, "lr": 1e-3}},
                              eval={"enabled": False}, export={"gguf": {"enabled": False}}, report={"enabled": False})
    run_dir = tmp_path / "run"
    out = banklm("run", recipe, "--run-dir", run_dir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "arbitrary code" in out.stderr
    assert ledger_stages(run_dir) == [("corpus", "done"), ("train", "done"), ("distill", "done")]
    stats = json.loads((run_dir / "distill" / "stats.json").read_text(encoding="utf-8"))
    assert stats["student_init"]["converted_from_pickle"] == str(student) and "arbitrary code" in stats[
        "student_init"]["risk"]
    assert (run_dir / "distill" / "init" / "model.safetensors").is_file()
    assert not list((run_dir / "distill" / "init").glob("*.bin"))
    assert json.loads((run_dir / "distill" / "student_train" / "train_summary.json").read_text())["steps"] == 2


def test_eval_of_a_mismatched_model_folder_is_refused(tiny_model, tmp_path, capsys):
    """``banklm eval --model`` scores any folder: one whose config describes layers the weights lack would be
    scored with those layers random (transformers only prints a load report)."""
    folder = _copy(tiny_model, tmp_path / "model")
    _edit_config(folder, num_hidden_layers=3)
    rc = main(["eval", "--model", str(folder), "--tasks", "credit", "--limit", "1", "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is missing from the checkpoint" in err[0] and str(folder) in err[0]
    assert not (tmp_path / "eval").exists()
    from banklm.evaluation.evaluate import load_model_dir

    with pytest.raises(ValueError, match="is missing from the checkpoint"):  # the loader itself, for library use
        load_model_dir(folder, device="cpu")
