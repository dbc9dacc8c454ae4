"""授信审批 (credit): a small-business loan application -> decision, risk grade and reason.

Answer layout: ``结论：拒绝；风险等级：D；理由：负债收入比72.4%过高``
(decision 通过/拒绝/人工复核, grade A-E, reason one clause whose numbers are copied from the prompt).

The task (fields, wording, answer layout, rules) is the spec ``banklm/tasks/specs/credit.yaml``; this module
is its synthetic sampler: realistic inputs, and per rule ``fire`` / ``avoid`` mutators for data balanced by
branch. Labelling rules (ordered; the first matching rule decides):

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

from banklm.tasks.base import Fields, Sampler, Task, gap, int_gap, r1, red_flag
from banklm.tasks.spec import builtin_spec

SPEC = builtin_spec("credit")

# The sampler's own lists: their order is part of the random stream (tests/test_task_golden.py).
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
AGE_BANDS = list(SPEC.fields["age"].bands)  # the spec derives age_band from age with these bands


def age_band(age: int) -> str:
    return next(b.of(age) for b in SPEC.bands if b.field == "age")


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


CREDIT = Task(
    SPEC,
    Sampler(
        _sampler,
        fire={"blacklist": _bl_fire, "dti_high": _dti_high_fire, "overdue_many": _overdue_fire,
              "inquiries_many": _inq_fire, "dti_mid": _dti_mid_fire, "large_unsecured": _large_fire,
              "prime": _prime_fire},
        avoid={"blacklist": _bl_avoid, "dti_high": _dti_high_avoid, "overdue_many": _overdue_avoid,
               "inquiries_many": _inq_avoid, "dti_mid": _dti_mid_avoid, "large_unsecured": _large_avoid,
               "prime": _prime_avoid},
    ),
)
