"""Metric values checked against small hand-computed examples (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
from banklm.corpora.synth import generate_records

from banklm.evaluation.evaluate import score_records
from banklm.evaluation.faithfulness import faithfulness, field_binding
from banklm.evaluation.metrics import (
    INVALID,
    accuracy,
    confusion_matrix,
    fairness,
    format_compliance,
    macro_f1,
    mcc,
    multi_label_metrics,
    positive_class_metrics,
)
from banklm.tasks import CREDIT
from banklm.tasks.formats import extract_numbers
from banklm.tasks.grammar import attached_numbers, binding_names, binding_values, task_units
from banklm.tasks.registry import task_from_spec
from banklm.tasks.spec import parse_spec

GOLD = ["A", "A", "A", "B", "B", "C"]
PRED = ["A", "A", "B", "B", None, "A"]


def test_accuracy_counts_none_as_wrong():
    # correct: positions 0, 1, 3 -> 3 / 6
    assert accuracy(GOLD, PRED) == pytest.approx(0.5)
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy(["A"], [])


def test_confusion_matrix_stable_order_and_invalid():
    cm = confusion_matrix(GOLD, PRED, labels=["A", "B", "C"])
    # rows gold A,B,C; columns A,B,C,INVALID
    assert cm["labels"] == ["A", "B", "C", INVALID]
    assert cm["matrix"] == [
        [2, 1, 0, 0],  # gold A: A,A,B
        [0, 1, 0, 1],  # gold B: B, None
        [1, 0, 0, 0],  # gold C: A
        [0, 0, 0, 0],
    ]
    # label order given explicitly survives whatever the data order is
    assert confusion_matrix(["C", "A"], ["C", "A"], labels=["A", "B", "C"])["labels"] == ["A", "B", "C"]
    # a prediction outside the label set is INVALID
    assert confusion_matrix(["A"], ["Z"], labels=["A"])["matrix"] == [[0, 1], [0, 0]]


def test_macro_f1_hand_computed():
    # A: tp=2, predicted A = 3 (pos 0,1,5), support 3 -> P=2/3, R=2/3, F1=2/3
    # B: tp=1, predicted B = 2 (pos 2,3), support 2 -> P=1/2, R=1/2, F1=1/2
    # C: tp=0 -> F1=0
    # macro = (2/3 + 1/2 + 0) / 3 = 7/18
    assert macro_f1(GOLD, PRED, ["A", "B", "C"]) == pytest.approx(7 / 18)
    # a class in the label list but absent from gold and predictions is not averaged
    assert macro_f1(GOLD, PRED, ["A", "B", "C", "D"]) == pytest.approx(7 / 18)
    assert macro_f1(["A", "B"], ["A", "B"]) == 1.0


def test_mcc_gorodkin_hand_computed():
    # matrix over A,B,C,INVALID (see confusion test): s=6, c=3
    # t (gold counts) = [3,2,1,0]; p (pred counts) = [3,2,0,1]
    # sum p_k t_k = 9+4+0+0 = 13; sum p^2 = 9+4+0+1 = 14; sum t^2 = 9+4+1 = 14
    # R_K = (3*6 - 13) / sqrt((36-14)(36-14)) = 5/22
    assert mcc(GOLD, PRED, ["A", "B", "C"]) == pytest.approx(5 / 22)
    assert mcc(["A", "B", "A"], ["A", "B", "A"]) == pytest.approx(1.0)
    assert mcc(["A", "A"], ["A", "A"]) == 0.0  # degenerate denominator


def test_mcc_binary_matches_classic_formula():
    gold = ["p", "p", "p", "n", "n", "n", "n"]
    pred = ["p", "p", "n", "p", "n", "n", "n"]
    # tp=2 fn=1 fp=1 tn=3: (tp*tn - fp*fn)/sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (6-1)/sqrt(3*3*4*4) = 5/12
    assert mcc(gold, pred, ["p", "n"]) == pytest.approx(5 / 12)


def test_format_compliance():
    texts = [
        "结论：通过；风险等级：B；理由：负债收入比31.0%，近24个月逾期1次",
        "结论:通过;风险等级:B;理由:x",
        "乱码",
    ]
    # only the first has the exact layout -> 1/3
    assert format_compliance(texts, CREDIT.parse) == pytest.approx(1 / 3)


def test_positive_class_metrics_hand_computed():
    g = [
        {"conclusion": "可疑", "typology": "拆分交易"},
        {"conclusion": "可疑", "typology": "快进快出"},
        {"conclusion": "可疑", "typology": "循环交易"},
        {"conclusion": "正常", "typology": "无"},
        {"conclusion": "正常", "typology": "无"},
    ]
    p = [
        {"conclusion": "可疑", "typology": "拆分交易"},
        {"conclusion": "可疑", "typology": "循环交易"},
        None,
        {"conclusion": "可疑", "typology": "拆分交易"},
        {"conclusion": "正常", "typology": "无"},
    ]
    m = positive_class_metrics(g, p, "conclusion", "可疑", ["typology"])
    # 3 gold suspicious, 2 predicted suspicious among them -> recall 2/3
    # typology right on 1 of those 2 true positives -> 1/2; 1 of 2 gold normal flagged -> FPR 1/2
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["detail_accuracy_tp"] == {"typology": pytest.approx(0.5)}
    assert m["false_positive_rate"] == pytest.approx(0.5)
    assert (m["n_positive"], m["n_true_positive"], m["key"], m["value"]) == (3, 2, "conclusion", "可疑")


def test_multi_label_metrics_hand_computed():
    gold = [{"拆分交易", "快进快出"}, {"快进快出"}, set(), {"涉赌"}]
    pred = [{"拆分交易"}, {"快进快出", "涉赌"}, set(), None]
    m = multi_label_metrics(gold, pred, ["拆分交易", "快进快出", "涉赌", "地下钱庄"])
    # 拆分交易: tp 1, predicted 1, gold 1 -> P 1, R 1; 快进快出: tp 1, predicted 1, gold 2 -> P 1, R 0.5
    # 涉赌: tp 0, predicted 1, gold 1 -> 0/0; 地下钱庄 never occurs -> left out
    assert set(m["per_value"]) == {"拆分交易", "快进快出", "涉赌"}
    assert m["per_value"]["快进快出"]["recall"] == pytest.approx(0.5)
    assert m["per_value"]["快进快出"]["f1"] == pytest.approx(2 / 3)
    assert m["per_value"]["涉赌"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["exact_set_match"] == pytest.approx(1 / 4)  # only the empty set matches


def test_extract_numbers_normalisation():
    assert extract_numbers("4.5万") == [("num", 45000.0)]
    assert extract_numbers("45,000元") == [("num", 45000.0)]
    assert extract_numbers("４５０００元") == [("num", 45000.0)]
    assert extract_numbers("52.0%") == extract_numbers("５２％") == [("pct", 52.0)]
    assert extract_numbers("2024年3月5日") == [("date", 2024, 3, 5)]
    assert extract_numbers("2024-03-05") == [("date", 2024, 3, 5)]
    assert extract_numbers("逾期3次，查询12次") == [("num", 3.0), ("num", 12.0)]
    assert extract_numbers("无数字") == []


def test_faithfulness_catches_planted_numbers():
    inputs = [
        "月收入18,500元，负债收入比52.3%，近24个月逾期2次，2024年3月5日申请",
        "近7日单笔4.5万至5万元现金存入3笔",
        "近7日单笔4.5万至5万元现金存入3笔",
        "任意",
    ]
    reasons = [
        "月收入1.85万元，负债收入比52.3%，2024-03-05申请",  # all supported (1.85万 == 18,500)
        "现金存入4笔，单笔45000元",  # 4 is planted (45000 == 4.5万 is fine)
        "负债收入比52.3%，逾期2次",  # both planted (not in this input)
        None,  # unparseable answer: not checked
    ]
    res = faithfulness(inputs, reasons)
    assert res["per_answer"] == [[], ["4"], ["52.3%", "2"], None]
    # 2 of 3 checked answers have unsupported numbers; 3 unsupported of 3+2+2 = 7 cited numbers
    assert res["hallucination_rate"] == pytest.approx(2 / 3)
    assert res["unsupported_number_rate"] == pytest.approx(3 / 7)
    assert res["n_checked"] == 3
    # a rule constant can be allowed explicitly
    assert faithfulness(["x"], ["超过70%"], allowed=[("pct", 70.0)])["hallucination_rate"] == 0.0


def test_fairness_flags_planted_bias():
    groups = {"gender": ["男"] * 4 + ["女"] * 4, "hukou": ["城镇", "农村"] * 4}
    pred = ["通过", "通过", "通过", "通过", "通过", "拒绝", None, "拒绝"]
    gold = ["通过", "通过", "通过", "拒绝", "通过", "拒绝", "通过", "拒绝"]
    res = fairness(groups, pred, gold, favourable="通过")
    # gender: 男 4/4 = 1.0, 女 1/4 = 0.25 -> ratio 0.25 < 0.8 -> flag
    assert res["gender"]["rates"] == {"女": 0.25, "男": 1.0}
    assert res["gender"]["ratio"] == pytest.approx(0.25) and res["gender"]["flag"]
    # accuracy: 男 3/4 (pos 3 wrong), 女 3/4 (pos 6 None wrong) -> gap 0
    assert res["gender"]["accuracy"] == {"女": 0.75, "男": 0.75}
    assert res["gender"]["accuracy_gap"] == pytest.approx(0.0)
    # hukou: 城镇 = pos 0,2,4,6 -> 通过 x3 of 4 = 0.75; 农村 = pos 1,3,5,7 -> 2/4 = 0.5; ratio 2/3
    assert res["hukou"]["ratio"] == pytest.approx(2 / 3) and res["hukou"]["flag"]
    assert res["any_flag"]
    fair = fairness({"gender": ["男", "女"] * 5}, ["通过", "通过", "拒绝", "拒绝"] * 2 + ["通过", "通过"],
                    favourable="通过")
    # 男 = pos 0,2,4,6,8: 通过,拒绝,通过,拒绝,通过 = 3/5; 女 = pos 1,3,5,7,9: same = 3/5 -> ratio 1
    assert (
        fair["gender"]["ratio"] == pytest.approx(1.0) and not fair["gender"]["flag"] and not fair["any_flag"]
    )
    assert math.isclose(fairness({"g": ["a", "b"]}, ["拒绝", "拒绝"], favourable="通过")["g"]["ratio"], 1.0)


def test_fairness_counts_the_favourable_value_of_the_spec():
    """A task whose favourable value is not 通过 (here 正常 of a 贷后预警 task): a model that flags one group
    far more often is flagged; with 通过 as the favourable value nothing would be counted (every rate 0)."""
    groups = {"gender": ["男"] * 4 + ["女"] * 4}
    pred = ["正常", "正常", "正常", "关注", "预警", "预警", "正常", "预警"]
    res = fairness(groups, pred, favourable="正常")
    assert res["gender"]["rates"] == {"女": 0.25, "男": 0.75} and res["gender"]["flag"]
    assert not fairness(groups, pred, favourable="通过")["any_flag"]


# ------------------------------------------------------------------------------------------------
# field binding: a number after a field's name must be that field's value

MORTGAGE = """
name: mortgage
title: 房贷审批
fields:
  负债收入比: {type: percent}
  首付比例: {type: percent}
  逾期天数: {type: integer, unit: 天}
  申请金额: {type: decimal, unit: 万元}
answer:
  keys:
    结论: {values: [通过, 拒绝]}
    理由: {type: reason, max_length: 40}
  primary: 结论
rules:
  - name: overdue
    when: 逾期天数 > 90
    outcome: {结论: 拒绝}
    reason: 逾期{{ 逾期天数 }}天，超过90天
  - name: ok
    outcome: {结论: 通过}
    reason: 负债收入比{{ 负债收入比 | pct }}，首付{{ 首付比例 | pct }}
"""


def test_field_binding_flags_a_number_cited_after_another_fields_name():
    t = task_from_spec(parse_spec(MORTGAGE, "mortgage.yaml"))
    names = binding_names(t)
    assert names["负债收入比"] == {"负债收入比"} and names["首付"] == {"首付比例"} and names["逾期"] == {"逾期天数"}
    vals = binding_values(t, {"负债收入比": 65.0, "首付比例": 30.0, "逾期天数": 120, "申请金额": 80})
    assert vals["负债收入比"] == {("pct", 65.0)} and vals["申请金额"] == {("num", 800000.0)}
    reasons = [
        "负债收入比30.0%过高",                      # 首付比例's value after 负债收入比: 1 error of 1
        "负债收入比65.0%，首付30.0%，逾期120天",       # all three right
        "负债收入比为65.0%，申请金额80万元",            # a short connective between name and number still binds
        "近期有30.0%的资金回流，另有120天未还",         # no field name before either number: not counted
        "负债收入比偏高，30.0%",                      # the name is in the previous clause: not counted
        "逾期天数120天超过90天",                      # 90 follows a number, not a name: not counted
        None,                                      # no reason
        "负债收入比30.0%",                           # a record without fields: skipped, counted
    ]
    res = field_binding(reasons, [vals] * 7 + [None], names, task_units(t))
    assert res["per_answer"][0] == [{"number": "30.0%", "fields": ["负债收入比"], "equals": ["首付比例"]}]
    assert res["per_answer"][1:6] == [[], [], [], [], []] and res["per_answer"][6:] == [None, None]
    assert res["n_bound_numbers"] == 1 + 3 + 2 + 1 and res["n_binding_errors"] == 1
    assert res["field_binding_error_rate"] == pytest.approx(1 / 7) and res["n_binding_skipped"] == 1
    # a number equal to no field's value is an error too; nothing bound: no rate
    assert field_binding(["逾期99天"], [vals], names)["per_answer"] == [
        [{"number": "99天", "fields": ["逾期天数"], "equals": []}]]
    assert field_binding(["无逾期"], [vals], names)["field_binding_error_rate"] is None


def test_field_binding_in_the_task_metrics_and_predictions():
    recs = generate_records("credit", 8, seed=2, split="test")
    outs = [r["messages"][-1]["content"] for r in recs]
    f = CREDIT.fields_from_meta(recs[0]["meta"])
    outs[0] = f"结论：拒绝；风险等级：D；理由：负债收入比{f['monthly_debt']}元过高"  # 月还款's value after 负债收入比
    prompt_only = {**recs[1], "meta": "{}"}  # no fields in meta (a table row in prompt mode)
    res, preds = score_records([*recs, prompt_only], [*outs, outs[1]])
    r = res["tasks"]["credit"]
    assert preds[0]["binding_errors"] == [{"number": f"{f['monthly_debt']}元", "fields": ["dti"],
                                           "equals": ["monthly_debt"]}]
    assert all(p["binding_errors"] == [] for p in preds[1:8]) and preds[8]["binding_errors"] is None
    n_gold = sum(len(attached_numbers(o.split("理由：")[1], binding_names(CREDIT))) for o in outs[1:])
    assert r["n_bound_numbers"] == n_gold + 1 and r["n_binding_skipped"] == 1
    assert r["field_binding_error_rate"] == pytest.approx(1 / (n_gold + 1))
