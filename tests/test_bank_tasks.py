"""The two bank tasks that exist only as YAML (docs/bank_tasks.md): 贷后五级分类 ``post_loan_5c`` and 客诉分类
``complaint``. Their specs load and hold their examples; the post-loan rules implement the floors of
《商业银行金融资产风险分类办法》 (checked against an independent statement of the floors); the bundled sample
tables pass ``task check`` and are what the generator writes; each recipe runs end to end on a tiny model."""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
import runpy

import pytest

from banklm.cli import main
from banklm.tasks.check import check_spec, check_table
from banklm.tasks.registry import task_from_spec
from banklm.tasks.spec import coerce_value
from tests.helpers import REPO, run_banklm

SPECS = {"post_loan_5c": REPO / "recipes" / "tasks" / "post_loan_5c.yaml",
         "complaint": REPO / "recipes" / "tasks" / "complaint.yaml"}
TABLES = {"post_loan_5c": REPO / "corpora" / "samples" / "tables" / "post_loan_5c.csv",
          "complaint": REPO / "corpora" / "samples" / "tables" / "complaint.csv"}
RECIPES = {"post_loan_5c": REPO / "recipes" / "post_loan_5c_cpu.yaml",
           "complaint": REPO / "recipes" / "complaint_cpu.yaml"}
LABEL = {"post_loan_5c": "五级分类", "complaint": "类别"}
CLASSES = ["正常", "关注", "次级", "可疑", "损失"]


@pytest.fixture(scope="module")
def post_loan():
    return task_from_spec(SPECS["post_loan_5c"])


def performing(**changes) -> dict:
    """A loan no floor applies to, with ``changes``."""
    f = {"客户类型": "小微企业", "贷款品种": "流动资金贷款", "逾期天数": 0, "重组情况": "未重组", "经营状况": "正常",
         "担保方式": "抵押", "资金用途": "与合同一致", "是否借新还旧": False, "是否涉诉": False, "抵押物价值变化": 3.0,
         "主要还款来源": "经营收入", "贷款余额": 200.0}
    f.update(changes)
    return f


def floor(f: dict) -> str:
    """The worst class the documented floors require, stated independently of the spec's rules."""
    need = ["正常"]
    d = f["逾期天数"]
    need += ["损失"] if d > 360 else ["可疑"] if d > 270 else ["次级"] if d > 90 else ["关注"] if d > 0 else []
    need += {"观察期内未按约还款": ["次级"], "观察期内再次重组": ["次级"], "观察期内按约还款": ["关注"]}.get(f["重组情况"], [])
    need += ["关注"] * (f["资金用途"] == "擅自改变用途") + ["关注"] * bool(f["是否借新还旧"])
    state = f.get("经营状况")
    if state == "停业":
        need.append("可疑" if f["担保方式"] == "信用" else "次级")
    need += {"恶化": ["次级"], "下滑": ["关注"]}.get(state, [])
    need += ["关注"] * bool(f["是否涉诉"])
    v = f.get("抵押物价值变化")
    need += ["关注"] * (v is not None and v <= -20)
    need += ["关注"] * (f["主要还款来源"] in ("担保人代偿", "处置抵押物"))
    return max(need, key=CLASSES.index)


# ------------------------------------------------------------------------------------------------ specs

@pytest.mark.parametrize("name", list(SPECS))
def test_specs_load_without_warnings_and_hold_their_examples(name):
    check = check_spec(SPECS[name])
    assert check.warnings == []
    t = check.task
    assert t.name == name and t.primary_key == LABEL[name]
    examples = t.spec.model.examples
    assert len(examples) >= 2
    for ex in examples:  # every example renders; where the spec has rules, they give the expected answer
        prompt = t.render_prompt(dict(ex.fields), random.Random(0))
        assert prompt.count("。") >= 1 and "{{" not in prompt
        if t.has_rules:
            got = t.label({n: ex.fields.get(n) for n in t.field_names})
            assert {k: got[k] for k in ex.expect} == ex.expect


def test_complaint_spec_flags_regulatory_complaints_as_its_positive_value():
    t = task_from_spec(SPECS["complaint"])
    assert not t.has_rules and t.positive == "是" and t.positive_key == "是否监管投诉"
    assert t.ordinal_keys == {"紧急程度": ["高", "中", "低"]}
    assert t.label_values == ["收费争议", "服务态度", "销售误导", "催收问题", "征信异议", "个人信息保护", "账户与交易", "其他"]


# ------------------------------------------------------------------------------------------------ the floors

@pytest.mark.parametrize("changes, cls", [
    ({}, "正常"),
    ({"逾期天数": 1}, "关注"),
    ({"逾期天数": 90}, "关注"),
    ({"逾期天数": 91}, "次级"),
    ({"逾期天数": 270}, "次级"),
    ({"逾期天数": 271}, "可疑"),
    ({"逾期天数": 360}, "可疑"),
    ({"逾期天数": 361}, "损失"),
    ({"逾期天数": 1500}, "损失"),
    ({"重组情况": "观察期内未按约还款"}, "次级"),
    ({"重组情况": "观察期内再次重组"}, "次级"),
    ({"重组情况": "观察期内按约还款"}, "关注"),
    ({"重组情况": "观察期满已退出"}, "正常"),
    ({"资金用途": "擅自改变用途"}, "关注"),
    ({"是否借新还旧": True}, "关注"),
    ({"经营状况": "下滑"}, "关注"),
    ({"经营状况": "恶化"}, "次级"),
    ({"经营状况": "停业"}, "次级"),
    ({"经营状况": "停业", "担保方式": "信用", "抵押物价值变化": None}, "可疑"),
    ({"是否涉诉": True}, "关注"),
    ({"抵押物价值变化": -20.0}, "关注"),
    ({"抵押物价值变化": -19.9}, "正常"),
    ({"主要还款来源": "担保人代偿"}, "关注"),
    ({"经营状况": None, "抵押物价值变化": None}, "正常"),  # empty optional cells are no evidence
])
def test_each_floor_alone_gives_its_class(post_loan, changes, cls):
    f = performing(**changes)
    assert floor(f) == cls
    assert post_loan.label(f)["五级分类"] == cls


@pytest.mark.parametrize("days, at_least", [(91, "次级"), (271, "可疑"), (361, "损失"), (45, "关注")])
def test_overdue_floors_hold_whatever_else_the_loan_shows(post_loan, days, at_least):
    """逾期 > 90 天 at least 次级, > 270 at least 可疑, > 360 损失, whatever the other fields say."""
    for state, restr, guarantee in itertools.product([None, "正常", "下滑", "恶化", "停业"],
                                                     ["未重组", "观察期内按约还款", "观察期内再次重组"],
                                                     ["信用", "抵押"]):
        f = performing(逾期天数=days, 经营状况=state, 重组情况=restr, 担保方式=guarantee)
        got = post_loan.label(f)["五级分类"]
        assert CLASSES.index(got) >= CLASSES.index(at_least), f
        assert got == floor(f), f


def test_worst_floor_decides_on_random_loans(post_loan):
    """First match over rules ordered worst first == the worst of all the floors that apply (2000 random loans,
    several red flags at once)."""
    r = random.Random(7)
    for _ in range(2000):
        f = performing(
            逾期天数=r.choice([0, 0, 0, r.randint(1, 1000), r.choice([90, 91, 270, 271, 360, 361])]),
            重组情况=r.choice(["未重组"] * 4 + ["观察期内按约还款", "观察期内未按约还款", "观察期内再次重组", "观察期满已退出"]),
            经营状况=r.choice([None, "正常", "正常", "下滑", "恶化", "停业"]), 担保方式=r.choice(["信用", "保证", "抵押"]),
            资金用途=r.choice(["与合同一致"] * 5 + ["擅自改变用途"]), 是否借新还旧=r.random() < 0.15,
            是否涉诉=r.random() < 0.15, 抵押物价值变化=r.choice([None, round(r.uniform(-40, 10), 1)]),
            主要还款来源=r.choice(["经营收入", "经营收入", "担保人代偿", "处置抵押物"]))
        ans = post_loan.label(f)
        assert ans["五级分类"] == floor(f), (f, ans)
        assert len(ans["理由"]) <= 40


# ------------------------------------------------------------------------------------------------ tables

@pytest.mark.parametrize("name", list(SPECS))
def test_sample_tables_pass_task_check(name, capsys):
    """Clean; the rows not yet classified (an empty label cell) are counted as unlabelled, not as problems."""
    res = check_table(SPECS[name], TABLES[name])
    assert res.ok, res.lines()
    assert res.rows >= 1200 and res.mode == "fields"
    rows = list(csv.DictReader(TABLES[name].open(encoding="utf-8")))
    unlabelled = sum(1 for row in rows if not row[LABEL[name]])
    assert 0 < unlabelled < 0.05 * len(rows) and res.unlabelled == unlabelled
    counts = {}
    for row in rows:
        counts[row[LABEL[name]]] = counts.get(row[LABEL[name]], 0) + 1
    t = task_from_spec(SPECS[name])
    assert min(counts.get(v, 0) for v in t.label_values) >= 200  # >= 30 test rows per label at a 15% test split
    assert main(["task", "check", str(SPECS[name]), str(TABLES[name])]) == 0
    out = capsys.readouterr().out
    assert f"{unlabelled} unlabelled" in out and "--- example 3" in out


def test_post_loan_sample_labels_follow_the_rules_or_are_worse_by_judgement():
    """Every labelled row is at least as bad as the floors require; a few (judgement) are one class worse."""
    t = task_from_spec(SPECS["post_loan_5c"])
    rows = list(csv.DictReader(TABLES["post_loan_5c"].open(encoding="utf-8")))
    worse = 0
    for i, row in enumerate(rows):
        if not row["五级分类"]:
            continue
        f = {n: None if row[n] == "" else coerce_value(t.spec.fields[n], row[n], strict=False) for n in t.field_names}
        rule = t.label(f)["五级分类"]
        got = CLASSES.index(row["五级分类"])
        assert got >= CLASSES.index(rule), (i, row)
        worse += got > CLASSES.index(rule)
    assert 0 < worse < 0.08 * len(rows)


def test_complaint_sample_holds_pii_for_the_pii_step_and_regulatory_words_match_the_flag():
    rows = [r for r in csv.DictReader(TABLES["complaint"].open(encoding="utf-8")) if r["类别"]]
    phones = [r for r in rows if re.search(r"1[3-9]\d[ -]?\d{4}[ -]?\d{4}", r["客服通话记录"])]
    names = [r for r in rows if "我叫" in r["客服通话记录"] or re.search(r"客户\w{2,3}到网点", r["客服通话记录"])]
    assert len(phones) > 300 and len(names) > 600
    reg = re.compile(r"12378|12363|金融监管|人民银行投诉|监管部门反映")
    for r in rows:  # 是 exactly when the customer's words name a regulator (the agent's disclosure excepted)
        said = r["客服通话记录"].replace("您也可以向金融监管部门反映", "")
        assert (r["是否监管投诉"] == "是") == bool(reg.search(said)), r
        if r["是否监管投诉"] == "是":
            assert r["紧急程度"] == "高"


def test_the_generator_rewrites_the_committed_tables_byte_for_byte():
    gen = runpy.run_path(str(REPO / "scripts" / "make_bank_tables.py"), run_name="make_bank_tables")
    assert gen["csv_text"](gen["POST_LOAN_COLUMNS"], gen["post_loan_rows"]()) == \
        TABLES["post_loan_5c"].read_text(encoding="utf-8")
    assert gen["csv_text"](gen["COMPLAINT_COLUMNS"], gen["complaint_rows"]()) == \
        TABLES["complaint"].read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ end to end

TINY = ["base.build.hidden_size=64", "base.build.num_layers=2",
        "base.build.intermediate_size=128", "train.max_steps=2", "train.batch_size=8", "train.compile=false",
        "eval.limit=6", "eval.batch_size=6", "eval.max_new_tokens=16", "device=cpu"]


def _run(name: str, tmp_path):
    run = tmp_path / "run"
    out = run_banklm("run", str(RECIPES[name]), *TINY, "--run-dir", str(run), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((run / "eval" / "sft" / "results.json").read_text(encoding="utf-8"))
    assert list(res["tasks"]) == [name]
    t = res["tasks"][name]
    assert t["n"] == 6
    assert {"accuracy", "macro_f1", "mcc", "format_compliance", "parse_rate", "confusion", "per_class"} <= set(t)
    stats = json.loads((run / "corpora" / "scenario" / "stats.json").read_text(encoding="utf-8"))
    rows = list(csv.DictReader(TABLES[name].open(encoding="utf-8")))
    assert stats["splits"]["unlabelled"] == sum(1 for r in rows if not r[LABEL[name]])
    assert min(stats["by_label"]["test"][name].values()) >= 30
    assert (run / "sft" / "merged" / "tasks" / f"{name}.yaml").read_bytes() == SPECS[name].read_bytes()
    assert not (run / "export").exists()
    return run, t, rows


@pytest.mark.slow
def test_post_loan_recipe_runs_end_to_end_on_a_tiny_model(tmp_path):
    _run("post_loan_5c", tmp_path)


@pytest.mark.slow
def test_complaint_recipe_runs_end_to_end_on_a_tiny_model_without_the_tables_pii(tmp_path):
    run, t, rows = _run("complaint", tmp_path)
    assert {"recall", "false_positive_rate"} <= set(t["positive"]) and t["positive"]["value"] == "是"
    raw = {m for r in rows for m in re.findall(r"1[3-9]\d[ -]?\d{4}[ -]?\d{4}", r["客服通话记录"])}
    phones = raw | {re.sub(r"[ -]", "", m) for m in raw}
    ids = {m for r in rows for m in re.findall(r"\d{17}[\dX]", r["客服通话记录"])}
    assert len(phones) > 300 and ids
    seen = b"".join(p.read_bytes() for p in (run / "corpora" / "scenario").rglob("*") if p.is_file())
    seen += (run / "eval" / "sft" / "predictions.jsonl").read_bytes()
    assert b"<PHONE>" in seen
    assert not [p for p in phones if p.encode() in seen]
    assert not [i for i in ids if i.encode() in seen]
    names = {m for r in rows for m in re.findall(r"我叫(\w{2,3}?)，", r["客服通话记录"])}
    assert len(names) > 300
    assert not [n for n in names if n.encode() in seen]
