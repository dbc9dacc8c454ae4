"""Model-risk evidence from prediction rows (banklm.evaluation.evidence), checked on small hand-computed fixtures."""

from __future__ import annotations

import json

import pytest

from banklm.evaluation.evidence import (
    baseline_comparison,
    key_confusions,
    ordinal_errors,
    paired_comparison,
    segment_results,
    task_intervals,
)
from banklm.evaluation.uncertainty import proportion_interval


def _row(i, decision, answer, grade="A", answer_grade="A", task="credit"):
    parsed = None if answer is None else {"decision": answer, "grade": answer_grade, "reason": "x"}
    return {"id": f"r{i}", "task": task, "gold": {"decision": decision, "grade": grade, "reason": "x"},
            "parsed": parsed, "label": decision, "pred_label": answer, "correct": answer == decision}


def test_paired_comparison_matches_records_and_runs_mcnemar():
    # a right / b wrong on 10 records, the reverse on 2, both right on 8: exact McNemar on 12 discordant pairs,
    # p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    a = [_row(i, "通过", "通过") for i in range(20)] + [_row(i, "通过", "拒绝") for i in range(20, 22)]
    b = [_row(i, "通过", "拒绝" if i < 10 else "通过") for i in range(20)] + [_row(i, "通过", "通过")
                                                                            for i in range(20, 22)]
    a.append(_row(99, "通过", "通过"))  # answered by a only: not paired
    res = paired_comparison(a, b, ("new", "old"))
    assert res["n"] == 22 and res["names"] == ["new", "old"]
    m = res["overall"]["mcnemar"]
    assert (m["a_only"], m["b_only"], m["both"], m["neither"]) == (10, 2, 10, 0)
    assert m["p_value"] == pytest.approx(2 * 79 / 4096)
    assert res["overall"]["a"]["accuracy"] == pytest.approx(20 / 22) and res["overall"]["significant"]
    assert set(res["tasks"]) == {"credit"}


def test_intervals_hold_the_accuracy_of_every_task():
    rows = [_row(i, "通过", "通过" if i % 4 else "拒绝") for i in range(40)]
    res = task_intervals(rows)
    acc = res["credit"]["accuracy"]
    assert acc["estimate"] == pytest.approx(0.75) and acc["low"] < 0.75 < acc["high"]
    assert res["overall"]["accuracy"]["estimate"] == pytest.approx(0.75)
    assert res["credit"]["macro_f1"]["low"] <= res["credit"]["macro_f1"]["estimate"] <= res["credit"]["macro_f1"]["high"]


def test_segments_count_each_value_with_its_interval():
    rows = [_row(i, "通过", "通过" if i < 7 else "拒绝") for i in range(10)]
    records = [{"id": f"r{i}", "meta": json.dumps({"guarantee": "信用" if i < 4 else "房产抵押"})} for i in range(9)]
    seg = segment_results("credit", rows, records)["guarantee"]
    # r0-r3 信用 all right; r4-r8 房产抵押: r4-r6 right, r7-r8 wrong; r9 has no record: 未提供 (wrong)
    assert {g: (v["n"], v["correct"]) for g, v in seg.items()} == {"信用": (4, 4), "房产抵押": (5, 3), "未提供": (1, 0)}
    want = proportion_interval(3, 5)
    assert (seg["房产抵押"]["low"], seg["房产抵押"]["high"]) == (want["low"], want["high"])


def test_every_categorical_key_has_its_confusion_and_grades_their_distance():
    rows = [_row(0, "通过", "通过", "A", "A"), _row(1, "通过", "通过", "A", "C"), _row(2, "拒绝", "通过", "D", "B"),
            _row(3, "拒绝", None, "E")]
    conf = key_confusions("credit", rows)
    assert set(conf) == {"decision", "grade"}
    g = conf["grade"]
    assert g["labels"][-1] == "INVALID" and g["matrix"][g["labels"].index("E")][-1] == 1
    assert g["matrix"][0][g["labels"].index("C")] == 1  # gold A answered C
    err = ordinal_errors("credit", rows)["grade"]
    # distances 0, 2 (A->C), 2 (D->B); the unparseable answer is counted apart
    assert err == {"n": 3, "unparseable": 1, "mean_abs_error": pytest.approx(4 / 3), "off_by_2_or_more": 2 / 3}


def test_a_baseline_that_beats_the_model_is_said_so():
    rows = [_row(i, "通过", "通过" if i < 12 else "拒绝") for i in range(20)]  # the model: 12 of 20
    ids = [f"r{i}" for i in range(20)]
    rules = {"name": "rules", "available": True, "predictions": ["通过"] * 20, "correct": [True] * 20}
    lr = {"name": "logistic_regression", "available": True, "predictions": ["拒绝"] * 20, "correct": [False] * 20}
    gb = {"name": "gradient_boosting", "available": False, "reason": "one class"}
    res = baseline_comparison(rows, {"credit": {"rules": rules, "tabular": [lr, gb], "test_ids": ids}})["credit"]
    assert res["rules"]["model_worse"] and res["rules"]["significantly"]  # 8 discordant: p = 2/256
    assert res["rules"]["mcnemar"]["p_value"] == pytest.approx(2 / 2 ** 8)
    assert not res["logistic_regression"]["model_worse"]
    assert res["gradient_boosting"] == {"available": False, "reason": "one class"}
