"""A bank's labelled table done right (issue 17): no invented facts, unlabelled rows apart, no placeholder or
contradicting reasons, labels-only targets, PII scrubbed, stratified splits, quarantine with reasons."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from banklm.corpora.build import SourceError, build_scenario, check_tables, stratified_split
from banklm.corpora.splits import load_split
from banklm.corpora.synth import generate_records

from banklm.evaluation.evaluate import score_records
from banklm.pipeline import RunContext
from banklm.recipe import ScenarioTable, load_recipe
from banklm.stages.distill import _seqkd_records
from banklm.tasks import get_task, register_spec, unregister
from banklm.tasks import spec as spec_module
from banklm.tasks.registry import task_from_spec
from banklm.tasks.spec import SpecError, parse_spec
from banklm.tasks.tables import from_table, read_task_table
from tests.test_task_spec import POST_LOAN

CREDIT = get_task("credit")
DROP = ["branch", "difficulty", "seed", "split", "age_band"]


def _frame(task: str, n: int, seed: int = 0) -> pd.DataFrame:
    """The fields of ``n`` generated records of ``task`` as a bank table would hold them (no label columns)."""
    metas = [json.loads(r["meta"]) for r in generate_records(task, n, seed, "bank")]
    return pd.DataFrame(metas).drop(columns=[c for c in DROP if c in metas[0]])


def _meta(rec: dict) -> dict:
    return json.loads(rec["meta"])


def _user(rec: dict) -> str:
    return next(m["content"] for m in rec["messages"] if m["role"] == "user")


# --------------------------------------------------------------------------------------------- missing values

def test_a_missing_optional_value_is_未提供_and_no_rule_fires_on_an_invented_value(tmp_path):
    df = _frame("audit", 28).drop(columns=["disclosed"])  # the old loader filled disclosed = False
    df.loc[0:2, "relation"] = ["配偶", "配偶", "无"]
    df.loc[0:2, "invoice_ok"] = [False, True, True]  # row 0: a rule before the related-party one decides
    df.loc[0:2, "title_ok"] = True
    df.to_csv(tmp_path / "audit.csv", index=False)
    res = read_task_table("audit", tmp_path / "audit.csv")
    by_row = {_meta(r)["row"]: r for r in res.records}
    # a related supplier whose disclosure is unknown: 未提供 in the prompt, never 未披露 or 关联交易未披露
    assert "披露情况未提供" in _user(by_row[0]) and by_row[0]["label"] == "发票不合规"
    assert all("未披露" not in _user(r) for r in res.records)
    assert all(r["label"] != "关联交易未披露" for r in res.records)
    assert by_row[2]["target"] == "answer"  # no relation: the rule is false whatever the disclosure
    # row 1 reaches the related-party rule: the rules cannot tell, and the table has no label: quarantined
    assert 1 not in by_row and res.quarantine[0] == {
        "file": str(tmp_path / "audit.csv"), "row": "row 3",
        "reason": "no label column and the rules cannot label the row: rule 'related_undisclosed' needs disclosed, "
                  "which the row does not give"}
    assert all("needs disclosed" in q["reason"] for q in res.quarantine)
    assert res.stats["missing_values"]["disclosed"] == 28
    # credit without 从业年限 and 期限: 未提供, not 0年 / 12个月
    df = _frame("credit", 8).drop(columns=["years_in_business", "term_months"])
    df.to_csv(tmp_path / "credit.csv", index=False)
    recs = from_table("credit", tmp_path / "credit.csv")
    assert len(recs) == 8 and all(_meta(r)["years_in_business"] is None for r in recs)
    assert all("从业年限未提供" in _user(r) and "期限未提供" in _user(r) and "0年" not in _user(r) for r in recs)


def test_the_bank_labels_a_row_the_rules_cannot(tmp_path):
    df = _frame("aml", 14).drop(columns=["foreign_region"])  # the first rule reads it: the rules never decide
    df["typology"] = [get_task("aml").gold(f)["typology"] for f in
                      (_meta(r) for r in generate_records("aml", 14, 0, "bank"))]
    df.loc[3, "typology"] = None
    df.to_csv(tmp_path / "aml.csv", index=False)
    # conclusion is written before the label (typology) and only the table or agreeing rules could give it:
    # without its column no row can be learnt, and a table of such rows is refused as a whole
    with pytest.raises(ValueError, match=r"aml.csv: 13 of 14 rows cannot be read \(first: row 2: no value for "
                                         r"'conclusion' \(column 'conclusion'\), which the answer writes before"):
        read_task_table("aml", tmp_path / "aml.csv")
    df["conclusion"] = ["正常" if t == "无" else "可疑" for t in df["typology"].fillna("无")]
    df.to_csv(tmp_path / "aml.csv", index=False)
    res = read_task_table("aml", tmp_path / "aml.csv")
    assert not res.quarantine and res.stats["unlabelled"] == 1
    labelled = [r for r in res.records if r["target"] != "none"]
    assert len(labelled) == 13 and all(r["target"] == "labels" for r in labelled)
    assert all(_meta(r)["rules_undecided"].startswith("rule 'high_risk_region' needs foreign_region")
               for r in labelled)
    assert all(set(json.loads(r["gold"])) == {"conclusion", "typology"} for r in labelled)


# ------------------------------------------------------------------------------------------ answers and targets

def test_labels_only_rows_and_no_contradicting_or_placeholder_reason(tmp_path):
    df = _frame("credit", 16)
    rule = [CREDIT.gold(f) for f in (_meta(r) for r in generate_records("credit", 16, 0, "bank"))]
    df["decision"] = [a["decision"] if i % 2 == 0 else ("通过" if a["decision"] != "通过" else "拒绝")
                      for i, a in enumerate(rule)]
    df.to_csv(tmp_path / "credit.csv", index=False)
    recs = from_table("credit", tmp_path / "credit.csv")
    assert len(recs) == 16 and not hasattr(spec_module, "TABLE_REASON")
    for i, r in enumerate(recs):
        gold, answer = json.loads(r["gold"]), r["messages"][-1]["content"]
        assert "见行内标注" not in answer
        if i % 2 == 0:  # the bank agrees with the rules: their grade and reason fit its label
            assert r["target"] == "answer" and gold == rule[i] and _meta(r)["rules_agree"]
        else:  # it does not: the label alone, never the rules' grade or reason
            assert r["target"] == "labels" and gold == {"decision": df["decision"][i]}
            assert answer == f"结论：{df['decision'][i]}" and rule[i]["reason"] not in answer
    # a bank grade column fills the grade whatever the rules say
    df["grade"] = "C"
    df.to_csv(tmp_path / "credit.csv", index=False)
    recs = from_table("credit", tmp_path / "credit.csv")
    assert all(json.loads(r["gold"])["grade"] == "C" for r in recs)
    assert recs[1]["messages"][-1]["content"] == f"结论：{df['decision'][1]}；风险等级：C"


def test_labels_only_rows_are_scored_on_their_keys():
    rec = {"id": "x", "task": "credit", "gold": json.dumps({"decision": "拒绝"}, ensure_ascii=False),
           "meta": "{}", "messages": [{"role": "user", "content": "申请"}], "target": "labels"}
    full = {**rec, "id": "y", "gold": json.dumps({"decision": "通过", "grade": "A", "reason": "房产抵押"},
                                                 ensure_ascii=False)}
    res, preds = score_records([rec, rec, full], ["结论：拒绝", "结论：拒绝；风险等级：E；理由：失信",
                                                  "结论：通过；风险等级：B；理由：x"])
    assert [p["correct"] for p in preds] == [True, True, True]
    assert [p["exact"] for p in preds] == [True, True, False]
    t = res["tasks"]["credit"]
    assert t["accuracy"] == 1.0 and t["field_accuracy"] == {"decision": 1.0, "grade": 0.0}
    assert t["parse_rate"] == 1.0 and t["format_compliance"] == pytest.approx(2 / 3)


SUMMARY_SPEC = POST_LOAN.replace("理由: {type: reason, max_length: 40,",
                                 '理由: {type: reason, max_length: 40, summary: "逾期{{ 逾期天数 }}天，五级分类{{ 五级分类 }}",')


def test_a_declared_summary_is_the_reason_of_a_row_without_one(tmp_path):
    t = task_from_spec(parse_spec(SUMMARY_SPEC, "s.yaml"))
    rows = "客户名称,客户类型,贷款余额,逾期天数,五级分类,是否涉诉,借款人年龄,借款人性别,经营状况,预警等级,风险标签\n"
    rows += "A,个人,10,120,正常,否,30,男,正常,关注,逾期\n"      # rules: 预警 (严重逾期): disagree
    rows += "B,个人,10,120,正常,否,30,男,正常,预警,逾期\n"      # agree: the rule's reason
    (tmp_path / "t.csv").write_text(rows, encoding="utf-8")
    a, b = from_table(t, tmp_path / "t.csv")
    assert json.loads(a["gold"]) == {"预警等级": "关注", "风险标签": ["逾期"], "理由": "逾期120天，五级分类正常"}
    assert a["target"] == "answer" and json.loads(b["gold"])["理由"] == "逾期120天，超过90天"
    with pytest.raises(SpecError, match=r"answer.keys.理由.summary: template names unknown field '逾期'"):
        parse_spec(SUMMARY_SPEC.replace('summary: "逾期{{ 逾期天数 }}', 'summary: "逾期{{ 逾期 }}'), "s.yaml")
    with pytest.raises(SpecError, match=r"answer.keys.预警等级.summary: a summary applies to the reason key"):
        parse_spec(SUMMARY_SPEC.replace("预警等级: {values:", "预警等级: {summary: x, values:"), "s.yaml")
    long = SUMMARY_SPEC.replace("五级分类{{ 五级分类 }}", "五级分类{{ 五级分类 }}" + "很长" * 20)
    with pytest.raises(SpecError, match="summary .* more than max_length 40"):
        parse_spec(long, "s.yaml")


# --------------------------------------------------------------------------------------------- corpus build

def _credit_table(path: Path, n: int, seed: int = 0, **cols) -> pd.DataFrame:
    df = _frame("credit", n, seed)
    for k, v in cols.items():
        df[k] = v
    df.to_csv(path, index=False)
    return df


def test_empty_label_rows_are_unlabelled_apart_and_feed_the_teacher_pool(tmp_path):
    labels = [CREDIT.gold(_meta(r))["decision"] for r in generate_records("credit", 24, 0, "bank")]
    labels = [None if i % 4 == 1 else lab for i, lab in enumerate(labels)]
    _credit_table(tmp_path / "train.csv", 24, decision=labels)
    _credit_table(tmp_path / "test.csv", 6, seed=1)
    tables = [{"path": "train.csv", "task": "credit", "split": "train", "pii": False},
              {"path": "test.csv", "task": "credit", "split": "test", "name": "held", "pii": False}]
    out = tmp_path / "run" / "corpora" / "scenario"
    stats = build_scenario({"credit": {"train": 4, "validation": 2, "test": 2}}, 0, out, tables=tables,
                           base_dir=tmp_path)
    assert stats["splits"]["unlabelled"] == 6 and stats["splits"]["train"] == 4 + 18
    assert stats["by_source"]["unlabelled"] == {"train.csv": 6}
    assert stats["by_source"]["train"] == {"synthetic": 4, "train.csv": 18}
    assert stats["targets"]["unlabelled"] == {"none": 6}
    assert stats["sources"][1]["unlabelled"] == 6 and stats["sources"][1]["records"] == 18
    un = load_split(out, "unlabelled")
    assert all(m["role"] != "assistant" for r in un for m in r["messages"]) and set(un["target"]) == {"none"}
    ids = set(un["id"])
    for split in ("train", "validation", "test"):
        assert not ids & set(load_split(out, split)["id"])
    assert set(load_split(out, "train")["target"]) == {"answer"}
    # the seqkd teacher pool reads it (recipe key, on by default), and says how many
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "name": "t", "base": {"path": "/nonexistent/model"},
        "corpora": {"scenario": {"synth": {"credit": {"train": 4, "validation": 2, "test": 2}}}},
        "distill": {"enabled": True, "method": "seq"}}), encoding="utf-8")
    ctx = RunContext(load_recipe(tmp_path / "r.yaml"), tmp_path / "run")
    train = load_split(out, "train")
    pool, problems = _seqkd_records(ctx, train)
    assert len(pool) == 22 + 6 and not problems and ctx.notes["distill_pool"] == {"train": 22, "unlabelled": 6,
                                                                                  "extra": 0}
    ctx = RunContext(load_recipe(tmp_path / "r.yaml", ["distill.seq.unlabelled_prompts=false"]), tmp_path / "run")
    assert len(_seqkd_records(ctx, train)[0]) == 22


def test_free_text_is_scrubbed_before_rendering_and_synthetic_records_are_not(tmp_path):
    t = task_from_spec(parse_spec(POST_LOAN, "p.yaml"))
    head = "客户名称,客户类型,贷款余额,逾期天数,五级分类,经营状况,是否涉诉,借款人年龄,借款人性别\n"
    rows = [f"客户{i} 电话13812345678,个人,10,{40 + i},正常,正常,否,30,男\n" for i in range(4)]
    rows[0] = "张三 身份证110101199003071233,个人,10,40,正常,正常,否,30,男\n"
    (tmp_path / "t.csv").write_text(head + "".join(rows), encoding="utf-8")
    out = tmp_path / "scenario"
    register_spec(t)
    try:
        stats = build_scenario({"credit": {"train": 3}}, 0, out, base_dir=tmp_path,
                               tables=[{"path": "t.csv", "task": "post_loan", "split": "train"}])
    finally:
        unregister("post_loan")
    recs = load_split(out, "train").to_list()
    bank = [r for r in recs if r["task"] == "post_loan"]
    assert len(bank) == 4
    text = json.dumps(bank, ensure_ascii=False)
    assert "13812345678" not in text and "110101199003071233" not in text and "<PHONE>" in _user(bank[1])
    assert stats["pii"]["counts"]["PHONE"] == 3 and stats["pii"]["counts"]["ID_CARD"] == 1
    assert stats["sources"][1]["pii"]["values_scrubbed"] == 4
    synth = [r for r in recs if r["task"] == "credit"]
    assert synth == generate_records("credit", 3, 0, "train")  # generated records are left as generated


def test_auto_split_keeps_30_per_label_in_test_or_names_the_shortfall(tmp_path):
    labels = ["a"] * 70 + ["b"] * 200
    parts = stratified_split(labels, {"train": 0.9, "validation": 0.05, "test": 0.05}, 0, 30, "t")
    assert Counter(labels[i] for i in parts["test"]) == {"a": 30, "b": 30}
    assert Counter(labels[i] for i in parts["validation"]) == {"a": 4, "b": 10}
    assert sorted(sum(parts.values(), [])) == list(range(270))
    with pytest.raises(SourceError, match=r"t: label a has 41 rows; a test split with 30 per label needs at least 63 "
                                          r"rows of it \(30 test, 3 validation, 30 train\), or give a separate test "
                                          r"table \(split: test\)"):
        stratified_split(["a"] * 41 + ["b"] * 200, {"train": 0.9, "validation": 0.05, "test": 0.05}, 0, 30, "t")
    # through the build and the recipe check (exit 2 before anything is built)
    df = _credit_table(tmp_path / "c.csv", 240)
    tables = [{"path": "c.csv", "task": "credit", "pii": False}]
    with pytest.raises(SourceError, match=r"scenario table 'c.csv': label 通过 has 60 rows; .* needs at least 63"):
        check_tables(tables, tmp_path)
    stats = build_scenario({}, 0, tmp_path / "s", tables=[{**tables[0], "min_test_per_label": 20}], base_dir=tmp_path)
    assert stats["by_label"]["test"]["credit"] == {"人工复核": 20, "拒绝": 20, "通过": 20}
    assert sum(stats["splits"].values()) == len(df)
    # a test table of the task: the auto table gives train and validation only
    tables = [*tables, {"path": "c.csv", "task": "credit", "split": "test", "limit": 5, "name": "held", "pii": False}]
    check_tables(tables, tmp_path)


def test_bad_rows_are_quarantined_with_file_row_and_reason_and_bad_tables_refused(tmp_path):
    df = _credit_table(tmp_path / "c.csv", 10, decision="拒绝")
    df = df.astype(object)
    df.loc[2, "dti"] = "很高"
    df.loc[5, "decision"] = "同意"
    df.to_csv(tmp_path / "c.csv", index=False)
    out = tmp_path / "s"
    stats = build_scenario({}, 0, out, tables=[{"path": "c.csv", "task": "credit", "split": "train", "pii": False}],
                           base_dir=tmp_path)
    assert stats["quarantined"] == 2 and stats["splits"]["train"] == 8 and stats["sources"][0]["quarantined"] == 2
    q = [json.loads(x) for x in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(x["file"], x["row"]) for x in q] == [("c.csv", "row 4"), ("c.csv", "row 7")]
    assert "cannot read '很高' as a number" in q[0]["reason"] and "label '同意' is not one of" in q[1]["reason"]
    # table-level: labels mostly outside the spec, a missing required column, no file, no such sheet
    df["decision"] = ["同意"] * 6 + ["拒绝"] * 4
    df.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(SourceError, match=r"c.csv': .*column 'decision': 6 of 10 labels are outside the spec's "
                                          r"labels of 'decision': '同意' \(6 rows\)"):
        check_tables([{"path": "c.csv", "task": "credit", "split": "train"}], tmp_path)
    df.drop(columns=["dti"]).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(SourceError, match=r"missing columns \['dti'\]"):
        check_tables([{"path": "c.csv", "task": "credit", "split": "train"}], tmp_path)
    with pytest.raises(SourceError, match="no such file"):
        check_tables([{"path": "nope.csv", "task": "credit"}], tmp_path)
    df = _frame("credit", 3)
    df["dti"] = "x"
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SourceError, match=r"3 of 3 rows cannot be read \(first: row 2: column 'dti'"):
        check_tables([{"path": "bad.csv", "task": "credit", "split": "train"}], tmp_path)


def test_a_sheet_of_a_workbook(tmp_path):
    df = _frame("credit", 6)
    with pd.ExcelWriter(tmp_path / "b.xlsx") as w:
        pd.DataFrame({"x": [1]}).to_excel(w, sheet_name="说明", index=False)
        df.to_excel(w, sheet_name="审批", index=False)
    t = ScenarioTable.model_validate({"path": "b.xlsx", "task": "credit", "sheet": "审批", "split": "train",
                                      "pii": False})
    stats = build_scenario({}, 0, tmp_path / "s", tables=[t.model_dump()], base_dir=tmp_path)
    assert stats["splits"]["train"] == 6 and stats["sources"][0]["sheet"] == "审批"
    with pytest.raises(SourceError, match="b.xlsx' \\(sheet '无此表'\\): .*无此表"):
        check_tables([{**t.model_dump(), "sheet": "无此表"}], tmp_path)


def test_a_hidden_column_is_not_copied_into_the_records(tmp_path):
    """A column the spec hides (an identifier, a phone number) stays out of the corpus records' meta; protected and
    segment fields stay (fairness and segments are computed from them)."""
    spec = POST_LOAN.replace("  客户名称: {type: text}", "  客户名称: {type: text}\n  联系电话: {type: text, show: false, required: false}")
    t = task_from_spec(parse_spec(spec, "p.yaml"))
    head = "客户名称,联系电话,客户类型,贷款余额,逾期天数,五级分类,经营状况,是否涉诉,借款人年龄,借款人性别,预警等级\n"
    (tmp_path / "t.csv").write_text(head + "甲公司,13812345678,企业,10,40,正常,正常,否,30,男,关注\n", encoding="utf-8")
    recs = from_table(t, tmp_path / "t.csv")
    meta = _meta(recs[0])
    assert "13812345678" not in json.dumps(recs, ensure_ascii=False) and meta["联系电话"] is None
    assert meta["借款人年龄"] == 30 and meta["借款人性别"] == "男" and meta["客户类型"] == "企业"
    assert t.fields_from_meta(meta) is not None  # robustness re-rendering still has every field


def test_free_text_ending_a_sentence_does_not_double_the_punctuation(tmp_path):
    t = task_from_spec(parse_spec(POST_LOAN, "p.yaml"))
    head = "客户名称,客户类型,贷款余额,逾期天数,五级分类,经营状况,是否涉诉,借款人年龄,借款人性别,预警等级\n"
    (tmp_path / "t.csv").write_text(head + "经营正常的甲公司。,企业,10,40,正常,正常,否,30,男,关注\n", encoding="utf-8")
    prompt = _user(from_table(t, tmp_path / "t.csv")[0])
    assert "经营正常的甲公司" in prompt and "。。" not in prompt and "。，" not in prompt and "。；" not in prompt
