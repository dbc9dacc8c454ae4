"""审计底稿 (audit): an expense claim sampled by internal audit -> finding category, severity, basis.

Answer layout: ``结论：超标准报销；严重程度：中；依据：报销金额8460元超过标准6000元，超标41.0%``
(category 发票不合规, 超标准报销, 拆分审批, 关联交易未披露, 无异常; severity 高/中/低; by
convention 无异常 has severity 低).

Labelling rules (ordered; the first matching rule decides):

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

from banklm.tasks.base import AnswerField, Fields, Rule, Task, fmt_pct, fmt_yuan, gap, r1, red_flag

CATEGORIES = ["发票不合规", "超标准报销", "拆分审批", "关联交易未披露", "无异常"]
SEVERITIES = ["高", "中", "低"]
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


def _ans(cat: str, sev: str, basis: str) -> dict:
    return {"category": cat, "severity": sev, "basis": basis}


RULES = [
    Rule(
        "invoice_fake",
        lambda f: not f["invoice_ok"],
        lambda f: _ans("发票不合规", "高", f"发票查验未通过，涉及金额{fmt_yuan(f['amount'])}"),
        _fake_fire,
        _fake_avoid,
    ),
    Rule(
        "invoice_title",
        lambda f: not f["title_ok"],
        lambda f: _ans("发票不合规", "中", "发票抬头与本行名称不一致"),
        _title_fire,
        _title_avoid,
    ),
    Rule(
        "related_undisclosed",
        lambda f: f["relation"] != "无" and not f["disclosed"],
        lambda f: _ans("关联交易未披露", "高", f"供应商为{f['relation']}且未披露"),
        _rel_fire,
        _rel_avoid,
    ),
    Rule(
        "split_approval",
        lambda f: f["same_count"] >= 2 and f["same_total"] > f["approval_limit"],
        lambda f: _ans(
            "拆分审批",
            "中",
            f"7日内同类报销{f['same_count']}笔合计{fmt_yuan(f['same_total'])}，"
            f"超过审批权限{fmt_yuan(f['approval_limit'])}",
        ),
        _split_fire,
        _split_avoid,
    ),
    Rule(
        "over_major",
        lambda f: f["over_pct"] > 30,
        lambda f: _ans(
            "超标准报销",
            "中",
            f"报销金额{fmt_yuan(f['amount'])}超过标准{fmt_yuan(f['standard'])}，超标{fmt_pct(f['over_pct'])}",
        ),
        _major_fire,
        _major_avoid,
    ),
    Rule(
        "over_minor",
        lambda f: f["over_pct"] > 0,
        lambda f: _ans(
            "超标准报销",
            "低",
            f"报销金额{fmt_yuan(f['amount'])}超过标准{fmt_yuan(f['standard'])}，超标{fmt_pct(f['over_pct'])}",
        ),
        _minor_fire,
        _minor_avoid,
    ),
    Rule("clean", lambda f: True, lambda f: _ans("无异常", "低", "发票、审批与标准均符合规定")),
]


def _facts(f: Fields) -> list[list[str]]:
    amt, std, pct = fmt_yuan(f["amount"]), fmt_yuan(f["standard"]), fmt_pct(f["over_pct"])
    rel = f["relation"]
    if rel == "无":
        rel_s = ["供应商与经办人无关联关系", "未发现供应商与经办人存在关联"]
    else:
        dis = "已披露" if f["disclosed"] else "未披露"
        rel_s = [f"供应商为{rel}，{dis}", f"供应商系{rel}（{dis}）"]
    n, tot, lim = f["same_count"], fmt_yuan(f["same_total"]), fmt_yuan(f["approval_limit"])
    return [
        [
            f"{f['department']}{f['claimant']}报销{f['expense']}",
            f"抽查{f['department']}{f['claimant']}的{f['expense']}报销",
        ],
        [f"报销金额{amt}，标准{std}，超标比例{pct}", f"标准{std}，实报{amt}，超标比例{pct}"],
        [
            "发票查验通过" if f["invoice_ok"] else "发票查验未通过",
            "发票真伪查验：通过" if f["invoice_ok"] else "发票真伪查验：未通过",
        ],
        ["发票抬头与本行名称一致" if f["title_ok"] else "发票抬头与本行名称不一致"],
        rel_s,
        [f"7日内同类报销{n}笔，合计{tot}", f"同类报销7日内共{n}笔，合计{tot}"],
        [f"审批权限{lim}", f"审批人单笔审批权限{lim}"],
    ]


AUDIT = Task(
    name="audit",
    title="审计底稿",
    rules=RULES,
    answer_fields=[
        AnswerField("category", "结论", CATEGORIES, aliases=("审计结论", "问题类型")),
        AnswerField("severity", "严重程度", SEVERITIES, aliases=("严重性", "风险程度")),
        AnswerField("basis", "依据", None, aliases=("理由",)),
    ],
    primary_key="category",
    field_names=[
        "department",
        "claimant",
        "expense",
        "standard",
        "amount",
        "over_pct",
        "invoice_ok",
        "title_ok",
        "relation",
        "disclosed",
        "same_count",
        "same_total",
        "approval_limit",
    ],
    sampler=_sampler,
    facts=_facts,
    intros=["审计抽查：", "费用报销审计底稿。", "内审检查以下报销事项："],
    questions=["请给出审计结论、严重程度和依据。", "请判断是否存在问题。", "请填写审计结论。"],
    distractors=[
        "报销单据已装订归档",
        "经办人已完成年度培训",
        "该部门上年审计无重大问题",
        "付款通过网银完成",
        "报销流程在OA系统中留痕",
    ],
    head_facts=1,
    numeric_fields=("standard", "amount", "over_pct", "same_count", "same_total", "approval_limit"),
    bool_fields=("invoice_ok", "title_ok", "disclosed"),
    optional_fields={
        "department": "某部门",
        "claimant": "经办人",
        "expense": "费用",
        "relation": "无",
        "disclosed": False,
    },
    extra={"yuan_fields": ("standard", "amount", "same_total", "approval_limit")},
)
