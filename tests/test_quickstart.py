"""The quickstart recipe end to end through the real CLI, then a second run that reuses every stage.

Sizes and time budgets are overridden down so the test takes about two minutes; the code path is the
quickstart's own, with LoRA instead of full fine-tuning so the adapter -> merge -> export path is the one
exercised end to end (full fine-tuning is covered in tests/test_sft.py). The full-size quickstart is what
`bash scripts/quickstart.sh` runs.
"""

import json
import subprocess

import pytest

from banklm.ledger import Ledger, verify_run
from tests.helpers import QUICKSTART_SMALL as SMALL
from tests.helpers import run_banklm as _banklm

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


def test_the_final_model_ships_with_its_operating_point(first_run):
    """Issue 19 end to end: the threshold and temperature fitted on the validation split (eval/sft/), the aml
    split at real-world prevalence scored, the threshold carried into the bundle (listed in SHA256SUMS), every
    artefact's coverage at it, the ledger's eval entry, the report's plots and the model card's rule."""
    _, run_dir, _ = first_run
    res = json.loads((run_dir / "eval" / "sft" / "results.json").read_text(encoding="utf-8"))
    point = json.loads((run_dir / "eval" / "sft" / "operating_point.json").read_text(encoding="utf-8"))
    assert res["operating_point"] == point and set(point["tasks"]) == {"credit", "aml", "audit"}
    assert point["target_accuracy"] == 0.97
    for task, r in res["tasks"].items():
        entry = point["tasks"][task]
        assert entry["validation"]["n"] == 40 and entry["temperature"] > 0
        c = r["confidence"]
        assert c["abstention"]["threshold"] == entry["threshold"] and r["coverage"] == c["abstention"]["coverage"]
        assert 0.0 <= c["calibration"]["ece"] <= 1.0 and c["calibration"]["bins"]
        assert "costs" in c  # every built-in spec declares a cost matrix
    assert "favourable_errors" in res["tasks"]["credit"]["confidence"]
    prev = res["test_prevalence"]["tasks"]["aml"]["confidence"]["operating_points"]
    assert (prev["n"], prev["n_negative"]) == (100, 90)  # 90% normal
    assert not any(p["estimable"] for p in prev["at_fpr"])  # 90 negatives: too few for FPR 1% or 5%
    sums = (run_dir / "export" / "SHA256SUMS").read_text()
    assert "  operating_point.json\n" in sums
    assert json.loads((run_dir / "export" / "operating_point.json").read_text(encoding="utf-8")) == point
    verify = json.loads((run_dir / "export" / "verify.json").read_text(encoding="utf-8"))
    for c in verify["gguf"] + verify["onnx"]:
        by = c["task_eval"]["by_decoding"]["constrained"]["tasks"]
        assert all(by[t]["coverage"] is not None for t in ("credit", "aml", "audit")), c["file"]
    eval_entry = next(json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()
                      if json.loads(x).get("stage") == "eval")
    assert eval_entry["notes"]["operating_point"]["aml"]["temperature"] == point["tasks"]["aml"]["temperature"]
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert 'alt="reliability diagrams"' in page and 'alt="risk-coverage curves"' in page
    assert "Coverage at the shipped threshold after export" in page
    card = (run_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Confidence and abstention" in card and "operating_point.json" in card


def test_the_report_opens_with_the_verdict_and_carries_the_model_risk_evidence(first_run):
    """Issue 20 end to end: eval/evidence.json (intervals, paired tests, segments, confusions, baselines,
    counterfactual flips), the report's first section is the verdict, reused stages keep their times."""
    _, run_dir, _ = first_run
    ev = json.loads((run_dir / "eval" / "evidence.json").read_text(encoding="utf-8"))
    res = json.loads((run_dir / "eval" / "sft" / "results.json").read_text(encoding="utf-8"))
    assert ev["final"] == "sft" and set(ev["intervals"]) == {"sft", "cpt"}
    for task, r in res["tasks"].items():
        acc = ev["intervals"]["sft"][task]["accuracy"]
        assert acc["estimate"] == pytest.approx(r["accuracy"]) and acc["low"] <= r["accuracy"] <= acc["high"]
        assert set(ev["confusions"][task]) >= {k for k in ("decision", "grade", "conclusion", "typology", "category",
                                                          "severity") if k in r["field_accuracy"]}
        assert {"rules", "logistic_regression", "gradient_boosting"} <= set(ev["baselines"][task])
        assert ev["baselines"][task]["rules"]["baseline"]["accuracy"] == 1.0  # the rules made the gold
        assert "reason_label" in r and r["reason_label"]["n_checked"] > 0
    assert ev["comparisons"][0]["what"] == "after vs before fine-tuning" and ev["comparisons"][0]["n"] == 60
    assert ev["ordinal"]["credit"]["grade"]["n"] + ev["ordinal"]["credit"]["grade"]["unparseable"] == 20
    assert set(ev["segments"]["credit"]) == {"guarantee"}
    cf = ev["counterfactual"]["credit"]
    assert cf["protected"]["gender"]["n"] > 0 and cf["protected"]["region"]["in_prompt"] is False
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert page.index("<h2>Verdict</h2>") < page.index("<h2>Pipeline</h2>")
    assert "<h2>Model risk</h2>" in page and "Baselines on the same test records" in page
    verdict = page[page.index("<h2>Verdict</h2>"):page.index("<h2>Pipeline</h2>")]
    overall = ev["intervals"]["sft"]["overall"]["accuracy"]
    assert f"{overall['estimate']:.3f} [{overall['low']:.3f}, {overall['high']:.3f}]" in verdict
    assert ("flag(s):" in verdict) != ("no flag raised" in verdict)
    cov = ev["intervals"]["sft"]["credit"]["coverage"]
    assert cov["estimate"] == pytest.approx(res["tasks"]["credit"]["coverage"]) and cov["method"] == "Wilson score"
    assert f"{cov['estimate']:.3f} [{cov['low']:.3f}, {cov['high']:.3f}]" in verdict
    assert 'alt="accuracy intervals"' in page


def test_export_verified(first_run):
    _, run_dir, _ = first_run
    verify = json.loads((run_dir / "export" / "verify.json").read_text())
    assert [c["type"] for c in verify["gguf"]] == ["f16", "q8_0"]
    assert [c["type"] for c in verify["onnx"]] == ["fp32", "int8"]
    assert verify["passed"] and all(c["passed"] for c in verify["gguf"] + verify["onnx"])
    # accuracy before and after each export, on the same test records
    base = verify["task_eval"]["pytorch"]["accuracy"]
    for c in verify["gguf"] + verify["onnx"]:
        assert c["task_eval"]["n"] == 30 and c["task_eval"]["accuracy_drop"] == pytest.approx(
            base - c["task_eval"]["accuracy"])
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert "export/onnx/int8/model.onnx" in page and "Task accuracy before and after export" in page


def _cells(*values) -> str:
    """A report table row as report.py renders it: floats to 3 decimals, None as '–'."""
    return "<tr>" + "".join(f"<td>{'–' if v is None else f'{v:.3f}' if isinstance(v, float) else v}</td>"
                            for v in values) + "</tr>"


def _model_section(page: str, name: str) -> str:
    """The report's block for one evaluated model: from its heading to the next heading."""
    start = page.index(f"<h3>model: {name}</h3>")
    ends = [i for i in (page.find("<h3>", start + 1), page.find("<h2>", start + 1)) if i != -1]
    return page[start:min(ends)]


def test_report_shows_real_numbers(first_run):
    """Every headline figure of the final model, exactly as eval/sft/results.json and retention.json hold it,
    in the row and column the report labels it with."""
    _, run_dir, _ = first_run
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    res = json.loads((run_dir / "eval" / "sft" / "results.json").read_text(encoding="utf-8"))
    sft = _model_section(page, "sft")
    assert ("<tr><th>task</th><th>n</th><th>accuracy</th><th>macro-F1</th><th>MCC</th><th>format compliance</th>"
            "<th>answers with unsupported numbers</th><th>unsupported-number rate</th>"
            "<th>field-binding error rate</th></tr>") in sft
    for task in ("credit", "aml", "audit"):  # accuracy, macro-F1, MCC, ..., unsupported-number rate per task
        r = res["tasks"][task]
        assert _cells(task, r["n"], r["accuracy"], r["macro_f1"], r["mcc"], r["format_compliance"],
                      r["hallucination_rate"], r["unsupported_number_rate"], r["field_binding_error_rate"]) in sft, task
    assert _cells("aml", "conclusion=可疑: recall", res["tasks"]["aml"]["positive"]["recall"]) in sft
    fairness = {a: f for a, f in res["tasks"]["credit"]["fairness"].items() if isinstance(f, dict)}
    assert fairness, "credit fairness missing from results.json"
    for attr, f in fairness.items():  # the four-fifths flag follows the ratio shown next to it
        assert _cells("credit", attr, f["ratio"], f["accuracy_gap"], "FLAG" if f["ratio"] < 0.8 else "ok") in sft
    assert ("FLAG" in sft) == any(f["ratio"] < 0.8 for f in fairness.values())
    rb = res["robustness"]["distractor"]
    assert rb["skipped"] == 0 and rb["n"] == res["n"]  # generated test records: every one re-rendered
    assert _cells("distractor", rb["n"], rb["skipped"], rb["accuracy"], rb["clean_accuracy"], rb["drop"]) in sft
    rt = json.loads((run_dir / "eval" / "retention.json").read_text(encoding="utf-8"))
    assert _cells("before fine-tuning", rt["before"]["model"], rt["before"]["perplexity"], rt["before"]["tokens"]) in page
    assert _cells("after fine-tuning", rt["after"]["model"], rt["after"]["perplexity"], rt["after"]["tokens"]) in page
    assert f"perplexity change {rt['change_pct']:+.1f}% on" in page
    assert "data:image/png;base64," in page
    assert "ledger intact" in page


def test_eval_cli_compares_models_and_exports_side_by_side(first_run, tmp_path):
    """base vs LoRA vs the GGUF and ONNX exports on the same records, one table and one chart."""
    _, run_dir, _ = first_run
    onnx = run_dir / "export" / "onnx" / "fp32"
    out = _banklm("eval", "--model", f"base={run_dir / 'cpt' / 'merged'}", "--model", f"lora={run_dir / 'sft' / 'merged'}",
                  "--model", str(run_dir / "export" / "gguf" / "quickstart-q8_0.gguf"), "--model", f"onnx-fp32={onnx}",
                  "--data", str(run_dir), "--tasks", "credit,aml", "--limit", "4", "--out", str(tmp_path / "cmp"),
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    names = ["base", "lora", "quickstart-q8_0", "onnx-fp32"]  # a .gguf is named after its file by default
    res, preds = {}, {}
    for n in names:
        res[n] = json.loads((tmp_path / "cmp" / n / "results.json").read_text(encoding="utf-8"))
        preds[n] = [json.loads(x) for x in (tmp_path / "cmp" / n / "predictions.jsonl").read_text().splitlines()]
        assert list(res[n]["tasks"]) == ["credit", "aml"] and res[n]["n"] == 8
        assert res[n]["overall"]["model_bytes"] > 0 and res[n]["overall"]["tokens_per_s"] > 0
        assert [p["id"] for p in preds[n]] == [p["id"] for p in preds["base"]]  # the same records for every model
    assert res["quickstart-q8_0"]["overall"]["format"] == "gguf"
    # the fp32 ONNX export answers exactly as the PyTorch model it was exported from
    assert [p["output"] for p in preds["onnx-fp32"]] == [p["output"] for p in preds["lora"]]
    table = (tmp_path / "cmp" / "comparison.md").read_text(encoding="utf-8")
    for task in ("credit", "aml"):
        rows = [line for line in table.splitlines() if line.startswith(f"| {task} |")]
        assert [r.split(" | ")[1] for r in rows] == names
        for n, row in zip(names, rows, strict=True):
            r, ov = res[n]["tasks"][task], res[n]["overall"]
            at = [("–" if r.get(k) is None else f"{r[k]:.3f}") for k in ("coverage", "answered_accuracy")]
            assert row == (f"| {task} | {n} | 4 | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['mcc']:.3f} | "
                           f"{r['format_compliance']:.3f} | {r['unsupported_number_rate']:.3f} | {at[0]} | {at[1]} | "
                           f"{ov['tokens_per_s']:.1f} | {ov['model_bytes'] / 1e6:.2f} |")
            # the exports find the bundle's operating point; the bare model folders have none
            assert (r.get("coverage") is not None) == (n in ("quickstart-q8_0", "onnx-fp32"))
            assert row in out.stdout
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert f"comparison: {tmp_path / 'cmp' / 'comparison.md'}; chart: {tmp_path / 'cmp' / 'comparison.png'}" in out.stdout


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
    assert "coverage" not in out.stdout  # a bare model folder carries no operating point ...
    point = run_dir / "eval" / "sft" / "operating_point.json"
    out = _banklm("eval", "--model", str(model), "--data", str(run_dir), "--tasks", "aml", "--limit", "5",
                  "--operating-point", str(point), "--out", str(tmp_path / "ev2"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "ev2" / "results.json").read_text(encoding="utf-8"))
    assert res["operating_point"] == json.loads(point.read_text(encoding="utf-8"))  # ... unless given one
    assert f"coverage {res['tasks']['aml']['coverage']:.3f}" in out.stdout
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
