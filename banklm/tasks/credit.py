"""授信审批 (credit): a small-business loan application -> decision, risk grade and reason.

Answer layout: ``结论：拒绝；风险等级：D；理由：负债收入比72.4%过高``
(decision 通过/拒绝/人工复核, grade A-E, reason one clause whose numbers are copied from the prompt).

Labelling rules (ordered; the first matching rule decides):

1. ``blacklist``: applicant is a 失信被执行人 -> 拒绝, E.
2. ``dti_high``: 负债收入比 > 70% -> 拒绝, D.
3. ``overdue_many``: 近24个月逾期次数 >= 3 -> 拒绝, D.
4. ``inquiries_many``: 近6个月征信查询次数 >= 6 -> 人工复核, C.
5. ``dti_mid``: 负债收入比 >= 50% -> 人工复核, C.
6. ``large_unsecured``: 申请金额 >= 50万元 and 担保方式 = 信用 -> 人工复核, C.
7. ``prime``: 负债收入比 < 30%, 近24个月逾期 0 次 and 担保方式 = 房产抵押 -> 通过, A.
8. ``standard``: otherwise -> 通过, B.

The 负债收入比 (monthly debt payments / monthly income) is stated in the prompt with one decimal, next
to the income and payment it derives from; rules read the stated value. Gender, age (band), hukou and
region are sampled independently of every rule input and are never used by the rules, so a fair model
approves every group at the same rate (fields for the fairness metric).
"""

from __future__ import annotations

import random

from banklm.tasks.base import (
    AnswerField,
    Fields,
    Rule,
    Task,
    fmt_pct,
    fmt_wan,
    fmt_yuan,
    gap,
    int_gap,
    r1,
    red_flag,
)

DECISIONS = ["通过", "拒绝", "人工复核"]
GRADES = ["A", "B", "C", "D", "E"]
GUARANTEES = ["房产抵押", "保证人担保", "信用"]

SURNAMES = list(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹彭曾肖田董潘袁蔡蒋余于杜叶程魏苏吕丁任沈姚卢"
)
CITIES = {
    "东部": ["温州", "泉州", "嘉兴", "潍坊", "南通", "台州", "绍兴", "临沂", "盐城", "漳州"],
    "中部": ["赣州", "襄阳", "洛阳", "衡阳", "阜阳", "宜昌", "南阳", "株洲", "九江", "长治"],
    "西部": ["绵阳", "遵义", "曲靖", "宝鸡", "天水", "南充", "柳州", "榆林", "大理", "石嘴山"],
}
INDUSTRIES = [
    "餐饮",
    "批发零售",
    "五金制造",
    "建筑装饰",
    "蔬菜种植",
    "生猪养殖",
    "货物运输",
    "农产品电商",
    "汽车维修",
    "服装加工",
    "茶叶加工",
    "建材销售",
    "家具制造",
    "水产养殖",
]
PURPOSES = ["经营周转", "购置设备", "采购原材料", "店面装修", "扩大养殖规模", "支付货款"]
AGE_BANDS = ["18-30岁", "31-45岁", "46-60岁"]


def age_band(age: int) -> str:
    return AGE_BANDS[0] if age <= 30 else AGE_BANDS[1] if age <= 45 else AGE_BANDS[2]


def _derive(f: Fields) -> None:
    f["age_band"] = age_band(int(f["age"]))


def _set_dti(f: Fields, dti: float) -> None:
    """Set the debt payment so that payment / income rounds to ``dti`` (one decimal)."""
    dti = max(1.0, min(r1(dti), 150.0))
    inc = f["monthly_income"]
    f["monthly_debt"] = int(round(inc * dti / 100))
    f["dti"] = r1(100 * f["monthly_debt"] / inc)


def _sampler(rng: random.Random, difficulty: float) -> Fields:
    region = rng.choice(list(CITIES))
    f: Fields = {
        "applicant": rng.choice(SURNAMES) + "某",
        "gender": rng.choice(["男", "女"]),
        "age": rng.randint(22, 60),
        "hukou": rng.choice(["城镇", "农村"]),
        "region": region,
        "city": rng.choice(CITIES[region]),
        "industry": rng.choice(INDUSTRIES),
        "purpose": rng.choice(PURPOSES),
        "years_in_business": rng.randint(1, 20),
        "amount_wan": float(rng.choice([5, 8, 10, 15, 20, 30, 40, 50, 60, 80, 100, 120, 150, 200])),
        "term_months": rng.choice([12, 24, 36]),
        "guarantee": rng.choice(GUARANTEES[:1] * 2 + GUARANTEES[1:2] * 2 + GUARANTEES[2:]),  # 20% unsecured
        "monthly_income": rng.randrange(6000, 80000, 100),
        "monthly_debt": 0,
        "dti": 0.0,
        "overdue_24m": rng.randint(3, 6) if red_flag(rng) else rng.choice([0, 0, 0, 0, 1, 1, 2]),
        "inquiries_6m": rng.randint(6, 9) if red_flag(rng) else rng.randint(0, 5),
        "blacklist": red_flag(rng, 0.05),
    }
    _set_dti(f, rng.uniform(70.1, 90) if red_flag(rng) else rng.uniform(50, 70) if red_flag(rng) else
             rng.uniform(8, 49.9))
    if rng.random() < 0.5:
        f["amount_wan"] = float(rng.randrange(5, 200))
    return f


# -- fire / avoid ---------------------------------------------------------------------------------


def _bl_fire(f, rng, d):
    f["blacklist"] = True


def _bl_avoid(f, rng, d):
    f["blacklist"] = False


def _dti_high_fire(f, rng, d):
    _set_dti(f, 70.1 + gap(rng, 0.0, 25.0, d))
    if f["dti"] <= 70:
        _set_dti(f, 70.2)


def _dti_high_avoid(f, rng, d):
    if f["dti"] > 70 or rng.random() < d:
        _set_dti(f, 70.0 - gap(rng, 0.0, 55.0, d))


def _overdue_fire(f, rng, d):
    f["overdue_24m"] = 3 + int_gap(rng, 3, d)


def _overdue_avoid(f, rng, d):
    if f["overdue_24m"] >= 3 or rng.random() < d:
        f["overdue_24m"] = 2 - int_gap(rng, 2, d)


def _inq_fire(f, rng, d):
    f["inquiries_6m"] = 6 + int_gap(rng, 4, d)


def _inq_avoid(f, rng, d):
    if f["inquiries_6m"] >= 6 or rng.random() < d:
        f["inquiries_6m"] = 5 - int_gap(rng, 5, d)


def _dti_mid_fire(f, rng, d):
    if rng.random() < 0.5:
        _set_dti(f, 50.0 + gap(rng, 0.0, 10.0, d))
    else:
        _set_dti(f, 70.0 - gap(rng, 0.0, 10.0, d))


def _dti_mid_avoid(f, rng, d):
    if f["dti"] >= 50 or rng.random() < d:
        _set_dti(f, 49.9 - gap(rng, 0.0, 40.0, d))


def _large_fire(f, rng, d):
    f["guarantee"] = "信用"
    f["amount_wan"] = float(50 + round(gap(rng, 0.0, 150.0, d)))


def _large_avoid(f, rng, d):
    if f["amount_wan"] >= 50 and f["guarantee"] == "信用" or rng.random() < d:
        if rng.random() < 0.5:
            f["guarantee"] = "信用"
            f["amount_wan"] = float(max(1, 49 - round(gap(rng, 0.0, 44.0, d))))
        else:
            f["guarantee"] = rng.choice(GUARANTEES[:2])


def _prime_fire(f, rng, d):
    f["overdue_24m"] = 0
    f["guarantee"] = "房产抵押"
    _set_dti(f, 29.9 - gap(rng, 0.0, 22.0, d))


def _prime_avoid(f, rng, d):
    choice = rng.randrange(3)
    if choice == 0:
        _set_dti(f, 30.0 + gap(rng, 0.0, 19.9, d))
    elif choice == 1:
        f["overdue_24m"] = rng.choice([1, 2])
    else:
        f["guarantee"] = rng.choice(GUARANTEES[1:])
        if f["guarantee"] == "信用":
            f["amount_wan"] = min(f["amount_wan"], 49.0)


def _ans(decision: str, grade: str, reason: str) -> dict:
    return {"decision": decision, "grade": grade, "reason": reason}


def _dti(f):
    return fmt_pct(f["dti"])


RULES = [
    Rule(
        "blacklist",
        lambda f: bool(f["blacklist"]),
        lambda f: _ans("拒绝", "E", "申请人为失信被执行人"),
        _bl_fire,
        _bl_avoid,
    ),
    Rule(
        "dti_high",
        lambda f: f["dti"] > 70,
        lambda f: _ans("拒绝", "D", f"负债收入比{_dti(f)}过高"),
        _dti_high_fire,
        _dti_high_avoid,
    ),
    Rule(
        "overdue_many",
        lambda f: f["overdue_24m"] >= 3,
        lambda f: _ans("拒绝", "D", f"近24个月逾期{f['overdue_24m']}次"),
        _overdue_fire,
        _overdue_avoid,
    ),
    Rule(
        "inquiries_many",
        lambda f: f["inquiries_6m"] >= 6,
        lambda f: _ans("人工复核", "C", f"近6个月征信查询{f['inquiries_6m']}次"),
        _inq_fire,
        _inq_avoid,
    ),
    Rule(
        "dti_mid",
        lambda f: f["dti"] >= 50,
        lambda f: _ans("人工复核", "C", f"负债收入比{_dti(f)}偏高"),
        _dti_mid_fire,
        _dti_mid_avoid,
    ),
    Rule(
        "large_unsecured",
        lambda f: f["amount_wan"] >= 50 and f["guarantee"] == "信用",
        lambda f: _ans("人工复核", "C", f"信用方式申请{fmt_wan(f['amount_wan'])}"),
        _large_fire,
        _large_avoid,
    ),
    Rule(
        "prime",
        lambda f: f["dti"] < 30 and f["overdue_24m"] == 0 and f["guarantee"] == "房产抵押",
        lambda f: _ans("通过", "A", f"房产抵押，负债收入比{_dti(f)}，无逾期"),
        _prime_fire,
        _prime_avoid,
    ),
    Rule(
        "standard",
        lambda f: True,
        lambda f: _ans("通过", "B", f"负债收入比{_dti(f)}，近24个月逾期{f['overdue_24m']}次"),
    ),
]


def _facts(f: Fields) -> list[list[str]]:
    a, g, age = f["applicant"], f["gender"], f["age"]
    inc, debt, dti = fmt_yuan(f["monthly_income"]), fmt_yuan(f["monthly_debt"]), _dti(f)
    od, inq = f["overdue_24m"], f["inquiries_6m"]
    amt = fmt_wan(f["amount_wan"])
    return [
        [f"申请人{a}，{g}，{age}岁，{f['hukou']}户籍", f"借款人{a}（{g}，{age}岁，{f['hukou']}户籍）"],
        [
            f"在{f['city']}从事{f['industry']}{f['years_in_business']}年",
            f"经营{f['industry']}，地点{f['city']}，从业{f['years_in_business']}年",
        ],
        [
            f"申请金额{amt}，期限{f['term_months']}个月，用途{f['purpose']}",
            f"拟借{amt}用于{f['purpose']}，期限{f['term_months']}个月",
        ],
        [f"担保方式：{f['guarantee']}", f"担保方式为{f['guarantee']}"],
        [f"月收入{inc}，月还款{debt}，负债收入比{dti}", f"负债收入比{dti}（月还款{debt}/月收入{inc}）"],
        [f"近24个月逾期{od}次", f"征信显示近24个月逾期{od}次"],
        [f"近6个月征信查询{inq}次", f"近6个月征信查询次数{inq}次"],
        [
            "失信被执行人：是" if f["blacklist"] else "失信被执行人：否",
            "已被列为失信被执行人" if f["blacklist"] else "未被列为失信被执行人",
        ],
    ]


CREDIT = Task(
    name="credit",
    title="授信审批",
    rules=RULES,
    answer_fields=[
        AnswerField("decision", "结论", DECISIONS, aliases=("审批结论", "决定")),
        AnswerField("grade", "风险等级", GRADES, aliases=("等级", "评级")),
        AnswerField("reason", "理由", None, aliases=("原因",)),
    ],
    primary_key="decision",
    field_names=[
        "applicant",
        "gender",
        "age",
        "hukou",
        "region",
        "city",
        "industry",
        "purpose",
        "years_in_business",
        "amount_wan",
        "term_months",
        "guarantee",
        "monthly_income",
        "monthly_debt",
        "dti",
        "overdue_24m",
        "inquiries_6m",
        "blacklist",
    ],
    sampler=_sampler,
    facts=_facts,
    intros=["授信申请：", "小微经营贷审批。", "请审批以下贷款申请。", "客户经理提交授信材料："],
    questions=["请给出审批结论、风险等级和理由。", "请按规则审批。", "是否通过？请给出结论。"],
    distractors=[
        "客户经理已完成实地走访",
        "申请人为本行代发工资客户",
        "经营场所为租赁",
        "申请资料齐全",
        "家庭成员4人",
        "店铺位于商业街",
        "申请人持有本行借记卡",
        "企业有纳税记录",
    ],
    head_facts=1,
    protected=("gender", "hukou", "age_band", "region"),
    numeric_fields=(
        "age",
        "years_in_business",
        "amount_wan",
        "term_months",
        "monthly_income",
        "monthly_debt",
        "dti",
        "overdue_24m",
        "inquiries_6m",
    ),
    bool_fields=("blacklist",),
    optional_fields={
        "applicant": "客户",
        "gender": "未知",
        "hukou": "未知",
        "region": "未知",
        "city": "本地",
        "industry": "个体经营",
        "purpose": "经营周转",
        "years_in_business": 0,
        "term_months": 12,
    },
    derive=_derive,
    extra={"yuan_fields": ("monthly_income", "monthly_debt")},
)
