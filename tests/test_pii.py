"""PII de-identification: every detector with valid and invalid examples, the modes, files, CLI, sample."""

from __future__ import annotations

import codecs
import importlib.util
import json
import time

import pytest

from banklm.cli import main
from corpora.ops.pii import (
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


def test_names_without_context_are_not_guessed():
    assert types_of("张伟和李娜去了银行") == []


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
    assert all(set(r) == {"file", "line", "reason", "line_sha256"} for r in rows)
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
