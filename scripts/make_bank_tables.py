"""Generate ``corpora/samples/tables/``: two bank-style labelled exports for the tasks that exist only as YAML.

Deterministic (seeded): ``python scripts/make_bank_tables.py`` rewrites the same bytes every time. The tables
stand in for what a bank exports from its own systems (labels in a column, set by people), so they carry what
real exports carry: an identifier column the spec does not read, empty optional cells, rows without a label
(not yet classified), rows with a label but no reason, and a small share of judgement rows.

Outputs (UTF-8 CSV, header = the specs' field and answer names; docs/bank_tasks.md describes both):

``post_loan_5c.csv``  贷后五级分类 (spec ``recipes/tasks/post_loan_5c.yaml``). Each row is drawn for a target
    rule branch (labels balanced, far from a real book's 93% 正常, so that a small model sees every class): the
    branch's trigger is forced, background red flags of lower rules occur at random, and the row is kept only
    when the spec's own rules (first match, worst class first) decide by that branch, so the label follows the
    documented floors. About 4% are judgement rows: a person classed the loan one class worse than the floors
    require, with their own reason (never better: a floor is a minimum).
``complaint.csv``  客诉分类 (spec ``recipes/tasks/complaint.yaml``). Call transcripts assembled from
    scenario parts (issue, escalation, repeat call, customer's name, phone, sometimes an ID number: fake but
    well-formed, for the corpus's PII step to replace); the labels follow the labelling guide in
    docs/bank_tasks.md: 类别 by the customer's main issue, 是否监管投诉 when the customer says they have
    complained or will complain to a regulator, 紧急程度 高 for a regulator / media / lawsuit threat, money
    already lost or a threatening collector, 中 for a money claim, a repeat call or a credit report blocking a
    loan, else 低.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

from banklm.tasks import task_from_spec  # banklm installed (scripts/_setup.sh)

REPO = Path(__file__).resolve().parent.parent

SEED = 20240601
OUT = REPO / "corpora" / "samples" / "tables"
N_POST_LOAN = 2000
N_COMPLAINT = 2000
UNLABELLED_SHARE = 0.02  # rows not yet classified: label and reason empty
NO_REASON_SHARE = 0.10  # labelled rows whose reason cell is empty
JUDGEMENT_SHARE = 0.04  # post-loan rows classed worse than the floors by a person

# ------------------------------------------------------------------------------------------ post-loan

POST_LOAN_COLUMNS = ["借据编号", "客户类型", "贷款品种", "贷款余额", "担保方式", "逾期天数", "是否借新还旧", "重组情况",
                     "资金用途", "经营状况", "是否涉诉", "抵押物价值变化", "主要还款来源", "五级分类", "理由"]
CLASSES = ["正常", "关注", "次级", "可疑", "损失"]
# target share of each class in the sample, and the rule branches that give it (uniform within a class)
CLASS_SHARE = {"正常": 0.24, "关注": 0.28, "次级": 0.20, "可疑": 0.14, "损失": 0.14}
BRANCHES = {
    "损失": ["逾期超360天"],
    "可疑": ["逾期超270天", "逾期超270天", "停业且无押品"],
    "次级": ["逾期超90天", "逾期超90天", "重组未履约", "经营恶化"],
    "关注": ["逾期", "逾期", "重组观察期", "挪用", "借新还旧", "经营下滑", "涉诉", "押品贬值", "第二还款来源"],
    "正常": ["正常"],
}
BUSINESS = ["个体工商户", "小微企业", "一般企业"]
JUDGEMENT_REASONS = ["实际控制人失联，审慎下调一类", "主要客户流失，现金流不足以覆盖本息", "关联企业贷款出现不良，审慎下调",
                     "贷后走访发现停工，审慎下调一类", "他行债务已逾期，审慎下调", "经营现金流连续两季为负，审慎下调",
                     "担保人代偿能力下降，审慎下调一类", "押品存在权属争议，审慎下调"]
BACKGROUND_RATE = 0.08  # each lower-priority red flag occurs at random in this share of rows


def _amount(r: random.Random, lo: float, hi: float) -> float:
    v = r.uniform(lo, hi)
    return round(v) if v > 100 or r.random() < 0.4 else round(v, 1 if r.random() < 0.6 else 2)


def _base_loan(r: random.Random, business: bool) -> dict:
    """A performing loan: consistent customer type, product, guarantee, collateral and repayment source."""
    kind = r.choice(BUSINESS) if business else r.choices(["个人", *BUSINESS], [0.35, 0.25, 0.25, 0.15])[0]
    if kind == "个人":
        product = r.choices(["个人消费贷款", "个人住房贷款"], [0.55, 0.45])[0]
    elif kind == "个体工商户":
        product = "个人经营贷款"
    else:
        product = r.choices(["流动资金贷款", "固定资产贷款"], [0.75 if kind == "小微企业" else 0.55, 0.25])[0]
    if product == "个人住房贷款":
        guarantee, amount = "抵押", _amount(r, 20, 300)
    elif product == "个人消费贷款":
        guarantee, amount = r.choices(["信用", "保证"], [0.8, 0.2])[0], _amount(r, 1, 50)
    elif product == "个人经营贷款":
        guarantee, amount = r.choices(["抵押", "保证", "信用"], [0.5, 0.3, 0.2])[0], _amount(r, 5, 300)
    elif product == "流动资金贷款":
        guarantee = r.choices(["保证", "抵押", "质押", "信用"], [0.4, 0.35, 0.1, 0.15])[0]
        amount = _amount(r, 50, 3000)
    else:
        guarantee, amount = r.choices(["抵押", "保证"], [0.8, 0.2])[0], _amount(r, 200, 8000)
    if kind == "个人":
        source = r.choices(["工资收入", "租金收入"], [0.85, 0.15])[0]
        state = "正常" if r.random() < 0.15 else None  # not asked for consumer and mortgage loans
    else:
        source = "经营收入"
        state = None if r.random() < 0.03 else "正常"
    secured = guarantee in ("抵押", "质押")
    value_change = round(r.uniform(-15, 10), 1) if secured and r.random() > 0.03 else None
    return {"客户类型": kind, "贷款品种": product, "贷款余额": amount, "担保方式": guarantee, "逾期天数": 0,
            "是否借新还旧": False, "重组情况": "观察期满已退出" if r.random() < 0.03 else "未重组",
            "资金用途": "与合同一致", "经营状况": state, "是否涉诉": False, "抵押物价值变化": value_change,
            "主要还款来源": source}


def _background(r: random.Random, f: dict) -> None:
    """Lower-priority red flags at random, as in a real book (they co-occur with the deciding one)."""
    if r.random() < BACKGROUND_RATE:
        f["逾期天数"] = r.randint(1, 60)
    if r.random() < BACKGROUND_RATE / 2:
        f["是否借新还旧"] = True
    if r.random() < BACKGROUND_RATE / 2:
        f["资金用途"] = "擅自改变用途"
    if f["经营状况"] is not None and r.random() < BACKGROUND_RATE:
        f["经营状况"] = "下滑"
    if r.random() < BACKGROUND_RATE / 2:
        f["是否涉诉"] = True
    if f["抵押物价值变化"] is not None and r.random() < BACKGROUND_RATE:
        f["抵押物价值变化"] = round(r.uniform(-45, -20), 1)
    if r.random() < BACKGROUND_RATE / 2:
        f["主要还款来源"] = r.choice(["担保人代偿", "处置抵押物"] if f["担保方式"] in ("抵押", "质押") else ["担保人代偿"])


def _days(r: random.Random, lo: int, hi: int) -> int:
    """Overdue days in [lo, hi], at the edges in a fifth of the rows (the thresholds are what must be learnt)."""
    if r.random() < 0.2:
        return r.choice([lo, lo + 1, hi - 1, hi])
    return r.randint(lo, hi)


def _force(r: random.Random, branch: str, f: dict) -> None:
    """Make ``branch``'s trigger hold."""
    if branch == "逾期超360天":
        f["逾期天数"] = _days(r, 361, 1100) if r.random() < 0.7 else _days(r, 361, 420)
    elif branch == "逾期超270天":
        f["逾期天数"] = _days(r, 271, 360)
    elif branch == "逾期超90天":
        f["逾期天数"] = _days(r, 91, 270)
    elif branch == "逾期":
        f["逾期天数"] = _days(r, 1, 90)
    elif branch == "停业且无押品":
        f.update(经营状况="停业", 担保方式="信用", 抵押物价值变化=None, 逾期天数=r.choice([0, 0, r.randint(1, 200)]))
    elif branch == "经营恶化":
        f["经营状况"] = "停业" if f["担保方式"] != "信用" and r.random() < 0.3 else "恶化"
    elif branch == "重组未履约":
        f["重组情况"] = r.choice(["观察期内未按约还款", "观察期内再次重组"])
        f["逾期天数"] = r.choice([0, r.randint(1, 90)])
    elif branch == "重组观察期":
        f["重组情况"] = "观察期内按约还款"
    elif branch == "挪用":
        f["资金用途"] = "擅自改变用途"
    elif branch == "借新还旧":
        f["是否借新还旧"] = True
    elif branch == "经营下滑":
        f["经营状况"] = "下滑"
    elif branch == "涉诉":
        f["是否涉诉"] = True
    elif branch == "押品贬值":
        f["抵押物价值变化"] = -20.0 if r.random() < 0.15 else round(r.uniform(-50, -20), 1)
    elif branch == "第二还款来源":
        f["主要还款来源"] = r.choice(["担保人代偿", "处置抵押物"] if f["担保方式"] in ("抵押", "质押") else ["担保人代偿"])


NEEDS_BUSINESS = {"停业且无押品", "经营恶化", "经营下滑"}
NEEDS_COLLATERAL = {"押品贬值"}


def _loan_for(r: random.Random, task, branch: str) -> tuple[dict, dict]:
    """(fields, the rules' answer) of a loan the rules class by ``branch``."""
    for _ in range(1000):
        f = _base_loan(r, business=branch in NEEDS_BUSINESS)
        if branch in NEEDS_COLLATERAL and f["抵押物价值变化"] is None:
            continue
        _background(r, f)
        _force(r, branch, f)
        ans = task.label(f)
        if ans["rule"] == branch:
            return f, ans
    raise RuntimeError(f"cannot draw a loan for branch {branch!r}")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "是" if v else "否"
    return str(v)


def post_loan_rows(seed: int = SEED, n: int = N_POST_LOAN) -> list[dict]:
    task = task_from_spec(REPO / "recipes" / "tasks" / "post_loan_5c.yaml")
    r = random.Random(seed)
    rows = []
    for i in range(n):
        cls = r.choices(list(CLASS_SHARE), list(CLASS_SHARE.values()))[0]
        f, ans = _loan_for(r, task, r.choice(BRANCHES[cls]))
        label, reason = ans["五级分类"], ans["理由"]
        u = r.random()
        if u < UNLABELLED_SHARE:
            label = reason = None
        elif u < UNLABELLED_SHARE + JUDGEMENT_SHARE and label != "损失":
            label, reason = CLASSES[CLASSES.index(label) + 1], r.choice(JUDGEMENT_REASONS)
        elif r.random() < NO_REASON_SHARE:
            reason = None
        row = {"借据编号": f"JJ{2019 + i % 6}{r.randint(0, 99_999_999):08d}", **{k: _cell(v) for k, v in f.items()},
               "五级分类": _cell(label), "理由": _cell(reason)}
        if f["抵押物价值变化"] is not None and r.random() < 0.2:
            row["抵押物价值变化"] += "%"  # exports mix "-23.5" and "-23.5%"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ complaints

COMPLAINT_COLUMNS = ["工单编号", "受理渠道", "产品类型", "客服通话记录", "类别", "是否监管投诉", "紧急程度", "理由"]
SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁")
GIVEN = ["伟", "芳", "娜", "秀英", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明", "超",
         "秀兰", "霞", "平", "刚", "桂英", "建华", "志强", "婷", "玉兰", "海燕", "晓东", "子涵", "浩然", "欣怡",
         "俊杰", "思远", "嘉怡", "文博", "立新", "春梅", "振国", "美玲", "鹏飞", "晓峰"]
REGIONS = ["110105", "310104", "440305", "330106", "320102", "510107", "420106", "370202", "350203", "430104"]

# Each scenario: (category, products, summary for the reason, customer's words, flags, amounts). Flags: "loss"
# money already lost (高), "threat" a threatening collector (高), "claim" asks for money back (中), "loan" a credit
# record blocking a loan (中). Words may use {amt} (drawn from the scenario's amounts) and {n} (2-5).
SMALL, MID, LARGE = [60, 80, 120, 200, 300, 360, 580, 600], [800, 1200, 2400, 3000, 5800], [8000, 12000, 26000, 50000]
SCENARIOS = [
    ("收费争议", ["信用卡"], "信用卡年费扣收争议，要求退费",
     ["我信用卡被扣了{amt}元年费，办卡的时候业务员说免年费的，你们要给我退回来",
      "没开卡也收年费？账单上多了一笔{amt}元的年费，我要求退掉",
      "年费的事情上次就说好减免，这个月又扣了{amt}元"], {"claim"}, SMALL),
    ("收费争议", ["信用卡"], "分期手续费与宣传不符",
     ["做分期的时候说零利息，结果每期收手续费，算下来一共{amt}元，这不是骗人吗",
      "你们宣传账单分期费率很低，实际手续费比说的高很多，多收的{amt}元要退给我",
      "说好分{n}期免手续费，结果每期都收了，一共{amt}元"], {"claim"}, SMALL + MID),
    ("收费争议", ["借记卡"], "借记卡账户管理费等收费争议",
     ["我的卡每个季度被扣账户管理费，从来没人告诉我，这几年扣了{amt}元", "短信通知费我没开通过，怎么每个月扣钱",
      "卡里就几百块钱，每年被扣小额账户管理费，开户时没人说过"], {"claim"}, SMALL),
    ("收费争议", ["个人贷款"], "贷款违约金或利息计收争议",
     ["我想提前还房贷，你们要收{amt}元违约金，合同里根本没写清楚", "利息算得不对，我每期都按时还，怎么多扣了{amt}元",
      "还款日当天就还了，还被收了{amt}元罚息"], {"claim"}, SMALL + MID),
    ("服务态度", ["其他", "借记卡"], "网点工作人员服务态度差",
     ["在网点排了两个小时队，柜员还一直不耐烦，说话很冲", "大堂经理对我爱答不理，问个问题就让我自己去手机上弄",
      "我腿脚不好，柜员非要我本人去排队，一点都不通融"], set(), SMALL),
    ("服务态度", ["信用卡", "其他"], "客服推诿、挂断电话",
     ["我打了{n}次客服，每次都说会回电，结果没有一个人回我", "刚才那个客服说到一半直接把电话挂了，什么态度",
      "转了{n}个部门，每个人都说不归他管"], set(), SMALL),
    ("销售误导", ["理财产品"], "理财销售时称保本，实际亏损",
     ["当时理财经理说这个产品保本保收益，现在亏了{amt}元，根本没说有风险",
      "买理财前没给我做风险测评，直接让我签字，现在亏了{amt}元",
      "客户经理说年化收益有百分之六，到期一算亏了{amt}元"], {"claim", "loss"}, MID + LARGE),
    ("销售误导", ["代销保险"], "存款被推销成保险",
     ["我去存定期，柜员给我办成了保险，说跟存款一样，现在取出来要扣{amt}元",
      "我家老人七十多岁，去存钱被推销了一份分红险，他根本不知道买的是保险",
      "说是高息存款，签完才知道是{n}年期的保险，退保要损失本金"], {"claim"}, MID + LARGE),
    ("催收问题", ["个人贷款", "信用卡"], "催收频繁致电骚扰亲友",
     ["你们催收一天给我打十几个电话，还打到我单位同事那里，我已经在协商还款了",
      "催收员把我欠款的事告诉了我父母和朋友，这是侵犯隐私", "晚上十一点还有催收电话打过来，一晚上打了{n}次"], set(), SMALL),
    ("催收问题", ["个人贷款", "信用卡"], "催收人员威胁恐吓",
     ["催收的人说再不还钱就上门，还说要让我坐牢，我很害怕", "有人自称是法院的，说我不还款就要抓人，是不是你们委托的",
      "催收发短信说要把我的照片发到网上，还要找到我孩子学校"], {"threat"}, SMALL),
    ("征信异议", ["个人贷款", "信用卡"], "征信记录有误，影响贷款审批",
     ["我的征信上有一条逾期记录，那笔钱我明明按时还了，现在房贷批不下来",
      "征信显示我信用卡逾期{n}次，是你们系统扣款失败造成的，经营贷被拒了",
      "贷款早就结清了，征信上还显示未结清，车贷审批被拒了"], {"loan"}, SMALL),
    ("征信异议", ["个人贷款"], "未经授权查询征信或记录不实",
     ["我没有在你们行申请过贷款，征信报告上却有你们的贷款审批查询记录", "征信上多了一笔我不知道的担保记录，要求核查",
      "征信报告上有{n}条你们行的查询记录，我从来没授权过"], set(), SMALL),
    ("个人信息保护", ["其他", "手机银行"], "客户信息疑似泄露",
     ["我刚在你们行办了贷款，第二天就接到一堆贷款中介电话，他们知道我的额度",
      "有人打电话能说出我的卡号后四位和余额，我的信息是不是被你们泄露了", "你们的客户经理把我的流水截图发给了别人"],
     set(), SMALL),
    ("个人信息保护", ["手机银行", "借记卡"], "未经同意开通业务或使用个人信息",
     ["我没同意，手机银行就默认勾选了把我的信息共享给第三方", "我从来没申请过，怎么用我的身份开了一个电子账户",
      "注销手机银行以后还一直收到营销短信，要求删除我的信息"], set(), SMALL),
    ("账户与交易", ["借记卡", "手机银行"], "银行卡被盗刷",
     ["我的卡一直在身上，昨晚被异地刷了{amt}元，赶紧帮我冻结", "凌晨收到短信，卡里{amt}元被转走了，不是我操作的",
      "卡在我手上，却在外地ATM被取了{amt}元"], {"loss"}, MID + LARGE),
    ("账户与交易", ["手机银行", "借记卡"], "资金未到账或账户受限",
     ["我转了{amt}元给供应商，显示成功但对方三天没收到", "我的卡突然被限制非柜面交易，工资都取不出来",
      "自动取款机吞了我的卡，钱也没吐出来，{amt}元到现在没退回"], set(), MID + LARGE),
    ("账户与交易", ["借记卡"], "遭遇电信诈骗，要求止付",
     ["我刚被骗了，按对方说的转了{amt}元到一个安全账户，能不能马上拦截",
      "有人冒充客服让我转账解冻，我已经转了{amt}元，求帮忙止付", "网上刷单被骗了{amt}元，钱是从你们行卡里转出去的，能追回吗"],
     {"loss"}, MID + LARGE),
    ("其他", ["其他"], "网点设施与预约问题",
     ["你们网点门口不让停车，老年人办业务很不方便", "网点装修了也没提前通知，白跑一趟", "纪念币预约成功了，到网点却说没有了"],
     set(), SMALL),
    ("其他", ["其他", "信用卡"], "积分和活动规则不清",
     ["积分兑换的礼品一直没发货，已经等了{n}个星期", "活动说满{amt}元送礼品，结果说我不符合条件，规则写得不清楚",
      "信用卡积分到期清零了也没提前提醒"], set(), SMALL),
]
REGULATOR = [("我要打12378投诉你们", "将"), ("我已经向金融监管总局投诉了", "已"), ("再不处理我就去人民银行投诉", "将"),
             ("我已经在12378登记了投诉", "已"), ("不给说法我就向监管部门反映", "将"), ("我已经打了12363反映这个事", "已"),
             ("我会去当地金融监管局投诉", "将")]
MEDIA = ["再不解决我就找媒体曝光", "我会去法院起诉你们", "我已经咨询了律师，准备起诉"]
REPEAT = ["这已经是我第{n}次打电话了", "上周就反映过，到现在没人处理", "我前天来过一次电话，一直没结果"]
AGENT_CLOSE = ["非常抱歉给您带来不便，我已为您登记，会在2个工作日内回复您", "您反映的情况已记录，会转相关部门核实处理",
               "理解您的心情，我们会尽快核实并给您答复", "已为您提交工单，处理结果会通过短信告知"]
AGENT_DISCLOSE = "如对处理结果不满意，您也可以向金融监管部门反映"  # the agent names the channel: not a complaint


def _name(r: random.Random) -> str:
    return r.choice(SURNAMES) + r.choice(GIVEN)


def _mobile(r: random.Random) -> str:
    m = "1" + r.choice("3578") + "".join(r.choice("0123456789") for _ in range(9))
    return r.choice([m, m, f"{m[:3]} {m[3:7]} {m[7:]}", f"{m[:3]}-{m[3:7]}-{m[7:]}"])


def _id18(r: random.Random) -> str:
    body = r.choice(REGIONS) + f"{r.randint(1950, 2000)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}"
    body += "".join(r.choice("0123456789") for _ in range(3))
    total = sum(int(d) * (2 ** (17 - i) % 11) for i, d in enumerate(body))
    v = (12 - total % 11) % 11
    return body + ("X" if v == 10 else str(v))


FEELING = ["", "", "", "真的太过分了", "你们到底管不管", "麻烦尽快处理", "我现在很着急", "希望给个说法"]


def _words(r: random.Random, text: str, amounts: list[int] = SMALL) -> str:
    return text.format(amt=r.choice(amounts), n=r.randint(2, 5))


def _transcript(r: random.Random, channel: str, words: list[str], ident: list[str], escalate: str | None,
                repeat: str | None, disclose: bool) -> str:
    """One call (or chat, or branch note, or app message) in the channel's usual form."""
    said = "，".join(w for w in [*words, r.choice(FEELING), repeat, escalate] if w)
    if channel == "营业网点":
        who = f"客户{ident[0]}" if ident else "客户"
        extra = f"，联系电话{ident[1]}" if len(ident) > 1 else ""
        return f"{who}到网点反映{extra}：{said}。网点已安抚客户并登记，转消保岗跟进"
    if channel == "手机银行留言":
        return f"{said}！" + (f"请联系我{ident[1]}" if len(ident) > 1 else "")
    open_ = r.choice(["客服：您好，很高兴为您服务，请问有什么可以帮您？", "客服：您好，这里是本行客服中心，工号" +
                      str(r.randint(1000, 9999)) + "，请问怎么称呼？", ""])
    intro = ""
    if ident:
        intro = f"我叫{ident[0]}" + (f"，手机号{ident[1]}" if len(ident) > 1 else "") + \
                (f"，身份证号{ident[2]}" if len(ident) > 2 else "") + "，"
    close = r.choice(AGENT_CLOSE) + (f"。{AGENT_DISCLOSE}" if disclose else "")
    first = "客户" if channel == "客服热线" else "用户"
    return f"{open_}{first}：{intro}{said}。客服：{close}"


def _complaint(r: random.Random, scenario: tuple, second: tuple | None) -> tuple[dict, dict]:
    cat, products, summary, variants, flags, amounts = scenario
    channel = r.choices(["客服热线", "在线客服", "营业网点", "手机银行留言"], [0.6, 0.2, 0.12, 0.08])[0]
    words = [_words(r, r.choice(variants), amounts)]
    if second is not None:  # a second, lesser issue mentioned on the way: the label is the main issue
        words.append("还有，" + _words(r, r.choice(second[3]), second[5]))
    reg = r.choice(REGULATOR) if r.random() < 0.2 else None
    media = r.choice(MEDIA) if reg is None and r.random() < 0.06 else None
    repeat = _words(r, r.choice(REPEAT)) if r.random() < 0.2 else None
    disclose = reg is None and channel == "客服热线" and r.random() < 0.06
    ident = []
    if r.random() < 0.65:
        ident.append(_name(r))
        if r.random() < 0.6:
            ident.append(_mobile(r))
            if r.random() < 0.12:
                ident.append(_id18(r))
    text = _transcript(r, channel, words, ident, (reg or (media, None))[0], repeat, disclose)
    if reg or media or flags & {"loss", "threat"}:
        urgency = "高"
    elif repeat or flags & {"claim", "loan"}:
        urgency = "中"
    else:
        urgency = "低"
    reason = summary
    if reg:
        reason += "，" + ("已向监管投诉" if reg[1] == "已" else "称将向监管投诉")
    elif media:
        reason += "，扬言曝光或起诉"
    elif repeat:
        reason += "，多次来电未解决"
    product = r.choice(products) if r.random() > 0.1 else None
    fields = {"受理渠道": channel, "产品类型": product, "客服通话记录": text}
    return fields, {"类别": cat, "是否监管投诉": "是" if reg else "否", "紧急程度": urgency, "理由": reason}


def complaint_rows(seed: int = SEED, n: int = N_COMPLAINT) -> list[dict]:
    r = random.Random(seed + 1)
    by_cat: dict[str, list[tuple]] = {}
    for s in SCENARIOS:
        by_cat.setdefault(s[0], []).append(s)
    cats = list(by_cat)
    rows = []
    for i in range(n):
        main = r.choice(by_cat[cats[i % len(cats)]])  # categories round-robin, scenarios drawn within
        second = None
        if r.random() < 0.06:
            second = r.choice([s for s in SCENARIOS if s[0] != main[0] and not s[4]])  # flags: the main issue's
        fields, ans = _complaint(r, main, second)
        if r.random() < UNLABELLED_SHARE:
            ans = dict.fromkeys(ans)
        elif r.random() < NO_REASON_SHARE:
            ans["理由"] = None
        rows.append({"工单编号": f"KS{2024 + i % 2}{i:06d}", **{k: _cell(v) for k, v in fields.items()},
                     **{k: _cell(v) for k, v in ans.items()}})
    r.shuffle(rows)
    return rows


# ------------------------------------------------------------------------------------------ output


def csv_text(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, columns, rows in [("post_loan_5c.csv", POST_LOAN_COLUMNS, post_loan_rows()),
                                ("complaint.csv", COMPLAINT_COLUMNS, complaint_rows())]:
        (OUT / name).write_text(csv_text(columns, rows), encoding="utf-8")
        print(f"{OUT / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
