"""审计底稿 (audit): an expense claim sampled by internal audit -> finding category, severity, basis.

Answer layout: ``结论：超标准报销；严重程度：中；依据：报销金额8460元超过标准6000元，超标41.0%``
(category 发票不合规, 超标准报销, 拆分审批, 关联交易未披露, 无异常; severity 高/中/低; by
convention 无异常 has severity 低).

The task (fields, wording, answer layout, rules) is the spec ``banklm/tasks/specs/audit.yaml``; this module
is its synthetic sampler: realistic inputs, and per rule ``fire`` / ``avoid`` mutators for data balanced by
branch. Labelling rules (ordered; the first matching rule decides):

1. ``invoice_fake``: 发票查验未通过 -> 发票不合规, 高.
2. ``invoice_title``: 发票抬头与本行名称不一致 -> 发票不合规, 中.
3. ``related_undisclosed``: the supplier is related to the claimant (关联关系 not 无) and it was not
   disclosed -> 关联交易未披露, 高.
4. ``split_approval``: 7日内同类报销 >= 2 笔 and their 合计 > 审批权限 (each claim stays within it)
   -> 拆分审批, 中.
5. ``over_major``: 超标比例 > 30% -> 超标准报销, 中.
6. ``over_minor``: 超标比例 > 0% -> 超标准报销, 低.
7. ``clean``: otherwise -> 无异常, 低.

The 超标比例 ((报销金额 - 标准) / 标准, 0.0% when within the standard) is stated in the prompt.
"""

from __future__ import annotations

import random

from banklm.tasks.base import Fields, Sampler, Task, gap, r1, red_flag
from banklm.tasks.spec import builtin_spec

SPEC = builtin_spec("audit")

CATEGORIES = list(SPEC.model.answer.keys["category"].values)
SEVERITIES = list(SPEC.model.answer.keys["severity"].values)
# The sampler's own lists: their order is part of the random stream (tests/test_task_golden.py).
DEPARTMENTS = [
    "公司业务部",
    "零售业务部",
    "办公室",
    "信息科技部",
    "风险管理部",
    "普惠金融部",
    "城东支行",
    "城西支行",
]
EXPENSES = ["差旅费", "业务招待费", "会议费", "培训费", "办公用品费", "车辆维修费", "宣传印刷费"]
RELATIONS = ["经办人配偶控股的企业", "经办人兄弟任法人的企业", "经办人亲属持股的企业"]
LIMITS = [20000, 30000, 50000]
SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高郑梁谢宋唐许韩冯邓曹彭曾肖田董潘袁蔡蒋")


def _set_over(f: Fields, pct: float) -> None:
    std = f["standard"]
    amount = (
        int(round(std * (1 + max(pct, 0.0) / 100))) if pct > 0 else int(round(std * (1 - pct_under(pct))))
    )
    f["amount"] = amount
    f["over_pct"] = r1(max(0.0, (amount - std) / std * 100))
    _sync_total(f)


def pct_under(pct: float) -> float:
    """For pct <= 0: the claim is this fraction under the standard."""
    return min(0.6, -pct / 100)


def _sync_total(f: Fields) -> None:
    if f["same_count"] <= 1:
        f["same_count"] = 1
        f["same_total"] = f["amount"]
    elif f["same_total"] < f["amount"] + 500:
        f["same_total"] = f["amount"] + 500


def _sampler(rng: random.Random, difficulty: float) -> Fields:
    f: Fields = {
        "department": rng.choice(DEPARTMENTS),
        "claimant": rng.choice(SURNAMES) + "某",
        "expense": rng.choice(EXPENSES),
        "standard": rng.randrange(500, 8000, 100),
        "amount": 0,
        "over_pct": 0.0,
        "invoice_ok": not red_flag(rng),
        "title_ok": not red_flag(rng),
        "relation": rng.choice(RELATIONS) if red_flag(rng, 0.2) else "无",
        "disclosed": rng.random() < 0.5,
        "same_count": rng.choice([2, 3]) if red_flag(rng, 0.25) else 1,
        "same_total": 0,
        "approval_limit": rng.choice(LIMITS),
    }
    f["same_total"] = rng.randrange(5000, 70000, 100)
    _set_over(f, rng.uniform(30.1, 80) if red_flag(rng) else rng.uniform(0.1, 30) if red_flag(rng, 0.15) else
              rng.uniform(-40, 0))
    return f


def _fake_fire(f, rng, d):
    f["invoice_ok"] = False


def _fake_avoid(f, rng, d):
    f["invoice_ok"] = True


def _title_fire(f, rng, d):
    f["title_ok"] = False


def _title_avoid(f, rng, d):
    f["title_ok"] = True


def _rel_fire(f, rng, d):
    f["relation"] = rng.choice(RELATIONS)
    f["disclosed"] = False


def _rel_avoid(f, rng, d):
    if f["relation"] != "无" and not f["disclosed"] or rng.random() < d:
        if rng.random() < 0.5:
            f["relation"] = "无"
        else:
            f["relation"] = rng.choice(RELATIONS)
            f["disclosed"] = True


def _split_fire(f, rng, d):
    f["same_count"] = rng.choice([2, 3, 4])
    f["same_total"] = max(
        f["approval_limit"] + 100 + int(round(gap(rng, 0, 30000, d), -2)), f["amount"] + 500
    )


def _split_avoid(f, rng, d):
    if (f["same_count"] >= 2 and f["same_total"] > f["approval_limit"]) or rng.random() < d:
        if rng.random() < 0.4 and d < 0.5:
            f["same_count"] = 1
        else:
            f["same_count"] = rng.choice([2, 3])
            f["same_total"] = f["approval_limit"] - int(round(gap(rng, 0, 15000, d), -2))
    _sync_total(f)


def _major_fire(f, rng, d):
    _set_over(f, 30.1 + gap(rng, 0.0, 50.0, d))


def _major_avoid(f, rng, d):
    if f["over_pct"] > 30 or rng.random() < d:
        _set_over(f, 30.0 - gap(rng, 0.0, 29.0, d))


def _minor_fire(f, rng, d):
    if rng.random() < 0.5:
        _set_over(f, 30.0 - gap(rng, 0.0, 25.0, d))
    else:
        _set_over(f, 0.3 + gap(rng, 0.0, 25.0, d))


def _minor_avoid(f, rng, d):
    _set_over(f, -gap(rng, 0.0, 40.0, d))


AUDIT = Task(
    SPEC,
    Sampler(
        _sampler,
        fire={"invoice_fake": _fake_fire, "invoice_title": _title_fire, "related_undisclosed": _rel_fire,
              "split_approval": _split_fire, "over_major": _major_fire, "over_minor": _minor_fire},
        avoid={"invoice_fake": _fake_avoid, "invoice_title": _title_avoid, "related_undisclosed": _rel_avoid,
               "split_approval": _split_avoid, "over_major": _major_avoid, "over_minor": _minor_avoid},
    ),
)
