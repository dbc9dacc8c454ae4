"""Bad inputs to the corpus build and bad recipes: each one is a clear error naming the file/key (exit 2), or a
quarantined record/file with its reason, and every step keeps ``in = kept + dropped + quarantined``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from banklm.cli import main
from tests.reliability.relutil import banklm, tiny_recipe

TEXT = "本行对个人经营性贷款实行贷前调查、贷时审查和贷后检查制度，客户经理应当如实记录调查情况。"


def _doc(i: int) -> str:
    return f"第{i}条 {TEXT}第{i * 7}号文件。"


def _jsonl(path: Path, recs: list, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode(encoding))
    return path


def _recipe(tmp_path: Path, source: str = "docs", **extra) -> Path:
    data = {"name": "bad", "base": {"path": str(tmp_path / "no-model")},
            "corpora": {"root": str(tmp_path / "in"),
                        "vertical": {"sources": [{"path": source}], "steps": ["normalize", "exact_dedup", "quality"]}},
            **extra}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return p


def _build(tmp_path, capsys, *args, source="docs"):
    rc = main(["corpus", "build", str(_recipe(tmp_path, source)), *args, "--run-dir", str(tmp_path / "run")])
    return rc, capsys.readouterr().err


def _out(tmp_path) -> Path:
    return tmp_path / "run" / "corpora" / "vertical"


def _quarantine(tmp_path) -> dict[str, list[str]]:
    """file name -> reason categories."""
    out: dict[str, list[str]] = {}
    for line in (_out(tmp_path) / "quarantine.jsonl").read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        out.setdefault(Path(q["file"]).name, []).append(q["reason"].split(":")[0])
    return out


def _check_accounting(tmp_path) -> dict:
    stats = json.loads((_out(tmp_path) / "stats.json").read_text(encoding="utf-8"))
    for st in stats["steps"]:
        assert st["in"] == st["kept"] + st["dropped"] + st["quarantined"], st
    q = (_out(tmp_path) / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(q) == stats["quarantined"] == stats["steps"][0]["quarantined"] + stats["bad_files"]
    return stats


@pytest.fixture(autouse=True)
def _quiet():
    import datasets

    datasets.disable_progress_bars()


def test_every_bad_file_and_record_is_quarantined_with_its_reason(tmp_path, capsys):
    d = tmp_path / "in" / "docs"
    _jsonl(d / "good.jsonl", [{"id": f"g{i}", "text": _doc(i)} for i in range(8)])
    bad_records = [{"id": "t1", "text": 123}, {"id": "t2", "text": ["a"]}, {"id": {"x": 1}, "text": _doc(20)},
                   {"id": "nf", "content": _doc(21)}, {"id": "sur", "text": _doc(22) + "\ud800"}]
    with open(d / "mixed.jsonl", "w", encoding="utf-8") as fh:
        for r in bad_records:
            fh.write(json.dumps(r) + "\n")  # ensure_ascii: the lone surrogate stays a \ud800 escape
        fh.write('{"id": "broken", "text": \n[1, 2]\n')
        fh.write(json.dumps({"id": "ok-mixed", "text": _doc(23)}, ensure_ascii=False) + "\n")
        fh.write(json.dumps({"id": "escaped-nul", "text": _doc(24) + "\u0000隐藏"}) + "\n")
    _jsonl(d / "gbk.jsonl", [{"id": f"k{i}", "text": _doc(30 + i)} for i in range(3)], encoding="gbk")
    (d / "bom.txt").write_bytes(b"\xef\xbb\xbf" + _doc(40).encode("utf-8"))
    (d / "raw_nul.jsonl").write_bytes(json.dumps({"id": "n", "text": _doc(41)}).encode() + b"\x00\n")
    (d / "empty.jsonl").write_bytes(b"")
    big = "长" * (17 * 1024 * 1024)  # 51 MB of UTF-8 in one record
    with open(d / "big.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "big", "text": big}, ensure_ascii=False) + "\n")
        fh.write(json.dumps({"id": "small", "text": _doc(42)}, ensure_ascii=False) + "\n")
    with open(d / "big_array.json", "w", encoding="utf-8") as fh:
        json.dump([{"id": "big2", "text": big}, {"id": "small2", "text": _doc(43)}], fh, ensure_ascii=False)
    del big
    assert (d / "big.jsonl").stat().st_size > 50 * 1024 * 1024
    os.symlink("self.jsonl", d / "self.jsonl")  # a link to itself
    (d / "sub").mkdir()
    os.symlink("..", d / "sub" / "loop")  # a folder loop
    os.symlink("good.jsonl", d / "alias.jsonl")  # a second path to one file: read once
    (d / os.fsdecode("报告".encode("gbk") + b".jsonl")).write_text(json.dumps({"text": _doc(44)}, ensure_ascii=False),
                                                                  encoding="utf-8")  # a GBK file name

    rc, err = _build(tmp_path, capsys)
    assert rc == 0, err
    stats = _check_accounting(tmp_path)
    q = _quarantine(tmp_path)
    assert q["mixed.jsonl"] == ["wrong_type", "wrong_type", "wrong_type", "missing_field", "bad_text",
                                "invalid_json", "not_an_object"]
    assert q["raw_nul.jsonl"] == ["binary_file"] and q["empty.jsonl"] == ["empty_file"]
    assert q["big.jsonl"] == ["line_too_long"] and q["big_array.json"] == ["record_too_large"]
    assert q["self.jsonl"] == ["unreadable_file"] and q["loop"] == ["linked_folder"]
    assert q["\\xb1\\xa8\\xb8\\xe6.jsonl"] == ["bad_file_name"]  # shown escaped, never as broken text
    assert "alias.jsonl" not in q and stats["encodings"]["gb18030"] == 1 and stats["encodings"]["utf-8-sig"] == 1
    from datasets import load_from_disk

    ids = {i for split in load_from_disk(str(_out(tmp_path) / "data")).values() for i in split["id"]}
    assert ids == {f"g{i}" for i in range(8)} | {"ok-mixed", "escaped-nul", "k0", "k1", "k2", "small", "small2",
                                                  "docs/bom.txt:1"}
    # the ledger records the files read, never the unreadable paths
    entry = json.loads((tmp_path / "run" / "ledger.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert {Path(i["path"]).name for i in entry["inputs"]} == {"good.jsonl", "mixed.jsonl", "gbk.jsonl", "bom.txt",
                                                                "raw_nul.jsonl", "empty.jsonl", "big.jsonl",
                                                                "big_array.json"}


def test_one_file_mixing_utf8_and_gbk_lines_keeps_its_good_lines(tmp_path, capsys):
    """Exports of two systems (UTF-8 and GBK) concatenated into one file, plus one line in neither encoding: the
    good lines are kept, the bad one is quarantined by file and line (never its content), the GBK lines counted."""
    d = tmp_path / "in" / "docs"
    d.mkdir(parents=True)
    marker = "ACCT-6222021234567890"  # stands for customer data on the broken line: must not leak
    with open(d / "export.jsonl", "wb") as fh:
        for i in range(3):
            fh.write((json.dumps({"id": f"u{i}", "text": _doc(i)}, ensure_ascii=False) + "\n").encode("utf-8"))
        fh.write(b"\x80\xff " + marker.encode() + b" \xfe\xff\n")  # 0x80/0xFF: neither UTF-8 nor GB18030
        for i in range(3):
            fh.write((json.dumps({"id": f"g{i}", "text": _doc(10 + i)}, ensure_ascii=False) + "\n").encode("gbk"))
    rc, err = _build(tmp_path, capsys)
    assert rc == 0, err
    stats = _check_accounting(tmp_path)
    assert _quarantine(tmp_path) == {"export.jsonl": ["undecodable_line"]}
    (entry,) = [json.loads(x) for x in (_out(tmp_path) / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    assert set(entry) == {"stage", "file", "line", "reason"} and entry["line"] == 4
    assert stats["bad_files"] == 0 and stats["steps"][0]["in"] == 7 and stats["steps"][0]["quarantined"] == 1
    assert stats["encodings"] == {"mixed": 1} and stats["sources"][0]["lines_gb18030"] == 3
    from datasets import load_from_disk

    texts = {r["id"]: r["text"] for split in load_from_disk(str(_out(tmp_path) / "data")).values() for r in split}
    assert texts == {**{f"u{i}": _doc(i) for i in range(3)}, **{f"g{i}": _doc(10 + i) for i in range(3)}}
    card = (_out(tmp_path) / "card.md").read_text(encoding="utf-8")
    assert "mixed, read line by line" in card and "3 GB18030, 1 undecodable" in card
    for f in _out(tmp_path).rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".md"):
            assert marker not in f.read_text(encoding="utf-8"), f
    assert marker not in err


def test_glob_through_a_link_loop_reads_each_file_once(tmp_path, capsys):
    d = tmp_path / "in" / "docs"
    _jsonl(d / "a.jsonl", [{"text": _doc(i)} for i in range(6)])  # no ids: a second path would be a new record
    (d / "sub").mkdir()
    os.symlink("..", d / "sub" / "loop1")
    os.symlink("..", d / "sub" / "loop2")  # two loops: glob.glob('**') would walk 2^40 paths
    rc, err = _build(tmp_path, capsys, source="docs/**/*.jsonl")
    assert rc == 0, err
    stats = _check_accounting(tmp_path)
    assert stats["steps"][0]["in"] == 6 and stats["steps"][0]["kept"] == 6
    assert _quarantine(tmp_path) == {"loop1": ["linked_folder"], "loop2": ["linked_folder"]}


def test_wrong_field_names_everywhere_is_one_clear_error(tmp_path, capsys):
    _jsonl(tmp_path / "in" / "docs" / "a.jsonl", [{"id": i, "body": _doc(i)} for i in range(4)])
    rc, err = _build(tmp_path, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "a.jsonl:1" in lines[0] and "field_map" in lines[0]
    assert not (tmp_path / "run" / "ledger.jsonl").exists()


# ------------------------------------------------------------------------------------------- recipes


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def _run(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path, capsys):
    p = _write(tmp_path, "name: t\nbase: {path: /m}\ntrain: {lr: 1.0e-4, learning_rate: 3}\n")
    rc, err = _run(["run", str(p), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2 and len(err) == 1 and "unknown key 'train.learning_rate'" in err[0] and "lr" in err[0]
    assert not (tmp_path / "run").exists()


def test_yaml_alias_bomb_is_refused_fast(tmp_path, capsys):
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 10)]  # 10^10 elements if expanded
    p = _write(tmp_path, "name: t\nbase: {path: /m}\n" + "\n".join(lines) + "\n")
    t0 = time.perf_counter()
    rc, err = _run(["run", str(p), "--run-dir", str(tmp_path / "run")], capsys)
    assert time.perf_counter() - t0 < 5
    assert rc == 2 and len(err) == 1 and "aliases" in err[0] and f"{p}:4" in err[0]


@pytest.mark.parametrize("override,message", [
    ("train.lr=" + "9" * 20_000, "more than 10000"),
    ("base.build.hidden_size=100000000", "base.build.hidden_size = 100000000"),
    ("train.epochs=.inf", "finite number"),
    ("train.batch_size=1000000000000", "train.batch_size"),
    ("train.max_steps=100000000000000000000000", "train.max_steps"),
    ("seed=100000000000000000000000000000", "seed = "),
    ("corpora.scenario.synth.credit.train=999999999999", "corpora.scenario.synth.credit.train"),
])
def test_huge_override_values_are_clear_errors(tmp_path, capsys, override, message):
    p = _write(tmp_path, "name: t\ntokenizer: {train: true}\nbase: {build: {hidden_size: 32}}\n")
    rc, err = _run(["run", str(p), override, "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", "../../../banklm-escape"])
def test_recipe_name_with_path_traversal_is_refused(tmp_path, name):
    """The recipe name becomes the default run folder (``runs/<name>/…``): a name that is not one plain folder
    name is refused by the schema before anything is written. From ``work/runs`` the names reach up to
    the folder holding this test's temporary folder, which is compared before and after."""
    work = tmp_path / "work"
    work.mkdir()
    recipe = tiny_recipe(tmp_path / "r.yaml", name=name)
    before = sorted(p.relative_to(tmp_path.parent).as_posix() for p in tmp_path.parent.rglob("*"))
    out = banklm("run", recipe, cwd=work)  # no --run-dir: the name decides where the run would go
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr[-2000:]
    assert f"name = {name!r}" in err[0] and str(recipe) in err[0]
    assert sorted(p.relative_to(tmp_path.parent).as_posix() for p in tmp_path.parent.rglob("*")) == before
    assert not any(work.iterdir())


@pytest.mark.parametrize("path", ["../../etc/passwd", "samples:../../../../etc/passwd", "docs/*/../../../etc"])
def test_source_path_traversal_is_refused(tmp_path, capsys, path):
    (tmp_path / "in" / "docs").mkdir(parents=True)
    rc, err = _build(tmp_path, capsys, source=path)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "corpora.vertical" in err
    assert not (tmp_path / "run" / "ledger.jsonl").exists()


def test_run_dir_traversal_and_foreign_folders_are_refused(tmp_path, capsys):
    _jsonl(tmp_path / "in" / "docs" / "a.jsonl", [{"text": _doc(i)} for i in range(4)])
    p = _recipe(tmp_path)
    # a file (../../etc/passwd from a run folder two levels down)
    rc, err = _run(["corpus", "build", str(p), "--run-dir", "/etc/passwd"], capsys)
    assert rc == 2 and err == ["banklm: error: --run-dir /etc/passwd: exists and is not a folder"]
    # someone's non-empty folder (a home directory, /etc): never mixed with run outputs
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine", encoding="utf-8")
    before = sorted(os.listdir(home))
    rc, err = _run(["corpus", "build", str(p), "--run-dir", str(home)], capsys)
    assert rc == 2 and len(err) == 1 and "is not a banklm run folder" in err[0]
    assert sorted(os.listdir(home)) == before
    # corpora.root pointing at a file
    rc, err = _run(["corpus", "build", str(_recipe(tmp_path)), "corpora.root=/etc/passwd", "--run-dir",
                    str(tmp_path / "run")], capsys)
    assert rc == 2 and len(err) == 1 and "corpora.vertical.sources" in err[0]
