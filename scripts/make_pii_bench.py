"""Generate the PII benchmark: labelled bank records written independently of banklm's detectors.

    python scripts/make_pii_bench.py --n 1200 --seed 7 --out /tmp/pii_bench.jsonl

Nothing here imports banklm: the identifiers are built from their own specifications (check digits
computed by code written for this file), and the name pools are not the detector's lexicon (surnames
come from a broader list that includes rare ones, given names from a separate character pool, romanised
names from a pinyin syllable list of this file). The templates imitate the styles the issue lists
(credit notes, collection call logs, audit working papers, e-mails, KYC records, complaint transcripts,
mixed Chinese/English) and plant, next to the PII, values that must be kept: amounts, dates, serial
numbers, branch codes, 95xxx/400 numbers, place and company names and words that are also names.

One JSON object per line::

    {"id": "b00001", "style": "email", "text": "...",
     "pii":  [{"start": 3, "end": 6, "type": "PERSON", "kind": "zh"}, ...],
     "keep": [{"start": 20, "end": 29, "kind": "amount"}, ...]}

``type`` is one of PERSON MOBILE LANDLINE ID_CARD BANK_CARD ACCOUNT USCC PASSPORT PLATE EMAIL ADDRESS;
a PII span counts as caught when every one of its non-space characters is replaced, a keep span counts
as kept when none of its characters is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
from pathlib import Path

# ------------------------------------------------------------------------------------------ pools

# single surnames: the frequent ones (drawn more often) and a tail of rarer ones
FREQUENT_SURNAMES = list(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚"
    "卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤")
RARE_SURNAMES = list(
    "禄笪郗佴蒯暴揭琚郦钮逄昌隗璩濮扶堵冉宦艾鱼容向古易慎戈廖庾终暨居衡步都耿满弘匡国文寇广禄阙东欧殳沃利蔚越夔隆"
    "师巩厍聂晁勾敖融冷訾辛阚那简饶空曾毋沙乜养鞠须丰巢关蒯相查后荆红游竺权逯盖益桓公晋楚闫法汝鄢涂钦归海帅缑亢况"
    "郈有琴梁丘左丘商牟佘佴伯赏南宫墨哈谯笪年爱阳佟")
COMPOUND_SURNAMES = ["欧阳", "司马", "尉迟", "皇甫", "上官", "诸葛", "东方", "夏侯", "令狐", "慕容", "公孙", "长孙",
                     "宇文", "司徒", "端木", "申屠", "澹台", "呼延", "南宫", "闻人", "司空", "百里", "东郭", "钟离"]
GIVEN_CHARS = list(
    "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉萍红建文辉婷宇浩欣怡梓涵子轩睿博思雨彤晨佳嘉诗琪悦一若瑶鑫昊"
    "泽俊逸晓春秋冬海波斌亮宁凯峰毅蕾璐颖倩薇露莉琳岚翔鹏飞龙腾云霏依然沐阳朵可馨雅婉清韵舒兰菊梅竹松柏林森淼焱垚"
    "鸿志远航帆锦程乐天宏图永福寿康泰荣昌盛德仁义礼智信忠孝廉勤俭朴素雯雪冰霜晴露珊瑚琦瑾璇瑜琼璟珂玥晗昕曦旭昱晟"
    "景尧舜禹汤铭钧铎锋钰镇川江河湖溪涓源沁澜洁淑慧惠敬恭谦逊奕弈彦斐蓉芸芷茜茹荷莲萱蔚蓓蕴苒")
# ambiguous two- and three-character words that are names elsewhere; planted as words to keep
AMBIGUOUS_KEEP = [("高峰期", "ambiguous"), ("金华", "place"), ("常熟", "place"), ("温州", "place"),
                  ("石家庄", "place"), ("高新区", "place"), ("江苏银行", "company"), ("平安银行", "company"),
                  ("华夏银行", "company"), ("民生银行", "company"), ("常州", "place"), ("安庆", "place"),
                  ("武汉", "place"), ("黄山", "place"), ("白云区", "place"), ("文山州", "place"),
                  ("雷州", "place"), ("钟祥", "place"), ("龙岗区", "place"), ("宁波", "place"), ("高明区", "place"),
                  ("江宁区", "place"), ("高邮", "place"), ("马鞍山", "place"), ("金山区", "place"),
                  ("海宁", "place"), ("余杭区", "place"), ("华为", "company"), ("方正证券", "company"),
                  ("长城汽车", "company"), ("万科", "company"), ("高德地图", "company"), ("周黑鸭", "company"),
                  ("石化", "ambiguous"), ("杨梅", "ambiguous"), ("高山", "ambiguous"), ("向日葵", "ambiguous"),
                  ("金融", "ambiguous"), ("安全", "ambiguous"), ("钱包", "ambiguous"), ("常年", "ambiguous"),
                  ("高温", "ambiguous"), ("黄金周", "ambiguous"), ("文明", "ambiguous"), ("张家港", "place"),
                  ("王府井", "place"), ("马尾区", "place"), ("韩城", "place"), ("曹妃甸", "place")]
PLACES = ["温州", "金华", "常熟", "石家庄", "宁波", "常州", "安庆", "武汉", "黄山", "马鞍山", "高邮", "海宁", "张家港",
          "韩城", "钟祥", "雷州", "义乌", "昆山", "绍兴", "嘉兴", "台州", "泉州", "东莞", "佛山"]
COMPANIES = ["江苏银行", "平安银行", "华夏银行", "民生银行", "金华市恒信建材有限公司", "温州瓯江电器有限公司",
             "常熟市高峰纺织有限公司", "石家庄华北物流有限公司", "宁波港城贸易有限公司", "武汉光谷芯片科技有限公司",
             "黄山徽茶有限公司", "安庆石化配件厂", "马鞍山钢城五金经营部", "高邮湖蟹专业合作社"]
BRANCHES = ["金华分行", "温州分行营业部", "常熟支行", "石家庄分行", "高新区支行", "江宁区支行", "龙岗区支行", "白云区支行",
            "余杭区支行", "宁波分行", "黄山路支行", "常州分行"]

PINYIN_SURNAMES = ["Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou", "Xu", "Sun", "Ma", "Zhu",
                   "Hu", "Guo", "Gao", "Lin", "Luo", "Zheng", "Liang", "Xie", "Song", "Tang", "Han", "Feng", "Deng",
                   "Cao", "Peng", "Zeng", "Xiao", "Tian", "Dong", "Yuan", "Pan", "Jiang", "Cai", "Du", "Ye", "Cheng",
                   "Su", "Wei", "Lyu", "Ding", "Ren", "Shen", "Yao", "Lu", "Jia", "Xia", "Fu", "Fang", "Bai", "Zou",
                   "Meng", "Qin", "Qiu", "Hou", "Yin", "Xue", "Yan", "Lei", "Shi", "Tao", "Gu", "Mao", "Hao", "Gong",
                   "Shao", "Qian", "Dai", "Tan", "Kong", "Sima", "Ouyang", "Zhuge", "Shangguan", "Situ", "Huangfu",
                   "Murong", "Linghu", "Xiahou", "Duanmu", "Yuwen", "Zhong", "Jin", "Qi", "Ke", "Niu", "Geng"]
GIVEN_SYLLABLES = ["yi", "rong", "xiao", "ming", "hang", "yu", "jun", "hao", "wei", "fang", "na", "min", "jing", "li",
                   "qiang", "lei", "jie", "tao", "chao", "xiu", "xia", "ping", "gang", "ying", "hua", "hong", "jian",
                   "wen", "hui", "ting", "xin", "zi", "han", "xuan", "rui", "bo", "si", "tong", "chen", "jia", "shi",
                   "qi", "yue", "ruo", "yao", "kai", "feng", "lu", "qian", "lin", "shu", "yun", "peng", "fei", "long",
                   "xiang", "zhi", "yuan", "hang", "fan", "le", "tian", "kang", "tai", "chang", "de", "ren", "zhong",
                   "qing", "lan", "mei", "song", "sen", "miao", "xue", "bing", "shuang", "qin", "xu", "jia", "ze"]
WESTERN_GIVEN = ["Leo", "Tony", "Kevin", "Grace", "Lily", "Jason", "Amy", "Eric", "Vivian", "Cathy", "Michael", "Jenny",
                 "Frank", "Helen", "Peter", "Sophia", "Alan", "Wendy", "Ryan", "Iris", "Ken", "Joyce", "Vincent",
                 "Cindy", "Derek", "Fiona", "Jack", "Nancy", "Oscar", "Sabrina", "Terry", "Yvonne", "Winston", "Crystal"]

AREA_CODES = ["010", "020", "021", "022", "023", "024", "025", "027", "028", "029", "0311", "0351", "0371", "0431",
              "0451", "0512", "0513", "0519", "0531", "0532", "0551", "0571", "0573", "0574", "0575", "0576", "0577",
              "0579", "0591", "0592", "0731", "0755", "0756", "0757", "0760", "0769", "0771", "0851", "0871", "0898",
              "0931", "0991", "0471", "0951"]
SERVICE_NUMBERS = ["95588", "95533", "95599", "95566", "95580", "95555", "95561", "95568", "95595", "95528", "95577",
                   "96588", "12363", "12378", "4008-208-888", "400-820-8888", "800-820-8888", "4006695566",
                   "400 800 9888", "10086"]
ROADS = ["文三", "解放", "建设", "人民", "中山", "延安", "长江", "黄河", "和平", "胜利", "光明", "学府", "科技", "滨江",
         "东风", "八一北", "迎宾", "南京西", "环城北", "望江"]
ROAD_SUFFIX = ["路", "街", "大道", "巷", "东路", "中路", "西路"]
ESTATES = ["阳光花园", "湖滨花园", "翠苑", "金色家园", "幸福里小区", "锦绣江南", "碧桂园", "绿城桂花园", "东方明珠苑",
           "紫金小区", "和谐家园", "星河湾", "新城国际", "丽水嘉园", "华星时代广场"]
REGIONS = ["浙江省杭州市西湖区", "江苏省苏州市工业园区", "河北省石家庄市长安区", "浙江省金华市婺城区", "广东省深圳市南山区",
           "北京市朝阳区", "上海市浦东新区", "湖北省武汉市洪山区", "江苏省常熟市", "浙江省温州市鹿城区", ""]
CN_DIGITS = "〇一二三四五六七八九"
PROVINCE_ABBR = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
PROVINCE_CODES = [11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50, 51, 52, 53,
                  54, 61, 62, 63, 64, 65]
EMAIL_DOMAINS = ["163.com", "qq.com", "126.com", "sina.com", "outlook.com", "gmail.com", "bank-example.cn",
                 "corp.example.com", "foxmail.com"]


# --------------------------------------------------------------------------------------- a record

class Record:
    """A text built piece by piece, so every labelled span's offsets are exact by construction."""

    def __init__(self, style: str):
        self.style = style
        self.parts: list[str] = []
        self.length = 0
        self.pii: list[dict] = []
        self.keep: list[dict] = []

    def add(self, text: str) -> Record:
        self.parts.append(text)
        self.length += len(text)
        return self

    def pii_(self, type_: str, value: str, kind: str = "") -> Record:
        self.pii.append({"start": self.length, "end": self.length + len(value), "type": type_, "kind": kind})
        return self.add(value)

    def keep_(self, kind: str, value: str) -> Record:
        self.keep.append({"start": self.length, "end": self.length + len(value), "kind": kind})
        return self.add(value)

    def to_json(self, rid: str) -> dict:
        text = "".join(self.parts)
        for sp in self.pii + self.keep:
            sp["value"] = text[sp["start"]:sp["end"]]
        return {"id": rid, "style": self.style, "text": text, "pii": self.pii, "keep": self.keep}


# --------------------------------------------------------------------------------- value factories

class Fake:
    """Random fake values, each valid by its own specification (computed here, not by banklm)."""

    def __init__(self, rng: random.Random):
        self.r = rng

    # -- people
    def surname(self) -> str:
        x = self.r.random()
        if x < 0.12:
            return self.r.choice(COMPOUND_SURNAMES)
        if x < 0.30:
            return self.r.choice(RARE_SURNAMES)
        return self.r.choice(FREQUENT_SURNAMES)

    def zh_name(self) -> str:
        sur = self.surname()
        n_given = 1 if self.r.random() < 0.3 else 2
        return sur + "".join(self.r.choice(GIVEN_CHARS) for _ in range(n_given))

    def pinyin_given(self) -> str:
        n = 1 if self.r.random() < 0.35 else 2
        syl = [self.r.choice(GIVEN_SYLLABLES) for _ in range(n)]
        if n == 2 and self.r.random() < 0.1:
            return syl[0].capitalize() + "-" + syl[1]  # Yi-rong
        return "".join(syl).capitalize()

    def roman_name(self) -> str:
        sur = self.r.choice(PINYIN_SURNAMES)
        x = self.r.random()
        if x < 0.3:
            return f"{sur} {self.pinyin_given()}"          # Li Yirong
        if x < 0.55:
            return f"{self.pinyin_given()} {sur}"          # Yuhang Sima
        if x < 0.8:
            return f"{self.r.choice(WESTERN_GIVEN)} {sur}"  # Leo Wang
        if x < 0.9:
            return f"{sur.upper()} {self.pinyin_given()}"  # LI Yirong (passport style)
        return f"{self.r.choice(WESTERN_GIVEN)} {sur} {self.pinyin_given()}"  # Kevin Zhang Wei

    # -- numbers
    def digits(self, n: int) -> str:
        return "".join(self.r.choice("0123456789") for _ in range(n))

    def id_card(self) -> str:
        born = dt.date(1950, 1, 1) + dt.timedelta(days=self.r.randint(0, 365 * 55))
        body = f"{self.r.choice(PROVINCE_CODES)}{self.r.randint(1, 99):02d}{self.r.randint(1, 99):02d}"
        body += born.strftime("%Y%m%d") + self.digits(3)
        # ISO 7064 MOD 11-2 with the weights written out as powers of two
        s = sum(int(c) * (2 ** (17 - i) % 11) for i, c in enumerate(body))
        check = "10X98765432"[s % 11]
        value = body + check
        if self.r.random() < 0.1:
            value = f"{value[:6]} {value[6:14]} {value[14:]}"
        return value

    def luhn_complete(self, body: str) -> str:
        for c in "0123456789":
            n = body + c
            total = 0
            for i, d in enumerate(reversed(n)):
                v = int(d) * (2 if i % 2 else 1)
                total += v - 9 if v > 9 else v
            if total % 10 == 0:
                return n
        raise AssertionError

    def bank_card(self) -> str:
        prefix = self.r.choice(["622202", "622848", "621700", "622588", "623668", "436742", "524070", "625965"])
        length = self.r.choice([16, 19, 19])
        card = self.luhn_complete(prefix + self.digits(length - 7))
        style = self.r.random()
        if style < 0.25:
            return " ".join(card[i:i + 4] for i in range(0, len(card), 4))
        if style < 0.35:
            return "-".join(card[i:i + 4] for i in range(0, len(card), 4))
        return card

    def account(self) -> str:
        # corporate account numbers: not Luhn-checked, 12-22 digits
        while True:
            acc = self.r.choice(["3", "1", "7", "8"]) + self.digits(self.r.choice([12, 14, 16, 19, 21]))
            if not acc.startswith(("62", "4", "5", "35", "22")):
                return acc

    def uscc(self) -> str:
        alpha = "0123456789ABCDEFGHJKLMNPQRTUWXY"
        body = self.r.choice("9159") + self.r.choice("123") + f"{self.r.choice(PROVINCE_CODES)}{self.r.randint(1, 99):02d}{self.r.randint(1, 99):02d}"
        body += "".join(self.r.choice(alpha) for _ in range(9))
        s = sum(alpha.index(c) * pow(3, i, 31) for i, c in enumerate(body))
        return body + alpha[(31 - s % 31) % 31]

    def mobile(self) -> str:
        n = "1" + self.r.choice("3456789") + self.digits(9)
        return self.r.choice([n, n, n, f"{n[:3]}-{n[3:7]}-{n[7:]}", f"{n[:3]} {n[3:7]} {n[7:]}", f"+86 {n}",
                              f"+86-{n}", f"86-{n}", f"0086{n}"])

    def landline(self) -> str:
        area = self.r.choice(AREA_CODES)
        sub_len = 8 if len(area) == 3 or self.r.random() < 0.7 else 7
        sub = self.r.choice("23456789") + self.digits(sub_len - 1)
        a = area[1:]
        grouped = f"{sub[:4]} {sub[4:]}"
        ext = ""
        x = self.r.random()
        if x < 0.12:
            ext = self.r.choice(["转", "转", "-", " ext. ", " ext ", "分机", " x", " 转"]) + self.digits(self.r.randint(2, 4))
        forms = [f"{area}-{sub}", f"({area}){sub}", f"（{area}）{sub}", f"({area}) {grouped}", f"{area} {grouped}",
                 f"{area} {sub}", f"+86 {a} {grouped}", f"+86-{a}-{sub}", f"86-{a}-{sub}", f"0086-{a}-{sub}",
                 f"0086 {a} {sub}", f"+86 ({a}) {sub}", f"(+86){area}-{sub}", f"{area}-{sub[:4]}-{sub[4:]}",
                 f"+86{a}{sub}", f"{area}-{sub}"]
        return self.r.choice(forms) + ext

    def passport(self) -> tuple[str, str]:
        """(cue, number): the cue says which document it is."""
        kind = self.r.randrange(8)
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        if kind == 0:
            return self.r.choice(["护照号码：", "护照号", "护照 ", "持护照"]), "E" + self.digits(8)
        if kind == 1:
            return self.r.choice(["护照号码：", "护照：", "Passport No. ", "passport "]), "E" + self.r.choice(letters) + self.digits(7)
        if kind == 2:
            return self.r.choice(["护照号码", "护照号："]), "G" + self.digits(8)
        if kind == 3:
            return self.r.choice(["港澳通行证", "往来港澳通行证号码：", "港澳通行证号"]), "C" + self.digits(8)
        if kind == 4:
            return self.r.choice(["港澳通行证：", "往来港澳通行证"]), "C" + self.r.choice(letters) + self.digits(7)
        if kind == 5:
            return self.r.choice(["回乡证号码：", "回乡证", "港澳居民来往内地通行证"]), self.r.choice("HM") + self.digits(8)
        if kind == 6:
            return self.r.choice(["台胞证号码：", "台湾居民来往大陆通行证号码："]), self.digits(8)
        return self.r.choice(["Passport No.: ", "外籍护照号码：", "passport number "]), (
            self.r.choice(letters) + self.digits(8) if self.r.random() < 0.5 else self.digits(9))

    def plate(self) -> str:
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        p = self.r.choice(PROVINCE_ABBR) + self.r.choice(letters)
        if self.r.random() < 0.3:
            return p + self.r.choice("DF") + self.digits(5)
        tail = "".join(self.r.choice("0123456789" if i != 2 else letters + "0123456789") for i in range(5))
        return p + self.r.choice(["", "·"]) + tail

    def email(self, name_hint: str | None = None) -> str:
        local = name_hint or self.r.choice(["zhang.wei", "lixm", "wangfang88", "chen_jie", "kevin.liu", "hr", "ops.team"])
        return f"{local}{self.r.choice(['', str(self.r.randint(1, 99))])}@{self.r.choice(EMAIL_DOMAINS)}"

    def cn_num(self, n: int) -> str:
        """Chinese numerals as written in addresses: 12 -> 十二, 502 -> 五〇二."""
        if n < 10:
            return CN_DIGITS[n]
        if n < 100 and self.r.random() < 0.7:
            tens, ones = divmod(n, 10)
            return ("" if tens == 1 else CN_DIGITS[tens]) + "十" + (CN_DIGITS[ones] if ones else "")
        return "".join(CN_DIGITS[int(d)] for d in str(n))

    def address(self) -> tuple[str, str]:
        """(region prefix that may stay, identifying part that must go)."""
        region = self.r.choice(REGIONS)
        chinese = self.r.random() < 0.3
        num = (lambda n: self.cn_num(n)) if chinese else str
        road = self.r.choice(ROADS) + self.r.choice(ROAD_SUFFIX)
        kind = self.r.randrange(5)
        if kind == 0:
            core = f"{road}{num(self.r.randint(1, 999))}号"
        elif kind == 1:
            core = f"{road}{num(self.r.randint(1, 300))}号{self.r.choice(ESTATES)}{num(self.r.randint(1, 30))}号楼{num(self.r.randint(1, 6))}单元{num(self.r.randint(1, 30) * 100 + self.r.randint(1, 4))}室"
        elif kind == 2:
            core = f"{self.r.choice(ESTATES)}{num(self.r.randint(1, 30))}{self.r.choice(['栋', '幢', '号楼'])}{num(self.r.randint(1, 6))}单元{num(self.r.randint(1, 30) * 100 + self.r.randint(1, 4))}室"
        elif kind == 3:
            b, u, rm = self.r.randint(1, 30), self.r.randint(1, 6), self.r.randint(1, 30) * 100 + self.r.randint(1, 4)
            core = f"{self.r.choice(ESTATES)}{b}-{u}-{rm}" + self.r.choice(["室", ""])
        else:
            core = f"{road}{num(self.r.randint(1, 500))}弄{num(self.r.randint(1, 40))}号{num(self.r.randint(1, 20) * 100 + self.r.randint(1, 4))}室"
        return region, core

    def english_address(self) -> str:
        return (f"Room {self.r.randint(1, 30)}{self.r.randint(1, 4):02d}, Building {self.r.randint(1, 20)}, "
                f"No. {self.r.randint(1, 999)} {self.r.choice(['Jianguo', 'Wensan', 'Renmin', 'Zhongshan', 'Binjiang'])} Road")

    # -- values to keep
    def amount(self) -> str:
        x = self.r.random()
        if x < 0.3:
            return f"{self.r.randint(1, 999)},{self.r.randint(0, 999):03d}.{self.r.randint(0, 99):02d}元"
        if x < 0.5:
            return f"{self.r.randint(1, 500)}.{self.r.randint(1, 9)}万元"
        if x < 0.7:
            return f"¥{self.r.randint(1000, 99999)}.00"
        if x < 0.85:
            return f"人民币{self.r.choice(['伍拾万元整', '壹佰贰拾万元整', '叁万伍仟元整', '捌仟元整'])}"
        return f"{self.r.randint(100000, 9999999)}元"

    def date(self) -> str:
        d = dt.date(2019, 1, 1) + dt.timedelta(days=self.r.randint(0, 2000))
        return self.r.choice([f"{d.year}年{d.month}月{d.day}日", d.isoformat(), f"{d.year}/{d.month:02d}/{d.day:02d}",
                              f"{d.month}月{d.day}日", f"{d.year}{d.month:02d}{d.day:02d}"])

    def en_date(self) -> str:
        d = dt.date(2019, 1, 1) + dt.timedelta(days=self.r.randint(0, 2000))
        return self.r.choice([d.strftime("%d %B %Y"), d.strftime("%B %d, %Y"), d.isoformat()])

    def serial(self) -> tuple[str, str]:
        x = self.r.randrange(6)
        if x == 0:
            return "流水号", "LS" + self.digits(16)
        if x == 1:
            return "合同编号", f"HT-{self.r.randint(2019, 2025)}-{self.digits(4)}-{self.digits(3)}"
        if x == 2:
            return "工单号", f"GD{self.r.randint(2019, 2025)}{self.digits(8)}"
        if x == 3:
            # an all-digit transaction reference that is no card (fails Luhn) and no phone (starts 20)
            while True:
                s = "20" + self.digits(18)
                if self.luhn_complete(s[:-1]) != s:
                    return "交易参考号", s
        if x == 4:
            return "借据号", f"JJ{self.digits(12)}"
        return "审计底稿编号", f"SJ-{self.r.randint(2019, 2025)}-{self.digits(3)}"

    def branch_code(self) -> tuple[str, str]:
        return self.r.choice(["网点号", "机构号", "机构代码", "柜员号"]), self.digits(self.r.choice([4, 5, 6]))

    def ambiguous(self) -> tuple[str, str]:
        return self.r.choice(AMBIGUOUS_KEEP)


# ------------------------------------------------------------------------------------------ styles
# each style: f(rec, fake) appends text; names appear after varied cues, keep values next to them


def _name(rec: Record, f: Fake) -> None:
    rec.pii_("PERSON", f.zh_name(), "zh")


def _roman(rec: Record, f: Fake) -> None:
    rec.pii_("PERSON", f.roman_name(), "roman")


def _phone_any(rec: Record, f: Fake) -> None:
    if f.r.random() < 0.5:
        rec.pii_("MOBILE", f.mobile())
    else:
        rec.pii_("LANDLINE", f.landline())


def _keep_place_or_company(rec: Record, f: Fake) -> None:
    value, kind = f.ambiguous()
    rec.keep_(kind, value)


def credit_note(rec: Record, f: Fake) -> None:
    r = f.r
    rec.add("【授信调查报告】").add(r.choice(["借款人", "申请人", "借款申请人"])).add(r.choice(["", "：", " "]))
    _name(rec, f)
    rec.add("，身份证号").pii_("ID_CARD", f.id_card()).add("，现住")
    region, core = f.address()
    rec.add(region).pii_("ADDRESS", core).add("。")
    rec.add(r.choice(["共同借款人", "借款人配偶", "其配偶"])).add(r.choice(["", "为", "："]))
    _name(rec, f)
    rec.add("，联系电话").pii_("MOBILE", f.mobile()).add("。经营地位于").keep_("place", r.choice(PLACES))
    rec.add(r.choice(["，主营建材批发", "，经营服装加工", "，从事农产品批发"])).add("，申请金额").keep_("amount", f.amount())
    rec.add("，期限").keep_("amount", f"{r.choice([12, 24, 36])}个月").add("，年利率").keep_("rate", f"{r.choice(['3.85', '4.35', '5.2'])}%")
    rec.add("。担保人")
    _name(rec, f)
    rec.add(r.choice(["、", "和", "与", "及"]))
    _name(rec, f)
    rec.add("提供连带责任保证。还款账户").pii_("BANK_CARD", f.bank_card()).add("，")
    label, serial = f.serial()
    rec.add(label).keep_("serial", serial).add("。调查人：")
    _name(rec, f)
    rec.add(r.choice(["，复核人：", "；复核人 ", "  审批人："]))
    _name(rec, f)
    rec.add("，").keep_("branch", r.choice(BRANCHES)).add("，").keep_("date", f.date()).add("。")
    if r.random() < 0.5:
        rec.add("客户经理").pii_("PERSON", f.surname(), "zh").add(r.choice(["经理", "行长"])).add("建议在")
        _keep_place_or_company(rec, f)
        rec.add("网点放款。")


def collection_log(rec: Record, f: Fake) -> None:
    r = f.r
    rec.add("催收记录 ").keep_("date", f.date()).add(" 催收员：")
    _name(rec, f)
    rec.add(r.choice(["（工号", "（坐席"])).keep_("serial", f"{r.choice(['A', 'CS'])}{f.digits(4)}").add("）\n")
    rec.add(r.choice(["拨打", "外呼", "致电"])).add("借款人")
    _name(rec, f)
    rec.add("手机").pii_("MOBILE", f.mobile()).add(r.choice(["无人接听", "关机", "接通"])).add("；转拨单位座机")
    rec.add(r.choice(["", " ", "："])).pii_("LANDLINE", f.landline()).add("，")
    rec.add(r.choice(["来电人自称", "接电话者自称", "对方自称"])).add(r.choice(["是其同事", "是借款人哥哥", ""]))
    _name(rec, f)
    rec.add(r.choice(["，称", "，表示"])).add("借款人已于").keep_("date", f.date()).add("离职。")
    rec.add(r.choice(["借款人称", "客户表示"])).add(r.choice(["我爱人", "我老婆", "我丈夫", "我母亲", "我儿子"]))
    _name(rec, f)
    rec.add("会代为还款").keep_("amount", f.amount()).add("，逾期").keep_("amount", f"{r.randint(3, 180)}天")
    rec.add("。已提示可拨打").keep_("service", r.choice(SERVICE_NUMBERS)).add("咨询。")
    if r.random() < 0.6:
        rec.add("客户要求将款项转出至")
        _name(rec, f)
        rec.add("名下").add(r.choice(["的", ""])).add("账户").pii_("ACCOUNT", f.account()).add("。")
    if r.random() < 0.5:
        rec.add("紧急联系人")
        _name(rec, f)
        rec.add(r.choice(["（", "，"])).add(r.choice(["母亲", "朋友", "同事"])).add(r.choice(["）", "，"])).add("电话")
        _phone_any(rec, f)
        rec.add("。")
    rec.add("高峰期外呼，").keep_("place", r.choice(PLACES)).add("地区。")


def audit_paper(rec: Record, f: Fake) -> None:
    r = f.r
    label, serial = "底稿编号", f"SJ-{r.randint(2019, 2025)}-{f.digits(3)}"
    rec.add(f"审计工作底稿  {label}：").keep_("serial", serial).add("\n被审计单位：").keep_("branch", r.choice(BRANCHES))
    rec.add("\n审计人员：")
    _name(rec, f)
    rec.add(r.choice(["、", "，", " "]))
    _name(rec, f)
    rec.add("\n复核人：")
    _name(rec, f)
    rec.add("  日期：").keep_("date", f.date()).add("\n访谈对象：")
    _name(rec, f)
    rec.add(r.choice(["（信贷部经理）", "（柜员）", "，运营主管"])).add("。\n")
    rec.add("抽查").keep_("amount", f"{r.randint(20, 200)}笔").add("贷款，发现客户")
    _name(rec, f)
    rec.add("的贷款资金经").pii_("BANK_CARD", f.bank_card()).add("转入").keep_("company", r.choice(COMPANIES))
    rec.add("（统一社会信用代码").pii_("USCC", f.uscc()).add("），金额").keep_("amount", f.amount()).add("。")
    rec.add(r.choice(["柜员", "经办柜员", "客户经理"]))
    _name(rec, f)
    rec.add(r.choice(["未按规定核实身份", "称已电话核实", "表示不知情"])).add("。")
    rec.add("网点号").keep_("branch", f.digits(5)).add("。")
    if r.random() < 0.5:
        rec.add("整改责任人：")
        _name(rec, f)
        rec.add("，").keep_("place", r.choice(["高新区", "江宁区", "龙岗区", "白云区"])).add("支行。")


def email(rec: Record, f: Fake) -> None:
    r = f.r
    sender = f.zh_name()
    rec.add(r.choice(["发件人：", "From: "]))
    if r.random() < 0.5:
        rec.add('"').pii_("PERSON", sender, "zh").add('" <')
    else:
        rec.pii_("PERSON", sender, "zh").add(" <")
    rec.pii_("EMAIL", f.email()).add(">\n")
    rec.add(r.choice(["收件人：", "To: "]))
    _name(rec, f)
    rec.add(" <").pii_("EMAIL", f.email()).add(">")
    if r.random() < 0.6:
        rec.add("; ")
        _name(rec, f)
        rec.add(" <").pii_("EMAIL", f.email()).add(">")
    rec.add("\n" + r.choice(["抄送：", "Cc: "]))
    _name(rec, f)
    rec.add("\n主题：关于").keep_("company", r.choice(COMPANIES)).add("授信续作的意见\n\n")
    rec.add(r.choice(["各位好：", "您好，"])).add("\n附件为").keep_("branch", r.choice(BRANCHES)).add("报送的材料，")
    rec.add("申请额度").keep_("amount", f.amount()).add("。如有疑问请联系")
    _name(rec, f)
    rec.add("，电话").pii_("LANDLINE", f.landline()).add("。\n\n")
    rec.add(r.choice(["此致\n敬礼\n", "谢谢！\n", "顺祝商祺\n"])).pii_("PERSON", sender, "zh").add("\n")
    rec.keep_("branch", r.choice(BRANCHES)).add(" 公司金融部\n")
    rec.add("手机：").pii_("MOBILE", f.mobile()).add("\n")


def kyc_record(rec: Record, f: Fake) -> None:
    r = f.r
    rec.add("客户尽职调查表（KYC）\n客户姓名：")
    _name(rec, f)
    rec.add("  性别：").add(r.choice(["男", "女"])).add("  国籍：中国\n证件类型：")
    x = r.random()
    if x < 0.5:
        rec.add("居民身份证  证件号码：").pii_("ID_CARD", f.id_card())
    else:
        cue, num = f.passport()
        rec.add(cue).pii_("PASSPORT", num)
    rec.add("\n联系地址：")
    region, core = f.address()
    rec.add(region).pii_("ADDRESS", core).add("\n联系电话：")
    _phone_any(rec, f)
    rec.add("  电子邮箱：").pii_("EMAIL", f.email()).add("\n职业：")
    rec.add(r.choice(["个体工商户", "企业主", "公司职员"])).add("  工作单位：").keep_("company", r.choice(COMPANIES))
    rec.add("\n单位电话：").pii_("LANDLINE", f.landline()).add("\n车辆：").pii_("PLATE", f.plate())
    rec.add("\n实际控制人：")
    _name(rec, f)
    rec.add("  受益所有人：")
    _name(rec, f)
    rec.add("\n开户网点：").keep_("branch", r.choice(BRANCHES)).add("（机构号").keep_("branch", f.digits(4)).add("）")
    rec.add("\n客户风险等级：").add(r.choice(["低", "中", "高"])).add("  评定日期：").keep_("date", f.date()).add("\n")
    if r.random() < 0.5:
        cue, num = f.passport()
        rec.add("补充证件：").add(cue).pii_("PASSPORT", num).add("\n")


def complaint(rec: Record, f: Fake) -> None:
    r = f.r
    rec.add("投诉工单 ").keep_("serial", f"TS{r.randint(2019, 2025)}{f.digits(8)}").add("\n")
    rec.add(r.choice(["来电人：", "投诉人："]))
    _name(rec, f)
    rec.add(r.choice(["女士", "先生", ""])).add("，来电号码")
    _phone_any(rec, f)
    rec.add("\n坐席：").keep_("serial", f"{f.digits(5)}").add("号\n")
    rec.add("客户：你好，我是")
    _name(rec, f)
    rec.add("，我的卡").pii_("BANK_CARD", f.bank_card()).add("在").keep_("date", f.date()).add("被扣了").keep_("amount", f.amount())
    rec.add("。\n坐席：请问是哪位经办的？\n客户：是你们").keep_("branch", r.choice(BRANCHES)).add("的")
    rec.pii_("PERSON", f.surname(), "zh").add(r.choice(["经理", "主任", "行长", "总"])).add("，还有一个姓")
    rec.pii_("PERSON", f.surname(), "zh").add("的柜员。我住在")
    region, core = f.address()
    rec.add(region).pii_("ADDRESS", core).add("，你们可以上门。\n坐席：已登记，工单将转")
    _keep_place_or_company(rec, f)
    rec.add("相关部门，").keep_("amount", "2个工作日").add("内回复，也可拨打").keep_("service", r.choice(SERVICE_NUMBERS)).add("。\n")
    if r.random() < 0.5:
        rec.add("客户补充：我爱人")
        _name(rec, f)
        rec.add("的车").pii_("PLATE", f.plate()).add("也被扣了停车费。\n")


def mixed_en(rec: Record, f: Fake) -> None:
    r = f.r
    x = r.randrange(4)
    if x == 0:
        rec.add("From: ")
        _roman(rec, f)
        rec.add(" <").pii_("EMAIL", f.email()).add(">\nTo: ")
        _roman(rec, f)
        rec.add("\nSubject: Credit review - ").keep_("company", r.choice(["Bank of China", "Ping An Bank", "Hang Seng Bank",
                                                                       "China Merchants Bank", "Jiangsu Bank"])).add("\n\n")
        rec.add("Dear ").pii_("PERSON", r.choice(PINYIN_SURNAMES), "roman").add(",\n")
        rec.add("Please find the file for customer ")
        _roman(rec, f)
        rec.add(", ID ").pii_("ID_CARD", f.id_card()).add(", limit CNY ").keep_("amount", f"{r.randint(1, 99)},000,000.00")
        rec.add(". Contact person: ")
        _roman(rec, f)
        rec.add(", tel. ").pii_("LANDLINE", f.landline()).add(", mobile ").pii_("MOBILE", f.mobile())
        rec.add(".\nOffice: ").keep_("place", r.choice(["Wenzhou", "Jinhua", "Changshu", "Shijiazhuang", "Suzhou Industrial Park"])).add(" branch.\n")
        rec.add("Best regards,\n")
        _roman(rec, f)
        rec.add("\n")
    elif x == 1:
        rec.add("客户").pii_("PERSON", f.roman_name(), "roman").add(r.choice(["来电", "于"])).keep_("date", f.date())
        rec.add("咨询外汇汇款，passport ").pii_("PASSPORT", "E" + f.digits(8)).add("，联系人：")
        _roman(rec, f)
        rec.add("，电话").pii_("LANDLINE", f.landline()).add("。客户经理").pii_("PERSON", f.roman_name(), "roman")
        rec.add("已跟进，金额").keep_("amount", f"USD {r.randint(1, 99)},{f.digits(3)}").add("，热线").keep_("service", r.choice(SERVICE_NUMBERS)).add("。")
    elif x == 2:
        rec.add("Call log ").keep_("date", f.en_date()).add(": customer ")
        _roman(rec, f)
        rec.add(" (card ").pii_("BANK_CARD", f.bank_card()).add(") said her husband ")
        _roman(rec, f)
        rec.add(" would repay ").keep_("amount", f"CNY {r.randint(1000, 90000)}").add(" by ").keep_("date", f.en_date())
        rec.add(". Guarantor: ")
        _roman(rec, f)
        rec.add(", address ").pii_("ADDRESS", f.english_address()).add(", ").keep_("place", r.choice(["Chaoyang District, Beijing", "Pudong, Shanghai", "Wenzhou"]))
        rec.add(". Ticket ").keep_("serial", f"TKT-{r.randint(2019, 2025)}-{f.digits(5)}").add(".")
    else:
        rec.add("KYC note: Mr. ").pii_("PERSON", r.choice(PINYIN_SURNAMES), "roman").add(" (")
        _roman(rec, f)
        rec.add(") holds passport No. ").pii_("PASSPORT", "E" + r.choice("ABCDEFGHJK") + f.digits(7))
        rec.add(", works at ").keep_("company", r.choice(["Ping An Insurance", "Bank of Communications", "Huawei", "Hang Seng Bank"]))
        rec.add(" in ").keep_("place", r.choice(["Hangzhou", "Jinhua", "Wenzhou", "Changzhou"]))
        rec.add(". Relationship manager: ")
        _roman(rec, f)
        rec.add(", phone ").pii_("LANDLINE", f.landline()).add(". Reviewed by ")
        _roman(rec, f)
        rec.add(" on ").keep_("date", f.en_date()).add(".")


def narrative(rec: Record, f: Fake) -> None:
    """Running prose with names in subject and object positions and near ambiguous words."""
    r = f.r
    rec.add("经").keep_("branch", r.choice(BRANCHES)).add("客户经理")
    _name(rec, f)
    rec.add("实地走访，借款人")
    _name(rec, f)
    rec.add("经营的").keep_("company", r.choice(COMPANIES)).add("位于").keep_("place", r.choice(PLACES))
    rec.add("，近一年流水").keep_("amount", f.amount()).add("。")
    rec.add("其").add(r.choice(["妻子", "丈夫", "父亲", "弟弟"]))
    _name(rec, f)
    rec.add("名下有房产一处，位于")
    region, core = f.address()
    rec.add(region).pii_("ADDRESS", core).add("。")
    rec.add("经办人")
    _name(rec, f)
    rec.add("于").keep_("date", f.date()).add("与")
    _name(rec, f)
    rec.add(r.choice(["先生", "女士"])).add("面谈，对方").add(r.choice(["确认", "表示"])).add("于")
    _keep_place_or_company(rec, f)
    rec.add("无其他负债。")
    if r.random() < 0.5:
        rec.add("另据").pii_("PERSON", f.surname(), "zh").add(r.choice(["总", "经理", "主任", "师傅"])).add("介绍，客户常年在")
        rec.keep_("place", r.choice(PLACES)).add("从事批发。")
    rec.add("客服热线").keep_("service", r.choice(SERVICE_NUMBERS)).add("。")


STYLES = {"credit_note": credit_note, "collection_log": collection_log, "audit_paper": audit_paper, "email": email,
          "kyc": kyc_record, "complaint": complaint, "mixed_en": mixed_en, "narrative": narrative}


def generate(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    fake = Fake(rng)
    names = list(STYLES)
    out = []
    for i in range(n):
        style = names[i % len(names)]
        rec = Record(style)
        STYLES[style](rec, fake)
        out.append(rec.to_json(f"b{i:05d}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1200, help="records (default 1200)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    recs = generate(args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        for r in recs:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    n_pii = sum(len(r["pii"]) for r in recs)
    n_keep = sum(len(r["keep"]) for r in recs)
    print(f"{len(recs)} records, {n_pii} PII spans, {n_keep} keep spans -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
