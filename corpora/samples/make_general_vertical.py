"""Write the small self-written sample corpora ``general/`` and ``vertical/`` (deterministic).

    python corpora/samples/make_general_vertical.py [--out corpora/samples]

general/   Chinese instruction records from templates, in three input formats:
           alpaca.json (LLaMA-Factory alpaca, some with system/history), sharegpt.json (multi-turn,
           human/gpt) and messages.jsonl. Answers are computed, so they are right.
vertical/  finance documents from templates: regulations (txt, one article per blank-line block; one file
           in GB18030), product manuals (md; one with a UTF-8 BOM), quarterly report snippets (html, with
           scripts, styles and a shared footer), risk tips (jsonl). Planted on purpose, for the ops to find:
           exact duplicates, near duplicates, junk (ads, symbol runs, repeated phrases, too short).

Every text here is written for banklm from templates; the bank and the people are fictional.
"""

from __future__ import annotations

import argparse
import calendar
import random
from pathlib import Path

from banklm.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text

HERE = Path(__file__).resolve().parent
BANK = "示例农村商业银行"

# ------------------------------------------------------------------------------------------- general

SYNONYMS = [("高兴", "愉快、开心"), ("认真", "仔细、专心"), ("迅速", "快速、敏捷"), ("美丽", "漂亮、秀丽"),
            ("安全", "平安、稳妥"), ("困难", "艰难、不易"), ("重要", "关键、要紧"), ("简单", "容易、简便")]
POSITIVE = ["这家餐馆的菜很好吃，服务也很周到", "今天的会议开得很顺利", "新买的书包结实又好看",
            "老师讲得清楚，我一下就听懂了", "周末和家人去公园，心情很好"]
NEGATIVE = ["排队等了一个小时还没轮到", "快递送来时盒子已经压坏了", "这部手机用了两天就死机",
            "楼上装修的噪音吵得人睡不着", "说好的活动临时取消了"]
INFORMAL = [("这事儿咱们明天再说吧", "此事我们明日再议。"), ("你帮我看下这个表行不", "请您帮忙审阅这份表格。"),
            ("东西我放桌上了啊", "物品已放置于桌面。"), ("这个方案不太行", "该方案尚有不足之处。")]
SYSTEMS = ["你是一个耐心、准确的中文助手。", "你是一名小学数学老师，回答要简洁。", ""]


def _general_qa(rng: random.Random, i: int) -> tuple[str, str, str]:
    """(instruction, input, output) for template i % 9."""
    k = i % 9
    if k == 0:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        return f"计算 {a} 加 {b} 等于多少？", "", f"{a} 加 {b} 等于 {a + b}。"
    if k == 1:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return f"计算 {a} 乘以 {b}。", "", f"{a} 乘以 {b} 等于 {a * b}。"
    if k == 2:
        x, p = rng.randint(1, 50) * 20, rng.choice([5, 10, 15, 20, 25, 50])
        return f"{x} 的百分之{p}是多少？", "", f"{x} × {p}% = {x * p // 100}。"
    if k == 3:
        km = rng.randint(1, 90)
        return f"{km} 公里等于多少米？", "", f"1 公里等于 1000 米，所以 {km} 公里等于 {km * 1000} 米。"
    if k == 4:
        y, m = rng.randint(1990, 2030), rng.randint(1, 12)
        return f"{y}年{m}月有多少天？", "", f"{y}年{m}月有 {calendar.monthrange(y, m)[1]} 天。"
    if k == 5:
        w, s = SYNONYMS[rng.randrange(len(SYNONYMS))]
        return f"请写出“{w}”的两个近义词。", "", f"“{w}”的近义词有：{s}。"
    if k == 6:
        pos = rng.random() < 0.5
        s = rng.choice(POSITIVE if pos else NEGATIVE)
        return "判断下面这句话的情感是正面还是负面。", s, f"这句话的情感是{'正面' if pos else '负面'}的。"
    if k == 7:
        a, b = INFORMAL[rng.randrange(len(INFORMAL))]
        return "把下面的句子改写得更正式。", a, b
    nums = rng.sample(range(1, 200), 5)
    return "将下列数字从小到大排序。", "、".join(map(str, nums)), "、".join(map(str, sorted(nums)))


def general_records(seed: int = 7):
    rng = random.Random(seed)
    alpaca, sharegpt, messages = [], [], []
    for i in range(120):
        ins, inp, out = _general_qa(rng, i)
        rec = {"instruction": ins, "input": inp, "output": out}
        if i % 4 == 0 and SYSTEMS[i % 3]:
            rec["system"] = SYSTEMS[i % 3]
        if i % 10 == 5:
            h_ins, h_inp, h_out = _general_qa(rng, i + 1)
            rec["history"] = [["\n".join(p for p in (h_ins, h_inp) if p), h_out]]
        alpaca.append(rec)
    for i in range(100):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
        conv = [{"from": "human", "value": f"{a} 加 {b} 是多少？"}, {"from": "gpt", "value": f"等于 {a + b}。"},
                {"from": "human", "value": f"再乘以 {c} 呢？"}, {"from": "gpt", "value": f"{a + b} 乘以 {c} 等于 {(a + b) * c}。"}]
        if i % 2:
            ins, inp, out = _general_qa(rng, i)
            conv = [{"from": "human", "value": "\n".join(p for p in (ins, inp) if p)}, {"from": "gpt", "value": out}]
        sharegpt.append({"conversations": conv, **({"system": SYSTEMS[0]} if i % 5 == 0 else {})})
    for i in range(100):
        ins, inp, out = _general_qa(rng, i + 3)
        messages.append({"id": f"general-msg-{i:04d}", "messages": [
            {"role": "user", "content": "\n".join(p for p in (ins, inp) if p)}, {"role": "assistant", "content": out}]})
    return alpaca, sharegpt, messages


# ------------------------------------------------------------------------------------------ vertical

SUBJECTS = ["客户经理", "授信审批部门", "风险管理部门", "营业网点", "合规部门", "运营管理部门", "内部审计部门"]
DUTIES = ["核实借款人身份信息和收入证明的真实性", "对大额现金交易进行登记并按规定报告",
          "在贷款发放前完成抵押物价值评估", "按季度对存量贷款进行风险分类", "对可疑交易开展尽职调查并留存记录",
          "定期检查客户身份资料的完整性", "对关联交易实行回避和集体审议", "对逾期贷款及时催收并记录过程",
          "在办理业务时向客户充分揭示风险", "对重要空白凭证实行专人保管和登记"]
CONDITIONS = ["发现异常情况的，应当在两个工作日内向上级报告", "相关资料应当至少保存五年",
              "未经审批不得擅自变更业务流程", "涉及金额超过五十万元的，须经双人复核",
              "对不配合调查的客户，可以暂停办理非柜面业务", "检查结果应当纳入年度绩效考核"]
TOPICS = ["个人经营性贷款管理办法", "反洗钱工作实施细则", "内部审计工作规程", "信用卡业务风险管理办法",
          "员工行为管理规定", "票据业务操作规程", "个人消费贷款管理办法", "不良资产处置办法"]
PRODUCTS = [("惠农贷", "种植养殖户", "30万元", "3年"), ("税易贷", "小微企业", "100万元", "1年"),
            ("安居贷", "购房个人", "200万元", "20年"), ("薪享贷", "代发工资客户", "20万元", "2年"),
            ("商户通", "个体工商户", "50万元", "1年"), ("创业贷", "返乡创业人员", "30万元", "3年")]
FOOTER = "本简报仅供内部参考，不构成任何投资建议。"


def regulation(rng: random.Random, topic: str, n_articles: int) -> str:
    arts = [f"{BANK}{topic}", f"第一条 为规范{topic[:-4]}业务，防范经营风险，根据有关法律法规和监管要求，制定本办法。"]
    for k in range(2, n_articles + 1):
        d1, d2 = rng.sample(DUTIES, 2)
        arts.append(f"第{_cn(k)}条 {rng.choice(SUBJECTS)}应当{d1}，并{d2}；{rng.choice(CONDITIONS)}。"
                    f"{rng.choice(PERIODS)}，{rng.choice(SUBJECTS)}{rng.choice(CHECKS)}。")
    arts.append(f"第{_cn(n_articles + 1)}条 本办法由总行{rng.choice(SUBJECTS)}负责解释，自印发之日起施行。")
    return "\n\n".join(arts) + "\n"


PERIODS = ["每季度末", "每半年", "每年一月底前", "每月初", "遇有重大风险事件时", "新产品上线前"]
CHECKS = ["应当对执行情况开展专项检查", "牵头组织业务培训并留存签到记录", "汇总问题清单并督促限期整改",
          "抽查不少于百分之十的业务档案", "向董事会风险管理委员会提交书面报告"]


def _cn(n: int) -> str:
    d = "零一二三四五六七八九"
    if n < 10:
        return d[n]
    if n < 20:
        return "十" + (d[n % 10] if n % 10 else "")
    return d[n // 10] + "十" + (d[n % 10] if n % 10 else "")


def manual(rng: random.Random, name: str, who: str, limit: str, term: str, v: int) -> str:
    rate = rng.choice(["3.45%", "3.85%", "4.20%", "4.65%", "5.10%"])
    return f"""# {name}产品说明书（第{v}版）

## 产品概述
{name}是{BANK}面向**{who}**推出的贷款产品，最高额度{limit}，期限最长{term}，年利率{rate}起。

## 申请条件
- 年满十八周岁，具有完全民事行为能力；
- 在本行服务区域内有固定住所或经营场所；
- 信用记录良好，近两年内无连续三期以上逾期。

## 办理流程
1. 客户提交申请及相关资料；
2. 客户经理实地调查，{rng.choice(DUTIES)}；
3. 审批通过后签订合同，按约定方式放款。

| 项目 | 标准 |
|---|---|
| 最高额度 | {limit} |
| 还款方式 | {rng.choice(["等额本息", "按月付息到期还本", "等额本金"])} |

详情请咨询[当地网点](https://example.invalid/branches)。
"""


def report_html(rng: random.Random, year: int, q: int) -> str:
    dep = rng.randint(80, 160) + q
    loan = rng.randint(50, 120) + q
    npl = round(rng.uniform(1.1, 2.6), 2)
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>{year}年第{q}季度经营简报</title>
<style>body {{ font-family: sans-serif; }} .n {{ color: red; }}</style>
<script>var track = "analytics"; function f() {{ return 1 < 2; }}</script></head>
<body><h1>{BANK}{year}年第{q}季度经营简报</h1>
<p>截至{year}年第{q}季度末，本行各项存款余额{dep}亿元，较年初增长{rng.randint(3, 12)}&#46;{rng.randint(0, 9)}%；各项贷款余额{loan}亿元，
其中涉农贷款占比{rng.randint(45, 70)}%。</p>
<p>不良贷款率{npl}%，拨备覆盖率{rng.randint(150, 260)}%，资本充足率保持在监管要求以上。本季度新增小微企业贷款
{rng.randint(200, 900)}户，{rng.choice(DUTIES)}的工作持续推进。</p>
<p>下一阶段，本行将继续&nbsp;&ldquo;{rng.choice(["服务三农", "支持小微", "稳健经营"])}&rdquo;，加强{rng.choice(TOPICS)[:-4]}管理。</p>
<div class="footer"><p>{FOOTER}</p><p>扫码关注公众号</p><p>版权所有 © {year} {BANK}</p></div>
</body></html>
"""


def risk_tips(rng: random.Random, n: int) -> list[dict]:
    frauds = ["冒充客服要求转账", "以高息理财为名集资", "冒充公检法称账户涉案", "虚假贷款平台收取手续费",
              "以刷单返利为名诱导转账", "冒充亲友借钱", "以注销校园贷为由诱导借款", "冒充电商退款索要验证码"]
    victims = ["老年客户", "在校学生", "个体工商户", "退休职工", "新市民", "农户"]
    channels = ["电话", "短信", "社交软件", "陌生网页链接", "视频通话"]
    advice = ["立即挂断电话", "到就近网点核实", "拨打官方客服电话核实", "与家人商量后再做决定",
              "保存聊天记录并报警", "不要点击陌生链接"]
    out = []
    for i in range(n):
        out.append({"id": f"tip-{i:04d}", "text": (
            f"风险提示（第{i + 1}期）：近期{rng.choice(victims)}中出现不法分子通过{rng.choice(channels)}"
            f"{rng.choice(frauds)}的案例，涉案金额{rng.randint(2, 90)}万元。{BANK}提醒您，本行工作人员不会"
            f"索要密码和验证码；如遇可疑情况，请{rng.choice(advice)}。"
            f"单笔转账超过{rng.choice([5, 10, 20, 50])}万元的，柜面将进行{rng.choice(['二次确认', '风险提示', '身份核验', '用途询问'])}。")})
    return out


def vertical_files(seed: int = 11) -> dict[str, bytes]:
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for t, topic in enumerate(TOPICS):
        text = regulation(rng, topic, 16)
        if t == 0:  # one file in GB18030 (as exported by an old office system)
            files[f"regulations/{t:02d}_{topic}_gb18030.txt"] = text.encode("gb18030")
        else:
            files[f"regulations/{t:02d}_{topic}.txt"] = text.encode("utf-8")
    for v, (name, who, limit, term) in enumerate(PRODUCTS * 3):
        md = manual(rng, name, who, limit, term, v // len(PRODUCTS) + 1)
        if v == 0:  # one with a UTF-8 byte-order mark
            files[f"manuals/{v:02d}_{name}_bom.md"] = "\ufeff".encode() + md.encode("utf-8")
        else:
            files[f"manuals/{v:02d}_{name}.md"] = md.encode("utf-8")
    for year in (2023, 2024, 2025):
        for q in (1, 2, 3, 4):
            files[f"reports/{year}Q{q}.html"] = report_html(rng, year, q).encode("utf-8")
    tips = risk_tips(rng, 120)
    # planted: exact duplicates (new ids), near duplicates (one detail changed), junk
    extra = [{"id": f"tip-dup-{k}", "text": tips[k]["text"]} for k in (3, 17, 40)]
    extra += [{"id": f"tip-near-{k}", "text": tips[k]["text"].replace("不法分子", "不法人员")} for k in (5, 22)]
    extra += [
        {"id": "junk-ad", "text": "点击领取新人红包！！！\n扫码关注，好礼送不停\n广告合作请联系"},
        {"id": "junk-symbols", "text": "★★★★☆☆ ###### |||||| ====== ****** >>>>>> $$$$$$ ######"},
        {"id": "junk-short", "text": "见附件。"},
        {"id": "junk-repeat", "text": "风险提示风险提示" * 12},
        {"id": "junk-english", "text": "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod."},
        {"id": "junk-digits", "text": "2024 2023 1001 2002 3003 4004 5005 6006 7007 8008 9009 1234 5678"},
    ]
    lines = [*tips, *extra]
    rng.shuffle(lines)
    from json import dumps

    files["tips/risk_tips.jsonl"] = "".join(dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8")
    return files


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    alpaca, sharegpt, messages = general_records()
    atomic_write_json(args.out / "general" / "alpaca.json", alpaca, indent=1)
    atomic_write_json(args.out / "general" / "sharegpt.json", sharegpt, indent=1)
    atomic_write_jsonl(args.out / "general" / "messages.jsonl", messages)
    atomic_write_text(args.out / "general" / "README", GENERAL_README)
    for rel, data in vertical_files().items():
        atomic_write_bytes(args.out / "vertical" / rel, data)
    atomic_write_text(args.out / "vertical" / "README", VERTICAL_README)


GENERAL_README = """# general samples

Self-written Chinese instruction records generated by `corpora/samples/make_general_vertical.py`
(templates; computed answers): `alpaca.json` (120, LLaMA-Factory alpaca, some with system/history),
`sharegpt.json` (100, human/gpt turns), `messages.jsonl` (100). Read them with
`banklm.corpora.sources.read_sources([{"path": "corpora/samples/general"}])` (this file has no extension,
so reading the folder skips it).
"""

VERTICAL_README = """vertical samples: self-written finance documents from templates (fictional bank), made by
corpora/samples/make_general_vertical.py. regulations/*.txt (one article per blank-line block; 00_* is
GB18030), manuals/*.md (00_* has a UTF-8 BOM), reports/*.html, tips/risk_tips.jsonl. Planted for the ops:
exact duplicates (tip-dup-*), near duplicates (tip-near-*), junk records (junk-*), a footer repeated in
every report. This file has no extension, so reading the folder skips it.
"""

if __name__ == "__main__":
    main()
