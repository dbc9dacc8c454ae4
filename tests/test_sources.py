import json
from collections import Counter

import pytest
from banklm.corpora.sources import Bad, detect_encoding, html_to_text, markdown_to_text, read_sources

SAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "corpora" / "samples"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _read(path, **spec):
    return read_sources([{"path": str(path), **spec}], seed=0)


# ------------------------------------------------------------------------------------------- readers


def test_jsonl_keeps_ids_and_derives_missing_ones(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": "x1", "text": "第一篇"}, {"text": "第二篇"}, {"id": 7, "text": "第三篇"}])
    ds, st, q = _read(tmp_path / "a.jsonl")
    assert ds["id"] == ["x1", f"{tmp_path.name}/a.jsonl:2", "7"]
    assert ds["text"] == ["第一篇", "第二篇", "第三篇"]
    assert st["kind"] == "text" and st["records"] == 3 and q == []
    again, _, _ = _read(tmp_path / "a.jsonl")
    assert again["id"] == ds["id"]  # deterministic


def test_json_array_and_object_with_list(tmp_path):
    (tmp_path / "arr.json").write_text('[\n {"text": "甲"},\n {"text": 5},\n {"text": "丙"}\n]', encoding="utf-8")
    ds, st, q = _read(tmp_path / "arr.json", name="s")
    assert ds["text"] == ["甲", "丙"] and ds["id"] == ["s/arr.json:2", "s/arr.json:4"]
    assert q == [{"file": str(tmp_path / "arr.json"), "line": 3,
                  "reason": "wrong_type: field 'text' is int, expected string"}]
    (tmp_path / "obj.json").write_text(json.dumps({"version": 1, "data": [{"text": "乙"}, {"text": "丁"}]}),
                                       encoding="utf-8")
    ds, _, _ = _read(tmp_path / "obj.json")
    assert ds["text"] == ["乙", "丁"]


def test_csv_tsv_with_field_map(tmp_path):
    (tmp_path / "a.csv").write_text('doc_id,content\nd1,"贷款, 利率"\nd2,"多行\n文本"\nd3\n', encoding="utf-8")
    ds, st, q = _read(tmp_path / "a.csv", field_map={"id": "doc_id", "text": "content"})
    assert ds["id"] == ["d1", "d2"] and ds["text"] == ["贷款, 利率", "多行\n文本"]
    assert [(x["line"], x["reason"].split(":")[0]) for x in q] == [(5, "bad_row")]
    (tmp_path / "b.tsv").write_text("text\tlabel\n一段文字\t正常\n", encoding="utf-8")
    ds, _, _ = _read(tmp_path / "b.tsv")
    assert ds[0]["text"] == "一段文字" and ds[0]["label"] == "正常"


def test_parquet_and_saved_hf_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["存款", "贷款"]}), tmp_path / "a.parquet")
    ds, _, _ = _read(tmp_path / "a.parquet")
    assert ds["id"] == ["p1", "p2"]
    DatasetDict({"train": Dataset.from_list([{"text": "一"}, {"text": "二"}])}).save_to_disk(str(tmp_path / "hf"))
    ds, st, _ = _read(tmp_path / "hf", format="hf", name="h")
    assert ds["text"] == ["一", "二"] and ds["id"] == ["h/hf:1", "h/hf:2"] and st["encodings"] == {"arrow": 1}


def test_text_folder_per_file_and_per_block(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("第一段\n续行\n\n\n第二段\n", encoding="utf-8")
    (d / "sub" / "b.txt").write_text("另一篇", encoding="utf-8")
    (d / ".hidden.txt").write_text("忽略", encoding="utf-8")
    ds, _, _ = _read(d)
    assert ds["id"] == ["docs/a.txt:1", "docs/sub/b.txt:1"]
    ds, _, _ = _read(d / "**" / "*.txt", unit="block")
    assert ds["id"] == ["docs/a.txt:1", "docs/a.txt:5", "docs/sub/b.txt:1"]
    assert ds["text"] == ["第一段\n续行", "第二段", "另一篇"]


def test_markdown_and_html_extraction():
    md = "---\ntitle: x\n---\n# 标题\n\n**重点**说明，见[网点](http://x)。\n\n- 条件一\n\n| 项目 | 标准 |\n|---|---|\n| 额度 | 30万元 |\n"
    assert markdown_to_text(md) == "标题\n\n重点说明，见网点。\n\n条件一\n\n项目 标准\n额度 30万元"
    html = ("<html><head><style>p{color:red}</style><script>var a = 1 < 2;</script><title>简报</title></head>"
            "<body><p>存款&nbsp;增长&#46;5&amp;</p><div>贷款<br>余额</div></body></html>")
    assert html_to_text(html) == "简报\n\n存款 增长.5&\n\n贷款\n余额"


def test_instruction_formats_become_messages(tmp_path):
    _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}])
    _jsonl(tmp_path / "p.jsonl", [{"prompt": "问2", "completion": "答2"}])
    (tmp_path / "alpaca.json").write_text(json.dumps([
        {"instruction": "翻译", "input": "hello", "output": "你好", "system": "助手", "history": [["早", "早上好"]]}],
        ensure_ascii=False), encoding="utf-8")
    (tmp_path / "sg.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "一加一"}, {"from": "gpt", "value": "二"}], "system": "算术"}],
        ensure_ascii=False), encoding="utf-8")
    specs = [{"path": str(tmp_path / "m.jsonl")}, {"path": str(tmp_path / "p.jsonl")},
             {"path": str(tmp_path / "alpaca.json"), "format": "alpaca"},
             {"path": str(tmp_path / "sg.json"), "format": "sharegpt"}]
    ds, st, q = read_sources(specs)
    assert st["kind"] == "messages" and q == []
    msgs = ds["messages"]
    assert msgs[1] == [{"role": "user", "content": "问2"}, {"role": "assistant", "content": "答2"}]
    assert msgs[2] == [{"role": "system", "content": "助手"}, {"role": "user", "content": "早"},
                       {"role": "assistant", "content": "早上好"}, {"role": "user", "content": "翻译\nhello"},
                       {"role": "assistant", "content": "你好"}]
    assert msgs[3] == [{"role": "system", "content": "算术"}, {"role": "user", "content": "一加一"},
                       {"role": "assistant", "content": "二"}]


def test_encodings_detected_per_file(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.txt").write_bytes("利率调整通知".encode())
    (d / "b.txt").write_bytes("\ufeff利率调整通知".encode())
    (d / "c.txt").write_bytes("利率调整通知".encode("gb18030"))
    (d / "d.txt").write_bytes("客户经理".encode("gbk"))
    assert [detect_encoding(d / f) for f in ("a.txt", "b.txt", "c.txt", "d.txt")] == \
        ["utf-8", "utf-8-sig", "gb18030", "gb18030"]
    ds, st, q = _read(d)
    assert ds["text"] == ["利率调整通知"] * 3 + ["客户经理"]
    assert st["encodings"] == {"utf-8": 1, "utf-8-sig": 1, "gb18030": 2} and q == []
    assert [n["file"].rsplit("/", 1)[1] for n in st["encoding_notes"]] == ["b.txt", "c.txt", "d.txt"]


# one file, several encodings: exports of different systems concatenated
UNDECODABLE = b"\x80\xff\x80 not UTF-8 nor GB18030\n"  # 0x80 and 0xFF start no character in either


def _mixed(path, lines):
    """Write ``[(encoding | None, text | raw bytes)]`` as one file."""
    path.write_bytes(b"".join(t if enc is None else t.encode(enc) for enc, t in lines))
    return path


def test_one_file_mixing_utf8_and_gbk_lines_keeps_every_decodable_line(tmp_path):
    # "实时" in GBK is also valid UTF-8 (as "ʵʱ"): such a line must still be read as GBK
    assert "实时".encode("gbk").decode("utf-8") == "ʵʱ"
    p = _mixed(tmp_path / "m.jsonl", [
        ("utf-8", '{"id": "u1", "text": "第一条 利率调整通知"}\n'),
        ("gbk", '{"id": "g1", "text": "第二条 客户经理应当如实记录"}\n'),
        (None, UNDECODABLE),
        ("utf-8", '{"id": "u2", "text": "第三条 贷后检查制度"}\n'),
        ("gbk", '{"id": "g2", "text": "实时"}\n')])
    assert detect_encoding(p) == "mixed"
    ds, st, q = _read(p)
    assert ds["id"] == ["u1", "g1", "u2", "g2"]
    assert ds["text"] == ["第一条 利率调整通知", "第二条 客户经理应当如实记录", "第三条 贷后检查制度", "实时"]
    assert q == [{"file": str(p), "line": 3, "reason": "undecodable_line: not valid UTF-8 nor GB18030"}]
    assert (st["records_read"], st["valid"], st["quarantined_records"], st["bad_files"]) == (5, 4, 1, 0)
    assert st["encodings"] == {"mixed": 1} and st["lines_gb18030"] == 2
    (note,) = st["encoding_notes"]
    assert (note["encoding"], note["lines_utf8"], note["lines_gb18030"], note["lines_undecodable"]) == ("mixed", 2, 2, 1)
    with pytest.raises(ValueError, match=r"m\.jsonl:3: undecodable_line"):
        read_sources([{"path": str(p)}], on_error="raise")


@pytest.mark.parametrize("fmt", ["txt", "csv"])
def test_mixed_text_and_csv_files_keep_their_line_numbers(tmp_path, fmt):
    head = [("utf-8", "id,text\n")] if fmt == "csv" else []
    rows = [("utf-8", "第一条 利率调整通知"), ("gbk", "第二条 客户经理应当如实记录"), (None, UNDECODABLE),
            ("utf-8", "第三条 贷后检查制度"), ("gbk", "实时")]
    lines = [(enc, t if enc is None else (f"r{i},{t}\n" if fmt == "csv" else t + "\n")) for i, (enc, t) in enumerate(rows)]
    p = _mixed(tmp_path / f"m.{fmt}", head + lines)
    ds, st, q = _read(p, **({"unit": "block"} if fmt == "txt" else {}))
    bad_line = len(head) + 3
    assert q == [{"file": str(p), "line": bad_line,
                  "reason": "undecodable_line: not valid UTF-8 nor GB18030 (left out of the text)"}]
    if fmt == "csv":
        assert ds["id"] == ["r0", "r1", "r3", "r4"]
        assert ds["text"] == ["第一条 利率调整通知", "第二条 客户经理应当如实记录", "第三条 贷后检查制度", "实时"]
    else:  # the left-out line ends a block; the next block starts on the next line
        assert ds["id"] == [f"{tmp_path.name}/m.txt:1", f"{tmp_path.name}/m.txt:4"]
        assert ds["text"] == ["第一条 利率调整通知\n第二条 客户经理应当如实记录", "第三条 贷后检查制度\n实时"]
    assert st["lines_gb18030"] == 2 and st["records_read"] == st["valid"] + 1 and st["bad_files"] == 0


def test_gbk_file_with_utf8_lines_that_are_also_valid_gb18030_is_not_mojibake(tmp_path):
    utf8 = "利率调整通知\n".encode()
    assert utf8.decode("gb18030") != "利率调整通知\n"  # valid GB18030 too, as mojibake: the whole file passes
    p = _mixed(tmp_path / "a.txt", [("gbk", "客户经理应当如实记录调查情况\n实时\n"), (None, utf8)])
    assert p.read_bytes().decode("gb18030")  # the whole file is valid GB18030 (it would raise otherwise)
    assert detect_encoding(p) == "mixed"
    ds, st, q = _read(p)
    assert ds["text"] == ["客户经理应当如实记录调查情况\n实时\n利率调整通知\n"] and q == []
    # a GBK file whose short lines happen to be valid UTF-8 is still read as one GB18030 file
    g = _mixed(tmp_path / "g.txt", [("gbk", "实时\n实录\n营通\n客户经理\n")])
    assert all(w.encode("gbk").decode("utf-8") for w in ("实时", "实录", "营通"))
    assert detect_encoding(g) == "gb18030"
    assert _read(g)[0]["text"] == ["实时\n实录\n营通\n客户经理\n"]


def test_file_mostly_in_another_encoding_is_still_quarantined_whole(tmp_path):
    p = _mixed(tmp_path / "cp1252.txt", [("cp1252", "Price: 5€\nFee: 2€\nTotal: 7€\n"), ("utf-8", "利率调整通知\n")])
    with pytest.raises(Bad, match="undecodable"):
        detect_encoding(p)
    d = tmp_path / "d"
    d.mkdir()
    p.rename(d / "cp1252.txt")
    (d / "ok.txt").write_text("正常文本", encoding="utf-8")
    ds, st, q = _read(d)
    assert ds["text"] == ["正常文本"] and st["bad_files"] == 1
    assert [(x["line"], x["reason"].split(":")[0]) for x in q] == [(0, "undecodable")]


def test_samples_read(tmp_path):
    ds, st, q = read_sources([{"path": str(SAMPLES / "general")}])
    assert st["kind"] == "messages" and len(ds) == 320 and q == []
    specs = [{"path": str(SAMPLES / "vertical" / "regulations" / "*.txt"), "unit": "block"},
             {"path": str(SAMPLES / "vertical" / "manuals")},
             {"path": str(SAMPLES / "vertical" / "reports" / "*.html")},
             {"path": str(SAMPLES / "vertical" / "tips" / "risk_tips.jsonl")}]
    ds, st, q = read_sources(specs)
    assert st["kind"] == "text" and len(ds) > 250 and q == []
    assert st["encodings"]["gb18030"] == 1 and st["encodings"]["utf-8-sig"] == 1
    assert "示例农村商业银行" in ds[0]["text"]


# ---------------------------------------------------------------------------------------- bad input


def test_malformed_json_line_is_quarantined_without_content(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "好的"}\n{"text": "身份证 110101199001011234\n{"text": "好"}\n[1, 2]\n', encoding="utf-8")
    ds, st, q = _read(p)
    assert len(ds) == 2
    assert [(x["line"], x["reason"].split(":")[0]) for x in q] == [(2, "invalid_json"), (4, "not_an_object")]
    assert all(x["file"] == str(p) and "1101" not in x["reason"] for x in q)
    assert st["records_read"] == 4 and st["valid"] == 2 and st["quarantined_records"] == 2
    assert st["reasons"] == {"invalid_json": 1, "not_an_object": 1}
    with pytest.raises(ValueError, match=r"a\.jsonl:2: invalid_json"):
        read_sources([{"path": str(p)}], on_error="raise")


def test_wrong_field_names_raise_and_field_map_fixes(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"content": "一"}, {"content": "二"}])
    with pytest.raises(ValueError, match=r"a\.jsonl:1: missing_field.*found keys: content.*field_map"):
        _read(p)
    ds, _, _ = _read(p, field_map={"text": "content"})
    assert ds["text"] == ["一", "二"]


def test_wrong_types_are_quarantined(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [
        {"text": "好"}, {"prompt": "问", "completion": "答"}])
    with pytest.raises(ValueError, match=r"mix raw text \(.*a\.jsonl:1\) and instruction records \(.*a\.jsonl:2\)"):
        _read(p)  # text and messages records in one corpus
    p = _jsonl(tmp_path / "a.jsonl", [
        {"text": "好"}, {"text": ["列", "表"]}, {"text": "  "}, {"id": [1], "text": "好"}, {"text": None}])
    ds, st, q = _read(p)
    assert len(ds) == 1
    assert [x["reason"] for x in q] == [
        "wrong_type: field 'text' is list, expected string", "empty_text: field 'text' is empty",
        "wrong_type: field 'id' is list, expected string or integer", "missing_field: no field 'text'"]
    p = _jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]},
        {"messages": [{"role": "user", "content": "问"}]},
        {"messages": [{"role": "boss", "content": "问"}, {"role": "assistant", "content": "答"}]},
        {"instruction": "问", "output": 3}])
    ds, st, q = _read(p)
    assert len(ds) == 1 and Counter(x["reason"].split(":")[0] for x in q) == {"bad_messages": 2, "wrong_type": 1}


def test_empty_binary_and_undecodable_files_are_quarantined(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "ok.txt").write_text("正常文本", encoding="utf-8")
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text("  \n\n", encoding="utf-8")
    (d / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (d / "bad.txt").write_bytes(b"\xff\xfe\xfd\xfc" * 3)  # not UTF-8, not GB18030 (and no UTF-16 BOM)
    (d / "u16.txt").write_bytes("文本".encode("utf-16"))
    ds, st, q = _read(d)
    assert ds["text"] == ["正常文本"]
    assert {x["file"].rsplit("/", 1)[1]: x["reason"].split(":")[0] for x in q} == {
        "bad.txt": "undecodable", "bin.txt": "binary_file", "blank.txt": "empty_file", "empty.txt": "empty_file",
        "u16.txt": "undecodable"}
    assert st["bad_files"] == 5 and st["files"] == 6 and all(x["line"] == 0 for x in q)
    p = tmp_path / "e.jsonl"
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="no valid records.*empty_file"):
        _read(p)


def test_twenty_megabyte_line_is_quarantined(tmp_path):
    p = tmp_path / "big.jsonl"
    with open(p, "w", encoding="utf-8") as fh:
        fh.write('{"text": "前"}\n')
        fh.write('{"text": "' + "长" * (7 * 1024 * 1024) + '"}\n')  # about 21 MB on one line
        fh.write('{"text": "后"}\n')
    ds, st, q = _read(p)
    assert ds["text"] == ["前", "后"]
    assert q == [{"file": str(p), "line": 2, "reason": f"line_too_long: more than {10 * 1024 * 1024} bytes"}]


def test_duplicate_ids_are_quarantined_across_sources(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"id": "d1", "text": "一"}, {"id": "d1", "text": "二"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"id": "d1", "text": "三"}, {"id": "d2", "text": "四"}])
    ds, st, q = read_sources([{"path": str(a)}, {"path": str(b)}])
    assert ds["id"] == ["d1", "d2"] and ds["text"] == ["一", "四"]
    assert q == [{"file": str(a), "line": 2, "reason": f"duplicate_id: first seen at {a}:1"},
                 {"file": str(b), "line": 1, "reason": f"duplicate_id: first seen at {a}:1"}]
    assert st["records_read"] == 4 == st["valid"] + st["quarantined_records"]


def test_weights_sample_and_upsample_deterministically(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": f"甲{i}"} for i in range(1000)])
    b = _jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "text": f"乙{i}"} for i in range(10)])
    specs = [{"path": str(a), "weight": 0.3}, {"path": str(b), "weight": 2.5}]
    ds, st, _ = read_sources(specs, seed=3)
    by_src = Counter(i[0] for i in ds["id"])
    assert by_src["a"] == 300 and by_src["b"] == 25   # 0.3 x 1000; 2 x 10 + 0.5 x 10
    assert "b0#2" in ds["id"] and len(set(ds["id"])) == len(ds)
    assert [s["sampled"] for s in st["sources"]] == [by_src["a"], by_src["b"]]
    again, _, _ = read_sources(specs, seed=3)
    assert again["id"] == ds["id"]
    other, _, _ = read_sources(specs, seed=4)
    assert other["id"] != ds["id"]
    # the sample does not depend on where the files live
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    specs_moved = [{"path": str(a.rename(moved / "a.jsonl")), "weight": 0.3},
                   {"path": str(b.rename(moved / "b.jsonl")), "weight": 2.5}]
    assert read_sources(specs_moved, seed=3)[0]["id"] == ds["id"]


def test_spec_errors(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"text": "一"}])
    with pytest.raises(ValueError, match="unknown key 'wieght'"):
        read_sources([{"path": str(p), "wieght": 2}])
    with pytest.raises(ValueError, match="weight must be a number > 0"):
        read_sources([{"path": str(p), "weight": 0}])
    with pytest.raises(ValueError, match="no files match"):
        read_sources([{"path": str(tmp_path / "*.parquet")}])
    with pytest.raises(ValueError, match="format 'xml' unknown"):
        read_sources([{"path": str(p), "format": "xml"}])


def test_one_encoding_detector_for_every_reader(tmp_path):
    """`corpus scrub` (pii.scrub_jsonl) decodes with the readers' detector and line decoder, not a copy."""
    from banklm.corpora import sources
    from banklm.corpora.ops import pii

    assert pii.detect_encoding is sources.detect_encoding and pii.decode_line is sources.decode_line
    p = _mixed(tmp_path / "m.jsonl", [("utf-8", '{"id": "u", "text": "第一条 利率调整通知"}\n'),
                                      ("gbk", '{"id": "g", "text": "第二条 客户经理"}\n')])
    stats = pii.scrub_jsonl(p, tmp_path / "out.jsonl")
    assert stats["encoding"] == detect_encoding(p) == "mixed"
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in out] == read_sources([{"path": str(p)}])[0]["text"] == ["第一条 利率调整通知", "第二条 客户经理"]
    (tmp_path / "u16.jsonl").write_bytes("\ufeff{}".encode("utf-16-le"))
    with pytest.raises(pii.PIIInputError, match="UTF-16"):
        pii.scrub_jsonl(tmp_path / "u16.jsonl", tmp_path / "o.jsonl")
