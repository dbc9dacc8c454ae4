"""Person-name recognizer of the PII step: Chinese names from a surname lexicon plus context, romanised names.

Why context and not every surname: almost every Chinese sentence holds a surname character (王, 高, 金,
文 ...), so a name is taken only where the text says a person stands there:

* a cue before it: a role or field label (借款人, 审计人员：, 复核人, 催收员, 访谈对象, 发件人 ...), a relation
  (我爱人, 其配偶, 自称, 我叫 ...) or a verb whose object is a person (致电, 转出至 ... 名下, 面谈);
* a cue after it: an honorific or title (先生, 女士, 经理, 行长, 总 ...) or a verb a person does (表示, 确认,
  签字, 名下 ...);
* a layout slot: an e-mail display name (``"王小明" <x@y.cn>``, ``From: Li Yirong <...>``) or the line after a
  sign-off (此致 敬礼, Best regards,);
* a layout slot: a table or tab-separated cell, the speaker column of a transcript, a ``LABEL：`` field whose
  label names a role (主持：, 检查人：), the other form of a found name in brackets (``Tony Leung（梁朝伟）``),
  a bracketed role after it (``杭海波（零售部）``);
* names listed before or after a found one (、 和 与 及 , ;) are taken too; distinctive compound surnames
  (欧阳, 司马, 诸葛, 尉迟 ...) are a name wherever they stand.

After a relation cue, or a label followed by a separator (：, space, 为), the surname need not be in the
lexicon (a 2-3 character word that ends at a hard boundary and contains no function character); elsewhere
it must be. Words that are also places or
companies (金华, 常熟, 高峰期, 江苏银行) are taken only when the context is strong (先生/女士 after them, or
they alone fill a labelled field) and never when a place or organisation suffix follows (金华分行, 温州市).

Names that stand in running text without any of these (``客户祁同伟在三个月内向高小琴转账``) are left to the
statistical scorer of ``namescore.py`` (features from jieba's dictionary and name HMM): its names that do
not overlap a rule's name are added, then names listed next to any found name, then every other mention of
a found name in the text (``_from_scorer``).

In a text about people -- a rule found a name, the caller found other personal data (``about_people``), a
rule nearly took a name in a strong slot, or the scorer is confident of one -- a neural NER model, Baidu LAC
(``lacner.py``), gives a second opinion (``_LacReview``): it confirms candidates the scorer rates just below
its threshold (林海发言, 何丽珍管收银), decides the rules' near misses (客户濮存明来信, a table cell with a surname
outside the lexicon, 艾力·买买提, the repeated mention 文静近三年 of a name found elsewhere, 客户和关联交易 vs
客户全志勇不满), and vetoes a scored or comma-listed name it reads inside a place or company (滕王阁,
苏州钮氏机械). It never runs on other text: it is ~100 times slower than the rest of this step.

Romanised names: two or three capitalised words of which one is a pinyin surname and the other a pinyin
given name (checked against the syllable inventory) or a Western given name, in either order
(``Li Yirong``, ``Yuhang Sima``, ``Leo Wang``, ``LI Yirong``); after an English cue (customer, Contact
person:, Mr., Dear, From:) any capitalised name is taken.

Returns ``(start, end)`` pairs; the caller resolves overlaps.
"""

from __future__ import annotations

import re

from . import lacner, namescore
from .names import (
    AMBIGUOUS_LENGTHS,
    AMBIGUOUS_NAME_WORDS,
    BOUNDARY_CHARS,
    COMPOUND_SURNAMES,
    DISTINCTIVE_COMPOUND_SURNAMES,
    ENGLISH_PINYIN_WORDS,
    FOLLOW_WORDS,
    FUNCTION_WORD_SURNAMES,
    NOT_GIVEN,
    NOT_NAME_FIELD_WORDS,
    NOT_NAME_LENGTHS,
    NOT_NAME_START,
    NOT_NAME_WORDS,
    PINYIN_MAX_SYLLABLE,
    PINYIN_SURNAMES,
    PINYIN_SYLLABLES,
    ROMAN_NOT_PERSON_NEXT,
    ROMAN_NOT_PERSON_PAIRS,
    ROMAN_STOP_WORDS,
    SINGLE_SURNAMES,
    WESTERN_GIVEN_NAMES,
)

__all__ = ["find_persons"]

_CJK = "\u4e00-\u9fff"


def _is_cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff"


def _trie_pattern(words) -> str:
    """One regex alternation factored as a trie (longest match first): ``re`` tries a flat alternation of
    hundreds of cue words one by one at every position, a trie only along the characters present (the
    cue scan ran at 37 MB/s flat, 62 MB/s as a trie)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def walk(node: dict) -> str:
        branches = [re.escape(ch) + walk(node[ch]) for ch in sorted(c for c in node if c)]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return walk(trie)


# ------------------------------------------------------------------------------------------ cues

# labels and roles: the name that follows may have a surname outside the lexicon
# labels and roles: the name that follows may have a surname outside the lexicon. (Kept short on
# purpose: every cue's first character is a place where the scan stops, so a cue that another one covers
# -- 客户经理 by 经理, 信贷员 by 员 -- or that starts with a very common character is left out.)
_LABEL_CUES = (
    "共同借款人", "共借人", "借款人配偶", "借款申请人", "紧急联系人", "法定代表人", "实际控制人", "受益所有人", "客户姓名", "账户名称", "开户名称", "账户名", "开户名", "户名",
    "姓名", "借款人", "联系人", "法人代表", "担保人", "保证人", "抵押人", "出质人", "质押人", "申请人", "收款人", "付款人", "经办人", "持卡人", "配偶", "被保险人",
    "投保人", "受益人", "委托人", "受托人", "代理人", "负责人", "责任人", "整改责任人", "来电人", "来电客户", "投诉人", "柜员", "经办柜员", "复核人", "复核员",
    "审核人", "审核员", "审批人", "审查人", "审查员", "调查人", "调查人员", "审计人员", "审计员", "审计组长", "主审", "催收员", "催收人员", "催收专员", "户主",
    "承租人", "出租人", "债务人", "债权人", "被执行人", "被告", "原告", "股东", "法人", "员工", "坐席", "专员", "访谈对象", "被访谈人", "受访人", "访谈人",
    "发件人", "收件人", "抄送", "记录人", "编制人", "填表人", "制表人", "检查人", "监交人", "见证人", "签字人", "授权人", "被授权人", "签收人", "领取人", "监护人",
    "购房人", "买受人", "出卖人", "主办", "协办", "客户", "推荐人", "介绍人", "报案人", "举报人", "From:", "To:", "Cc:", "CC:", "Bcc:", "Attn:",
    "From：", "To：", "Cc：", "名片", "出席", "列席", "参会人员", "汇报人", "参加人员", "陪同人员", "签发", "签批", "批准人", "核准人", "拟稿人", "报告人",
    "经手人", "交款人", "存款人", "取款人", "汇款人", "寄件人", "共有人", "房主", "车主", "自然人", "被调查人", "证人", "法人姓名", "借款人姓名", "联系人姓名",
    "客户名称", "收款方", "付款方", "收款户名", "付款户名", "对方户名", "户名为", "复核", "审核", "审批", "经办", "确认人", "回访人", "直系亲属",
    "甲方", "乙方", "买方", "卖方", "交出人", "接收人", "接交人", "移交人", "交接人",
)
# relations and self-introductions: also a person whatever the surname
_RELATION_CUES = (
    "自称", "名叫", "叫做", "我叫", "我是", "本人是", "署名", "落款", "签名", "我爱人", "我老婆", "我老公", "我丈夫",
    "我妻子", "我先生", "我太太", "我母亲", "我父亲", "我妈", "我爸", "我儿子", "我女儿", "我哥哥", "我姐姐", "我弟弟",
    "我妹妹", "我哥", "我姐", "我弟", "我妹", "其配偶", "其妻子", "其丈夫", "其父亲", "其母亲", "其儿子", "其女儿",
    "其妻", "其夫", "妻子", "丈夫", "父亲", "母亲", "儿子", "女儿", "哥哥", "姐姐", "弟弟", "妹妹", "爱人", "老公",
    "老婆", "同事", "朋友", "亲属", "邻居", "家属", "岳父", "岳母", "公公", "婆婆", "女婿", "儿媳", "媳妇", "老伴",
    "男朋友", "女朋友", "男友", "女友", "未婚妻", "未婚夫", "前妻", "前夫", "亲戚", "侄子", "外甥", "孙子", "孙女",
    "表哥", "表姐", "表弟", "表妹", "堂哥", "堂弟", "舅舅", "姨妈", "叔叔", "伯伯", "合伙人", "同学", "室友", "房东", "租客",
    "其弟", "其兄", "其姐", "其妹", "其子", "其女", "其母", "其父", "其哥", "其嫂", "其侄", "其孙", "之子", "之女",
    "之父", "之母", "之妻", "之夫", "之兄", "之弟", "之姐", "之妹",
)
# verbs whose object is a person: the surname must be in the lexicon
_VERB_CUES = (
    "致电", "去电", "回电", "联系", "拜访", "约见", "询问", "告知", "委托", "授权", "陪同", "转出至",
    "转至", "转入", "转账给", "转账至", "转给", "汇给", "汇款给", "汇至", "付款给", "支付给", "借给", "交给",
    "另据", "提醒", "催告", "感谢", "走访", "约谈", "协助", "转交", "移交给", "证明",
    "员", "签收人", "经理", "本人",
)
_CUE_SEP = r"(?:[0-9一二三四五]?[ \t]*[:：][ \t]*|[ \t]*(?:为|是|系)[ \t]*|[ \t]+|[（(])?"
# 其弟弟 / 我弟弟 as well as 弟弟: the trie takes the longest cue, so 其弟 would hide 弟弟 after it
_RELATION_CUES += tuple(p + w for w in _RELATION_CUES if w[0] not in "我其" and len(w) == 2 for p in "我其")
_CUE_KIND = {**{w: "verb" for w in _VERB_CUES}, **{w: "relation" for w in _RELATION_CUES},
             **{w: "label" for w in _LABEL_CUES}}
_CUE_RE = re.compile(f"(?P<cue>{_trie_pattern(_CUE_KIND)})(?P<sep>{_CUE_SEP})")
_ENUM_RE = re.compile(r"[ \t]*(?:、|，|,|和|及|与|/|；|;)[ \t]*|[ \t]+(?=[\u4e00-\u9fff])")

# honorifics (a surname alone before them is a person: 李女士) and titles (stricter left edge)
_HONORIFICS = ("先生", "女士", "小姐", "同志", "夫人", "太太")
_TITLES = ("副行长", "行长", "总经理", "副总经理", "副经理", "副主任", "副总监", "副科长", "副处长", "副部长", "经理", "主任", "老师", "师傅", "律师", "会计", "科长", "处长", "局长", "部长",
           "董事长", "主管", "专员", "老板", "阿姨", "大爷", "大姐", "大哥", "总监", "所长", "院长", "校长", "厂长",
           "村长", "书记", "医生", "警官", "法官", "教授", "博士", "老总")
# (two patterns: one alternation of both would lose ``re``'s fast scan for the first character)
_SUFFIX_RE = re.compile(f"{_trie_pattern(_HONORIFICS + _TITLES)}(?![产活成效意])")
_BOSS_RE = re.compile(r"总(?![额计行部体共是结量数价资分监裁督经值工公站台账包署局务则])")
# verbs a person does, right after the name
_AFTER_VERBS = ("表示", "声称", "反映", "确认", "承认", "否认", "同意", "拒绝", "承诺", "介绍", "告知", "签字", "签名",
                "签收", "来电", "来访", "致电", "到访", "陈述", "回复", "答复", "坦言", "名下", "本人", "夫妇", "之妻",
                "持护照", "持证", "持卡", "持有", "可代", "代为", "汇报", "签批", "出具", "负责", "联系电话", "手机号",
                "系夫妻", "系父子", "系父女", "系母子", "系母女", "系兄弟", "系姐妹", "系亲属", "系同事", "系朋友",
                "之夫", "称", "说", "认为", "提出", "反馈", "请求", "投诉", "咨询", "申请", "办理", "已于", "于")
_AFTER_VERB_RE = re.compile(_trie_pattern(_AFTER_VERBS))
_SURNAME_PREFIX_RE = re.compile(r"姓(?=[" + _CJK + r"])")

# characters that may stand right before a name found from a cue after it
_LEFT_PARTICLES = frozenset("的是找问请给跟和与向对让叫由据经、理长员人及同称被把将令至到从自")
# ... and, before a title only, the end of an organisation unit (公司部钱经理, 本所端木蓉律师)
_ORG_UNIT_END = frozenset("部处科室所局办组行司队")
_TITLE_WORD_PREFIXES = frozenset(("部门", "班主"))  # 部门经理, 班主任: not 门/班 + title
# words that stand before a title far more often than a name does: skip the look-back (speed only)
_TITLE_COMPOUNDS = frozenset(("客户", "理财", "项目", "大堂", "产品", "区域", "销售", "业务", "信贷", "支行", "分行", "总行",
                              "副", "总", "行", "室", "部", "处", "科", "营业", "运营", "会计", "风险", "授信"))

# a place or organisation word right after a candidate: it was a place (温州市, 金华分行), not a person
_PLACE_AFTER = ("分行", "支行", "银行", "农商", "信用社", "营业部", "网点", "地区", "一带", "当地", "本地", "市", "区",
                "县", "镇", "乡", "村", "省", "州", "路", "街", "大道", "港", "站", "机场", "公司", "集团", "大学",
                "火腿", "方面", "分公司", "办事处", "片区", "园区", "新区", "口岸", "海关", "人民", "中院", "法院", "东路",
                "西路", "南路", "北路", "籍", "人士", "话", "口音", "特产", "工业园", "商会", "协会", "城区", "郊区")
_PLACE_AFTER_LENS = sorted({len(w) for w in _PLACE_AFTER}, reverse=True)
_PLACE_AFTER_SET = frozenset(_PLACE_AFTER)
_CORP_TAIL = re.compile(r"[" + _CJK + r"A-Za-z0-9（）()]{0,12}?(有限责任公司|有限公司|股份公司|公司|集团|银行|支行|分行|"
                        r"商行|商店|超市|工厂|厂|中心|合作社|事务所|门市部|经营部|营业部|医院|学校|大学|协会|委员会|"
                        r"小区|大厦|广场|酒店|餐厅|饭店|市场)")
_VERBISH = frozenset("在于是为了的已将向从与及称说因被把对到")
# characters that never start a name even in a slot that holds only a name (a field after a colon)
_NOT_NAME_FIRST = frozenset("我你他她本该此某各贵敝全无暂待略详见同如若其另双对请")


# ------------------------------------------------------------------------------------ Chinese parts

def _surname_len(text: str, i: int) -> int:
    if text[i:i + 2] in COMPOUND_SURNAMES:
        return 2
    return 1 if i < len(text) and text[i] in SINGLE_SURNAMES else 0


def _prefix_len(text: str, i: int, words: frozenset, lengths: tuple) -> int:
    """Length of the longest word of ``words`` starting at ``i``, else 0."""
    for n in lengths:
        if text[i:i + n] in words:
            return n
    return 0


def _follow_word_at(text: str, j: int) -> bool:
    return text[j:j + 2] in FOLLOW_WORDS


def _hard_end(text: str, j: int) -> bool:
    """A name may end here whatever it is: end, punctuation/latin/digit, honorific, or a following word."""
    return (j >= len(text) or not _is_cjk(text[j]) or text.startswith(_HONORIFICS, j) or text.startswith(_TITLES, j)
            or _follow_word_at(text, j))


def _soft_end(text: str, j: int) -> bool:
    return _hard_end(text, j) or text[j] in BOUNDARY_CHARS


def _place_after(text: str, j: int) -> bool:
    return any(text[j:j + n] in _PLACE_AFTER_SET for n in _PLACE_AFTER_LENS)


def _strong_person_end(text: str, j: int) -> bool:
    """Evidence strong enough to read a place-like word (高峰, 金华) as a name."""
    return j >= len(text) or not _is_cjk(text[j]) or text.startswith(_HONORIFICS, j) or text.startswith(("手机", "电话", "身份"), j)


def _given_ok(given: str) -> bool:
    return all(_is_cjk(c) and c not in NOT_GIVEN for c in given)


def parse_name(text: str, i: int, *, fallback: bool = False, field: bool = False, label: bool = False) -> int | None:
    """End of a Chinese name starting at ``i`` (surname + 1-2 given characters), or None.

    ``fallback``: a label or relation cue precedes, so a surname outside the lexicon is accepted when the
    word ends at a hard boundary. ``field``: the label ends with a colon (调查人：…), so even a surname that
    is also a function character (年, 后, 有) is accepted there. ``label``: a role label precedes, so a
    known surname with a full given name is taken even when an unusual verb follows (收款人喻文洲误录).

    An end before a word that follows names (承认, 手机, 先生 ...) is preferred to an end before a mere
    function character, so 司马光承认 is 司马光, not 司马光承."""
    if i >= len(text) or not _is_cjk(text[i]):
        return None
    s = _surname_len(text, i)
    if s == 1 and text[i] in FUNCTION_WORD_SURNAMES and not (fallback or label):
        return None  # 向银行, 于近日: a weak cue is not enough for these
    unknown = s == 0
    if unknown:
        if not fallback or (text[i] in NOT_NAME_START and not (field and text[i] not in _NOT_NAME_FIRST)):
            return None
        s = 1
    if not unknown and (_SUFFIX_RE.match(text, i + s) or _BOSS_RE.match(text, i + s)):
        return i + s  # 另据尹主任介绍: the surname, then a title (not 尹主任 as a name)
    bl = _prefix_len(text, i, NOT_NAME_WORDS, NOT_NAME_LENGTHS)
    amb = _prefix_len(text, i, AMBIGUOUS_NAME_WORDS, AMBIGUOUS_LENGTHS)
    for hard_only in (True, False):
        for g in (2, 1):
            j = i + s + g
            if _name_fits(text, i, s, j, hard_only=hard_only or unknown, unknown=unknown, fallback=fallback,
                          bl=bl, amb=amb):
                c = _CORP_TAIL.match(text, i)
                if c and not any(ch in _VERBISH for ch in text[i:c.start(1)]):
                    return None  # 王记餐饮有限公司: a company, not a person
                return j
    if label and not unknown and not bl and not amb:
        j = i + s + 2
        if j <= len(text) and _given_ok(text[i + s:j]) and not _place_after(text, j) and not _CORP_TAIL.match(text, i):
            return j
    return None


def _name_fits(text: str, i: int, s: int, j: int, *, hard_only: bool, unknown: bool, fallback: bool, bl: int,
               amb: int) -> bool:
    """May ``text[i:j]`` (surname of ``s`` characters + given name) be a name ending at ``j``?"""
    if j > len(text) or (bl and j - i <= bl) or not _given_ok(text[i + s:j]) or _place_after(text, j):
        return False
    if not (_hard_end(text, j) if hard_only else _soft_end(text, j)):
        return False
    if unknown and text.startswith(_TITLES, j):
        return False  # 报告人：运营主管: a department before a title, not a name
    if amb and j - i <= amb and not (fallback and _strong_person_end(text, j)) and not text.startswith(_HONORIFICS, j):
        return False  # 金华分行, 来自温州: a place unless the context is strong
    if bl and not _strong_person_end(text, j):
        return False  # 黄金凤 alone is a name, 黄金业务 is not
    return text[i:j] not in NOT_NAME_FIELD_WORDS


def _left_edge_ok(text: str, i: int, *, strict: bool) -> bool:
    """May a name start at ``i``? Start of text, non-CJK, or a particle (strict) / any function char."""
    if i == 0 or not _is_cjk(text[i - 1]):
        return True
    c = text[i - 1]
    return c in _LEFT_PARTICLES or (not strict and c in BOUNDARY_CHARS)


def _name_before(text: str, a: int, *, strict: bool, allow_surname_only: bool, title: bool = False) -> int | None:
    """Start of a name ending at ``a`` (before a title or a verb), longest first, or None."""
    for n in (4, 3, 2, 1):
        i = a - n
        if i < 0:
            continue
        s = _surname_len(text, i)
        if not s or s > n or (s == n and not allow_surname_only):
            continue
        if s == 1 and text[i] in FUNCTION_WORD_SURNAMES and not title:
            continue
        given = text[i + s:a]
        if len(given) > 2 or (given and not _given_ok(given)):
            continue
        if given and (_SUFFIX_RE.match(text, i + s) or _BOSS_RE.match(text, i + s)):
            continue  # 尹主任介绍: a title, not a given name (the title pass finds 尹)
        if _prefix_len(text, i, NOT_NAME_WORDS, NOT_NAME_LENGTHS) >= n:
            continue
        if _prefix_len(text, i, AMBIGUOUS_NAME_WORDS, AMBIGUOUS_LENGTHS) >= n and not text.startswith(_HONORIFICS, a):
            continue
        if _left_edge_ok(text, i, strict=strict):
            return i
        if title and text[i - 1] in _ORG_UNIT_END and text[i - 1:i + 1] not in _TITLE_WORD_PREFIXES \
                and text[i:a + 1] not in _TITLE_WORD_PREFIXES:
            return i
    return None


def _from_prefix_cues(text: str, doubts: list | None = None) -> list[tuple[int, int]]:
    out = []
    for m in _CUE_RE.finditer(text):
        kind = _CUE_KIND[m.group("cue")]
        field = kind != "verb" and (":" in m.group("sep") or "：" in m.group("sep") or m.group("cue")[-1] in ":：")
        # a surname outside the lexicon only after a relation (自称, 我爱人) or a label followed by a separator
        # (保证人：X, 保证人 X), not glued to a label: 保证人代偿 is no name
        fallback = kind == "relation" or (kind == "label" and bool(m.group("sep")))
        label = kind == "label"
        i = m.end()
        if fallback and (u := _ORG_UNIT_RE.match(text, i)) and parse_name(text, u.end(), label=True):
            i = u.end()  # 联系人：授信部韦小宝
        while i < len(text):
            j = parse_name(text, i, fallback=fallback, field=field, label=label)
            if j is None:
                if doubts is not None and kind != "verb" and _is_cjk(text[i]) and text[i] not in _NOT_NAME_FIRST \
                        and text[i] not in NOT_NAME_START and not _prefix_len(text, i, NOT_NAME_WORDS, NOT_NAME_LENGTHS):
                    # 客户濮存明来信: LAC may know; a known surname after a label with a colon or a relation is
                    # strong enough to ask even in a text where nothing else points to a person
                    strong = bool(fallback and (field or kind == "relation") and _surname_len(text, i))
                    doubts.append(("start", i, min(len(text), i + 4), strong))
                break
            if doubts is not None and not fallback and text[i] in FUNCTION_WORD_SURNAMES and _surname_len(text, i) == 1 \
                    and not _hard_end(text, j):
                doubts.append(("weak", i, j, False))  # 客户和关联交易 or 客户全志勇不满: LAC decides when it runs
            else:
                out.append((i, j))
            e = _ENUM_RE.match(text, j)
            if not e:
                break
            # after 、 the list goes on whatever the surname; after a comma or a space only with a known one
            fallback = fallback and "、" in e.group()
            field = field and fallback
            i = e.end()
    return out


_ORG_UNIT_RE = re.compile(r"[\u4e00-\u9fff]{1,7}?(?:部|处|科|室|中心|组|支行|分行|营业部)")
_ROLE_IN_BRACKETS_RE = re.compile(
    r"[（(][^（）()\n]{0,8}?(?:部|处|科|室|中心|组|行|经理|主任|委员|行长|员|主管|总监|父亲|母亲|配偶|妻子|丈夫|儿子|"
    r"女儿|哥哥|姐姐|弟弟|妹妹|朋友|同事|亲属|本人|借款人|担保人|保证人|客户|股东|法人|男|女)[）)]")
_LIST_SEP_BEFORE = ("、", "和", "与", "及", "，")


def _from_bracketed_roles(text: str) -> list[tuple[int, int]]:
    """杭海波（零售部）, 练国栋（父亲）: a name followed by a role or relation in brackets."""
    out = []
    for m in _ROLE_IN_BRACKETS_RE.finditer(text):
        i = _name_before(text, m.start(), strict=False, allow_surname_only=False)
        if i is not None:
            out.append((i, m.start()))
    return out


def _list_neighbours(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The names listed right before a found one (郝建军、林芳夫妇): walk back over 、 和 与 及."""
    out = []
    todo = list(spans)
    while todo:
        s, _ = todo.pop()
        if s < 3 or not text.startswith(_LIST_SEP_BEFORE, s - 1):
            continue
        i = _name_before(text, s - 1, strict=False, allow_surname_only=False)
        if i is not None and (i, s - 1) not in out:
            out.append((i, s - 1))
            todo.append((i, s - 1))
    return out


def _from_suffix_cues(text: str) -> list[tuple[int, int]]:
    out = []
    for m in _SUFFIX_RE.finditer(text):
        a = m.start()
        if text[a - 2:a] in _TITLE_COMPOUNDS or text[a - 1:a] in _TITLE_COMPOUNDS:
            continue
        if m.group() in _HONORIFICS:
            start = _honorific_name(text, a)
        else:
            start = _name_before(text, a, strict=True, allow_surname_only=True, title=True)
        if start is not None:
            out.append((start, a))
    for m in _BOSS_RE.finditer(text):  # 王总, 欧阳总: a surname alone
        a = m.start()
        if a >= 2 and text[a - 2:a] in COMPOUND_SURNAMES:
            out.append((a - 2, a))
        elif a >= 1 and text[a - 1] in SINGLE_SURNAMES and _left_edge_ok(text, a - 1, strict=True):
            out.append((a - 1, a))
    return out


def _honorific_name(text: str, a: int) -> int | None:
    """Before 先生/女士: the longest name with a clean left edge, else the shortest (张先生 -> 张)."""
    shortest = None
    for n in (4, 3, 2, 1):
        i = a - n
        if i < 0:
            continue
        s = _surname_len(text, i)
        if not s or s > n:
            continue
        given = text[i + s:a]
        if len(given) > 2 or (given and not _given_ok(given)):
            continue
        if _prefix_len(text, i, NOT_NAME_WORDS, NOT_NAME_LENGTHS) >= n:
            continue
        shortest = i
        if _left_edge_ok(text, i, strict=True) or (text[i - 1] in BOUNDARY_CHARS and text[i] not in BOUNDARY_CHARS):
            return i
    return shortest


def _from_after_verbs(text: str) -> list[tuple[int, int]]:
    out = []
    for m in _AFTER_VERB_RE.finditer(text):
        a = m.start()
        if a < 2 or not _is_cjk(text[a - 1]) or _SURNAME_CHARS.isdisjoint(text[max(0, a - 4):a]):
            continue
        i = _name_before(text, a, strict=False, allow_surname_only=False)
        if i is not None and not _place_after(text, a):
            out.append((i, a))
    return out


_SURNAME_CHARS = frozenset(SINGLE_SURNAMES | {w[0] for w in COMPOUND_SURNAMES})


def _from_surname_prefix(text: str) -> list[tuple[int, int]]:
    """姓王的柜员, 一位姓欧阳的经理: the surname alone."""
    out = []
    for m in _SURNAME_PREFIX_RE.finditer(text):
        i = m.end()
        s = _surname_len(text, i)
        if s and (i + s >= len(text) or text[i + s] in "的，,。、 先女经" or not _is_cjk(text[i + s])):
            out.append((i, i + s))
    return out


_DISTINCTIVE_RE = re.compile(_trie_pattern(DISTINCTIVE_COMPOUND_SURNAMES))


def _from_distinctive_surnames(text: str) -> list[tuple[int, int]]:
    """欧阳静, 皇甫一鸣, 令狐冲: these compound surnames are names wherever they stand."""
    out = []
    for m in _DISTINCTIVE_RE.finditer(text):
        j = parse_name(text, m.start(), label=True)
        if j is not None:
            out.append((m.start(), j))
    return out


_CELL_RE = re.compile(r"(?:^|(?<=[\t|｜]))[ ]*([\u4e00-\u9fff]{2,4})(?=[ ]*[\t|｜]|[ ]*$|[ ]{2,}\S)", re.M)


def _from_table_cells(text: str, doubts: list | None = None) -> list[tuple[int, int]]:
    """A table or tab-separated cell holding only a name with a known surname (| 赵丽颖 |, \t郑晓燕\t)."""
    out = []
    for m in _CELL_RE.finditer(text):
        value = m.group(1)
        s = _surname_len(value, 0)
        # the given part must be possible in a name: not 房抵贷 (贷), not 周周享 (the surname repeated)
        if s and _cjk_name_alone(value) and _given_ok(value[s:]) and value[s] != value[s - 1]:
            out.append(m.span(1))
        elif doubts is not None and not s and len(value) == 3 and _cjk_name_alone(value) and _given_ok(value[1:]):
            doubts.append(("exact", *m.span(1), True))  # | 綦志华 |: a surname outside the lexicon
    return out


# a field label before a colon (主持：陆毅, 检查人：…, 参会：沙瑞金、李达康): found from the colon, which is cheap
# to scan for, instead of adding every such word to the cue scan
_FIELD_COLON_RE = re.compile(r"[:：][ \t]*(?=[\u4e00-\u9fff])")
_PERSON_FIELD_LABELS = frozenset(
    "主持 主持人 参会 参会人 出席 列席 记录 记录人 缺席 请假 汇报 汇报人 发言 发言人 经办 复核 审核 审批 审定 批准 签发 签批 "
    "会签 拟稿 核稿 校对 制表 制单 填报 填表 编制 编写 撰写 起草 检查 巡检 督导 带队 组长 副组长 组员 成员 负责 联络 "
    "主办 协办 主审 复审 初审 终审 出纳 会计 记账 录入 核对 授权 监督 见证 陪同 接待 讲师 主讲 培训师 考官 评委".split())


def _from_field_labels(text: str) -> list[tuple[int, int]]:
    """Names after ``LABEL：`` where the label names a role: one of the words above, or any word ending in
    人/员/者 (检查人, 出险人, 审计员, 申请者); the names after it may form a list (、)."""
    out = []
    for m in _FIELD_COLON_RE.finditer(text):
        k = m.start()
        label = next((text[k - n:k] for n in (4, 3, 2) if text[k - n:k] in _PERSON_FIELD_LABELS), None)
        if label is None and not (k >= 2 and text[k - 1] in "人员者" and _is_cjk(text[k - 2])):
            continue
        i = m.end()
        while i < len(text):
            j = parse_name(text, i, fallback=True, field=True, label=True)
            if j is None:
                break
            out.append((i, j))
            e = _ENUM_RE.match(text, j)
            if not e or "、" not in e.group() and "，" not in e.group() and "," not in e.group():
                break
            i = e.end()
    return out


_SPEAKER_RE = re.compile(r"^[ \t]*([\u4e00-\u9fff]{2,4})[ \t]*[:：]", re.M)


def _from_speaker_lines(text: str) -> list[tuple[int, int]]:
    """柴进：明天开会 / 史进：收到 -- a transcript's speakers, when at least two lines start with a name."""
    found = [m.span(1) for m in _SPEAKER_RE.finditer(text)
             if _surname_len(m.group(1), 0) and _given_ok(m.group(1)[_surname_len(m.group(1), 0):])
             and _cjk_name_alone(m.group(1))]
    return found if len({text[s:e] for s, e in found}) >= 2 else []


# a role noun ending in 人 right before a name: 出险人封晓雅, 回访人邢岫烟 (the name must end cleanly)
_ROLE_REN_RE = re.compile("人(?<=[\u4e00-\u9fff]人)(?=[" + "".join(sorted(SINGLE_SURNAMES)) + "])")


def _from_role_suffix(text: str) -> list[tuple[int, int]]:
    out = []
    for m in _ROLE_REN_RE.finditer(text):
        i = m.end()
        j = parse_name(text, i)
        if j is not None and _hard_end(text, j):
            out.append((i, j))
    return out


_ALIAS_RE = re.compile(r"[ ]?[（(]([\u4e00-\u9fff]{2,4}|[A-Z][A-Za-z\-]+(?: [A-Z][A-Za-z\-]+){1,2})[）)]")


def _aliases(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The other form of a found name written in brackets right after it: Tony Leung（梁朝伟）, 王芳 (Wang Fang)."""
    out = []
    for _, e in spans:
        m = _ALIAS_RE.match(text, e)
        if not m:
            continue
        value = m.group(1)
        if (_is_cjk(value[0]) and _surname_len(value, 0) and _cjk_name_alone(value)) or \
                (not _is_cjk(value[0]) and _roman_tokens_ok(value.split(" "), lenient=True)):
            out.append(m.span(1))
    return out


# ---------------------------------------------------------------------------------------- romanised

_TOKEN = r"(?:[A-Z][a-z]+(?:-[A-Za-z][a-z]+)?|[A-Z]{2,}(?:-[A-Z]{2,})?)"
_ROMAN_RE = re.compile(rf"[A-Z](?<![A-Za-z0-9.@_\-][A-Z])(?:[a-z]+(?:-[A-Za-z][a-z]+)?|[A-Z]+(?:-[A-Z]{{2,}})?)"
                       rf"(?:[ ]{_TOKEN}){{1,2}}(?![A-Za-z0-9@])")
_EN_CUE_RE = re.compile(
    r"(?:\b(?:[Cc]ustomer|[Cc]lient|[Bb]orrower|[Cc]o-borrower|[Gg]uarantor|[Aa]pplicant|[Cc]ontact(?: [Pp]erson)?|"
    r"[Rr]elationship [Mm]anager|RM|[Oo]fficer|[Mm]anager|[Rr]eviewed by|[Pp]repared by|[Aa]pproved by|[Cc]hecked by|"
    r"[Ss]igned by|[Nn]ame|[Aa]ccount [Nn]ame|[Bb]eneficiary|[Pp]ayee|[Pp]ayer|[Hh]usband|[Ww]ife|[Ss]pouse|[Ss]on|"
    r"[Dd]aughter|[Ff]ather|[Mm]other|[Bb]rother|[Ss]ister|[Pp]artner|[Ff]riend|[Ww]itness|[Nn]otary|[Dd]irector|"
    r"[Cc]olleague|[Ss]ender|[Rr]ecipient|[Aa]ttn|[Aa]ttention|[Ff]rom|[Tt]o|[Cc]c|"
    r"Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Dear|Hi|Hello|[Ii]nterviewee|[Aa]uditor|[Cc]aller|[Cc]omplainant|[Aa]gent|[Tt]eller)"
    r"|客户|联系人|经理|客户经理|借款人|担保人|收件人|发件人|抄送|来电人|自称|我叫|我是)"
    r"\.?[ \t]*[:：,]?[ \t]*$")
_INVERTED_RE = re.compile(r"([A-Z](?<![A-Za-z][A-Z])[A-Z]+),[ ]?([A-Z][a-z]+(?:-[a-z]+)?)(?![A-Za-z])")
# (it starts with a character class so that ``re`` skips ahead to the next M/D/P: 4x faster on prose)
_TITLE_SURNAME_RE = re.compile(rf"[MDP](?:(?<=M)(?:rs|r|s|iss|x)|(?<=D)(?:r|ear)|(?<=P)rof)\.?[ ]+"
                               rf"(?:(?:M(?:rs|r|s|iss|x)|D(?:r|ear)|Prof)\.?[ ]+)*({_TOKEN})(?![A-Za-z])")


def _pinyin_word(word: str, max_syllables: int = 3) -> bool:
    """Is ``word`` (lower case, hyphens allowed) 1..max_syllables pinyin syllables?"""
    w = word.replace("-", "").replace("ü", "v")
    return bool(w) and _split_pinyin(w, max_syllables)


def _split_pinyin(w: str, budget: int) -> bool:
    if not w:
        return True
    if budget == 0:
        return False
    for n in range(min(PINYIN_MAX_SYLLABLE, len(w)), 0, -1):
        if w[:n] in PINYIN_SYLLABLES and _split_pinyin(w[n:], budget - 1):
            return True
    return False


# a hyphenated Hong Kong given name (Siu-fai, Ka-ming, Chi-wai): two short syllables, not necessarily pinyin
_CANTONESE_GIVEN_RE = re.compile(r"[A-Z][a-z]{1,4}-[a-z]{2,5}")


def _roman_pair(a: str, b: str, *, lenient: bool) -> bool:
    la, lb = a.lower(), b.lower()
    if la in ROMAN_STOP_WORDS or lb in ROMAN_STOP_WORDS:
        return False
    sur_a, sur_b = la.replace("-", "") in PINYIN_SURNAMES, lb.replace("-", "") in PINYIN_SURNAMES
    giv_a = _pinyin_word(la) or la in WESTERN_GIVEN_NAMES or bool(_CANTONESE_GIVEN_RE.fullmatch(a))
    giv_b = _pinyin_word(lb) or lb in WESTERN_GIVEN_NAMES or bool(_CANTONESE_GIVEN_RE.fullmatch(b))
    ok = (sur_a and giv_b) or (sur_b and giv_a)
    if lenient:
        return ok or la in WESTERN_GIVEN_NAMES or (giv_a and giv_b)
    if not ok:
        return False
    if la in ENGLISH_PINYIN_WORDS and lb in ENGLISH_PINYIN_WORDS:
        return False
    return f"{la} {lb}" not in ROMAN_NOT_PERSON_PAIRS


def _roman_tokens_ok(tokens: list[str], *, lenient: bool) -> int:
    """How many leading tokens form a name (3, 2) or 0."""
    if len(tokens) >= 3:
        a, b, c = tokens[:3]
        if a.lower() in WESTERN_GIVEN_NAMES and (_roman_pair(b, c, lenient=False) or
                                                 (lenient and _roman_pair(b, c, lenient=True))):
            return 3  # Kevin Zhang Wei
        if " ".join(t.lower() for t in tokens[:3]) in ROMAN_NOT_PERSON_PAIRS:
            return 0
    three = len(tokens) >= 3 and tokens[0].lower().replace("-", "") in PINYIN_SURNAMES \
        and _syllable_given(tokens[1], tokens[2], lenient)
    if len(tokens) >= 2 and _roman_pair(tokens[0], tokens[1], lenient=lenient):
        return 3 if three else 2  # Cheung Mei Ling: a surname and two one-syllable given names
    return 3 if three and lenient else 0  # after a cue: Tan Boon Huat


_SHORT_SYLLABLE_RE = re.compile(r"[A-Z][a-z]{1,5}")


def _syllable_given(b: str, c: str, lenient: bool) -> bool:
    """Two given-name syllables written apart: pinyin/Cantonese single syllables, or after a cue any short
    capitalised syllables (Hokkien Boon Huat)."""
    lb, lc = b.lower(), c.lower()
    if lb in ROMAN_STOP_WORDS or lc in ROMAN_STOP_WORDS or lc in WESTERN_GIVEN_NAMES or lc in ENGLISH_PINYIN_WORDS:
        return False
    if _pinyin_word(lb, 1) and _pinyin_word(lc, 1):
        return True
    return lenient and bool(_SHORT_SYLLABLE_RE.fullmatch(b) and _SHORT_SYLLABLE_RE.fullmatch(c))


def _next_word(text: str, j: int) -> str:
    m = re.match(r"[ \t]*([A-Za-z][A-Za-z.\-]*)", text[j:j + 30])
    return m.group(1).lower().rstrip(".") if m else ""


def _has_en_cue(text: str, i: int) -> bool:
    return bool(_EN_CUE_RE.search(text[max(0, i - 40):i]))


def _from_roman(text: str) -> list[tuple[int, int]]:
    out = []
    pos = 0
    while m := _ROMAN_RE.search(text, pos):
        tokens = m.group().split(" ")
        starts = [m.start()]
        for t in tokens[:-1]:
            starts.append(starts[-1] + len(t) + 1)
        pos = m.end()
        for k in range(len(tokens) - 1):  # try the window at each token (a cue word may lead the run)
            lenient = _has_en_cue(text, starts[k])
            n = _roman_tokens_ok(tokens[k:], lenient=lenient)
            if n:
                end = starts[k] + len(" ".join(tokens[k:k + n]))
                if _next_word(text, end) not in ROMAN_NOT_PERSON_NEXT:
                    out.append((starts[k], end))
                    break
        else:
            if len(tokens) == 3:  # 「Our RM Karen」 Yip: the last word may open a name with the next one
                pos = starts[-1]
    for m in _INVERTED_RE.finditer(text):  # WANG, Xiaoming (passport order)
        if m.group(1).lower() in PINYIN_SURNAMES and _pinyin_word(m.group(2).lower()):
            out.append(m.span())
    for m in _TITLE_SURNAME_RE.finditer(text):
        if (m.start() == 0 or not text[m.start() - 1].isalpha()) and m.group(1).lower() not in ROMAN_STOP_WORDS:
            out.append(m.span(1))
    return out


# ------------------------------------------------------------------------------------ layout slots

_EMAIL_TAIL = r"[ \t]*[<＜][^<>＜＞\s@]+@[^<>＜＞\s]+[>＞]"
_DISPLAY_RE = re.compile(r'(?:"([^"<>\n]{1,40})"|“([^”<>\n]{1,40})”|([^\s"<>：:;,，；、]{2,6}|'
                         + _TOKEN + r"(?:[ ]" + _TOKEN + r"){1,2}))" + _EMAIL_TAIL)
_SIGNOFF_RE = re.compile(
    r"(?:此致[ \t]*\r?\n?[ \t]*敬礼|敬礼|谢谢|顺祝(?:商祺|时祺|安好|工作顺利)|祝好|祝工作顺利|"
    r"Best regards|Kind regards|Warm regards|Regards|Best wishes|Best|Thanks|Thank you|Sincerely|Yours sincerely|"
    r"Yours faithfully|Cheers)[ \t]*[,，！!。.]?[ \t]*\r?\n[ \t]*")


_ORG_CHARS = frozenset("部门组中心行司处科室团队办局会系统客服通知中台群站厂店社院校所")


def _cjk_name_alone(value: str) -> bool:
    """A slot that holds only a person's name (display name, signature line): 2-4 CJK characters that
    are not an organisation, a place or a common word; the surname need not be in the lexicon."""
    return (2 <= len(value) <= 4 and all(_is_cjk(c) for c in value) and value[0] not in _NOT_NAME_FIRST
            and not any(c in _ORG_CHARS for c in value[1:]) and value not in NOT_NAME_FIELD_WORDS
            and not _prefix_len(value, 0, NOT_NAME_WORDS, NOT_NAME_LENGTHS)
            and value not in AMBIGUOUS_NAME_WORDS and (len(value) < 4 or value[:2] in COMPOUND_SURNAMES))


def _display_name_span(text: str, s: int, e: int) -> tuple[int, int] | None:
    """A display name (quoted or bare) that is a person: Chinese 2-4 characters or a romanised name."""
    value = text[s:e].strip()
    s += len(text[s:e]) - len(text[s:e].lstrip())
    e = s + len(value)
    if value and all(_is_cjk(c) for c in value):
        return (s, e) if _cjk_name_alone(value) else None
    tokens = value.split()
    if 2 <= len(tokens) <= 3 and all(re.fullmatch(_TOKEN, t) for t in tokens):
        return (s, e) if _roman_tokens_ok(tokens, lenient=True) or _roman_tokens_ok(tokens[::-1], lenient=True) else None
    return None


def _from_email_slots(text: str) -> list[tuple[int, int]]:
    out = []
    for m in _DISPLAY_RE.finditer(text):
        g = next(k for k in (1, 2, 3) if m.group(k) is not None)
        span = _display_name_span(text, m.start(g), m.end(g))
        if span:
            out.append(span)
    return out


_DASH_SIGNATURE_RE = re.compile(r"(?:——|—|--)[ \t]*([\u4e00-\u9fff]{2,4})[ \t]*(?=\r?\n|$)")


def _from_signatures(text: str) -> list[tuple[int, int]]:
    out = []
    if "—" in text or "--" in text:  # 「……请给出说明。——易建联」: a signature after a dash at the end of a line
        out += [m.span(1) for m in _DASH_SIGNATURE_RE.finditer(text) if _cjk_name_alone(m.group(1))]
    for m in _SIGNOFF_RE.finditer(text):
        i = m.end()
        line_end = text.find("\n", i)
        line = text[i:line_end if line_end >= 0 else len(text)].rstrip()
        if _cjk_name_alone(line):
            out.append((i, i + len(line)))
            continue
        j = parse_name(text, i, fallback=True)
        if j is not None:
            out.append((i, j))
            continue
        tokens = line.split(" ")
        if 2 <= len(tokens) <= 3 and all(re.fullmatch(_TOKEN, t) for t in tokens) and \
                _roman_tokens_ok(tokens, lenient=True):
            out.append((i, i + len(line)))
    return out


# ------------------------------------------------------------------------------------------- public

def find_persons(text: str, about_people: bool = False) -> list[tuple[int, int]]:
    """Candidate person-name spans of ``text`` (may overlap; the caller resolves). ``about_people``: the
    caller found other personal data in the text (a phone, an ID ...), which lets LAC review doubtful names
    even when no rule found a name."""
    doubts: list[tuple[str, int, int, bool]] = []  # where a rule nearly took a name: LAC decides (see _from_scorer)
    out = _from_prefix_cues(text, doubts)
    out += _from_suffix_cues(text)
    out += _from_after_verbs(text)
    if "姓" in text:
        out += _from_surname_prefix(text)
    if "@" in text:
        out += _from_email_slots(text)
    if "\n" in text or "—" in text:
        out += _from_signatures(text)
    if _HAS_CAPITAL.search(text):
        out += _from_roman(text)
    out += _from_distinctive_surnames(text)
    if "\t" in text or "|" in text or "｜" in text or "  " in text:
        out += _from_table_cells(text, doubts)
    if "\n" in text:
        out += _from_speaker_lines(text)
    if "：" in text or ":" in text:
        out += _from_field_labels(text)
    out += _from_role_suffix(text)
    if "（" in text or "(" in text:
        out += _from_bracketed_roles(text)
        out += _aliases(text, out)
    out += _list_neighbours(text, out)
    if "·" in text:
        doubts += [("dot", *m.span(), True) for m in _DOT_NAME_RE.finditer(text)]
    return out + _from_scorer(text, out, doubts, about_people)


# a transliterated (Uyghur, Kazakh, Manchu ...) name: parts joined by a middle dot (艾力·买买提, 钮祜禄·敏)
_DOT_NAME_RE = re.compile(r"[\u4e00-\u9fff]{1,6}·[\u4e00-\u9fff]{1,8}(?:·[\u4e00-\u9fff]{1,8})?")


def _not_a_person(text: str, i: int, j: int) -> bool:
    """The scorer's veto: a place or organisation word after the candidate (温州市, 金华分行), a surname that
    is also a function character before a place or an ambiguous word (于文明, 于钟祥, 向温州), or a company
    name starting there (王记餐饮有限公司)."""
    if _place_after(text, j):
        return True
    if text[i] in FUNCTION_WORD_SURNAMES and text[i + 1:j] in AMBIGUOUS_NAME_WORDS:
        return True
    c = _CORP_TAIL.match(text, i)
    return bool(c) and not any(ch in _VERBISH for ch in text[i:c.start(1)])


def _from_scorer(text: str, found: list[tuple[int, int]], doubts=(), about_people: bool = False) -> list[tuple[int, int]]:
    """Names without a cue (namescore.py), reviewed by LAC where the text is about people; names listed next
    to any found name; the other occurrences of every found name. Scored candidates overlapping a name the
    rules found are dropped."""
    lac = lacner.available()
    gate = lac and (found or about_people or any(d[3] for d in doubts) or lacner.everywhere())
    cands = namescore.scored_candidates(text, LAC_LOW if gate else namescore.THRESHOLD, veto=_not_a_person, blocked=gate)
    if not (cands or found or doubts or about_people):
        return []  # ordinary prose: nothing to list, repeat or review
    if lac and not gate and any(sc > LAC_GATE_SCORE and not v for sc, _, _, v in cands):
        gate = True  # (score again, lower: a text about people)
        cands = namescore.scored_candidates(text, LAC_LOW, veto=_not_a_person, blocked=True)
    thr = namescore.THRESHOLD
    scored = [(i, j) for i, j in namescore.best_non_overlapping(
        [(sc, i, j) for sc, i, j, v in cands if sc > thr and not v]) if _free(i, j, found)]
    weak = [(i, j) for kind, i, j, _ in doubts if kind == "weak"]
    review = None
    if gate:
        review = _LacReview(text)
        scored = review.check(scored)
        scored += review.confirm_candidates(cands, found + scored)
        scored += review.confirm_doubts(list(doubts) + _extensions(text, found), found + scored)
    else:
        found = found + weak
        scored = [sp for sp in scored if _free(*sp, weak)] + weak
        if lac and "·" in text:
            scored += _LacReview(text).confirm_doubts([d for d in doubts if d[0] == "dot"], found + scored)
    spans = found + scored
    listed = namescore.list_neighbours(text, spans, veto=_not_a_person)
    if review is not None:  # after a comma a list is weak evidence (我姓滕，滕王阁的滕): LAC may veto a place
        comma = [sp for sp in listed if _comma_listed(text, *sp)]
        if comma:
            vetoed_listed = set(comma) - set(review.check(comma))
            listed = [sp for sp in listed if sp not in vetoed_listed]
    spans += listed
    vetoed: list[tuple[int, int]] = []
    corefs = namescore.coreferences(text, spans, veto=_not_a_person, vetoed=vetoed if review else None)
    if vetoed:
        corefs += review.confirm_doubts([("exact", i, j, False) for i, j in vetoed], [])
    return scored + listed + corefs


def _comma_listed(text: str, i: int, j: int) -> bool:
    k = i
    while k > 0 and text[k - 1] in " \t":
        k -= 1
    return k > 0 and text[k - 1] in "，," or text[j:j + 1] in ("，", ",")


def _free(i: int, j: int, spans) -> bool:
    return all(j <= a or i >= b for a, b in spans)


# LAC (lacner.py) reviews the scorer where a text is about people: where a rule found a name, the caller found
# other personal data (about_people), a near miss of a rule is strong (a cue with a colon or a relation
# before a known surname, a table cell, a dotted name), or the scorer rates a name above LAC_GATE_SCORE.
# Elsewhere -- ordinary prose -- it never runs: one LAC call costs as much as the rest of the step on some
# 2,000 characters. In a reviewed text it sees candidates down to LAC_LOW (the scorer's threshold is 0).
LAC_LOW = -4.0
LAC_GATE_SCORE = 2.0
_FUNCTION_TAGS = frozenset(("p", "c", "u", "d", "r", "xc", "f", "q", "m"))


def _extensions(text: str, found) -> list[tuple[str, int, int, bool]]:
    """Two-character names the rules found before a character that may end a given name (借款人阎立|本配合):
    LAC may read the longer name."""
    return [("extend", i, j + 1, False) for i, j in found
            if j - i == 2 and j < len(text) and _is_cjk(text[j]) and text[j] not in namescore.FUNCTION_CHARS]


class _LacReview:
    """LAC's words around the spans asked about in one text (one batch per question)."""

    def __init__(self, text: str):
        self.text = text

    def words(self, items) -> list[list[tuple[int, int, str]]]:
        """LAC's words (start, end, tag) in text offsets, over the segment around each ``(start, end)``."""
        text = self.text
        segs = [lacner.segment_around(text, i, j) for i, j in items]
        tags = lacner.tag_segments([text[a:b] for a, b in segs])
        return [[(a + x, a + y, t) for x, y, t in w] for (a, _), w in zip(segs, tags, strict=True)]

    def check(self, spans) -> list[tuple[int, int]]:
        """The scorer's names less those LAC reads inside a place or organisation (滕王阁, 苏州钮氏机械);
        where LAC reads a longer or shifted person name, the union of both."""
        if not spans:
            return []
        out = []
        for (i, j), w in zip(spans, self.words(spans), strict=True):
            cover = [(a, b, t) for a, b, t in w if a < j and i < b]
            per = [(a, b) for a, b, t in cover if t == "PER"]
            if per:
                out.append((min(i, per[0][0]), max(j, per[-1][1])))
            elif not any(t in ("LOC", "ORG") for _, _, t in cover):
                out.append((i, j))
        return out

    def confirm_candidates(self, cands, taken) -> list[tuple[int, int]]:
        """Candidates the scorer rates just below its threshold that LAC tags as a person: exactly, or one
        character longer or shorter for a name of three (何丽|珍管收银). Not a vetoed one (an ambiguous word,
        a place after it): LAC alone also tags 文静的性格 and 林海雪|原 PER; a vetoed word is taken only as
        the repeated mention of a name found elsewhere (``coreferences``)."""
        thr = namescore.THRESHOLD
        band = [(sc, i, j) for sc, i, j, v in cands if sc <= thr and not v and _free(i, j, taken)]
        if not band:
            return []
        ok = []
        for (sc, i, j), w in zip(band, self.words([(i, j) for _, i, j in band]), strict=True):
            for a, b, t in w:
                if t == "PER" and a == i and (b == j or abs(b - j) == 1 and b - a >= 2):
                    ok.append((sc, i, max(b, j)))
                    break
        return [(i, j) for i, j in namescore.best_non_overlapping(ok) if _free(i, j, taken)]

    def confirm_doubts(self, doubts, taken) -> list[tuple[int, int]]:
        """The rules' near misses, decided by LAC: ``start`` a PER word where a cue's name would start
        (客户濮存明来信); ``exact`` a PER word that is exactly the span (a table cell, a repeated mention);
        ``extend`` the same, one character longer than a found name; ``dot`` a dotted name, taken from LAC's
        word before the dot to its word after it when either is PER (艾力·买买提); ``weak`` a name after a
        label glued to a function-character surname (客户全志勇不满), taken unless LAC reads that character
        as a function word or a word crossing its end (客户和关联交易)."""
        text = self.text
        doubts = [d for d in doubts if _free(d[1], d[2], [(a, b) for a, b in taken if not (d[1] <= a and b <= d[2])])]
        if not doubts:
            return []
        out: list[tuple[int, int]] = []
        for (kind, i, j, _), w in zip(doubts, self.words([(d[1], d[2]) for d in doubts]), strict=True):
            per = [(a, b) for a, b, t in w if t == "PER"]
            span = None
            if kind == "start":
                span = next(((a, b) for a, b in per if a == i and 2 <= b - a <= 4), None)
            elif kind in ("exact", "extend"):
                span = (i, j) if (i, j) in per else None
            elif kind == "weak":
                if not any(a == i and b == i + 1 and t in _FUNCTION_TAGS or i < a < j < b or a < i < b < j
                           for a, b, t in w):
                    span = (i, j)
            else:
                span = _dotted_name(text, i, j, w)
            if span and (kind in ("dot", "extend") or _free(*span, taken + out)):
                out.append(span)
        return out


def _dotted_name(text: str, i: int, j: int, words) -> tuple[int, int] | None:
    by_end = {b: (a, t) for a, b, t in words}
    by_start = {a: (b, t) for a, b, t in words}
    for k in range(i, j):
        if text[k] == "·" and k in by_end and k + 1 in by_start:
            (a, lt), (b, rt) = by_end[k], by_start[k + 1]
            if "PER" in (lt, rt) and all(_is_cjk(c) or c == "·" for c in text[a:b]):
                return a, b
    return None


# every romanised pattern needs two capitalised words next to each other (Li Yirong, WANG, Xiaoming, Mr. Li):
# the romanised pass is skipped on text without them (most English sentences in Chinese prose)
_HAS_CAPITAL = re.compile(r"[A-Z][A-Za-z\-]*(?:,[ ]?|\.?[ ]+)[A-Z]")
