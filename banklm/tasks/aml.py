"""反洗钱 (aml): a monitored account's transaction profile -> suspicious or not, typology and reason.

Answer layout: ``结论：可疑；类型：拆分交易；理由：近7日单笔4.5万至5万元现金存入4笔``
(conclusion 可疑/正常, typology one of 拆分交易, 快进快出, 分散转入集中转出, 与高风险地区往来,
与身份不符的大额现金, 循环交易, or 无 when normal).

The prompt states summary indicators over a 30-day monitoring window (every derived ratio is stated,
never left to arithmetic). The task (fields, wording, answer layout, rules) is the spec
``banklm/tasks/specs/aml.yaml``; this module is its synthetic sampler: realistic inputs, and per rule
``fire`` / ``avoid`` mutators for data balanced by branch. Labelling rules (ordered; the first matching
rule decides):

1. ``high_risk_region``: the foreign counterparty is in a high-risk jurisdiction (朝鲜, 伊朗, 缅甸)
   -> 可疑, 与高风险地区往来.
2. ``structuring``: 近7日单笔4.5万至5万元现金存入 >= 3 笔 -> 可疑, 拆分交易.
3. ``pass_through``: 转入资金48小时内转出比例 >= 90% -> 可疑, 快进快出.
4. ``fan_in_out``: 转入对手方 >= 10 个 and 转出对手方 <= 2 个 -> 可疑, 分散转入集中转出.
5. ``cash_identity``: 近30日现金交易额 >= 月收入的 10 倍 -> 可疑, 与身份不符的大额现金.
6. ``round_trip``: 资金回流比例 >= 80% -> 可疑, 循环交易.
7. ``normal``: otherwise -> 正常, 无.

The primary label (for accuracy, F1, MCC) is the typology (无 for normal).
"""

from __future__ import annotations

import random

from banklm.tasks.base import Fields, Sampler, Task, gap, int_gap, r1, red_flag
from banklm.tasks.spec import builtin_spec

SPEC = builtin_spec("aml")

TYPOLOGIES = list(SPEC.model.answer.keys["typology"].values)
# The sampler's own lists: their order is part of the random stream (tests/test_task_golden.py).
HIGH_RISK = list(SPEC.constants["high_risk_regions"])  # the rule high_risk_region reads the same constant
OTHER_REGIONS = ["新加坡", "日本", "德国", "澳大利亚", "韩国", "英国", "加拿大"]
SURNAMES = list(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹彭曾肖田董潘袁蔡蒋余于杜叶程魏苏吕"
)
OCCUPATIONS = {
    "个人": ["学生", "退休人员", "公司职员", "自由职业者", "农户", "外卖骑手", "教师"],
    "个体工商户": ["建材批发", "服装零售", "餐饮经营", "水果批发", "手机维修", "物流配送"],
    "企业": ["贸易公司", "科技公司", "电子厂", "食品公司", "劳务公司"],
}


def _sampler(rng: random.Random, difficulty: float) -> Fields:
    ctype = rng.choice(list(OCCUPATIONS))
    lo, hi = {"个人": (3000, 20000), "个体工商户": (10000, 80000), "企业": (100000, 900000)}[ctype]
    return {
        "customer": rng.choice(SURNAMES) + "某"
        if ctype != "企业"
        else rng.choice(["某", "甲", "乙"]) + "公司",
        "customer_type": ctype,
        "occupation": rng.choice(OCCUPATIONS[ctype]),
        "monthly_income": rng.randrange(lo, hi, 100),
        "account_years": rng.randint(0, 15),
        "struct_count": rng.randint(3, 6) if red_flag(rng) else rng.choice([0, 0, 0, 0, 1, 1, 2]),
        "out48_pct": r1(rng.uniform(90.0, 99.9) if red_flag(rng) else rng.uniform(0, 89.9)),
        "in_cp": rng.randint(1, 25),
        "out_cp": rng.randint(1, 12),
        "cash_multiple": r1(rng.uniform(10.0, 20.0) if red_flag(rng) else rng.uniform(0.1, 9.9)),
        "return_pct": r1(rng.uniform(80.0, 99.0) if red_flag(rng) else rng.uniform(0, 79.9)),
        "foreign_region": rng.choice(HIGH_RISK) if red_flag(rng) else rng.choice(["无"] * 7 + OTHER_REGIONS),
    }


def _hr_fire(f, rng, d):
    f["foreign_region"] = rng.choice(HIGH_RISK)


def _hr_avoid(f, rng, d):
    if f["foreign_region"] in HIGH_RISK:
        f["foreign_region"] = rng.choice(["无", "无"] + OTHER_REGIONS)


def _st_fire(f, rng, d):
    f["struct_count"] = 3 + int_gap(rng, 4, d)


def _st_avoid(f, rng, d):
    if f["struct_count"] >= 3 or rng.random() < d:
        f["struct_count"] = 2 - int_gap(rng, 2, d)


def _pt_fire(f, rng, d):
    f["out48_pct"] = min(99.9, r1(90.0 + gap(rng, 0.0, 9.9, d)))


def _pt_avoid(f, rng, d):
    if f["out48_pct"] >= 90 or rng.random() < d:
        f["out48_pct"] = max(0.0, r1(89.9 - gap(rng, 0.0, 85.0, d)))


def _fan_fire(f, rng, d):
    f["in_cp"] = 10 + int_gap(rng, 20, d)
    f["out_cp"] = 2 - int_gap(rng, 1, d)


def _fan_avoid(f, rng, d):
    if (f["in_cp"] >= 10 and f["out_cp"] <= 2) or rng.random() < d:
        if rng.random() < 0.5:
            f["in_cp"] = 9 - int_gap(rng, 8, d)
        else:
            f["out_cp"] = 3 + int_gap(rng, 9, d)


def _cash_fire(f, rng, d):
    f["cash_multiple"] = r1(10.0 + gap(rng, 0.0, 20.0, d))


def _cash_avoid(f, rng, d):
    if f["cash_multiple"] >= 10 or rng.random() < d:
        f["cash_multiple"] = max(0.1, r1(9.9 - gap(rng, 0.0, 9.5, d)))


def _rt_fire(f, rng, d):
    f["return_pct"] = min(99.9, r1(80.0 + gap(rng, 0.0, 19.0, d)))


def _rt_avoid(f, rng, d):
    if f["return_pct"] >= 80 or rng.random() < d:
        f["return_pct"] = max(0.0, r1(79.9 - gap(rng, 0.0, 75.0, d)))


AML = Task(
    SPEC,
    Sampler(
        _sampler,
        fire={"high_risk_region": _hr_fire, "structuring": _st_fire, "pass_through": _pt_fire,
              "fan_in_out": _fan_fire, "cash_identity": _cash_fire, "round_trip": _rt_fire},
        avoid={"high_risk_region": _hr_avoid, "structuring": _st_avoid, "pass_through": _pt_avoid,
               "fan_in_out": _fan_avoid, "cash_identity": _cash_avoid, "round_trip": _rt_avoid},
    ),
)
