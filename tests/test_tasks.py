"""Scenario tasks: parsers, labelling rules (incl. near-threshold), generators, perturbations, table loader."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from banklm.corpora.synth import generate_records

from banklm.evaluation.faithfulness import faithfulness
from banklm.tasks import TASKS, get_task, perturb
from banklm.tasks.aml import AML
from banklm.tasks.audit import AUDIT
from banklm.tasks.base import to_fullwidth_digits
from banklm.tasks.credit import CREDIT
from banklm.tasks.tables import from_table

# ---------------------------------------------------------------------------------------------
# registry


def test_get_task_and_error_lists_names():
    assert get_task("credit") is CREDIT and get_task(AML) is AML
    with pytest.raises(ValueError, match="credit, aml, audit"):
        get_task("loans")


def test_task_metadata():
    assert CREDIT.label_values == ["通过", "拒绝", "人工复核"]
    assert AML.label_values[-1] == "无" and len(AML.label_values) == 7
    assert AUDIT.label_values == ["发票不合规", "超标准报销", "拆分审批", "关联交易未披露", "无异常"]
    for t in TASKS.values():
        assert len(set(t.branches)) == len(t.branches) >= 5
        assert t.__class__.__name__ == "Task" and t.reason_key in t.answer_keys


# ---------------------------------------------------------------------------------------------
# parser

CREDIT_GOLD = {"decision": "拒绝", "grade": "D", "reason": "负债收入比72.4%过高"}


@pytest.mark.parametrize(
    "text",
    [
        "结论：拒绝；风险等级：D；理由：负债收入比72.4%过高",
        "结论:拒绝;风险等级:D;理由:负债收入比72.4%过高",
        "结论 ： 拒绝 ； 风险等级 ： D ； 理由 ： 负债收入比72.4%过高",
        "风险等级：D；理由：负债收入比72.4%过高；结论：拒绝",
        "理由：负债收入比72.4%过高\n结论：拒绝\n风险等级：D",
        "审批意见如下。结论：拒绝；风险等级：D级；理由：负债收入比72.4%过高。",
        "结论：拒绝；风险等级：ｄ；理由：负债收入比72.4%过高；",
    ],
)
def test_parse_tolerant_variants(text):
    assert CREDIT.parse(text) == CREDIT_GOLD


@pytest.mark.parametrize(
    "text",
    [
        "",
        "我认为应该拒绝",
        "结论：拒绝；风险等级：D",  # reason missing
        "结论：同意；风险等级：D；理由：x",  # decision not allowed
        "结论：拒绝；风险等级：F；理由：x",  # grade not allowed
        "结论：拒绝；风险等级：D；理由：",  # empty reason
        "<unk><unk>",
    ],
)
def test_parse_garbage_is_none(text):
    assert CREDIT.parse(text) is None


def test_parse_none_input():
    assert CREDIT.parse(None) is None


def test_parse_strict_mode():
    good = "结论：拒绝；风险等级：D；理由：负债收入比72.4%过高"
    assert CREDIT.parse(good, strict=True) == CREDIT_GOLD
    for bad in [
        "结论:拒绝;风险等级:D;理由:负债收入比72.4%过高",
        "风险等级：D；结论：拒绝；理由：负债收入比72.4%过高",
        "结论： 拒绝；风险等级：D；理由：负债收入比72.4%过高",
        "好的。结论：拒绝；风险等级：D；理由：负债收入比72.4%过高",
        "结论：拒绝；风险等级：D级；理由：负债收入比72.4%过高",
    ]:
        assert CREDIT.parse(bad, strict=True) is None, bad
        assert CREDIT.parse(bad) is not None, bad


def test_parse_aml_and_audit_layouts():
    aml = "结论：可疑；类型：分散转入、集中转出；理由：转入对手方16个，转出对手方1个"
    assert AML.parse(aml) == {
        "conclusion": "可疑",
        "typology": "分散转入集中转出",
        "reason": "转入对手方16个，转出对手方1个",
    }
    assert AML.parse(aml, strict=True) is None
    aud = "严重程度:中; 依据: 报销金额8460元超过标准6000元，超标41.0%; 结论: 超标准报销"
    assert AUDIT.parse(aud) == {
        "category": "超标准报销",
        "severity": "中",
        "basis": "报销金额8460元超过标准6000元，超标41.0%",
    }
    assert AUDIT.parse("结论：超标准报销；严重程度：严重；依据：x") is None


def test_format_answer_layout():
    assert CREDIT.format_answer(CREDIT_GOLD) == "结论：拒绝；风险等级：D；理由：负债收入比72.4%过高"
    a = {"category": "无异常", "severity": "低", "basis": "发票、审批与标准均符合规定"}
    assert AUDIT.format_answer(a) == "结论：无异常；严重程度：低；依据：发票、审批与标准均符合规定"


# ---------------------------------------------------------------------------------------------
# labelling rules: one hand-built case per branch, plus the cases either side of each threshold


def credit_fields(**kw):
    f = {
        "applicant": "王某",
        "gender": "女",
        "age": 35,
        "hukou": "农村",
        "region": "中部",
        "city": "襄阳",
        "industry": "餐饮",
        "purpose": "经营周转",
        "years_in_business": 5,
        "amount_wan": 20.0,
        "term_months": 12,
        "guarantee": "保证人担保",
        "monthly_income": 10000,
        "monthly_debt": 4000,
        "dti": 40.0,
        "overdue_24m": 1,
        "inquiries_6m": 2,
        "blacklist": False,
    }
    f.update(kw)
    return f


@pytest.mark.parametrize(
    "kw,rule,decision,grade",
    [
        ({"blacklist": True, "dti": 90.0}, "blacklist", "拒绝", "E"),
        ({"dti": 70.1}, "dti_high", "拒绝", "D"),
        ({"dti": 70.0}, "dti_mid", "人工复核", "C"),  # 70.0 is not > 70
        ({"overdue_24m": 3}, "overdue_many", "拒绝", "D"),
        ({"overdue_24m": 2}, "standard", "通过", "B"),
        ({"inquiries_6m": 6, "dti": 60.0}, "inquiries_many", "人工复核", "C"),
        ({"inquiries_6m": 5}, "standard", "通过", "B"),
        ({"dti": 50.0}, "dti_mid", "人工复核", "C"),
        ({"dti": 49.9}, "standard", "通过", "B"),
        ({"amount_wan": 50.0, "guarantee": "信用"}, "large_unsecured", "人工复核", "C"),
        ({"amount_wan": 49.0, "guarantee": "信用"}, "standard", "通过", "B"),
        ({"amount_wan": 80.0, "guarantee": "房产抵押", "dti": 29.9, "overdue_24m": 0}, "prime", "通过", "A"),
        ({"guarantee": "房产抵押", "dti": 30.0, "overdue_24m": 0}, "standard", "通过", "B"),
        ({"guarantee": "房产抵押", "dti": 20.0, "overdue_24m": 1}, "standard", "通过", "B"),
    ],
)
def test_credit_rules(kw, rule, decision, grade):
    ans = CREDIT.label(credit_fields(**kw))
    assert (ans["rule"], ans["decision"], ans["grade"]) == (rule, decision, grade)


def test_credit_reason_copies_numbers():
    ans = CREDIT.label(credit_fields(dti=72.4))
    assert ans["reason"] == "负债收入比72.4%过高"
    assert CREDIT.label(credit_fields(overdue_24m=4))["reason"] == "近24个月逾期4次"


def test_credit_rules_ignore_protected_attributes():
    base = credit_fields(dti=55.0)
    outs = {
        json.dumps(CREDIT.gold({**base, "gender": g, "hukou": h, "region": r, "age": a}))
        for g in ("男", "女")
        for h in ("城镇", "农村")
        for r in ("东部", "西部")
        for a in (25, 50)
    }
    assert len(outs) == 1


def aml_fields(**kw):
    f = {
        "customer": "陈某",
        "customer_type": "个人",
        "occupation": "教师",
        "monthly_income": 8000,
        "account_years": 3,
        "struct_count": 0,
        "out48_pct": 20.0,
        "in_cp": 3,
        "out_cp": 4,
        "cash_multiple": 1.5,
        "return_pct": 5.0,
        "foreign_region": "无",
    }
    f.update(kw)
    return f


@pytest.mark.parametrize(
    "kw,rule,typ",
    [
        ({"foreign_region": "伊朗", "struct_count": 5}, "high_risk_region", "与高风险地区往来"),
        ({"foreign_region": "新加坡"}, "normal", "无"),
        ({"struct_count": 3, "out48_pct": 95.0}, "structuring", "拆分交易"),
        ({"struct_count": 2}, "normal", "无"),
        ({"out48_pct": 90.0}, "pass_through", "快进快出"),
        ({"out48_pct": 89.9}, "normal", "无"),
        ({"in_cp": 10, "out_cp": 2}, "fan_in_out", "分散转入集中转出"),
        ({"in_cp": 9, "out_cp": 1}, "normal", "无"),
        ({"in_cp": 20, "out_cp": 3}, "normal", "无"),
        ({"cash_multiple": 10.0}, "cash_identity", "与身份不符的大额现金"),
        ({"cash_multiple": 9.9}, "normal", "无"),
        ({"return_pct": 80.0}, "round_trip", "循环交易"),
        ({"return_pct": 79.9}, "normal", "无"),
    ],
)
def test_aml_rules(kw, rule, typ):
    ans = AML.label(aml_fields(**kw))
    assert (ans["rule"], ans["typology"]) == (rule, typ)
    assert ans["conclusion"] == ("正常" if typ == "无" else "可疑")


def audit_fields(**kw):
    f = {
        "department": "办公室",
        "claimant": "李某",
        "expense": "差旅费",
        "standard": 3000,
        "amount": 2800,
        "over_pct": 0.0,
        "invoice_ok": True,
        "title_ok": True,
        "relation": "无",
        "disclosed": False,
        "same_count": 1,
        "same_total": 2800,
        "approval_limit": 20000,
    }
    f.update(kw)
    return f


@pytest.mark.parametrize(
    "kw,rule,cat,sev",
    [
        ({"invoice_ok": False, "title_ok": False}, "invoice_fake", "发票不合规", "高"),
        ({"title_ok": False}, "invoice_title", "发票不合规", "中"),
        (
            {"relation": "经办人配偶控股的企业", "disclosed": False},
            "related_undisclosed",
            "关联交易未披露",
            "高",
        ),
        ({"relation": "经办人配偶控股的企业", "disclosed": True}, "clean", "无异常", "低"),
        ({"same_count": 3, "same_total": 20100}, "split_approval", "拆分审批", "中"),
        ({"same_count": 3, "same_total": 20000}, "clean", "无异常", "低"),
        ({"amount": 3903, "over_pct": 30.1}, "over_major", "超标准报销", "中"),
        ({"amount": 3900, "over_pct": 30.0}, "over_minor", "超标准报销", "低"),
        ({"amount": 3003, "over_pct": 0.1}, "over_minor", "超标准报销", "低"),
        ({}, "clean", "无异常", "低"),
    ],
)
def test_audit_rules(kw, rule, cat, sev):
    ans = AUDIT.label(audit_fields(**kw))
    assert (ans["rule"], ans["category"], ans["severity"]) == (rule, cat, sev)


# ---------------------------------------------------------------------------------------------
# sampling and generation


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("difficulty", [0.0, 0.5, 1.0])
def test_sample_hits_requested_branch(name, difficulty):
    t = TASKS[name]
    rng = random.Random(7)
    for b in t.branches:
        for _ in range(20):
            assert t.label(t.sample(rng, b, difficulty))["rule"] == b
    with pytest.raises(ValueError, match="unknown branch"):
        t.sample(rng, "nope")


def test_difficulty_moves_samples_to_thresholds():
    rng = random.Random(3)
    hard = [CREDIT.sample(rng, "dti_high", 1.0)["dti"] for _ in range(50)]
    easy = [CREDIT.sample(rng, "dti_high", 0.0)["dti"] for _ in range(50)]
    assert all(70 < x <= 70.3 for x in hard)
    assert max(easy) > 80
    hard_st = [AML.sample(rng, "structuring", 1.0)["struct_count"] for _ in range(30)]
    assert set(hard_st) == {3}
    # the rules avoided before the deciding one sit just below their thresholds, too
    hard_norm = [AML.sample(rng, "normal", 1.0) for _ in range(30)]
    assert all(f["struct_count"] == 2 and 89 <= f["out48_pct"] < 90 for f in hard_norm)


@pytest.mark.parametrize("name", list(TASKS))
def test_generate_records_format_balance_and_roundtrip(name):
    t = get_task(name)
    recs = generate_records(name, 10 * len(t.branches), seed=1, split="train")
    assert [r["id"] for r in recs[:2]] == [f"{name}-train-000000", f"{name}-train-000001"]
    branches = Counter(json.loads(r["meta"])["branch"] for r in recs)
    assert branches == Counter({b: 10 for b in t.branches})
    prompts, reasons = [], []
    for r in recs:
        assert set(r) == {"id", "task", "messages", "label", "gold", "meta", "target"} and r["task"] == name
        assert r["target"] == "answer"
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        gold = json.loads(r["gold"])
        answer = r["messages"][1]["content"]
        assert t.parse(answer) == gold and t.parse(answer, strict=True) == gold
        assert r["label"] == t.primary_label(gold) and r["label"] in t.label_values
        meta = json.loads(r["meta"])
        assert t.gold(t.fields_from_meta(meta)) == gold
        assert 80 <= len(r["messages"][0]["content"]) <= 200
        assert len(answer) <= 60
        prompts.append(r["messages"][0]["content"])
        reasons.append(gold[t.reason_key])
    # every number a gold reason cites is copied from its prompt
    assert faithfulness(prompts, reasons)["hallucination_rate"] == 0.0
    assert len(set(prompts)) == len(prompts)


def test_generate_records_deterministic_and_seed_split_dependent():
    a = generate_records("credit", 24, seed=5, split="train")
    assert a == generate_records("credit", 24, seed=5, split="train")
    b = generate_records("credit", 24, seed=6, split="train")
    c = generate_records("credit", 24, seed=5, split="test")
    pa = {r["messages"][0]["content"] for r in a}
    assert not pa & {r["messages"][0]["content"] for r in b}
    assert not pa & {r["messages"][0]["content"] for r in c}
    assert c[0]["id"] == "credit-test-000000"
    with pytest.raises(ValueError):
        generate_records("credit", 3, seed=0, split="x", difficulty=1.5)


def test_credit_protected_attributes_independent_of_label():
    recs = generate_records("credit", 1600, seed=0, split="train")
    by = {}
    for r in recs:
        m = json.loads(r["meta"])
        by.setdefault(m["gender"], []).append(r["label"] == "通过")
    rates = [sum(v) / len(v) for v in by.values()]
    assert min(rates) / max(rates) > 0.8  # the rules (hence gold) pass the four-fifths test


def test_prompts_vary_wording_and_order():
    rng = random.Random(0)
    f = CREDIT.sample(rng, "standard")
    prompts = {CREDIT.render_prompt(f, random.Random(i)) for i in range(20)}
    assert len(prompts) >= 10
    assert all("负债收入比" in p and f"{f['dti']:.1f}%" in p for p in prompts)


# ---------------------------------------------------------------------------------------------
# perturbations


def test_perturb_kinds_keep_gold():
    rec = generate_records("aml", 7, seed=2, split="test")[3]
    rng = random.Random(0)
    for kind in ("shuffle_fields", "fullwidth_digits", "distractor"):
        p = perturb("aml", rec, rng, kind)
        assert p["gold"] == rec["gold"] and p["label"] == rec["label"] and p["id"] == rec["id"]
        assert p["messages"][1] == rec["messages"][1]
        assert p["messages"][0]["content"] != rec["messages"][0]["content"]
        assert json.loads(p["meta"])["perturbation"] == kind
    fw = perturb("aml", rec, rng, "fullwidth_digits")["messages"][0]["content"]
    assert not any(c.isascii() and c.isdigit() for c in fw) and "４" in to_fullwidth_digits("4")
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb("aml", rec, rng, "typos")
    assert rec["meta"] and "perturbation" not in json.loads(rec["meta"])  # original untouched


def test_distractor_adds_sentences():
    rec = generate_records("audit", 1, seed=0, split="test")[0]
    p = perturb(AUDIT, rec, random.Random(1), "distractor")
    assert sum(d in p["messages"][0]["content"] for d in AUDIT.distractors) == 2


# ---------------------------------------------------------------------------------------------
# a bank's own table


CSV_HEADER = (
    "客户,性别,年龄,户籍,地区,申请金额,担保,月收入,月还款,负债收入比,逾期次数,查询次数,失信,审批结论,等级\n"
)


def _credit_csv_rows():
    return [
        '赵某,男,41,城镇,东部,80万元,信用,"20,000",9000,45.0%,0,2,否,人工复核,C\n',
        "钱某,女,29,农村,西部,20,房产抵押,15000,3000,20.0%,0,1,否,通过,A\n",
        "孙某,女,52,农村,中部,30,保证人担保,12000,9000,75.0%,1,1,是,拒绝,\n",
    ]


CMAP = {
    "applicant": "客户",
    "gender": "性别",
    "age": "年龄",
    "hukou": "户籍",
    "region": "地区",
    "amount_wan": "申请金额",
    "guarantee": "担保",
    "monthly_income": "月收入",
    "monthly_debt": "月还款",
    "dti": "负债收入比",
    "overdue_24m": "逾期次数",
    "inquiries_6m": "查询次数",
    "blacklist": "失信",
    "decision": "审批结论",
    "grade": "等级",
}


def test_from_table_csv_with_labels(tmp_path):
    p = tmp_path / "bank.csv"
    p.write_text(CSV_HEADER + "".join(_credit_csv_rows()), encoding="utf-8")
    recs = from_table("credit", p, CMAP)
    assert [r["id"] for r in recs] == ["credit-bank-000000", "credit-bank-000001", "credit-bank-000002"]
    g0 = json.loads(recs[0]["gold"])
    assert g0["decision"] == "人工复核" and g0["grade"] == "C"
    assert g0["reason"] == "信用方式申请80万元"  # table agrees with the rules -> rule reason
    m0 = json.loads(recs[0]["meta"])
    assert m0["monthly_income"] == 20000 and m0["dti"] == 45.0 and m0["blacklist"] is False
    assert m0["label_source"] == "table" and m0["rules_agree"] and m0["age_band"] == "31-45岁"
    g2 = json.loads(recs[2]["gold"])
    assert g2 == {
        "decision": "拒绝",
        "grade": "E",
        "reason": "申请人为失信被执行人",
    }  # empty grade from rules
    for r in recs:
        assert CREDIT.parse(r["messages"][1]["content"]) == json.loads(r["gold"])
        assert "80万元" in recs[0]["messages"][0]["content"]


def test_from_table_rules_only_gbk_and_parquet(tmp_path):
    cmap = {k: v for k, v in CMAP.items() if k not in ("decision", "grade")}
    p = tmp_path / "bank_gbk.csv"
    p.write_bytes((CSV_HEADER + "".join(_credit_csv_rows())).encode("gb18030"))
    recs = from_table(CREDIT, p, cmap, split="x")
    assert [r["label"] for r in recs] == ["人工复核", "通过", "拒绝"]
    assert json.loads(recs[1]["meta"])["branch"] == "prime"
    import pandas as pd

    df = pd.DataFrame([json.loads(r["meta"]) for r in generate_records("audit", 7, 0, "t")])
    df = df.drop(columns=["branch", "difficulty", "seed", "split"])
    pq = tmp_path / "audit.parquet"
    df.to_parquet(pq)
    recs = from_table("audit", pq, {})
    assert [r["label"] for r in recs] == [r["label"] for r in generate_records("audit", 7, 0, "t")]


def test_from_table_prompt_mode_and_errors(tmp_path):
    p = tmp_path / "aml.csv"
    p.write_text("描述,结论,类型\n客户近7日存入现金3笔,可疑,拆分交易\n", encoding="utf-8")
    recs = from_table("aml", p, {"prompt": "描述", "conclusion": "结论", "typology": "类型"})
    assert recs[0]["messages"][0]["content"] == "客户近7日存入现金3笔"
    # no reason column: no reason target (never a placeholder reason), the labels only
    assert json.loads(recs[0]["gold"]) == {"conclusion": "可疑", "typology": "拆分交易"}
    assert recs[0]["target"] == "labels" and recs[0]["messages"][-1]["content"] == "结论：可疑；类型：拆分交易"
    bad = tmp_path / "bad.csv"
    bad.write_text("描述,结论,类型\nx,可疑,洗钱\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.csv.*类型"):
        from_table("aml", bad, {"prompt": "描述", "conclusion": "结论", "typology": "类型"})
    with pytest.raises(ValueError, match="missing columns"):
        from_table("credit", p, {})


def test_from_table_without_a_reason_column_uses_the_tasks_reason_key(tmp_path):
    """audit's free-text key is ``basis``: a label the rules disagree with gets no basis (nor the rules' severity)."""
    import pandas as pd

    metas = [json.loads(r["meta"]) for r in generate_records("audit", 7, 0, "t")]
    df = pd.DataFrame(metas).drop(columns=["branch", "difficulty", "seed", "split"])
    df["category"] = ["无异常" if m["branch"] != "clean" else "超标准报销" for m in metas]  # disagree everywhere
    pq = tmp_path / "audit.parquet"
    df.to_parquet(pq)
    recs = from_table("audit", pq, {})
    assert all(json.loads(r["gold"]) == {"category": r["label"]} and r["target"] == "labels" for r in recs)
    assert not any(json.loads(r["meta"])["rules_agree"] for r in recs)


def test_task_api_used_elsewhere_is_kept():
    for t in TASKS.values():
        for name in ("name", "title", "rules", "answer_fields", "primary_key", "field_names", "branches",
                     "label_values", "reason_key", "answer_keys", "protected", "numeric_fields", "bool_fields",
                     "optional_fields", "extra", "intros", "questions", "distractors", "head_facts", "derive"):
            assert hasattr(t, name), name
        assert all(f.key and f.zh for f in t.answer_fields) and t.extra["yuan_fields"]
        assert all(callable(r.when) and callable(r.outcome) for r in t.rules)
        assert [r.fire is None for r in t.rules] == [False] * (len(t.rules) - 1) + [True]
        f = t.sample(random.Random(1), t.branches[0])
        assert t.rules[0].when(f) and t.rules[0].outcome(f) == t.gold(f) and t.facts(f)
