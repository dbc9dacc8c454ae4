"""Corpus builders (general, vertical, private, scenario), the mix, the recipe keys, and bad input end to end."""

import json
from pathlib import Path

import pytest
from banklm.corpora.build import (
    SAMPLES_DIR,
    SourceError,
    build_general,
    build_mix,
    build_private,
    build_scenario,
    build_vertical,
    resolve_source_path,
)
from banklm.corpora.splits import corpus_splits, load_split, scenario_test_prompts

from banklm.cli import main

CARD_SECTIONS = ["## Sources", "## Steps applied", "## Examples of removed records", "## PII", "## Deduplication",
                 "## Decontamination", "## Splits", "## Lengths and encodings", "## Tokens", "## Quarantine",
                 "## Known limits"]
STATS_KEYS = {"kind", "sources", "steps", "counts", "splits", "pii", "dedup", "decontamination", "lengths",
              "encodings", "encoding_notes", "tokens", "quarantined"}
EVAL = ["借款人申请经营贷款50万元，月收入2万元，负债收入比45%，请给出审批结论与风险等级。"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    import datasets

    datasets.disable_progress_bars()


def _check_folder(out: Path, stats: dict) -> None:
    for name in ("data", "stats.json", "quarantine.jsonl", "card.md"):
        assert (out / name).exists(), name
    assert json.loads((out / "stats.json").read_text(encoding="utf-8")) == json.loads(json.dumps(stats, default=str))
    assert STATS_KEYS <= set(stats)
    for st in stats["steps"]:
        assert st["in"] == st["kept"] + st["dropped"] + st["quarantined"], st["step"]
    for a, b in zip(stats["steps"], stats["steps"][1:], strict=False):
        if a["step"] != "read":
            assert b["in"] == a["kept"]
    assert sum(stats["splits"].values()) == stats["steps"][-1]["kept"]
    card = (out / "card.md").read_text(encoding="utf-8")
    for section in CARD_SECTIONS:
        assert section in card, section
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def _samples(path: str, **kw) -> list[dict]:
    return [{"path": f"samples:{path}", "licence": "test licence", **kw}]


def test_build_general_on_samples(tmp_path):
    out = tmp_path / "general"
    stats = build_general(_samples("general"), out, eval_prompts=EVAL)
    _check_folder(out, stats)
    assert stats["content"] == "messages" and stats["records_read"] == 320
    assert [s["step"] for s in stats["steps"]] == ["read", "normalize", "exact_dedup", "quality", "decontam"]
    assert stats["dedup"]["exact_removed"] > 0
    assert "test licence" in (out / "card.md").read_text(encoding="utf-8")
    assert stats["tokens"]["available"] is False


def test_build_vertical_on_samples(tmp_path):
    out = tmp_path / "vertical"
    sources = [{"path": "samples:vertical/regulations", "unit": "block"}, {"path": "samples:vertical/manuals"},
               {"path": "samples:vertical/reports"}, {"path": "samples:vertical/tips"}]
    stats = build_vertical(sources, out, eval_prompts=None)
    _check_folder(out, stats)
    by = {s["step"]: s for s in stats["steps"]}
    assert by["exact_dedup"]["dropped"] >= 3 and by["near_dedup"]["dropped"] >= 3
    assert {"junk_lines", "low_cjk_ratio"} <= set(by["quality"]["reasons"])
    assert by["boilerplate"]["lines_removed"] > 0
    assert stats["decontamination"]["status"].startswith("skipped")
    assert {"gb18030", "utf-8-sig"} <= set(stats["encodings"])
    assert stats["dedup"]["near_cluster_size_histogram"]
    # token counts with a tokenizer callable
    stats2 = build_vertical(sources[3:], tmp_path / "v2", count_tokens=lambda ts: [len(t) // 2 for t in ts],
                            tokenizer="half-chars")
    assert stats2["tokens"]["available"] and stats2["tokens"]["total"] > 0


def _canaries(repo):
    meta = json.loads((repo / "corpora" / "samples" / "private" / "canaries.json").read_text(encoding="utf-8"))
    return [c["value"] for c in meta["canaries"]]


def test_build_private_leaks_no_canary(tmp_path, repo):
    out = tmp_path / "private"
    # an eval prompt sharing a long n-gram with the notes: decontam drops records, and the card shows them
    eval_prompts = ["借款人任职于杭州云栖数据科技有限公司（统一社会信用代码"]
    stats = build_private(_samples("private/records.jsonl"), out, eval_prompts=eval_prompts)
    _check_folder(out, stats)
    assert stats["pii"]["counts"]["ID_CARD"] > 100 and set(stats["pii"]["counts"]) >= {"PERSON", "PHONE", "EMAIL"}
    assert stats["decontamination"]["removed"] > 0
    card = (out / "card.md").read_text(encoding="utf-8")
    assert "<ID_CARD>" in card  # examples of removed records are the scrubbed text
    blobs = [f.read_bytes() for f in out.rglob("*") if f.is_file()]
    assert any(b"<PERSON>" in b for b in blobs)  # the scrubbed text is in the Arrow files, uncompressed
    for c in _canaries(repo):
        for b in blobs:
            assert c.encode("utf-8") not in b, "a canary leaked"


def test_private_requires_pii_first(tmp_path):
    with pytest.raises(ValueError, match="only 'normalize' may come before 'pii'"):
        build_private(_samples("private/records.jsonl"), tmp_path / "p", steps=["exact_dedup", "pii"])
    with pytest.raises(ValueError, match="needs the 'pii' step"):
        build_private(_samples("private/records.jsonl"), tmp_path / "p", steps=["normalize"])


def test_quarantine_planted_bad_lines(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    good = [{"id": f"r{i}", "text": f"第{i}条 本行对个人经营性贷款实行贷前调查、贷时审查和贷后检查制度，第{i}次修订。"}
            for i in range(6)]
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    lines.insert(2, '{"id": "bad", "text": "unterminated')
    lines.insert(4, json.dumps({"id": "r1", "text": "重复的编号：本条与前面的记录使用了同一个编号，应当进入隔离区。"}, ensure_ascii=False))
    lines.insert(5, json.dumps({"id": "t", "text": 42}))
    (d / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "vertical"
    stats = build_vertical([{"path": str(d)}], out)
    _check_folder(out, stats)
    q = [json.loads(x) for x in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    reasons = {r["reason"].split(":")[0]: r for r in q}
    assert set(reasons) == {"invalid_json", "duplicate_id", "wrong_type"}
    assert reasons["invalid_json"]["line"] == 3 and reasons["invalid_json"]["file"].endswith("a.jsonl")
    assert "first seen at" in reasons["duplicate_id"]["reason"]
    read = stats["steps"][0]
    assert read["in"] == 9 and read["kept"] == 6 and read["quarantined"] == 3


def test_crash_mid_build_leaves_no_folder(tmp_path, monkeypatch):
    import banklm.corpora.build
    from banklm.corpora.ops.quality import QualityFilter

    out = tmp_path / "corpora" / "vertical"
    monkeypatch.setattr(QualityFilter, "apply", lambda self, ds, num_proc=1: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_vertical(_samples("vertical/tips"), out)
    assert not out.exists()
    monkeypatch.undo()
    # a crash while writing (after data/ and stats.json are in the temporary folder)
    monkeypatch.setattr(banklm.corpora.build, "text_card", lambda stats: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_vertical(_samples("vertical/tips"), out)
    assert list(out.parent.iterdir()) == []
    # ... and over an earlier complete build: the earlier one stays, whole
    monkeypatch.undo()
    first = build_vertical(_samples("vertical/tips"), out)
    monkeypatch.setattr(banklm.corpora.build, "text_card", lambda stats: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        build_vertical(_samples("vertical/tips"), out, steps=["normalize"])
    _check_folder(out, first)
    assert [p.name for p in out.parent.iterdir()] == ["vertical"]


def test_scenario_unchanged_and_tables(tmp_path):
    import pandas as pd
    from banklm.corpora.synth import generate_records

    synth = {"credit": {"train": 30, "validation": 6, "test": 9, "difficulty": 0.0}}
    out = tmp_path / "scenario"
    stats = build_scenario(synth, 0, out, licence="synthetic")
    assert stats["splits"] == {"train": 30, "validation": 6, "test": 9}
    assert [s["step"] for s in stats["steps"]] == ["exact_dedup_and_decontam[train]",
                                                   "exact_dedup_and_decontam[validation]"]
    assert len(scenario_test_prompts(out)) == 9
    # a bank table of audit cases, split automatically, plus a table fixed to the test split
    df = pd.DataFrame([json.loads(r["meta"]) for r in generate_records("audit", 40, 1, "t")])
    df.drop(columns=["branch", "difficulty", "seed", "split"]).to_csv(tmp_path / "audit.csv", index=False)
    tables = [{"path": "audit.csv", "task": "audit"}, {"path": "audit.csv", "task": "audit", "split": "test",
                                                       "limit": 5, "name": "held"}]
    stats = build_scenario(synth, 0, out, tables=tables, steps=["normalize"], base_dir=tmp_path,
                           splits={"train": 0.8, "validation": 0.1, "test": 0.1})
    assert stats["by_task"]["test"]["audit"] >= 5
    assert sum(s["by_task"][k].get("audit", 0) for s in [stats] for k in stats["by_task"]) <= 45
    assert any(s["step"] == "tables:normalize" for s in stats["steps"])
    assert "bank table `audit.csv`" in (out / "card.md").read_text(encoding="utf-8")


def test_mix_proportions(tmp_path):
    from datasets import load_from_disk

    build_scenario({"credit": {"train": 200, "validation": 20, "test": 10}}, 0, tmp_path / "scenario")
    build_general(_samples("general"), tmp_path / "general")
    build_vertical(_samples("vertical/tips"), tmp_path / "vertical")
    props = {"general": 0.2, "vertical": 0.3, "scenario": 0.5}
    stats = build_mix({k: tmp_path / k for k in props}, props, tmp_path / "mix", total=400, seed=1)
    train = load_from_disk(str(tmp_path / "mix" / "data"))["train"]
    assert len(train) == 400
    from collections import Counter

    assert Counter(train["source"]) == {"general": 80, "vertical": 120, "scenario": 200}
    assert stats["both_columns"] and set(train.column_names) >= {"id", "text", "messages", "source"}
    row = next(r for r in train if r["source"] == "vertical")
    assert row["text"] and row["messages"] == []
    assert len(set(train["id"])) == 400  # upsampled copies get #2, #3 ...
    assert "validation" in stats["splits"]
    # same content type: one column
    stats = build_mix({"general": tmp_path / "general", "scenario": tmp_path / "scenario"},
                      {"general": 1, "scenario": 1}, tmp_path / "mix2")
    assert not stats["both_columns"]


def test_resolve_source_path_refuses_traversal(tmp_path):
    assert resolve_source_path("samples:private/records.jsonl", tmp_path) == str(SAMPLES_DIR / "private" / "records.jsonl")
    assert resolve_source_path("data/*.jsonl", tmp_path) == str(tmp_path.resolve() / "data" / "*.jsonl")
    with pytest.raises(SourceError, match="outside"):
        resolve_source_path("../secret.jsonl", tmp_path)
    with pytest.raises(SourceError, match="outside"):
        resolve_source_path("samples:../../etc/passwd", tmp_path)
    with pytest.raises(SourceError, match="after a wildcard"):
        resolve_source_path("data/*/../../x", tmp_path)
    assert resolve_source_path("/abs/file.jsonl", tmp_path) == "/abs/file.jsonl"


# ------------------------------------------------------------------------------------- recipes / CLI


def _recipe(tmp_path: Path, corpora: dict) -> Path:
    import yaml

    data = {"name": "t", "base": {"path": str(tmp_path / "no-model")},
            "corpora": {"root": str(tmp_path / "in"), **corpora}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return p


def _run(tmp_path, corpora, capsys):
    p = _recipe(tmp_path, corpora)
    rc = main(["corpus", "build", str(p), "--run-dir", str(tmp_path / "run")])
    return rc, capsys.readouterr().err


TEXT = "本行对个人经营性贷款实行贷前调查、贷时审查和贷后检查制度，客户经理应当如实记录调查情况。"


def _doc(i: int, extra: str = "") -> str:
    return f"第{i}条 {TEXT}{extra}第{i * 7}号文件。"


def _write_jsonl(path: Path, recs: list, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode(encoding))


def _good(n=8, start=0):
    return [{"id": f"g{i}", "text": _doc(i)} for i in range(start, start + n)]


def _vertical(path="docs"):
    return {"vertical": {"sources": [{"path": path}], "steps": ["normalize", "exact_dedup", "quality"]}}


def _stats(tmp_path):
    return json.loads((tmp_path / "run" / "corpora" / "vertical" / "stats.json").read_text(encoding="utf-8"))


def _quarantine(tmp_path):
    p = tmp_path / "run" / "corpora" / "vertical" / "quarantine.jsonl"
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()]


def test_cli_malformed_json_lines_are_quarantined(tmp_path, capsys):
    f = tmp_path / "in" / "docs" / "a.jsonl"
    _write_jsonl(f, _good())
    with open(f, "a", encoding="utf-8") as fh:
        fh.write('{"id": "x", "text": \n{not json}\n')
    rc, err = _run(tmp_path, _vertical(), capsys)
    assert rc == 0, err
    q = _quarantine(tmp_path)
    assert [(r["line"], r["reason"].split(":")[0]) for r in q] == [(9, "invalid_json"), (10, "invalid_json")]
    assert _stats(tmp_path)["steps"][0]["kept"] == 8


def test_cli_wrong_field_names_exit_2_naming_file(tmp_path, capsys):
    _write_jsonl(tmp_path / "in" / "docs" / "a.jsonl", [{"id": i, "content": _doc(i)} for i in range(5)])
    rc, err = _run(tmp_path, _vertical(), capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "a.jsonl:1" in lines[0] and "field_map" in lines[0] and "corpora.vertical" in lines[0]
    assert not (tmp_path / "run" / "corpora" / "vertical").exists()
    # with the field map it builds
    corpora = _vertical()
    corpora["vertical"]["sources"][0]["field_map"] = {"text": "content"}
    rc, err = _run(tmp_path, corpora, capsys)
    assert rc == 0, err


def test_cli_gbk_bom_and_mixed_encodings(tmp_path, capsys):
    d = tmp_path / "in" / "docs"
    _write_jsonl(d / "utf8.jsonl", _good(4))
    _write_jsonl(d / "gbk.jsonl", _good(4, 10), encoding="gbk")
    (d / "bom.txt").write_bytes(b"\xef\xbb\xbf" + _doc(50).encode("utf-8"))
    (d / "gb.txt").write_bytes(_doc(60).encode("gb18030"))
    rc, err = _run(tmp_path, _vertical(), capsys)
    assert rc == 0, err
    st = _stats(tmp_path)
    assert st["encodings"] == {"utf-8": 1, "gb18030": 2, "utf-8-sig": 1}
    assert {Path(n["file"]).name for n in st["encoding_notes"]} == {"gbk.jsonl", "bom.txt", "gb.txt"}
    from datasets import load_from_disk

    dd = load_from_disk(str(tmp_path / "run" / "corpora" / "vertical" / "data"))
    texts = [t for s in dd.values() for t in s["text"]]
    assert len(texts) == 10 and all(not t.startswith("\ufeff") for t in texts)
    assert _doc(12) in texts and _doc(50) in texts  # GBK and BOM decoded right


def test_cli_empty_binary_and_huge_line(tmp_path, capsys):
    d = tmp_path / "in" / "docs"
    _write_jsonl(d / "a.jsonl", _good())
    (d / "empty.jsonl").write_bytes(b"")
    (d / "blob.jsonl").write_bytes(b"\x00\x01\x02PK\x03\x04" * 100)
    with open(d / "huge.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "big", "text": "长" * (7 * 1024 * 1024)}, ensure_ascii=False) + "\n")  # ~21 MB
        fh.write(json.dumps({"id": "small", "text": _doc(99)}, ensure_ascii=False) + "\n")
    assert (d / "huge.jsonl").stat().st_size > 20 * 1024 * 1024
    rc, err = _run(tmp_path, _vertical(), capsys)
    assert rc == 0, err
    reasons = {Path(r["file"]).name: r["reason"].split(":")[0] for r in _quarantine(tmp_path)}
    assert reasons == {"empty.jsonl": "empty_file", "blob.jsonl": "binary_file", "huge.jsonl": "line_too_long"}
    st = _stats(tmp_path)
    assert st["bad_files"] == 2 and st["steps"][0]["kept"] == 9


@pytest.mark.parametrize("content,reason", [(b"", "empty_file"), (b"\x00\x01\x02\x03" * 50, "binary_file")])
def test_cli_only_unreadable_file_exit_2(tmp_path, capsys, content, reason):
    (tmp_path / "in" / "docs").mkdir(parents=True)
    (tmp_path / "in" / "docs" / "x.jsonl").write_bytes(content)
    rc, err = _run(tmp_path, _vertical(), capsys)
    assert rc == 2 and "x.jsonl" in err and reason in err and "no readable file" in err
    assert not (tmp_path / "run" / "corpora" / "vertical").exists()


def test_cli_duplicate_ids_quarantined(tmp_path, capsys):
    d = tmp_path / "in" / "docs"
    _write_jsonl(d / "a.jsonl", _good(5))
    _write_jsonl(d / "b.jsonl", [{"id": "g2", "text": _doc(77)}, {"id": "new", "text": _doc(78)}])
    rc, err = _run(tmp_path, _vertical(), capsys)
    assert rc == 0, err
    q = _quarantine(tmp_path)
    assert len(q) == 1 and q[0]["reason"].startswith("duplicate_id") and "a.jsonl:3" in q[0]["reason"]
    assert q[0]["file"].endswith("b.jsonl") and q[0]["line"] == 1


@pytest.mark.parametrize("path", ["../outside.jsonl", "docs/../../outside.jsonl", "samples:../../../etc"])
def test_cli_path_traversal_refused(tmp_path, capsys, path):
    _write_jsonl(tmp_path / "outside.jsonl", _good())
    rc, err = _run(tmp_path, _vertical(path), capsys)
    assert rc == 2 and "outside" in err and "corpora.vertical" in err


def test_cli_missing_source_and_bad_step(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    rc, err = _run(tmp_path, _vertical("nope/*.jsonl"), capsys)
    assert rc == 2 and "no files match" in err
    corpora = _vertical()
    corpora["vertical"]["steps"] = ["normalize", "dedup"]
    rc, err = _run(tmp_path, corpora, capsys)
    assert rc == 2 and "corpora.vertical.steps.1.step = 'dedup'" in err and "'near_dedup'" in err
    corpora["vertical"]["steps"] = [{"near_dedup": {"threshold": 1.5}}]
    rc, err = _run(tmp_path, corpora, capsys)
    assert rc == 2 and "near_dedup: threshold = 1.5" in err


def test_scrub_and_build_read_a_mixed_encoding_file_alike(tmp_path, capsys):
    """`banklm corpus scrub` and `banklm corpus build` decode with the one detector (banklm.corpora.sources): a
    file mixing UTF-8 and GBK lines (GBK "实时" is also valid UTF-8, as "ʵʱ") and an undecodable line gives the
    same records and quarantines the same line in both. (scrub used to sniff the file alone: GB18030 mojibake
    for the UTF-8 lines, or a refused file.)"""
    want = {"u1": "第一条 利率调整通知", "g1": "第二条 客户经理应当如实记录", "u2": "第三条 贷后检查制度", "g2": "实时"}
    rows = [("utf-8", "u1"), ("gbk", "g1"), (None, b"\x80\xff\x80 not UTF-8 nor GB18030\n"), ("utf-8", "u2"),
            ("gbk", "g2")]
    f = tmp_path / "in" / "docs" / "mixed.jsonl"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"".join(x if enc is None else (json.dumps({"id": x, "text": want[x]}, ensure_ascii=False)
                                                  + "\n").encode(enc) for enc, x in rows))
    out = tmp_path / "scrubbed.jsonl"
    assert main(["corpus", "scrub", str(f), str(out)]) == 0
    assert "(mixed)" in capsys.readouterr().out
    scrubbed = {r["id"]: r["text"] for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    scrub_q = (tmp_path / "scrubbed.quarantine.jsonl").read_text(encoding="utf-8").splitlines()
    rc, err = _run(tmp_path, {"vertical": {"sources": [{"path": "docs"}], "steps": []}}, capsys)
    assert rc == 0, err
    corpus = tmp_path / "run" / "corpora" / "vertical"
    built = {r["id"]: r["text"] for split in corpus_splits(corpus) for r in load_split(corpus, split)}
    assert scrubbed == built == want
    assert [json.loads(x)["line"] for x in scrub_q] == [q["line"] for q in _quarantine(tmp_path)] == [3]
    assert _stats(tmp_path)["encodings"] == {"mixed": 1}


def test_cli_changed_source_reruns_stage(tmp_path, capsys):
    f = tmp_path / "in" / "docs" / "a.jsonl"
    _write_jsonl(f, _good())
    assert _run(tmp_path, _vertical(), capsys)[0] == 0
    assert _run(tmp_path, _vertical(), capsys)[0] == 0
    _write_jsonl(f, _good(9))
    assert _run(tmp_path, _vertical(), capsys)[0] == 0
    entries = [json.loads(x) for x in (tmp_path / "run" / "ledger.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["status"] for e in entries] == ["done", "reused", "done"]
    assert str(f.resolve()) in [i["path"] for i in entries[0]["inputs"]]
    assert _stats(tmp_path)["steps"][0]["kept"] == 9


def test_quickstart_corpus_build(tmp_path, repo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["corpus", "build", str(repo / "recipes" / "quickstart.yaml"), "--run-dir", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    for kind in ("scenario", "general", "vertical", "private"):
        assert (tmp_path / "run" / "corpora" / kind / "card.md").exists()
    st = json.loads((tmp_path / "run" / "corpora" / "scenario" / "stats.json").read_text(encoding="utf-8"))
    assert st["splits"] == {"train": 9000, "validation": 900, "test": 600, "test_prevalence": 1200}
    for kind in ("general", "vertical", "private"):
        st = json.loads((tmp_path / "run" / "corpora" / kind / "stats.json").read_text(encoding="utf-8"))
        assert st["decontamination"]["eval_prompts"] == 600 + 1200  # test and test_prevalence
