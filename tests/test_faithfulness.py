"""Faithfulness that can fail (banklm.evaluation.faithfulness), on planted wrong answers: a number copied from the
wrong field, a reason that argues against the label, a reason with nothing checkable counted as such."""

from __future__ import annotations

import json

import pytest
from banklm.corpora.synth import generate_records

from banklm.evaluation.faithfulness import (
    CONSISTENT,
    CONTRADICTS,
    UNCHECKED,
    faithfulness,
    field_binding,
    reason_label_consistency,
)
from banklm.tasks import get_task
from banklm.tasks.grammar import binding_names, binding_values, task_units

CREDIT = get_task("credit")
FIELDS = {"applicant": "王某", "gender": "男", "age": 40, "hukou": "城镇", "region": "东部", "city": "苏州",
          "industry": "餐饮", "purpose": "进货", "years_in_business": 5, "amount_wan": 30.0, "term_months": 12,
          "guarantee": "信用", "monthly_income": 20000, "monthly_debt": 12400, "dti": 62.0, "overdue_24m": 1,
          "inquiries_6m": 3, "blacklist": False}


def _statuses(reasons, labels, fields=None):
    res = reason_label_consistency(CREDIT, reasons, labels, fields)
    return [p["status"] if p else None for p in res["per_answer"]], res


def test_a_reason_from_a_rule_of_another_outcome_contradicts_the_label():
    # dti 62% fires dti_high (拒绝): its reason given with 通过 argues against the label
    reason = "负债收入比62.0%过高"
    got, res = _statuses([reason, reason], ["通过", "拒绝"], [FIELDS, FIELDS])
    assert got == [CONTRADICTS, CONSISTENT]
    assert res["per_answer"][0]["rules"] == ["dti_high"] and res["contradiction_rate"] == 0.5
    # matched by the template's words alone when the record's fields are not at hand
    assert _statuses(["负债收入比75.5%过高"], ["通过"])[0] == [CONTRADICTS]


def test_the_most_specific_template_decides():
    # standard (通过) writes 负债收入比…，近24个月逾期…次, which holds overdue_many's (拒绝) 近24个月逾期…次
    reason = "负债收入比30.1%，近24个月逾期1次"
    assert _statuses([reason, reason], ["通过", "拒绝"])[0] == [CONSISTENT, CONTRADICTS]


def test_a_cited_deciding_field_counts_and_a_reason_with_nothing_checkable_is_counted_as_such():
    # 近6个月征信查询… is inquiries_many's (人工复核) template wording; "申请资料齐全" has nothing to check
    reason = "近6个月征信查询次数较多"
    got, res = _statuses([reason, reason, "申请资料齐全，经营稳定", None], ["通过", "人工复核", "通过", "通过"])
    assert got == [CONTRADICTS, CONSISTENT, UNCHECKED, None]
    assert res["per_answer"][0]["rules"] == ["inquiries_many"]
    assert (res["n_checked"], res["consistent"], res["contradicts"], res["unchecked"]) == (3, 1, 1, 1)
    assert res["contradiction_rate"] == 0.5 and res["unchecked_rate"] == pytest.approx(1 / 3)
    # no template's wording, but a field's name: 担保方式 (guarantee) decides prime (通过) and large_unsecured
    # (人工复核), no 拒绝 rule: consistent with 通过, contradicting 拒绝
    got, res = _statuses(["担保方式为信用"] * 2, ["通过", "拒绝"])
    assert got == [CONSISTENT, CONTRADICTS] and res["per_answer"][1]["fields"] == ["guarantee"]
    assert res["per_answer"][1]["rules"] == ["large_unsecured", "prime"]
    # dti decides 通过 (prime) and 拒绝 (dti_high): a reason citing it alone agrees with both
    assert _statuses(["负债收入比较低"] * 2, ["通过", "拒绝"])[0] == [CONSISTENT, CONSISTENT]


def test_gold_reasons_agree_with_their_labels_and_disagree_with_every_other_label():
    for name in ("credit", "aml", "audit"):
        task = get_task(name)
        recs = generate_records(name, 60, 0, "test")
        reasons = [json.loads(r["gold"])[task.reason_key] for r in recs]
        fields = [task.fields_from_meta(r["meta"]) for r in recs]
        res = reason_label_consistency(task, reasons, [r["label"] for r in recs], fields)
        assert res["consistent"] == 60, name
        for i, r in enumerate(recs):
            for other in (v for v in task.label_values if v != r["label"]):
                one = reason_label_consistency(task, [reasons[i]], [other], [fields[i]])
                assert one["contradicts"] == 1, (name, reasons[i], other)


def test_a_spec_without_rules_checks_nothing():
    from banklm.tasks.registry import task_from_spec
    from banklm.tasks.spec import parse_spec
    from tests.test_task_spec import POST_LOAN

    text = POST_LOAN[: POST_LOAN.index("rules:")] + POST_LOAN[POST_LOAN.index("evaluation:") :]
    task = task_from_spec(parse_spec(text, "post_loan.yaml"))
    res = reason_label_consistency(task, ["逾期120天"], ["预警"])
    assert res["available"] is False and res["unchecked"] == 1 and res["contradiction_rate"] is None


def test_a_number_from_the_wrong_field_is_in_the_input_but_fails_the_binding():
    # 12400 is the monthly repayment; written after 月收入 it passes the number check and fails the binding
    reason = "月收入12400元，负债收入比62.0%过高"
    prompt = "月收入20000元，月还款12400元，负债收入比62.0%"
    assert faithfulness([prompt], [reason])["hallucination_rate"] == 0.0
    fb = field_binding([reason], [binding_values(CREDIT, FIELDS)], binding_names(CREDIT), task_units(CREDIT))
    assert fb["n_binding_errors"] == 1 and fb["per_answer"][0][0]["equals"] == ["monthly_debt"]


def test_reasons_without_numbers_are_counted_apart():
    res = faithfulness(["负债收入比62.0%"] * 3, ["负债收入比过高", "负债收入比62.0%", None])
    assert (res["n_checked"], res["n_without_numbers"], res["hallucination_rate"]) == (2, 1, 0.0)
