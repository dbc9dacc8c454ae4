"""Task specs: the schema, a bank's own task end to end, one clear error per bad input, the registry, ``task check``.

The rule language has its own tests (tests/test_expr.py); the built-ins reproducing their golden records are in
tests/test_task_golden.py.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from banklm.tasks import TASKS, get_task
from banklm.tasks.base import Sampler, Task, fmt_num, fmt_pct, fmt_wan, fmt_yuan
from banklm.tasks.check import check_spec, check_table, example_prompts, format_examples
from banklm.tasks.registry import register_spec, resolve_task, resolve_tasks, task_from_spec, unregister
from banklm.tasks.spec import SPEC_DIR, SpecError, builtin_spec, coerce_value, load_spec, parse_spec
from banklm.tasks.tables import from_table
from banklm.tasks.templates import FILTERS, Template, TemplateFailure
from tests.helpers import REPO

# the docs/tasks.md example: a bank's own task
POST_LOAN = """\
name: post_loan
title: 贷后预警等级
description: 贷后监测信息 -> 预警等级、风险标签和理由

constants:
  逾期关注天数: 30
  逾期预警天数: 90
  不良分类: [次级, 可疑, 损失]

fields:
  客户名称: {type: text}
  客户类型: {type: category, values: [个人, 个体工商户, 企业]}
  贷款余额: {type: decimal, unit: 万元, min: 0}
  逾期天数: {type: integer, unit: 天, min: 0}
  五级分类: {type: category, values: [正常, 关注, 次级, 可疑, 损失]}
  抵押物估值变化:
    type: percent
    required: false
    wording: 抵押物估值较上次评估变化{{ value }}
  经营状况: {type: category, values: [正常, 下滑, 停业], required: false}
  是否涉诉: {type: boolean, true_text: 有涉诉, false_text: 无涉诉, wording: "{{ value }}"}
  借款人年龄: {type: integer, unit: 岁, show: false, protected: true, bands: {35岁以下: 34, 35-54岁: 54, 55岁以上: null}}
  借款人性别: {type: category, values: [男, 女], show: false, protected: true}
  近期大额交易:
    type: list
    required: false
    fields:
      日期: {type: date}
      金额: {type: decimal, unit: 元}
      摘要: {type: text}

prompt:
  system: 你是本行贷后管理助理。依据《贷后管理办法》：逾期超过90天、五级分类为不良或涉诉且逾期的贷款列为预警；资料不全的转人工。
  instruction: 请根据以下贷后监测信息判断预警等级：
  question: 请给出预警等级、风险标签和理由。

answer:
  keys:
    预警等级: {values: [正常, 关注, 预警, 转人工], aliases: [等级]}
    风险标签: {type: multi, values: [逾期, 涉诉, 不良分类, 经营异常, 抵押物贬值, 无], aliases: [标签]}
    理由: {type: reason, max_length: 40, aliases: [原因], cite: [逾期天数, 五级分类, 抵押物估值变化, 逾期预警天数]}
  primary: 预警等级
  favourable: 正常
  abstain: 转人工

rules:
  - name: 涉诉且逾期
    when: 是否涉诉 and 逾期天数 > 0
    outcome: {预警等级: 预警, 风险标签: [涉诉, 逾期]}
    reason: 涉诉且逾期{{ 逾期天数 }}天
  - name: 严重逾期
    when: 逾期天数 > 逾期预警天数
    outcome: {预警等级: 预警, 风险标签: [逾期]}
    reason: 逾期{{ 逾期天数 }}天，超过{{ 逾期预警天数 }}天
  - name: 不良
    when: 五级分类 in 不良分类
    outcome: {预警等级: 预警, 风险标签: [不良分类]}
    reason: 五级分类为{{ 五级分类 }}
  - name: 资料不全
    when: 经营状况 == null
    outcome: {预警等级: 转人工, 风险标签: [无]}
    reason: 经营状况未提供，需人工核实
  - name: 停业
    when: 经营状况 == '停业'
    outcome: {预警等级: 预警, 风险标签: [经营异常]}
    reason: 借款人已停业
  - name: 逾期关注
    when: 逾期天数 > 逾期关注天数
    outcome: {预警等级: 关注, 风险标签: [逾期]}
    reason: 逾期{{ 逾期天数 }}天
  - name: 抵押物贬值
    when: 抵押物估值变化 != null and 抵押物估值变化 <= -20   # a missing valuation: the rule does not apply
    outcome: {预警等级: 关注, 风险标签: [抵押物贬值]}
    reason: 抵押物估值变化{{ 抵押物估值变化 | pct }}
  - name: 正常
    outcome: {预警等级: 正常, 风险标签: [无]}
    reason: 各项监测指标正常

examples:
  - fields: {客户名称: 张三, 客户类型: 个人, 贷款余额: 35, 逾期天数: 120, 五级分类: 次级, 抵押物估值变化: -5.0,
             经营状况: 下滑, 是否涉诉: false, 借款人年龄: 46, 借款人性别: 男,
             近期大额交易: [{日期: 2024-03-01, 金额: 49000, 摘要: 现金存入}]}
    expect: {rule: 严重逾期, 预警等级: 预警, 风险标签: [逾期], 理由: 逾期120天，超过90天}
  - fields: {客户名称: 李四, 客户类型: 企业, 贷款余额: 300, 逾期天数: 0, 五级分类: 正常, 是否涉诉: false,
             借款人年龄: 52, 借款人性别: 女}
    expect: {rule: 资料不全, 预警等级: 转人工}

evaluation:
  segments: [客户类型, 借款人年龄]
  costs: {预警: {正常: 10, 关注: 3, 转人工: 1}, 关注: {正常: 3, 转人工: 1}, 正常: {预警: 1, 关注: 0.5}}
  prevalence: {正常: 0.85, 关注: 0.1, 预警: 0.04, 转人工: 0.01}
"""


@pytest.fixture
def post_loan():
    return task_from_spec(parse_spec(POST_LOAN, "post_loan.yaml"))


@pytest.fixture
def spec_file(tmp_path):
    p = tmp_path / "post_loan.yaml"
    p.write_text(POST_LOAN, encoding="utf-8")
    yield p
    unregister("post_loan")


def fields(**kw):
    f = {"客户名称": "王五", "客户类型": "企业", "贷款余额": 80.0, "逾期天数": 0, "五级分类": "正常", "抵押物估值变化": -3.2,
         "经营状况": "正常", "是否涉诉": False, "借款人年龄": 40, "借款人性别": "女", "近期大额交易": []}
    f.update(kw)
    return f


# --------------------------------------------------------------------------------------------- built-ins

@pytest.mark.parametrize("name", ["credit", "aml", "audit"])
def test_builtin_specs_ship_in_the_package_and_hold_their_examples(name):
    spec = builtin_spec(name)
    assert spec.text == (SPEC_DIR / f"{name}.yaml").read_text(encoding="utf-8") and spec.warnings == []
    t = TASKS[name]
    assert t.spec.name == name and t.spec_text == spec.text and t.has_sampler and len(t.spec.examples) >= 2
    for ex, want in zip(t.spec.examples, t.spec.model.examples, strict=True):
        got = t.label(ex)
        assert all(got[k] == v for k, v in want.expect.items())
    assert [r.condition for r in t.rules][-1] is None and all(r.reason for r in t.rules)


def test_builtin_spec_properties():
    credit, aml, audit = TASKS["credit"], TASKS["aml"], TASKS["audit"]
    assert credit.favourable == "通过" and credit.positive is None and credit.abstain is None
    assert credit.protected == ("gender", "age_band", "hukou", "region")
    assert credit.protected_bands == {"age": {"field": "age_band", "bands": {"18-30岁": 30, "31-45岁": 45,
                                                                            "46-60岁": None}}}
    assert credit.ordinal_keys == {"grade": ["A", "B", "C", "D", "E"]} and credit.secondary_keys == ["grade"]
    assert (aml.positive, aml.positive_key, aml.favourable, aml.protected) == ("可疑", "conclusion", None, ())
    assert audit.ordinal_keys == {"severity": ["高", "中", "低"]} and audit.reason_key == "basis"
    assert [t.multi_label_keys for t in (credit, aml, audit)] == [[], [], []]
    assert credit.segments == ["guarantee"] and credit.policy is None and credit.reason_max_length == 40
    assert credit.rules[1].condition == "dti > 70" and credit.rules[1].reason == "负债收入比{{ dti | pct }}过高"
    # age_band comes from the spec's bands, exactly as the Python derive did
    f = credit.sample(random.Random(0), "standard")
    assert f["age_band"] == ("18-30岁" if f["age"] <= 30 else "31-45岁" if f["age"] <= 45 else "46-60岁")


def test_a_sampler_keyed_by_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown rules: nope"):
        Task(builtin_spec("aml"), Sampler(lambda rng, d: {}, fire={"nope": lambda f, r, d: None}))


def test_filters_are_the_base_formatters():
    for x in (0, 3.0, 12.5, 72.44, 18500, 99999.999, -0.001):
        assert FILTERS["pct"](x) == fmt_pct(x) and FILTERS["num"](x) == fmt_num(x)
        assert FILTERS["wan"](x) == fmt_wan(x) and FILTERS["yuan"](x) == fmt_yuan(x)
    assert FILTERS["yuan_thousands"](1234567) == "1,234,567元" and FILTERS["thousands"](1234567.5) == "1,234,567.5"
    assert FILTERS["pct"](None) == "未提供" and FILTERS["yesno"](True) == "是"


def test_templates_are_sandboxed():
    names = {"x", "s"}
    for src, msg in [("{{ x.__class__.__mro__ }}", "unsafe"), ("{{ 2 ** 100 }}", r"\*\*"),
                     ("{{ s * 100000 }}", "repeating"), ("{{ range(10) }}", "unknown field 'range'"),
                     ("{{ y }}", "unknown field 'y'"), ("{{ x | nope }}", "No filter named 'nope'")]:
        with pytest.raises(TemplateFailure, match=msg):
            Template(src, names).render({"x": 1.5, "s": "ab"})
    assert Template("{{ x | pct }}{{ s }}", names).render({"x": None, "s": "ab"}) == "未提供ab"


# --------------------------------------------------------------------------------------------- a bank's task

def test_bank_task_properties(post_loan):
    t = post_loan
    assert (t.name, t.title, t.primary_key, t.reason_key) == ("post_loan", "贷后预警等级", "预警等级", "理由")
    assert t.label_values == ["正常", "关注", "预警", "转人工"] and t.favourable == "正常" and t.abstain == "转人工"
    assert t.multi_label_keys == ["风险标签"] and t.categorical_keys == ["预警等级", "风险标签"]
    assert t.protected == ("借款人年龄_band", "借款人性别")
    assert t.protected_bands["借款人年龄"]["bands"] == {"35岁以下": 34, "35-54岁": 54, "55岁以上": None}
    assert t.segments == ["客户类型", "借款人年龄_band"]
    assert t.costs["预警"]["正常"] == 10 and t.prevalence["转人工"] == 0.01
    assert t.policy.startswith("你是本行贷后管理助理") and t.reason_max_length == 40
    assert t.numeric_fields == ("贷款余额", "逾期天数", "抵押物估值变化", "借款人年龄") and t.bool_fields == ("是否涉诉",)
    assert t.optional_fields == {"抵押物估值变化": None, "经营状况": None, "近期大额交易": None}
    assert t.branches[0] == "涉诉且逾期" and not t.has_sampler
    with pytest.raises(ValueError, match="no synthetic sampler"):
        t.sample(random.Random(0))


@pytest.mark.parametrize("kw,rule,level,tags", [
    ({"是否涉诉": True, "逾期天数": 5}, "涉诉且逾期", "预警", ["逾期", "涉诉"]),
    ({"逾期天数": 91}, "严重逾期", "预警", ["逾期"]),
    ({"逾期天数": 90}, "逾期关注", "关注", ["逾期"]),
    ({"五级分类": "可疑"}, "不良", "预警", ["不良分类"]),
    ({"经营状况": None}, "资料不全", "转人工", ["无"]),
    ({"经营状况": "停业"}, "停业", "预警", ["经营异常"]),
    ({"抵押物估值变化": -20.0}, "抵押物贬值", "关注", ["抵押物贬值"]),
    ({"抵押物估值变化": None}, "正常", "正常", ["无"]),  # a missing value never makes a rule fire
    ({}, "正常", "正常", ["无"]),
])
def test_bank_rules(post_loan, kw, rule, level, tags):
    ans = post_loan.label(fields(**kw))
    assert (ans["rule"], ans["预警等级"], ans["风险标签"]) == (rule, level, tags)


def test_bank_prompt_answer_and_record(post_loan):
    t = post_loan
    f = fields(贷款余额=35, 逾期天数=120, 抵押物估值变化=None, 是否涉诉=False,
               近期大额交易=[{"日期": "2024-03-01", "金额": 49000, "摘要": "现金存入"}])
    t.derive(f)
    prompt = t.render_prompt(f, random.Random(0))
    assert prompt == ("请根据以下贷后监测信息判断预警等级：客户名称：王五；客户类型：企业；贷款余额：35万元；逾期天数：120天；"
                      "五级分类：正常；抵押物估值较上次评估变化未提供；经营状况：正常；无涉诉；"
                      "近期大额交易：（日期：2024-03-01，金额：49000元，摘要：现金存入）。请给出预警等级、风险标签和理由。")
    assert "借款人年龄" not in prompt and "借款人性别" not in prompt  # show: false
    rec = t.make_record("post_loan-bank-000000", f, random.Random(0))
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert rec["messages"][0]["content"] == t.policy
    answer = rec["messages"][-1]["content"]
    assert answer == "预警等级：预警；风险标签：逾期；理由：逾期120天，超过90天"
    gold = json.loads(rec["gold"])
    assert gold == {"预警等级": "预警", "风险标签": ["逾期"], "理由": "逾期120天，超过90天"}
    assert t.parse(answer) == gold == t.parse(answer, strict=True) and rec["label"] == "预警"
    meta = json.loads(rec["meta"])
    assert meta["借款人年龄_band"] == "35-54岁" and meta["branch"] == "严重逾期"
    assert t.gold(t.fields_from_meta(meta)) == gold
    # a rule reading a band field works on fields without it (e.g. from a record's meta)
    banded = task_from_spec(parse_spec(_bad("when: 五级分类 in 不良分类",
                                            "when: 五级分类 in 不良分类 and 借款人年龄_band == '35-54岁'"), "b.yaml"))
    plain = fields(五级分类="次级", 借款人年龄=40)
    assert "借款人年龄_band" not in plain and banded.label(plain)["rule"] == "不良"
    assert banded.label(fields(五级分类="次级", 借款人年龄=60))["rule"] == "正常"
    # shuffle_fields re-renders in another order although the spec keeps a fixed order
    assert t.render_prompt(f, random.Random(0)) == prompt
    assert len({t.render_prompt(f, random.Random(i), shuffle=True) for i in range(5)}) > 1


def test_multi_label_parse(post_loan):
    t = post_loan
    want = {"预警等级": "预警", "风险标签": ["逾期", "涉诉"], "理由": "涉诉且逾期5天"}
    assert t.format_answer({**want, "风险标签": ["涉诉", "逾期"]}) == "预警等级：预警；风险标签：逾期、涉诉；理由：涉诉且逾期5天"
    for text in ["预警等级：预警；风险标签：逾期、涉诉；理由：涉诉且逾期5天",
                 "等级: 预警; 标签: 涉诉, 逾期; 理由: 涉诉且逾期5天",
                 "理由：涉诉且逾期5天\n风险标签：涉诉/逾期/逾期\n预警等级：预警"]:
        assert t.parse(text) == want, text
    assert t.parse("预警等级：预警；风险标签：逾期、涉诉；理由：涉诉且逾期5天", strict=True) == want
    assert t.parse("预警等级：预警；风险标签：涉诉、逾期；理由：x", strict=True) is None  # not in the declared order
    assert t.parse("预警等级：预警；风险标签：逾期、洗钱；理由：x") is None
    assert t.parse("预警等级：预警；风险标签：；理由：x") is None


def test_default_wording_formats():
    t = task_from_spec(parse_spec("""
name: formats
title: 格式
fields:
  比例: {type: percent}
  金额: {type: decimal, unit: 万元}
  月收入: {type: integer, unit: 元}
  流水: {type: decimal, unit: 元, format: yuan_thousands}
  次数: {type: integer, unit: 次}
  倍数: {type: decimal, unit: 倍}
  开户日期: {type: date}
  是否本地: {type: boolean}
  备注: {type: text, required: false}
answer:
  keys: {结论: {values: [是, 否]}}
  primary: 结论
""", "formats.yaml"))
    f = {"比例": 45, "金额": 12.5, "月收入": 18500, "流水": 1234567, "次数": 3, "倍数": 2.50, "开户日期": "2024-03-01",
         "是否本地": True, "备注": None}
    assert t.facts(f) == [["比例：45.0%"], ["金额：12.5万元"], ["月收入：18500元"], ["流水：1,234,567元"], ["次数：3次"],
                          ["倍数：2.5倍"], ["开户日期：2024-03-01"], ["是否本地：是"], ["备注：未提供"]]
    assert t.reason_key is None and t.parse("结论：是") == {"结论": "是"} and not t.has_rules
    with pytest.raises(ValueError, match="no rules"):
        t.label(f)


def test_coerce_value():
    s = parse_spec(POST_LOAN, "p.yaml").fields
    assert coerce_value(s["贷款余额"], "1,234.5万元") == 1234.5 and coerce_value(s["逾期天数"], "12天") == 12
    assert coerce_value(s["是否涉诉"], "有涉诉") is True and coerce_value(s["是否涉诉"], "否") is False
    assert coerce_value(s["客户类型"], " 企业 ") == "企业"
    assert coerce_value(s["近期大额交易"], '[{"日期": "2024/3/1", "金额": "4.9万元", "摘要": "存现"}]') == \
        [{"日期": "2024-03-01", "金额": 49000, "摘要": "存现"}]
    for field, bad, msg in [("逾期天数", "3.5", "whole number"), ("逾期天数", "-1", "minimum"), ("贷款余额", "abc", "number"),
                            ("是否涉诉", "也许", "yes/no"), ("客户类型", "个体", "not one of")]:
        with pytest.raises(ValueError, match=msg):
            coerce_value(s[field], bad)


# --------------------------------------------------------------------------------------------- bad input

def _bad(old: str, new: str) -> str:
    assert POST_LOAN.count(old) == 1, old
    return POST_LOAN.replace(old, new)


BAD = {
    "unknown key": (_bad("title: 贷后预警等级", "title: 贷后预警等级\ntitel: x"),
                    r"unknown key 'titel' \(allowed here: name, title, description, fields"),
    "unknown key in a field": (_bad("逾期天数: {type: integer, unit: 天, min: 0}", "逾期天数: {type: integer, unti: 天}"),
                               r"unknown key 'fields\.逾期天数\.unti' \(allowed here: type, label,"),
    "unknown key in a rule": (_bad("    when: 逾期天数 > 逾期关注天数", "    whne: 逾期天数 > 逾期关注天数"),
                              r"unknown key 'rules\[5\]\.whne' \(allowed here: name, when, outcome, reason, doc\)"),
    "unknown field type": (_bad("客户名称: {type: text}", "客户名称: {type: string}"),
                           r"fields\.客户名称\.type = 'string': allowed: 'text', 'integer'"),
    "duplicate label": (_bad("values: [正常, 关注, 预警, 转人工]", "values: [正常, 关注, 预警, 关注]"),
                        r"answer\.keys\.预警等级\.values: duplicate label '关注'"),
    "duplicate key": (_bad("title: 贷后预警等级", "title: 贷后预警等级\ntitle: x"), r"post_loan\.yaml:3: .*duplicate key 'title'"),
    "rule does not parse": (_bad("when: 逾期天数 > 逾期预警天数", "when: 逾期天数 >> > 逾期预警天数"),
                            r"rules\[1\] \(严重逾期\)\.when: rule '严重逾期': does not parse"),
    "rule names an unknown field": (_bad("when: 逾期天数 > 逾期预警天数", "when: 逾期日数 > 逾期预警天数"),
                                    r"rules\[1\] \(严重逾期\)\.when: rule '严重逾期': unknown field '逾期日数'"),
    "rule calls a function": (_bad("when: 逾期天数 > 逾期预警天数", "when: \"__import__('os') == 1\""),
                              r"rule '严重逾期': function calls are not allowed"),
    "rule reaches an attribute": (_bad("when: 逾期天数 > 逾期预警天数", "when: \"().__class__ == 1\""),
                                  r"rule '严重逾期': attribute access \(x\.y\) is not allowed"),
    "rule compares with an unknown value": (_bad("when: 经营状况 == '停业'", "when: 经营状况 == '停产'"),
                                            r"'停产' is not a value of '经营状况' \(allowed: 正常, 下滑, 停业\)"),
    "favourable outside the label set": (_bad("favourable: 正常", "favourable: 通过"),
                                         r"answer\.favourable: '通过' is not a label of '预警等级' \(allowed: 正常, 关注, 预警, 转人工\)"),
    "abstain outside the label set": (_bad("abstain: 转人工", "abstain: 无法判断"),
                                      r"answer\.abstain: '无法判断' is not a label"),
    "protected attribute is the label": (
        _bad("借款人性别: {type: category, values: [男, 女], show: false, protected: true}",
             "预警等级: {type: category, values: [正常, 关注, 预警, 转人工], show: false, protected: true}"),
        r"answer\.keys\.预警等级: '预警等级' is a protected attribute and also the label"),
    "reason template fails to render": (_bad("reason: 借款人已停业", "reason: 借款人已停业{{ 经营状况 + 1 }}"),
                                        r"rules\[4\] \(停业\)\.reason: on examples\[0\]: template .* fails to render: TypeError"),
    "reason template names an unknown field": (_bad("reason: 借款人已停业", "reason: 借款人已停业{{ 状态 }}"),
                                               r"rules\[4\] \(停业\)\.reason: template names unknown field '状态'"),
    "outcome outside the label set": (_bad("outcome: {预警等级: 预警, 风险标签: [经营异常]}", "outcome: {预警等级: 高危, 风险标签: [经营异常]}"),
                                      r"rules\[4\] \(停业\)\.outcome\.预警等级: '高危' is not a value of '预警等级'"),
    "outcome without a key": (_bad("outcome: {预警等级: 预警, 风险标签: [经营异常]}", "outcome: {预警等级: 预警}"),
                              r"rules\[4\] \(停业\)\.outcome: no value for '风险标签'"),
    "example the rules contradict": (_bad("expect: {rule: 严重逾期, 预警等级: 预警", "expect: {rule: 严重逾期, 预警等级: 关注"),
                                     r"examples\[0\]\.expect\.预警等级: the rules answer '预警' \(rule '严重逾期'\), the example expects '关注'"),
    "catch-all with a condition": (_bad("  - name: 正常\n", "  - name: 正常\n    when: 逾期天数 == 0\n"),
                                   r"rules\[7\] \(正常\)\.when: the last rule is the catch-all"),
    "numeric protected without bands": (_bad(", bands: {35岁以下: 34, 35-54岁: 54, 55岁以上: null}", ""),
                                        r"fields\.借款人年龄\.bands: the numeric protected attribute '借款人年龄' needs bands"),
    "reason longer than max_length": (_bad("max_length: 40", "max_length: 5"), r"more than max_length 5"),
    "bad task name": (_bad("name: post_loan", "name: Post-Loan"), r"name: task name 'Post-Loan': lowercase ASCII"),
    "cost over an unknown label": (_bad("costs: {预警: {正常: 10", "costs: {预警: {通过: 10"),
                                   r"evaluation\.costs\.预警\.通过: '通过' is not a label"),
    "example value outside its category": (_bad("客户类型: 个人, 贷款余额: 35", "客户类型: 个体, 贷款余额: 35"),
                                           r"examples\[0\]\.fields\.客户类型: '个体' is not one of 个人, 个体工商户, 企业"),
    "YAML alias": ("a: &x [1]\nb: *x\n", r"YAML aliases"),
    "not a mapping": ("- a\n- b\n", r"a task spec is a YAML mapping"),
    "empty": ("\n", r"spec is empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_clear_line(case):
    text, pattern = BAD[case]
    with pytest.raises(SpecError) as e:
        parse_spec(text, "post_loan.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("post_loan.yaml"), msg
    assert re.search(pattern, msg), msg


def test_load_spec_names_the_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yaml: spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text(BAD["duplicate label"][0], encoding="utf-8")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(p))}: answer\.keys\.预警等级\.values: duplicate label"):
        load_spec(p)


# --------------------------------------------------------------------------------------------- registry

def test_a_spec_named_like_a_builtin_is_refused(tmp_path):
    p = tmp_path / "credit.yaml"
    p.write_text(POST_LOAN.replace("name: post_loan", "name: credit"), encoding="utf-8")
    with pytest.raises(SpecError, match="'credit' is a built-in task"):
        register_spec(p)
    with pytest.raises(SpecError, match="built-in"):
        resolve_task(f"credit={p}")
    with pytest.raises(SpecError, match="'credit' is a built-in task"):
        check_spec(p)
    assert get_task("credit") is TASKS["credit"]


def test_register_get_and_resolve(spec_file, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'post_loan'; allowed: credit, aml, audit"):
        get_task("post_loan")
    t = register_spec(spec_file)
    assert get_task("post_loan") is t and register_spec(spec_file) is t  # the same spec again: the same task
    other = tmp_path / "other.yaml"
    other.write_text(POST_LOAN.replace("title: 贷后预警等级", "title: 贷后预警"), encoding="utf-8")
    with pytest.raises(SpecError, match="already registered"):
        register_spec(other)
    assert register_spec(other, replace=True).title == "贷后预警"
    unregister("post_loan")
    assert resolve_task(f"post_loan={spec_file}").name == "post_loan"
    with pytest.raises(SpecError, match="the spec is called 'post_loan', not 'loan'"):
        resolve_task(f"loan={spec_file}")
    unregister("post_loan")


def test_resolve_specs_carried_by_a_model_folder(spec_file, tmp_path):
    model = tmp_path / "model"
    (model / "tasks").mkdir(parents=True)
    (model / "tasks" / "post_loan.yaml").write_text(spec_file.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown task 'post_loan'.*specs carried by"):
        resolve_task("post_loan", folders=[tmp_path])
    ts = resolve_tasks(["credit", "post_loan", "credit"], folders=[model])
    assert [t.name for t in ts] == ["credit", "post_loan"] and ts[0] is TASKS["credit"]
    assert get_task("post_loan") is ts[1]


# --------------------------------------------------------------------------------------------- task check

def test_check_spec_warns_when_a_rule_reads_a_protected_attribute():
    assert check_spec("credit").warnings == []
    text = _bad("when: 五级分类 in 不良分类", "when: 五级分类 in 不良分类 or 借款人年龄 > 60")
    res = check_spec(parse_spec(text, "p.yaml"))
    assert res.warnings == ["rule '不良' reads the protected attribute '借款人年龄'"]
    assert res.lines()[0].startswith("p.yaml: task 'post_loan' (贷后预警等级) is valid: 11 fields, 8 rules")


TABLE = (
    "客户名称,客户类型,贷款余额,逾期天数,五级分类,经营状况,是否涉诉,借款人年龄,预警等级,理由,近期大额交易\n"
    "张三,个人,35万元,120,次级,下滑,否,46,预警,逾期120天，超过90天,\n"           # line 2: fine
    "李四,个体,30,10,正常,正常,否,30,正常,,\n"                                 # line 3: category
    "王五,企业,abc,5,正常,正常,否,40,正常,,\n"                                 # line 4: number
    "赵六,企业,100,3.5,正常,正常,也许,40,良好,,\n"                              # line 5: whole, yes/no, label
    "钱七,企业,100,,正常,正常,否,40,正常," + "很长的理由" * 10 + ",\n"             # line 6: empty, reason
    "孙八,个体户,100,-3,正常,正常,否,40,正常,,[{\"金额\": 1}]\n"                  # line 7: category, range, records
)


WITH_GENDER = TABLE.replace(",借款人年龄,", ",借款人年龄,借款人性别,").replace(",46,", ",46,男,", 1)


def test_check_table_lists_planted_errors_with_rows_and_counts(tmp_path):
    p = tmp_path / "贷后台账.csv"
    p.write_text(TABLE, encoding="utf-8")
    res = check_table(parse_spec(POST_LOAN, "p.yaml"), p, scrub=lambda s: f"<{s}>")
    assert res.rows == 6 and not res.ok and res.mode == "fields"
    got = {(q.kind, q.column): (q.count, q.rows) for q in res.problems}
    assert got == {
        ("missing_column", "借款人性别"): (0, []),
        ("outside_category", "客户类型"): (2, [3, 7]),
        ("not_a_number", "贷款余额"): (1, [4]),
        ("not_whole_number", "逾期天数"): (1, [5]),
        ("not_yes_no", "是否涉诉"): (1, [5]),
        ("bad_label", "预警等级"): (1, [5]),
        ("empty", "逾期天数"): (1, [6]),
        ("reason_too_long", "理由"): (1, [6]),
        ("out_of_range", "逾期天数"): (1, [7]),
        ("bad_records", "近期大额交易"): (1, [7]),
    }
    cat = next(q for q in res.problems if q.kind == "outside_category")
    assert cat.values == ["<个体>", "<个体户>"] and "allowed: 个人, 个体工商户, 企业" in cat.detail
    lines = res.lines()
    assert lines[0] == f"{p}: 6 rows, 10 problems"
    assert f"{p}: column '客户类型': 2 values outside the category (rows 3, 7); e.g. '<个体>', '<个体户>'; " \
           "allowed: 个人, 个体工商户, 企业" in lines
    assert res.counts()["outside_category"] == 2
    clean = tmp_path / "clean.csv"
    clean.write_text(TABLE.splitlines()[0].replace(",借款人年龄", ",借款人年龄,借款人性别") + "\n"
                     + "张三,个人,35万元,120,次级,下滑,否,46,男,预警,逾期120天，超过90天,\n", encoding="utf-8")
    assert check_table(parse_spec(POST_LOAN, "p.yaml"), clean).ok


def test_check_table_for_a_builtin_uses_its_column_names(tmp_path):
    p = tmp_path / "aml.csv"
    p.write_text("描述,结论,类型\nx,可疑,洗钱\n", encoding="utf-8")
    res = check_table("aml", p, {"prompt": "描述", "conclusion": "结论", "typology": "类型"})
    assert res.mode == "prompt" and [(q.kind, q.column, q.rows) for q in res.problems] == [("bad_label", "类型", [2])]


def test_example_prompts_scrub_what_they_print(tmp_path):
    scrub = lambda s: s.replace("张三", "[姓名]")  # noqa: E731
    exs = example_prompts(parse_spec(POST_LOAN, "p.yaml"), scrub=scrub)
    assert len(exs) == 3 and exs[0]["rule"] == "严重逾期" and "[姓名]" in exs[0]["prompt"]
    assert all("张三" not in (e["prompt"] + (e["answer"] or "") + (e["system"] or "")) for e in exs)
    assert exs[1]["answer"] == "预警等级：转人工；风险标签：无；理由：经营状况未提供，需人工核实"
    p = tmp_path / "t.csv"
    p.write_text(WITH_GENDER, encoding="utf-8")
    from_tab = example_prompts(parse_spec(POST_LOAN, "p.yaml"), table=p, scrub=scrub)
    assert from_tab[0]["source"] == "t.csv row 2" and "[姓名]" in from_tab[0]["prompt"]
    assert from_tab[0]["answer"] == "预警等级：预警；风险标签：逾期；理由：逾期120天，超过90天"
    credit = example_prompts("credit", n=3)
    assert [e["rule"] for e in credit] == TASKS["credit"].branches[:3]
    assert all(TASKS["credit"].parse(e["answer"]) for e in credit)
    lines = format_examples(credit)
    assert lines[0].startswith("--- example 1 (sampled (blacklist), rule blacklist)") and lines[1].startswith("[user] ")


def test_from_table_for_a_spec_task(tmp_path):
    t = task_from_spec(parse_spec(POST_LOAN, "p.yaml"))
    p = tmp_path / "t.csv"
    p.write_text(WITH_GENDER, encoding="utf-8")
    recs = from_table(t, p, limit=1)
    assert [m["role"] for m in recs[0]["messages"]] == ["system", "user", "assistant"]
    assert json.loads(recs[0]["gold"])["风险标签"] == ["逾期"]  # from the rules, which give the bank's label
    with pytest.raises(ValueError, match="cannot read 'abc' as a number"):
        from_table(t, p)
    assert len(from_table(t, p, skip_bad_rows=True)) == 1  # the rows with an empty label are unlabelled ...
    assert len(from_table(t, p, skip_bad_rows=True, unlabelled=True)) == 3  # ... records without an answer


def _render_or_error(template, values):
    try:
        return template.render(values)
    except TemplateFailure as e:
        return str(e)


def test_plain_templates_render_as_jinja_does():
    """Text with ``{{ name }}`` / ``{{ name | filter }}`` skips Jinja's runtime; the output (and errors) are the same."""
    rng = random.Random(0)
    plain = [a for t in TASKS.values() for alts in [*t._facts, *[[r.reason] for r in t._compiled]] for a in alts
             if isinstance(a, Template) and a._parts is not None]
    assert len(plain) > 40
    for a in plain:
        for _ in range(30):
            vals = {k: rng.choice([None, 0, 1.5, -2.25, 80.0, "文本", True, 123456]) for k in a.names}

            fast = _render_or_error(a, vals)
            parts, a._parts = a._parts, None
            try:
                assert _render_or_error(a, vals) == fast, a.source
            finally:
                a._parts = parts


def test_the_docs_example_is_this_spec():
    docs = (REPO / "docs" / "tasks.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", docs, re.S) if b.startswith("name: post_loan"))
    assert block == POST_LOAN
    t = task_from_spec(parse_spec(block, "docs/tasks.md"))
    ex = example_prompts(t, n=1)[0]
    assert f"[user]   {ex['prompt'][:60]}" in docs and f"[answer] {ex['answer']}" in docs
