"""The quickstart recipe end to end through the real CLI, then a second run that reuses every stage.

Sizes and time budgets are overridden down so the test takes about two minutes; the code path is the
quickstart's own, with LoRA instead of full fine-tuning so the adapter -> merge -> export path is the one
exercised end to end (full fine-tuning is covered in tests/test_sft.py). The full-size quickstart is what
`bash scripts/quickstart.sh` runs.
"""

import json
import subprocess

import pytest
from banklm_tests_conftest import QUICKSTART_SMALL as SMALL
from banklm_tests_conftest import run_banklm as _banklm

from banklm.ledger import Ledger, verify_run

pytestmark = pytest.mark.slow

STAGES = ["corpus", "tokenizer", "base", "cpt", "train", "eval", "export", "report"]


@pytest.fixture(scope="module")
def first_run(quickstart_run):
    """The session's small quickstart run (tests/conftest.py), built once for every test that needs it."""
    return quickstart_run


def test_every_stage_runs_and_is_recorded(first_run):
    _, run_dir, out = first_run
    entries = Ledger(run_dir).entries()
    assert [e["stage"] for e in entries] == STAGES
    assert all(e["status"] == "done" for e in entries)
    assert verify_run(run_dir) == []
    assert f"report: {run_dir / 'report' / 'index.html'}" in out.stdout


def test_run_folder_contents(first_run):
    _, run_dir, _ = first_run
    for rel in ["recipe.yaml", "corpora/scenario/stats.json", "corpora/scenario/card.md",
                "corpora/scenario/quarantine.jsonl", "tokenizer/tokenizer.model", "base/config.json",
                "cpt/merged/config.json", "sft/adapter", "sft/merged/model.safetensors", "sft/metrics.jsonl",
                "eval/sft/results.json", "eval/sft/predictions.jsonl", "export/verify.json",
                "export/gguf/quickstart-q8_0.Modelfile", "export/onnx/int8/model.onnx", "export/SHA256SUMS",
                "export/MODEL_CARD.md", "export/eval/onnx-int8/results.json", "report/index.html", "report/loss.png", "MODEL_CARD.md"]:
        assert (run_dir / rel).exists(), rel
    ggufs = sorted(p.name for p in (run_dir / "export" / "gguf").glob("*.gguf"))
    assert ggufs == ["quickstart-f16.gguf", "quickstart-q8_0.gguf"]


def test_eval_scores_parsed_from_generation(first_run):
    _, run_dir, _ = first_run
    res = json.loads((run_dir / "eval" / "sft" / "results.json").read_text(encoding="utf-8"))
    assert set(res["tasks"]) == {"credit", "aml", "audit"}
    assert set(res["robustness"]) == {"distractor"}
    assert res["overall"]["model_bytes"] > 0
    assert (run_dir / "eval" / "cpt" / "results.json").exists()  # eval.compare: [cpt]
    retention = json.loads((run_dir / "eval" / "retention.json").read_text(encoding="utf-8"))
    assert retention["before"]["model"] == "cpt/merged" and retention["after"]["model"] == "sft/merged"
    assert retention["before"]["perplexity"] > 1 and retention["after"]["perplexity"] > 1
    preds = [json.loads(x) for x in (run_dir / "eval" / "sft" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 60
    for task, r in res["tasks"].items():
        mine = [p for p in preds if p["task"] == task]
        assert r["n"] == len(mine) == 20
        assert r["accuracy"] == pytest.approx(sum(p["correct"] for p in mine) / len(mine))


def test_export_verified(first_run):
    _, run_dir, _ = first_run
    verify = json.loads((run_dir / "export" / "verify.json").read_text())
    assert [c["type"] for c in verify["gguf"]] == ["f16", "q8_0"]
    assert [c["type"] for c in verify["onnx"]] == ["fp32", "int8"]
    assert verify["passed"] and all(c["passed"] for c in verify["gguf"] + verify["onnx"])
    # accuracy before and after each export, on the same test records
    base = verify["task_eval"]["pytorch"]["accuracy"]
    for c in verify["gguf"] + verify["onnx"]:
        assert c["task_eval"]["n"] == 60 and c["task_eval"]["accuracy_drop"] == pytest.approx(
            base - c["task_eval"]["accuracy"])
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert "export/onnx/int8/model.onnx" in page and "Task accuracy before and after export" in page


def test_report_shows_real_numbers(first_run):
    _, run_dir, _ = first_run
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    res = json.loads((run_dir / "eval" / "sft" / "results.json").read_text(encoding="utf-8"))
    assert f"{res['tasks']['credit']['accuracy']:.3f}" in page
    assert "data:image/png;base64," in page
    assert "ledger intact" in page


def test_second_run_reuses_every_stage(first_run, repo):
    root, run_dir, _ = first_run
    run2 = run_dir.parent / "r2"
    out = _banklm("run", str(repo / "recipes" / "quickstart.yaml"), *SMALL, "--run-dir", str(run2), cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    entries = Ledger(run2).entries()
    assert [e["stage"] for e in entries] == STAGES
    assert [e["status"] for e in entries[:-1]] == ["reused"] * 7  # the report is always rewritten
    assert all(e["reused_from"]["run"] == "r1" for e in entries[:-1])
    assert verify_run(run2) == []
    a = (run_dir / "eval" / "sft" / "results.json").read_bytes()
    assert (run2 / "eval" / "sft" / "results.json").read_bytes() == a


def test_verify_cli_catches_tampered_gguf(first_run, tmp_path):
    import shutil

    _, run_dir, _ = first_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    f = copy / "export" / "gguf" / "quickstart-q8_0.gguf"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    out = _banklm("verify", str(copy), cwd=tmp_path)
    assert out.returncode == 1
    assert "(export)" in out.stderr and "quickstart-q8_0.gguf" in out.stderr


def test_eval_and_export_cli_on_a_model_folder(first_run, tmp_path):
    _, run_dir, _ = first_run
    model = run_dir / "sft" / "merged"
    out = _banklm("eval", "--model", str(model), "--data", str(run_dir), "--tasks", "aml", "--limit", "5",
                  "--out", str(tmp_path / "ev"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "ev" / "results.json").read_text(encoding="utf-8"))
    assert list(res["tasks"]) == ["aml"] and res["tasks"]["aml"]["n"] == 5
    out = _banklm("export", "--model", str(model), "--format", "gguf", "--quant", "q8_0", "--out",
                  str(tmp_path / "gg"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "gg" / "verify.json").read_text())["gguf"][0]["passed"] is True
    bad = _banklm("eval", "--model", str(model), "--tasks", "loans", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown task 'loans'" in bad.stderr


def test_too_small_vocabulary_names_the_recipe_key(repo, tmp_path):
    out = _banklm("run", str(repo / "recipes" / "quickstart.yaml"), *SMALL, "tokenizer.vocab_size=300",
                  "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 1
    assert "tokenizer.vocab_size = 300 is smaller than the" in out.stderr
    assert [e["stage"] for e in Ledger(tmp_path / "run").entries()] == ["corpus"]


def test_run_recipe_script_tees_log_into_run_folder(first_run, repo):
    root, run_dir, _ = first_run
    run3 = run_dir.parent / "r3"
    out = subprocess.run(["bash", str(repo / "scripts" / "run_recipe.sh"), str(repo / "recipes" / "quickstart.yaml"),
                          *SMALL, "--run-dir", str(run3)], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    logs = list((run3 / "logs").glob("run_recipe-*.log"))
    assert len(logs) == 1 and "[train] unchanged: reused" in logs[0].read_text(encoding="utf-8")
    assert subprocess.run(["bash", str(repo / "scripts" / "run_recipe.sh")], capture_output=True).returncode == 2
