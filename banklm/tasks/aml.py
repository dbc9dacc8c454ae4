"""反洗钱 (aml): a monitored account's transaction profile -> suspicious or not, typology and reason.

Answer layout: ``结论：可疑；类型：拆分交易；理由：近7日单笔4.5万至5万元现金存入4笔``
(conclusion 可疑/正常, typology one of 拆分交易, 快进快出, 分散转入集中转出, 与高风险地区往来,
与身份不符的大额现金, 循环交易, or 无 when normal).

The prompt states summary indicators over a 30-day monitoring window (every derived ratio is stated,
never left to arithmetic). Labelling rules (ordered; the first matching rule decides):

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

from banklm.tasks.base import (
    AnswerField,
    Fields,
    Rule,
    Task,
    fmt_num,
    fmt_pct,
    fmt_yuan,
    gap,
    int_gap,
    r1,
    red_flag,
)

TYPOLOGIES = [
    "拆分交易",
    "快进快出",
    "分散转入集中转出",
    "与高风险地区往来",
    "与身份不符的大额现金",
    "循环交易",
    "无",
]
CONCLUSIONS = ["可疑", "正常"]
HIGH_RISK = ["朝鲜", "伊朗", "缅甸"]
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


def _ans(typ: str, reason: str) -> dict:
    return {"conclusion": "正常" if typ == "无" else "可疑", "typology": typ, "reason": reason}


RULES = [
    Rule(
        "high_risk_region",
        lambda f: f["foreign_region"] in HIGH_RISK,
        lambda f: _ans("与高风险地区往来", f"与{f['foreign_region']}的境外对手方有资金往来"),
        _hr_fire,
        _hr_avoid,
    ),
    Rule(
        "structuring",
        lambda f: f["struct_count"] >= 3,
        lambda f: _ans("拆分交易", f"近7日单笔4.5万至5万元现金存入{f['struct_count']}笔"),
        _st_fire,
        _st_avoid,
    ),
    Rule(
        "pass_through",
        lambda f: f["out48_pct"] >= 90,
        lambda f: _ans("快进快出", f"转入资金48小时内转出{fmt_pct(f['out48_pct'])}"),
        _pt_fire,
        _pt_avoid,
    ),
    Rule(
        "fan_in_out",
        lambda f: f["in_cp"] >= 10 and f["out_cp"] <= 2,
        lambda f: _ans("分散转入集中转出", f"转入对手方{f['in_cp']}个，转出对手方{f['out_cp']}个"),
        _fan_fire,
        _fan_avoid,
    ),
    Rule(
        "cash_identity",
        lambda f: f["cash_multiple"] >= 10,
        lambda f: _ans("与身份不符的大额现金", f"现金交易额为月收入的{fmt_num(f['cash_multiple'])}倍"),
        _cash_fire,
        _cash_avoid,
    ),
    Rule(
        "round_trip",
        lambda f: f["return_pct"] >= 80,
        lambda f: _ans("循环交易", f"资金回流比例{fmt_pct(f['return_pct'])}"),
        _rt_fire,
        _rt_avoid,
    ),
    Rule("normal", lambda f: True, lambda f: _ans("无", "各项指标未触发可疑规则")),
]


def _facts(f: Fields) -> list[list[str]]:
    who = f"{f['customer']}（{f['customer_type']}，{f['occupation']}）"
    inc = fmt_yuan(f["monthly_income"])
    cm = fmt_num(f["cash_multiple"])
    region = f["foreign_region"]
    return [
        [f"客户{who}", f"监测对象{who}"],
        [f"开户{f['account_years']}年，月收入{inc}", f"月收入{inc}，开户{f['account_years']}年"],
        [
            f"近7日单笔4.5万至5万元现金存入{f['struct_count']}笔",
            f"近7日有{f['struct_count']}笔单笔4.5万至5万元的现金存入",
        ],
        [f"转入资金48小时内转出{fmt_pct(f['out48_pct'])}", f"48小时内转出比例{fmt_pct(f['out48_pct'])}"],
        [
            f"转入对手方{f['in_cp']}个，转出对手方{f['out_cp']}个",
            f"资金来自{f['in_cp']}个对手方，转给{f['out_cp']}个对手方",
        ],
        [f"现金交易额为月收入的{cm}倍", f"近30日现金交易额是月收入的{cm}倍"],
        [f"资金回流比例{fmt_pct(f['return_pct'])}", f"经他人账户回流的资金占{fmt_pct(f['return_pct'])}"],
        [
            "无境外交易" if region == "无" else f"境外对手方所在地：{region}",
            "无境外对手方" if region == "无" else f"有{region}的境外对手方",
        ],
    ]


AML = Task(
    name="aml",
    title="反洗钱",
    rules=RULES,
    answer_fields=[
        AnswerField("conclusion", "结论", CONCLUSIONS, aliases=("判断",)),
        AnswerField("typology", "类型", TYPOLOGIES, aliases=("可疑类型", "交易类型")),
        AnswerField("reason", "理由", None, aliases=("原因",)),
    ],
    primary_key="typology",
    field_names=[
        "customer",
        "customer_type",
        "occupation",
        "monthly_income",
        "account_years",
        "struct_count",
        "out48_pct",
        "in_cp",
        "out_cp",
        "cash_multiple",
        "return_pct",
        "foreign_region",
    ],
    sampler=_sampler,
    facts=_facts,
    intros=["反洗钱监测（近30日）：", "可疑交易甄别。", "以下为账户近30日交易监测摘要："],
    questions=["请判断是否可疑并说明类型。", "请给出结论、类型和理由。", "是否需要上报可疑交易？"],
    distractors=[
        "客户已完成身份信息更新",
        "账户绑定了手机银行",
        "客户为本行存量客户",
        "近期有水电费代扣",
        "客户经理反馈客户配合调查",
        "账户开立于城区网点",
    ],
    head_facts=1,
    numeric_fields=(
        "monthly_income",
        "account_years",
        "struct_count",
        "out48_pct",
        "in_cp",
        "out_cp",
        "cash_multiple",
        "return_pct",
    ),
    optional_fields={
        "customer": "客户",
        "customer_type": "个人",
        "occupation": "未知",
        "account_years": 0,
        "foreign_region": "无",
    },
    extra={"yuan_fields": ("monthly_income",)},
)
