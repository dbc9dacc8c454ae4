"""SIGKILL ``banklm run`` during the corpus build, mid-training (after a checkpoint, while the next one is
half written) and during export; each re-run resumes from the last complete stage or checkpoint, and the
final run equals an uninterrupted one: same metrics, same weights, same exported file, ``banklm verify``
passes, and no half-written file was ever taken as complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from banklm.io import sha256_file
from tests.reliability.relutil import banklm, banklm_killed_at, ledger_stages, temp_leftovers, tiny_recipe

KILLED = -9


def _json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8"))


def _hidden(folder: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in folder.glob(".*") if p.name.startswith(prefix)) if folder.is_dir() else []


@pytest.mark.slow
def test_killed_three_times_resumes_to_the_uninterrupted_result(reference_run, tmp_path):
    _, ref = reference_run
    recipe = tiny_recipe(tmp_path / "tiny.yaml")
    run_dir = tmp_path / "runs" / "tiny" / "crashed"  # no sibling run to reuse from: every stage recomputes
    args = ("run", recipe, "--run-dir", run_dir)

    # 1. killed while writing the corpus (the data is saved into the temporary folder, stats not yet)
    out = banklm_killed_at("banklm.corpora.build:_save", "after", 1, *args, cwd=tmp_path)
    assert out.returncode == KILLED, out.stderr[-2000:]
    assert ledger_stages(run_dir) == []
    assert _hidden(run_dir / "corpora", ".scenario.tmp-") and not (run_dir / "corpora" / "scenario").exists()

    # 2. re-run: the half-built corpus is removed and rebuilt; killed in training when checkpoint-6 is
    #    written by the Trainer but not yet marked complete (checkpoints 2 and 4 are complete)
    out = banklm_killed_at("banklm.finetune.callbacks:CheckpointState.on_save", "before", 3, *args, cwd=tmp_path)
    assert out.returncode == KILLED, out.stderr[-2000:]
    assert ledger_stages(run_dir) == [("corpus", "done"), ("tokenizer", "done"), ("base", "done")]
    assert _hidden(run_dir / "corpora", ".scenario.tmp-") == []
    ckpts = run_dir / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (ckpts / "checkpoint-4" / "banklm_state.json").is_file()
    assert not (ckpts / "checkpoint-6" / "banklm_state.json").exists()  # half written: must not be resumed
    assert not (run_dir / "sft" / "train_summary.json").exists()

    # 3. re-run: corpus..base reused, training resumes at step 4 (checkpoint-6 discarded); killed while
    #    writing the GGUF (its tensors half written into the temporary file)
    out = banklm_killed_at("gguf:GGUFWriter.write_tensor_data", "before", 5, *args, cwd=tmp_path)
    assert out.returncode == KILLED, out.stderr[-2000:]
    assert ledger_stages(run_dir)[3:] == [("corpus", "reused"), ("tokenizer", "reused"), ("base", "reused"),
                                          ("train", "done"), ("eval", "done")]
    summary = _json(run_dir / "sft" / "train_summary.json")
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 8
    assert not ckpts.exists()  # removed once the stage's outputs were complete
    half = [p for p in run_dir.glob(".export.tmp-*/**/*.gguf*")]  # the export folder is built aside, then swapped in
    assert half and not (run_dir / "export").exists()

    # 4. re-run: completes
    out = banklm(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    stages = ledger_stages(run_dir)
    assert stages[8:] == [(s, "reused") for s in ("corpus", "tokenizer", "base", "train", "eval")] + [
        ("export", "done"), ("report", "done")]
    assert temp_leftovers(run_dir) == []
    verify = banklm("verify", run_dir, cwd=tmp_path)
    assert verify.returncode == 0, verify.stderr

    # the same result as the uninterrupted run
    a, b = _json(ref / "sft" / "train_summary.json"), summary
    assert a["steps"] == b["steps"] and a["tokens_seen"] == b["tokens_seen"]
    assert b["final_loss"] == pytest.approx(a["final_loss"], abs=1e-5)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
    ref_rows, rows = (Path(d / "sft" / "metrics.jsonl").read_text().splitlines() for d in (ref, run_dir))
    losses = [[json.loads(r).get("loss") for r in x] for x in (ref_rows, rows)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)  # every logged step, before and after the resume
    import torch
    from safetensors.torch import load_file

    wa, wb = (load_file(d / "sft" / "merged" / "model.safetensors") for d in (ref, run_dir))
    assert set(wa) == set(wb)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # resuming is exact: weights bit for bit
    for task in ("credit", "aml", "audit"):
        ra, rb = (_json(d / "eval" / "sft" / "results.json")["tasks"][task] for d in (ref, run_dir))
        assert (ra["accuracy"], ra["macro_f1"], ra["n"]) == (rb["accuracy"], rb["macro_f1"], rb["n"])
    gguf = Path("export") / "gguf" / "tiny-f16.gguf"
    assert sha256_file(run_dir / gguf) == sha256_file(ref / gguf)  # and so is the exported file


CORPUS_ONLY = {"train": {"enabled": False}, "eval": {"enabled": False}, "export": {"gguf": {"enabled": False}},
               "report": {"enabled": False}}


def test_killed_after_the_outputs_but_before_the_ledger_entry(tmp_path):
    """Outputs without a ledger entry are not a completed stage: the re-run builds them again and records them."""
    recipe = tiny_recipe(tmp_path / "r.yaml", **CORPUS_ONLY)
    run_dir = tmp_path / "run"
    out = banklm_killed_at("banklm.ledger:Ledger.append", "before", 1, "corpus", "build", recipe, "--run-dir",
                           run_dir, cwd=tmp_path)
    assert out.returncode == KILLED
    assert (run_dir / "corpora" / "scenario" / "stats.json").is_file() and ledger_stages(run_dir) == []
    out = banklm("corpus", "build", recipe, "--run-dir", run_dir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ledger_stages(run_dir) == [("corpus", "done")]
    assert banklm("verify", run_dir, cwd=tmp_path).returncode == 0


def test_folder_swap_cut_between_its_renames_is_restored(tmp_path):
    """atomic_dir moves the old folder aside, then renames the new one in; a crash between the two leaves only
    ``.<name>.old-<pid>``, the last complete version: the next run puts it back before anything reads it."""
    from banklm.pipeline import clean_stale_temp

    run_dir = tmp_path / "run"
    (run_dir / "sft" / ".merged.old-4242").mkdir(parents=True)
    (run_dir / "sft" / ".merged.old-4242" / "model.safetensors").write_bytes(b"complete")
    (run_dir / "sft" / ".merged.tmp-4242").mkdir()  # the new one, half written
    (run_dir / "sft" / ".merged.tmp-4242" / "model.safetensors").write_bytes(b"half")
    (run_dir / ".ledger.jsonl.k2j4h1.tmp").write_text("{", encoding="utf-8")  # an interrupted atomic_open
    removed = clean_stale_temp(run_dir)
    assert sorted(p.name for p in removed) == [".ledger.jsonl.k2j4h1.tmp", ".merged.tmp-4242"]
    assert (run_dir / "sft" / "merged" / "model.safetensors").read_bytes() == b"complete"
    assert temp_leftovers(run_dir) == []
