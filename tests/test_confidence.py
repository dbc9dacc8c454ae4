"""Confidence a bank can act on (banklm.evaluation.confidence): per-task statistics from prediction rows, the
operating point (temperature and threshold) fitted on the validation split and carried into the export bundle,
the test split at real-world prevalence, and the report's flag on a planted miscalibrated model. The
statistics themselves are checked against hand-computed values in tests/test_calibration.py."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from banklm.corpora.build import build_scenario
from banklm.corpora.synth import generate_records

from banklm.evaluation.confidence import (
    HANDOFF,
    OPERATING_POINT_FILE,
    confidence_metrics,
    confidence_rows,
    find_operating_point,
    fit_operating_point,
    load_operating_point,
    primary_distribution,
)
from banklm.modelcard import _confidence
from banklm.recipe import RecipeError, load_recipe
from banklm.report import render_confidence_section
from banklm.tasks import get_task
from tests.helpers import require_llama_cpp, sharpened_tiny_model

APPROVE, REJECT, REVIEW = "通过", "拒绝", "人工复核"


def _credit_row(answer: str, gold: str, p: float) -> dict:
    """A credit prediction row as evaluate writes it: label scores over (decision, grade) combinations whose
    decision marginal gives ``answer`` probability ``p`` (the rest on the other two decisions)."""
    rest = [d for d in (APPROVE, REJECT, REVIEW) if d != answer]
    combos = [[{"decision": answer, "grade": "A"}, p * 0.5], [{"decision": answer, "grade": "B"}, p * 0.5],
              [{"decision": rest[0], "grade": "C"}, (1 - p) / 2], [{"decision": rest[1], "grade": "D"}, (1 - p) / 2]]
    return {"task": "credit", "gold": {"decision": gold, "grade": "A", "reason": "x"}, "label": gold,
            "parsed": {"decision": answer, "grade": "A", "reason": "x"}, "pred_label": answer,
            "label_scores": {"combos": combos, "confidence": {}, "multi": {}}}


def _aml_row(gold_typology: str, flagged: bool, p_suspicious: float) -> dict:
    t = "拆分交易"
    chosen = {"conclusion": "可疑", "typology": t} if flagged else {"conclusion": "正常", "typology": "无"}
    combos = [[{"conclusion": "可疑", "typology": t}, p_suspicious], [{"conclusion": "正常", "typology": "无"},
                                                                     1 - p_suspicious]]
    gold = {"conclusion": "正常" if gold_typology == "无" else "可疑", "typology": gold_typology, "reason": "x"}
    return {"task": "aml", "gold": gold, "label": gold_typology, "parsed": {**chosen, "reason": "x"},
            "pred_label": chosen["typology"], "label_scores": {"combos": combos, "confidence": {}, "multi": {}}}


# --- rows and distributions -----------------------------------------------------------------------------------------

def test_primary_distribution_is_the_marginal_of_the_allowed_combinations():
    ls = {"combos": [[{"conclusion": "可疑", "typology": "拆分交易"}, 0.3],
                     [{"conclusion": "可疑", "typology": "快进快出"}, 0.2],
                     [{"conclusion": "正常", "typology": "无"}, 0.5]]}
    assert primary_distribution(ls, "aml") == pytest.approx({"拆分交易": 0.3, "快进快出": 0.2, "无": 0.5})
    row, = confidence_rows([{"task": "aml", "gold": {"conclusion": "可疑", "typology": "快进快出"},
                             "parsed": {"conclusion": "可疑", "typology": "拆分交易"}, "pred_label": "拆分交易",
                             "label_scores": ls}])
    # the positive score is P(conclusion = 可疑) = 0.3 + 0.2, read on aml's positive_key, not its primary key
    assert row["positive_score"] == pytest.approx(0.5)
    assert row["gold_positive"] and row["answered_positive"] and row["answer"] == "拆分交易"
    assert not row["model_abstained"]
    # rows without label scores (free decoding on an exported file) are left out, not scored as 0
    assert confidence_rows([{"task": "aml", "gold": {}, "pred_label": "无"}]) == []


# --- a planted miscalibrated model ----------------------------------------------------------------------------------

def _planted(confidence: float, n_right: int, n: int = 10) -> list[dict]:
    """``n`` credit answers 通过 at ``confidence``, ``n_right`` of them right (the rest gold 拒绝)."""
    return [_credit_row(APPROVE, APPROVE if i < n_right else REJECT, confidence) for i in range(n)]


def test_a_planted_overconfident_model_is_measured_and_flagged():
    rows = confidence_rows(_planted(0.9, 6))
    m = confidence_metrics(rows, "credit")
    cal = m["calibration"]
    assert cal["ece"] == pytest.approx(0.3)  # one bin: |0.6 - 0.9|
    assert cal["brier"] == pytest.approx(0.6 * 0.1 ** 2 + 0.4 * 0.9 ** 2)
    assert cal["flag"] is True and cal["accuracy"] == pytest.approx(0.6)
    # credit's bad approvals: every gold 拒绝 answered 通过; the cost matrix charges 10 each: 4 x 10 / 10 cases
    assert m["favourable_errors"][REJECT] == {"rate": 1.0, "n": 4, "n_favourable": 4}
    assert m["costs"]["answers"]["per_case"] == pytest.approx(4.0)
    assert m["abstention"]["coverage"] == 1.0 and m["abstention"]["threshold"] is None
    # at a threshold above every confidence each case goes to a person at credit's handoff cost (1)
    at = confidence_metrics(rows, "credit", {"threshold": 0.95, "temperature": 1.0})
    assert at["abstention"]["coverage"] == 0.0 and at["abstention"]["accuracy"] is None
    assert at["abstention"]["abstained_threshold"] == 10 and at["abstention"]["abstain_value"] == HANDOFF
    assert at["costs"]["at_threshold"]["per_case"] == pytest.approx(get_task("credit").handoff_cost)
    # calibrated: confidence 0.6 with 6 of 10 right is not flagged
    assert confidence_metrics(confidence_rows(_planted(0.6, 6)), "credit")["calibration"]["flag"] is False


def test_the_report_and_the_model_card_flag_the_planted_miscalibrated_model():
    bad = {"tasks": {"credit": {"confidence": confidence_metrics(confidence_rows(_planted(0.9, 6)), "credit")}}}
    page = render_confidence_section(bad, {})
    assert "miscalibrated: credit: ECE 0.300 &gt; 0.05" in page and "<td>ECE &gt; 0.05</td>" in page
    card = "\n".join(_confidence(bad, lambda zh, en: en))
    assert "**Miscalibrated**" in card and "| ECE > 0.05 |" in card
    good = {"tasks": {"credit": {"confidence": confidence_metrics(confidence_rows(_planted(0.6, 6)), "credit")}}}
    assert "miscalibrated" not in render_confidence_section(good, {})
    assert "Miscalibrated" not in "\n".join(_confidence(good, lambda zh, en: en))


# --- the operating point ---------------------------------------------------------------------------------------------

def _validation() -> list[dict]:
    # confidences 0.95, 0.9, 0.8, 0.7, 0.6 with the fourth wrong
    return confidence_rows([_credit_row(APPROVE, APPROVE if i != 3 else REJECT, p)
                            for i, p in enumerate([0.95, 0.9, 0.8, 0.7, 0.6])])


def test_the_threshold_is_chosen_on_the_validation_split_for_the_target_accuracy():
    point = fit_operating_point(_validation(), target_accuracy=0.97, temperature=False)
    credit = point["tasks"]["credit"]
    # answering down to 0.8 keeps 3 of 5 cases, all right; 0.7 would bring in the wrong one (3/4 = 0.75)
    assert credit["threshold"] == pytest.approx(0.8) and credit["temperature"] == 1.0
    assert credit["validation"] == {"n": 5, "coverage": 0.6, "accuracy": 1.0, "met": True}
    assert credit["abstain_value"] == HANDOFF and "0.97" in credit["rule"]
    fixed = fit_operating_point(_validation(), min_confidence=0.75, temperature=False)["tasks"]["credit"]
    assert fixed["threshold"] == 0.75 and fixed["validation"]["coverage"] == 0.6
    with pytest.raises(ValueError, match="one of them"):
        fit_operating_point(_validation(), target_accuracy=0.9, min_confidence=0.5)
    # a fitted temperature is recorded with its fit and applied to the confidences before the threshold
    fitted = fit_operating_point(confidence_rows(_planted(0.9, 6)), target_accuracy=0.5)["tasks"]["credit"]
    assert fitted["temperature"] > 1 and fitted["temperature_fit"]["nll_after"] < fitted["temperature_fit"]["nll_before"]


def test_operating_point_files_are_checked_and_found_with_the_model(tmp_path):
    point = fit_operating_point(_validation(), target_accuracy=0.97, temperature=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / OPERATING_POINT_FILE).write_text(json.dumps(point), encoding="utf-8")
    assert find_operating_point(model)["tasks"]["credit"]["threshold"] == pytest.approx(0.8)
    # an artefact deep in an export bundle finds the bundle's file; outside a bundle nothing is picked up
    bundle = tmp_path / "export"
    (bundle / "onnx" / "fp32").mkdir(parents=True)
    (bundle / OPERATING_POINT_FILE).write_text(json.dumps(point), encoding="utf-8")
    assert find_operating_point(bundle / "onnx" / "fp32") is None  # no SHA256SUMS: not a bundle
    (bundle / "SHA256SUMS").write_text("", encoding="utf-8")
    assert find_operating_point(bundle / "onnx" / "fp32")["tasks"]["credit"]["threshold"] == pytest.approx(0.8)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tasks": {"credit": {"threshold": 3}}}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"tasks.credit.threshold must be a probability"):
        load_operating_point(bad)
    bad.write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not a readable operating point"):
        load_operating_point(bad)


# --- detection: operating points at real-world prevalence ------------------------------------------------------------

def test_detection_operating_points_and_alerts_at_prevalence():
    typologies = [v for v in get_task("aml").label_values if v != "无"]
    # 60 normal accounts with scores 0.00..0.59 and 12 suspicious ones (2 per typology) scored 0.995 and 0.65
    rows = [_aml_row("无", i >= 54, i / 100) for i in range(60)]
    rows += [_aml_row(t, True, s) for t in typologies for s in (0.995, 0.65)]
    m = confidence_metrics(confidence_rows(rows), "aml")
    o = m["operating_points"]
    assert (o["n_positive"], o["n_negative"]) == (12, 60)
    # the model flags all 12 and 6 of the 60 normal ones: recall 1, FPR 0.1, precision 12/18
    assert o["decision"]["recall"] == 1.0 and o["decision"]["fpr"] == pytest.approx(0.1)
    assert o["decision"]["precision"] == pytest.approx(12 / 18)
    # 60 negatives cannot support FPR 1% (needs 1000) nor 5% (needs 200)
    assert [p["estimable"] for p in o["at_fpr"]] == [False, False]
    assert "60 negatives" in o["at_fpr"][0]["reason"]
    # re-weighted to 90% normal: alerts = 1000 x (0.1 x recall 1 + 0.9 x FPR 0.1) = 190
    assert o["prevalence"]["positive"] == pytest.approx(0.1)
    assert o["decision"]["alerts_per_1000"] == pytest.approx(190.0)
    # a missed suspicious case costs 20 in aml's matrix, a needless alert 1: 6 false alerts / 72 cases
    assert m["costs"]["answers"]["per_case"] == pytest.approx(6 / 72)


# --- the split at real-world prevalence ---------------------------------------------------------------------------

def test_test_prevalence_records_follow_the_spec_shares():
    aml = get_task("aml")
    recs = generate_records("aml", 1200, 0, "test_prevalence", prevalence=aml.prevalence)
    counts = Counter(r["label"] for r in recs)
    # 无: 0.9 declared; the other 0.1 split evenly over the 6 typologies
    assert counts == {"无": 1080, **{t: 20 for t in aml.label_values if t != "无"}}
    assert all(json.loads(r["meta"])["branch"] in aml.branch_labels for r in recs)
    assert all(aml.branch_labels[json.loads(r["meta"])["branch"]] == r["label"] for r in recs)
    assert recs == generate_records("aml", 1200, 0, "test_prevalence", prevalence=aml.prevalence)
    assert len({r["id"] for r in recs}) == 1200 and recs[0]["id"] == "aml-test_prevalence-000000"
    # shuffled, not in blocks by label
    assert len({r["label"] for r in recs[:50]}) > 1


def test_the_prevalence_split_is_built_and_training_never_sees_its_prompts(tmp_path):
    from banklm.corpora.splits import corpus_splits, load_split

    stats = build_scenario({"aml": {"train": 30, "validation": 10, "test": 7, "test_prevalence": 40}}, 0,
                           tmp_path / "scenario")
    assert stats["splits"]["test_prevalence"] == 40
    assert stats["by_label"]["test_prevalence"]["aml"]["无"] == 36
    assert "test_prevalence" in corpus_splits(tmp_path / "scenario")
    prev = {m["content"] for r in load_split(tmp_path / "scenario", "test_prevalence")["messages"] for m in r}
    train = load_split(tmp_path / "scenario", "train")
    assert not any(m["content"] in prev for r in train["messages"] for m in r if m["role"] == "user")


def test_a_task_without_declared_prevalence_cannot_ask_for_the_split(repo):
    quickstart = repo / "recipes" / "quickstart.yaml"
    with pytest.raises(RecipeError, match=r"synth.credit.test_prevalence.*evaluation.prevalence"):
        load_recipe(quickstart, ["corpora.scenario.synth.credit.test_prevalence=100"])
    with pytest.raises(RecipeError, match="not both"):
        load_recipe(quickstart, ["eval.abstain.min_confidence=0.5"])
    r = load_recipe(quickstart, ["eval.abstain.min_confidence=0.5", "eval.abstain.target_accuracy=null"])
    assert (r.eval.abstain.min_confidence, r.eval.abstain.target_accuracy) == (0.5, None)


# --- with a model: evaluate_records fits, applies and writes the operating point --------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = [m["content"] for t in ("credit", "aml", "audit") for r in generate_records(t, 40, 1, "train")
             for m in r["messages"]]
    return sharpened_tiny_model(tmp_path_factory.mktemp("confidence"), texts)


def _split(split: str, n: int) -> list[dict]:
    return [r for t in ("credit", "aml", "audit") for r in generate_records(t, n, 0, split)]


@pytest.mark.parametrize("decoding", ["constrained", "free"])
def test_evaluate_records_fits_the_operating_point_and_reports_every_task(tiny, tmp_path, decoding):
    from banklm.evaluation.evaluate import ConfidenceCheck, evaluate_records

    _, model, tok = tiny
    prevalence = generate_records("aml", 30, 0, "test_prevalence", prevalence=get_task("aml").prevalence)
    check = ConfidenceCheck(validation=_split("validation", 8), test_prevalence=prevalence, target_accuracy=0.9,
                            temperature=False)
    res = evaluate_records(model, tok, _split("test", 4), tmp_path, batch_size=8, max_new_tokens=24,
                           decoding=decoding, confidence=check)
    val = [json.loads(x) for x in (tmp_path / "validation" / "predictions.jsonl").read_text().splitlines()]
    assert len(val) == 24 and all("label_scores" in v for v in val)
    point = load_operating_point(tmp_path / OPERATING_POINT_FILE)
    assert point == res["operating_point"] and set(point["tasks"]) == {"credit", "aml", "audit"}
    preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    for name, r in res["tasks"].items():
        th = point["tasks"][name]["threshold"]
        mine = [p for p in preds if p["task"] == name]
        # the coverage is the share of the answers whose label-scoring probability reaches the threshold
        dists = [primary_distribution(p["label_scores"], name) for p in mine]
        conf = [d.get(p["pred_label"], 0.0) if p["pred_label"] else 0.0 for d, p in zip(dists, mine, strict=True)]
        assert r["coverage"] == pytest.approx(sum(c >= th for c in conf) / len(mine)), name
        assert r["confidence"]["calibration"]["ece"] is not None and "risk_coverage" in r["confidence"]["abstention"]
        if decoding == "constrained":  # the answer is the scored label: its confidence is the stored one
            assert conf == pytest.approx([p["scored_confidence"] for p in mine], abs=1e-5)  # 6-digit rounding
    assert set(res["test_prevalence"]["tasks"]) == {"aml"}
    o = res["test_prevalence"]["tasks"]["aml"]["confidence"]["operating_points"]
    assert o["n"] == 30 and o["n_negative"] == 27 and not o["at_fpr"][0]["estimable"]
    assert len((tmp_path / "test_prevalence" / "predictions.jsonl").read_text().splitlines()) == 30


def test_the_threshold_travels_through_export_into_onnx_and_llama_cpp_scoring(tiny, tmp_path):
    """The bundle carries operating_point.json (in SHA256SUMS); every artefact's coverage is measured at that
    threshold, and evaluate_export reads it from the bundle without being told."""
    from banklm.export.bundle import build_export, check_sha256sums

    from banklm.evaluation.evaluate import evaluate_export, evaluate_records, label_score_predictions
    require_llama_cpp()
    d, model, tok = tiny
    records = _split("test", 3)
    # a threshold at the median PyTorch confidence of each task, so coverage is neither 0 nor 1
    rows = confidence_rows(label_score_predictions(model, tok, records, batch_size=9))
    point = fit_operating_point(rows, min_confidence=0.5, temperature=False)
    for name, entry in point["tasks"].items():
        conf = sorted(r["distribution"][r["answer"]] for r in rows if r["task"] == name)
        entry["threshold"] = conf[len(conf) // 2]
    out = tmp_path / "export"
    summary = build_export(d, out, name="tiny", prompts=[], gguf_quant=("f16",), onnx_quant=("fp32",), records=records,
                           decodings=("constrained",), eval_max_new_tokens=16, operating_point=point)
    assert f"  {OPERATING_POINT_FILE}\n" in (out / "SHA256SUMS").read_text()
    assert check_sha256sums(out) == []
    assert load_operating_point(out / OPERATING_POINT_FILE) == point
    assert summary["operating_point"]["tasks"]["credit"]["threshold"] == point["tasks"]["credit"]["threshold"]
    pt = summary["task_eval"]["pytorch"]["tasks"]
    for name in ("credit", "aml", "audit"):
        assert 0.0 < pt[name]["coverage"] < 1.0, name
    for path in (out / "onnx" / "fp32", next((out / "gguf").glob("*.gguf"))):
        res = evaluate_export(path, records, tmp_path / path.name, max_new_tokens=16, decoding="constrained")
        assert res["overall"]["runtime"].startswith("llama.cpp" if path.suffix == ".gguf" else "onnxruntime")
        assert res["operating_point"] == point  # read from the bundle
        preds = [json.loads(x) for x in (tmp_path / path.name / "predictions.jsonl").read_text().splitlines()]
        for name, r in res["tasks"].items():
            th = point["tasks"][name]["threshold"]
            mine = [p for p in preds if p["task"] == name]
            assert r["coverage"] == pytest.approx(sum(p["scored_confidence"] >= th for p in mine) / len(mine))
        # fp32 ONNX and f16 GGUF answer like PyTorch here: the same coverage (no confidence within 1e-3 of a cut)
        ref = evaluate_records(model, tok, records, tmp_path / "torch", max_new_tokens=16, decoding="constrained",
                               operating_point=point)
        near = any(abs(p["scored_confidence"] - point["tasks"][p["task"]]["threshold"]) < 1e-3 for p in preds)
        if not near:
            assert {t: r["coverage"] for t, r in res["tasks"].items()} == \
                {t: r["coverage"] for t, r in ref["tasks"].items()}


def test_random_prevalence_schedule_hits_every_declared_count():
    from banklm.corpora.synth import prevalence_branches

    aml = get_task("aml")
    for n in (7, 13, 100):
        sched = prevalence_branches(aml, n, {"无": 0.5}, random.Random(n))
        labels = Counter(aml.branch_labels[b] for b in sched)
        assert sum(labels.values()) == n and abs(labels["无"] - n / 2) <= 1


def test_a_spec_task_s_own_abstain_value_counts_as_not_answered(tmp_path):
    """post_loan declares 转人工 as its abstain value (a label the rules give too): an answer 转人工 is the model's
    own abstention, not counted as answered; below the threshold a case becomes 转人工 and costs what the spec's
    matrix says for it (预警 -> 转人工: 1)."""
    from banklm.tasks.registry import register_spec
    from tests.test_task_spec import POST_LOAN

    spec = tmp_path / "post_loan.yaml"
    spec.write_text(POST_LOAN, encoding="utf-8")
    task = register_spec(spec)
    assert task.abstain == "转人工"

    def row(answer, gold, p):
        others = [v for v in task.label_values if v != answer]
        combos = [[{"预警等级": answer}, p]] + [[{"预警等级": v}, (1 - p) / len(others)] for v in others]
        return {"task": "post_loan", "gold": {"预警等级": gold}, "parsed": {"预警等级": answer}, "pred_label": answer,
                "label_scores": {"combos": combos}}

    rows = confidence_rows([row("转人工", "转人工", 0.9), row("转人工", "预警", 0.9), row("正常", "正常", 0.9),
                            row("正常", "正常", 0.6)])
    m = confidence_metrics(rows, task)
    ab = m["abstention"]
    assert (ab["answered"], ab["abstained_model"], ab["abstained_threshold"]) == (2, 2, 0)
    assert ab["coverage"] == 0.5 and ab["accuracy"] == 1.0 and ab["abstain_value"] == "转人工"
    # the model's abstentions never enter the risk-coverage curve: it ends at coverage 2/4
    assert m["abstention"]["risk_coverage"]["points"][-1]["coverage"] == 0.5
    at = confidence_metrics(rows, task, {"threshold": 0.8, "temperature": 1.0})
    assert (at["abstention"]["answered"], at["abstention"]["abstained_threshold"]) == (1, 1)
    # answers as given: 预警 answered 转人工 costs 1, the rest 0: 1/4; at the threshold the 0.6 正常 becomes 转人工,
    # which costs nothing for gold 正常 in the matrix (正常 -> 转人工 not listed): still 1/4
    assert m["costs"]["answers"]["per_case"] == pytest.approx(0.25)
    assert at["costs"]["at_threshold"]["per_case"] == pytest.approx(0.25)
    point = fit_operating_point(rows, target_accuracy=0.97, temperature=False)["tasks"]["post_loan"]
    assert point["abstain_value"] == "转人工" and point["validation"]["coverage"] == 0.5
