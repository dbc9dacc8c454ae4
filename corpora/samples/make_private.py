"""Generate ``corpora/samples/private/``: FAKE private bank records full of fake-but-valid PII.

Deterministic (seeded): ``python corpora/samples/make_private.py`` rewrites the same bytes every time.

Every identifier below is synthetic and carries a valid check digit (resident ID: GB 11643 MOD 11-2,
bank cards: Luhn, USCC: GB 32100 MOD 31), computed here by an implementation independent of
``corpora/ops/pii.py`` so the sample really tests the detector. Each record also carries things that
must survive scrubbing: amounts, dates, rates, hotlines, regulation citations, company names and
serial / contract numbers that look like identifiers but fail every checksum.

Outputs
    private/records.jsonl   {id, kind, text}    kinds: credit_note, call_transcript, ticket
    private/canaries.json   {"canaries": [{type, value}], "must_keep": [...]} -- a handful of planted
                            PII values that must never appear in any scrubbed output, stats or quarantine
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

SEED = 20240315
N_RECORDS = 210
OUT = Path(__file__).resolve().parent / "private"

# ------------------------------------------------------------------ independent checksum arithmetic


def id_check(body17: str) -> str:
    # weight of position i (from the left) is 2^(17-i) mod 11; check value (12 - sum mod 11) mod 11, 10 -> X
    total = sum(int(d) * (2 ** (17 - i) % 11) for i, d in enumerate(body17))
    v = (12 - total % 11) % 11
    return "X" if v == 10 else str(v)


def luhn_check(body: str) -> str:
    # check digit that makes body+check Luhn-valid
    digits = [int(c) for c in body]
    s = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        s += d
    return str((10 - s % 10) % 10)


def luhn_valid(num: str) -> bool:
    return luhn_check(num[:-1]) == num[-1]


USCC_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"
USCC_W = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28]


def uscc_check(body17: str) -> str:
    s = sum(USCC_CHARS.index(c) * w for c, w in zip(body17, USCC_W, strict=True))
    return USCC_CHARS[(31 - s % 31) % 31]


# ---------------------------------------------------------------------------------------- vocab

REGIONS = ["110105", "110108", "310104", "310115", "440305", "440106", "330106", "320102", "510107",
           "420106", "610113", "370202", "350203", "500103", "120101", "430104", "210102", "530102"]
SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁")
COMPOUND = ["欧阳", "司马", "诸葛", "上官", "慕容", "东方", "皇甫", "令狐"]
GIVEN = ["伟", "芳", "娜", "秀英", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明", "超",
         "秀兰", "霞", "平", "刚", "桂英", "建华", "志强", "婷", "玉兰", "海燕", "晓东", "子涵", "浩然", "欣怡", "梓萱",
         "宇轩", "雨桐", "俊杰", "思远", "嘉怡", "文博", "晨曦", "立新", "春梅", "振国", "美玲", "鹏飞", "晓峰"]
ADDR = [("北京市", "朝阳区", "建国路", "SOHO现代城"), ("上海市", "浦东新区", "陆家嘴环路", "金茂公寓"),
        ("广东省深圳市", "南山区", "科技园南路", "海岸城"), ("浙江省杭州市", "西湖区", "文三路", "华星时代广场"),
        ("江苏省南京市", "鼓楼区", "中山北路", "银城花园"), ("四川省成都市", "武侯区", "人民南路", "锦绣苑"),
        ("湖北省武汉市", "江汉区", "解放大道", "泛海国际"), ("山东省青岛市", "市南区", "香港中路", "海韵小区"),
        ("天津市", "和平区", "南京路", "滨江花园"), ("重庆市", "渝中区", "解放碑步行街", "英利大厦")]
COMPANIES = ["杭州云栖数据科技有限公司", "深圳市前海星河贸易有限公司", "成都蜀锦餐饮管理有限公司",
             "南京恒达建材有限公司", "青岛海融物流有限公司", "武汉光谷智造设备有限公司"]
PLATE_PROV = "京沪粤浙苏川鄂鲁津渝"
HOTLINES = ["95588", "95533", "95599", "400-820-8888", "12378", "12363"]
REGS = ["《商业银行法》第三十九条", "银发〔2021〕12号", "《个人信息保护法》第二十八条", "银保监发〔2020〕9号",
        "《反洗钱法》第十六条", "《个人贷款管理暂行办法》第二十条"]
PLATE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


class Gen:
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def d(self, n: int) -> str:
        return "".join(self.r.choice("0123456789") for _ in range(n))

    def name(self) -> str:
        sur = self.r.choice(COMPOUND) if self.r.random() < 0.15 else self.r.choice(SURNAMES)
        return sur + self.r.choice(GIVEN)

    def birth(self) -> dt.date:
        return dt.date(1950, 1, 1) + dt.timedelta(days=self.r.randrange(0, 365 * 55))

    def id18(self) -> str:
        body = self.r.choice(REGIONS) + self.birth().strftime("%Y%m%d") + self.d(3)
        return body + id_check(body)

    def id15(self) -> str:
        return self.r.choice(REGIONS) + self.birth().strftime("%y%m%d") + self.d(3)

    def id_fmt(self, v: str) -> str:
        k = self.r.random()
        if len(v) == 18 and k < 0.2:
            return f"{v[:6]} {v[6:14]} {v[14:]}"
        if len(v) == 18 and v[-1] == "X" and k < 0.4:
            return v[:-1] + "x"
        return v

    def mobile(self) -> str:
        return "1" + self.r.choice("3456789") + self.d(9)

    def mobile_fmt(self, m: str) -> str:
        return self.r.choice([m, f"{m[:3]}-{m[3:7]}-{m[7:]}", f"{m[:3]} {m[3:7]} {m[7:]}", f"+86 {m}",
                              f"+86-{m[:3]}-{m[3:7]}-{m[7:]}", f"0086{m}", f"86-{m}"])

    def landline(self) -> str:
        area = self.r.choice(["010", "021", "020", "0755", "0571", "025", "028", "027", "0532"])
        local = self.r.choice("23456789") + self.d(7 if len(area) == 3 else self.r.choice([6, 7]))
        return self.r.choice([f"{area}-{local}", f"({area}){local}", f"{area}-{local}转{self.d(3)}"])

    def card(self) -> str:
        prefix = self.r.choice(["622202", "621700", "622848", "625965", "436742", "524070", "622588", "2221"])
        length = self.r.choice([16, 19]) if prefix.startswith("62") else 16
        body = prefix + self.d(length - len(prefix) - 1)
        return body + luhn_check(body)

    def card_fmt(self, c: str) -> str:
        k = self.r.random()
        if k < 0.4:
            return c
        if k < 0.8:
            return " ".join(c[i:i + 4] for i in range(0, len(c), 4))
        return "-".join(c[i:i + 4] for i in range(0, len(c), 4))

    def account(self) -> str:
        # corporate settlement account: not a card, fails Luhn on purpose
        while True:
            a = self.r.choice(["3100", "1202", "4400", "1109"]) + self.d(self.r.choice([10, 12, 14]))
            if not luhn_valid(a):
                return a

    def uscc(self) -> str:
        body = "91" + self.r.choice(REGIONS) + "".join(self.r.choice(USCC_CHARS) for _ in range(9))
        return body + uscc_check(body)

    def passport(self) -> str:
        return self.r.choice("EG") + self.d(8)

    def permit(self) -> str:
        return self.r.choice("CHM") + self.d(8)

    def plate(self) -> str:
        p = self.r.choice(PLATE_PROV) + self.r.choice(PLATE_LETTERS)
        if self.r.random() < 0.3:
            return p + self.r.choice("DF") + self.d(5)
        return p + self.r.choice(PLATE_LETTERS) + self.d(4)

    def email(self, name_hint: str = "") -> str:
        user = self.r.choice(["zhang", "li.ming", "wang_fang", "chen88", "liu.jie", "sunny", "hz.zhao"]) + self.d(3)
        return f"{user}@{self.r.choice(['qq.com', '163.com', 'example.com.cn', 'corp-mail.cn'])}"

    def address(self) -> str:
        prov, dist, road, estate = self.r.choice(ADDR)
        tail = self.r.choice([f"{estate}{self.r.randint(1, 20)}号楼{self.r.randint(1, 6)}单元{self.r.randint(1, 30)}0{self.r.randint(1, 4)}室",
                              f"{self.r.randint(1, 30)}栋{self.r.randint(101, 2804)}室", ""])
        return f"{prov}{dist}{road}{self.r.randint(1, 999)}号{tail}"

    # ---- things that must be kept
    def serial(self) -> str:
        """A 19-digit transaction serial starting like a UnionPay card but failing Luhn."""
        while True:
            s = "62" + self.d(17)
            if not luhn_valid(s):
                return s

    def contract(self) -> str:
        """An 18-digit contract number: starts like an ID but fails MOD 11-2, the USCC check and Luhn."""
        while True:
            body = self.r.choice(REGIONS) + "2024" + self.d(8)
            if body[-1] != id_check(body[:17]) and body[-1] != uscc_check(body[:17]) and not luhn_valid(body):
                return body

    def amount(self) -> str:
        return self.r.choice([f"¥{self.r.randint(1, 999)},{self.r.randint(0, 999):03d}.00",
                              f"{self.r.randint(1, 200) / 2:g}万元", f"人民币{self.r.randint(5, 500)}万元整"])

    def date(self) -> str:
        d = dt.date(2023, 1, 1) + dt.timedelta(days=self.r.randrange(0, 600))
        return self.r.choice([f"{d.year}年{d.month}月{d.day}日", d.isoformat()])

    def rate(self) -> str:
        return self.r.choice(["4.35%", "3.85%", "LPR+50BP", "年化5.6%", "3.45%"])


def credit_note(g: Gen, rid: str, plant: dict) -> dict:
    name, spouse, mgr = plant.get("PERSON") or g.name(), g.name(), g.name()
    idv = plant.get("ID_CARD") or g.id18()
    comp = g.r.choice(COMPANIES)
    addr = plant.get("ADDRESS") or g.address()
    text = (f"【贷前调查】借款人{name}，身份证号码：{g.id_fmt(idv)}，配偶{spouse}"
            f"（旧版身份证{g.id15()}），手机{g.mobile_fmt(plant.get('PHONE') or g.mobile())}。"
            f"家庭住址：{addr}。借款人任职于{comp}（统一社会信用代码{plant.get('USCC') or g.uscc()}），"
            f"月均收入{g.amount()}。申请金额{g.amount()}，期限36个月，执行利率{g.rate()}。"
            f"还款账户：{g.card_fmt(plant.get('BANK_CARD') or g.card())}；公司结算账户 账号：{plant.get('ACCOUNT') or g.account()}。"
            f"名下车辆车牌{g.plate()}。借款合同编号{g.contract()}，放款流水号{g.serial()}，"
            f"签约日期{g.date()}。依据{g.r.choice(REGS)}完成面谈面签，客户经理{mgr}，复核人：{g.name()}。")
    return {"id": rid, "kind": "credit_note", "text": text}


def call_transcript(g: Gen, rid: str, plant: dict) -> dict:
    name = plant.get("PERSON") or g.name()
    sur = name[:2] if name[:2] in COMPOUND else name[0]
    phone = plant.get("PHONE") or g.mobile()
    text = (f"[来电记录 {g.date()} 热线{g.r.choice(HOTLINES)}] 坐席：您好，这里是{g.r.choice(HOTLINES)}客服，请问怎么称呼？"
            f"客户：我叫{name}。坐席：{sur}先生您好，请提供身份证号核实身份。客户：{g.id_fmt(plant.get('ID_CARD') or g.id18())}。"
            f"坐席：您的预留手机{g.mobile_fmt(phone)}是否还在使用？客户：换号了，新号{g.mobile_fmt(g.mobile())}，"
            f"家里座机{g.landline()}。坐席：好的，您尾号{g.d(4)}的卡号{g.card_fmt(plant.get('BANK_CARD') or g.card())}"
            f"于{g.date()}有一笔{g.amount()}的境外消费，交易流水号{g.serial()}。客户：那是我出差用的，"
            f"护照号{plant.get('PASSPORT') or g.passport()}，港澳通行证{g.permit()}。坐席：已为您登记，"
            f"如有疑问可拨打{g.r.choice(HOTLINES)}或发邮件至{plant.get('EMAIL') or g.email()}回复。紧急联系人：{g.name()}，"
            f"电话{g.mobile_fmt(g.mobile())}。")
    return {"id": rid, "kind": "call_transcript", "text": text}


def ticket(g: Gen, rid: str, plant: dict) -> dict:
    comp = g.r.choice(COMPANIES)
    text = (f"工单#{g.d(8)} 状态：处理中。收款人：{plant.get('PERSON') or g.name()}，收款账户（中国银行）"
            f"{g.card_fmt(g.card())}；付款人：{comp}，付款账户：{plant.get('ACCOUNT') or g.account()}，"
            f"A/C No. {g.account()}，统一社会信用代码：{plant.get('USCC') or g.uscc()}，法定代表人：{g.name()}。"
            f"转账金额{g.amount()}，手续费{g.amount()}，提交时间{g.date()}。经办人{g.name()}反映对方户名不符，"
            f"联系人{g.name()}，手机{g.mobile_fmt(g.mobile())}，邮箱{plant.get('EMAIL') or g.email()}，"
            f"办公地址{plant.get('ADDRESS') or g.address()}，车牌{plant.get('PLATE') or g.plate()}。"
            f"参考{g.r.choice(REGS)}，业务编号{g.serial()}，年利率{g.rate()}。投诉可拨{g.r.choice(HOTLINES)}。")
    return {"id": rid, "kind": "ticket", "text": text}


def main() -> None:
    g = Gen(SEED)
    canaries = {
        "PERSON": "上官婉清", "ID_CARD": g.id18(), "PHONE": g.mobile(), "BANK_CARD": g.card(),
        "ACCOUNT": g.account(), "USCC": g.uscc(), "EMAIL": "canary.kestrel739@example.com.cn",
        "ADDRESS": "浙江省杭州市西湖区文三路478号华星时代广场A座1502室", "PASSPORT": g.passport(), "PLATE": g.plate(),
    }
    must_keep = ["95588", "《商业银行法》第三十九条", "银发〔2021〕12号", "4.35%"]
    makers = [credit_note, call_transcript, ticket]
    records = []
    for i in range(N_RECORDS):
        # every 10th record of each kind carries the canaries
        plant = canaries if i % 10 == 0 else {}
        rec = makers[i % 3](g, f"private-{i:04d}", plant)
        records.append(rec)
    # a fixed record with planted must-keep strings next to the serial-looking numbers
    serial, contract = g.serial(), g.contract()
    records.append({"id": f"private-{N_RECORDS:04d}", "kind": "ticket",
                    "text": f"客服热线95588、95533与400-820-8888均为公开号码；依据《商业银行法》第三十九条及银发〔2021〕12号，"
                            f"贷款年利率4.35%，金额¥12,000.00（3.5万元以内），交易流水号{serial}，合同编号{contract}，"
                            f"客户经理对杭州云栖数据科技有限公司的授信已于2024年3月15日审批。"})
    must_keep += [serial, contract, "¥12,000.00", "3.5万元", "2024年3月15日", "杭州云栖数据科技有限公司", "400-820-8888"]
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "records.jsonl", "w", encoding="utf-8", newline="\n") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(OUT / "canaries.json", "w", encoding="utf-8", newline="\n") as fh:
        json.dump({"note": "FAKE values planted in records.jsonl; none may survive scrubbing",
                   "canaries": [{"type": t, "value": v} for t, v in canaries.items()],
                   "must_keep": must_keep}, fh, ensure_ascii=False, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    main()
