"""``banklm task init`` (issue 17): a task spec drafted from a bank's labelled table (CSV, GBK CSV, JSONL, Parquet,
Excel), personal information and protected attributes hidden, the spec loading and checking against its table
unedited and a recipe built on it running end to end; the table reader's formats and its one-line errors."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pytest
import yaml
from banklm.corpora.draft_spec import AGE_BANDS, DraftError, draft_examples, draft_spec, task_name

from banklm.cli import main
from banklm.tasks import load_spec, task_from_spec, unregister
from banklm.tasks.check import check_table
from banklm.tasks.table_files import read_table, row_label
from tests.helpers import run_banklm

SURNAMES = "张王李赵刘陈杨黄周吴徐孙马朱胡郭何高林罗"
GIVEN = ["伟", "芳", "娜", "秀英", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明", "超"]
COLUMNS = ["客户编号", "客户姓名", "手机号", "年龄", "性别", "客户类型", "贷款余额(万元)", "逾期天数", "负债收入比",
           "是否涉诉", "放款日期", "经营状况", "备注", "预警等级"]
REMARKS = ["客户经营稳定，按期还款，无不良记录，继续保持关注。", "借款人近期资金周转紧张，已电话提醒按时还款。",
           "实地走访：门店正常营业，库存充足，经营情况良好。"]


def bank_rows(n: int = 60, seed: int = 0, unlabelled_every: int = 0) -> list[dict]:
    """A post-loan ledger as a bank exports it: an id, a customer's name and mobile number, age and gender, the
    loan's figures, an optional column, free-text remarks, and the bank's label (learnable from 逾期天数)."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        overdue = r.choice([0, 0, 0, 5, 12, 35, 60, 95, 130])
        label = "预警" if overdue > 90 else "关注" if overdue > 30 else "正常"
        rows.append({
            "客户编号": f"KH{i:05d}", "客户姓名": r.choice(SURNAMES) + r.choice(GIVEN),
            "手机号": f"1{r.choice('3589')}{r.randrange(10**9):09d}", "年龄": r.randint(21, 68), "性别": r.choice("男女"),
            "客户类型": r.choice(["个人", "个体工商户", "企业"]), "贷款余额(万元)": round(r.uniform(5, 300), 1),
            "逾期天数": overdue, "负债收入比": f"{r.uniform(10, 90):.1f}%", "是否涉诉": r.choice("是否否否"),
            "放款日期": f"2023-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
            "经营状况": r.choice(["正常", "下滑", "停业", None]), "备注": r.choice(REMARKS),
            "预警等级": None if unlabelled_every and i % unlabelled_every == 0 else label,
        })
    return rows


def write_csv(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    lines = [",".join(COLUMNS)] + [",".join("" if r[c] is None else str(r[c]) for c in COLUMNS) for r in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def write_xlsx(path: Path, rows: list[dict], sheet: str = "台账", merge: str | None = None) -> Path:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = sheet
    ws.append(COLUMNS)
    for r in rows:
        ws.append([r[c] for c in COLUMNS])
    if merge:
        ws.merge_cells(merge)
    wb.create_sheet("说明").append(["本表为贷后台账导出"])
    wb.save(path)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows, columns=COLUMNS).to_parquet(path)
    return path


WRITERS = {
    "csv": lambda p, rows: write_csv(p / "贷后台账.csv", rows),
    "gbk_csv": lambda p, rows: write_csv(p / "贷后台账.csv", rows, "gbk"),
    "parquet": lambda p, rows: write_parquet(p / "贷后台账.parquet", rows),
    "xlsx": lambda p, rows: write_xlsx(p / "贷后台账.xlsx", rows),
}


@pytest.fixture(autouse=True)
def _forget_tasks():
    yield
    for name in ("bank_task", "postloan"):
        unregister(name)


# ------------------------------------------------------------------------------------------------ the CLI

@pytest.mark.parametrize("fmt", list(WRITERS))
def test_task_init_drafts_a_spec_that_hides_pii_and_bands_age(fmt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = bank_rows(60, unlabelled_every=20)
    table = WRITERS[fmt](tmp_path, rows)
    assert main(["task", "init", str(table), "--label", "预警等级", "--protected", "年龄,性别"]) == 0
    out = capsys.readouterr().out
    spec_path = tmp_path / "贷后台账.yaml"  # <table stem>.yaml in the current folder
    spec = load_spec(spec_path)
    f = spec.fields
    assert spec.name == "bank_task" and list(spec.model.answer.keys) == ["预警等级"]
    assert set(spec.model.answer.keys["预警等级"].values) == {"正常", "关注", "预警"}
    assert spec.model.answer.favourable == "正常" and not spec.rules and not spec.model.examples
    assert "预警等级" not in f and list(f) == COLUMNS[:-1]
    for name in ("客户编号", "客户姓名", "手机号", "年龄", "性别"):
        assert f[name].show is False, name
    assert f["年龄"].protected and f["年龄"].type == "integer" and f["年龄"].bands == AGE_BANDS
    assert f["性别"].protected and f["性别"].type == "category" and f["性别"].bands is None
    assert {n: f[n].type for n in COLUMNS[5:-1]} == {
        "客户类型": "category", "贷款余额(万元)": "decimal", "逾期天数": "integer", "负债收入比": "percent",
        "是否涉诉": "boolean", "放款日期": "date", "经营状况": "category", "备注": "text"}
    assert f["贷款余额(万元)"].unit == "万元" and f["贷款余额(万元)"].label == "贷款余额"
    assert f["经营状况"].required is False and f["逾期天数"].required is True
    assert spec.model.evaluation.segments == ["客户类型"]
    # the summary: counts, and each hidden column with why (the PII type for personal information)
    assert "60 rows: 57 labelled, 3 unlabelled" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert "hidden" in lines["客户姓名"] and "PERSON" in lines["客户姓名"]
    assert "hidden" in lines["手机号"] and "PHONE" in lines["手机号"]
    assert "identifier" in lines["客户编号"] and "protected" in lines["年龄"] and "25岁以下" in lines["年龄"]
    assert "shown" in lines["备注"] and "free text" in lines["备注"]
    # three example prompts; no name nor phone number of the table printed anywhere, nor in the spec
    assert out.count("[user] ") == 3 and out.count("[answer] 预警等级：") == 3
    text = spec_path.read_text(encoding="utf-8")
    for r in rows:
        assert r["客户姓名"] not in out and r["手机号"] not in out and r["客户姓名"] not in text
    # the spec checks against its own table unedited: the empty labels are unlabelled data, not problems
    assert main(["task", "check", str(spec_path), str(table)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "60 rows (3 unlabelled" in out and "no problems" in out
    assert out.count("[answer] 预警等级：") == 3  # examples from labelled rows


def test_task_init_in_a_subprocess_refuses_to_overwrite_and_names_the_task(tmp_path, monkeypatch):
    table = write_xlsx(tmp_path / "PostLoan 2024.xlsx", bank_rows(40))
    out = run_banklm("task", "init", str(table), "--label", "预警等级", "--out", "specs/pl.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert load_spec(tmp_path / "specs" / "pl.yaml").name == "postloan_2024"
    assert "wrote specs/pl.yaml (task 'postloan_2024')" in out.stdout
    before = (tmp_path / "specs" / "pl.yaml").read_bytes()
    out = run_banklm("task", "init", str(table), "--label", "预警等级", "--out", "specs/pl.yaml", "--name", "pl2",
                     cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--force" in out.stderr
    assert (tmp_path / "specs" / "pl.yaml").read_bytes() == before
    args = ["task", "init", str(table), "--label", "预警等级", "--out", str(tmp_path / "specs" / "pl.yaml")]
    assert main([*args, "--name", "pl2", "--force"]) == 0 and load_spec(tmp_path / "specs" / "pl.yaml").name == "pl2"
    assert main([*args[:-1], str(tmp_path / "specs"), "--force"]) == 2  # a folder is not a spec file


def test_max_labels_refusal_names_the_top_counts(tmp_path, capsys):
    rows = bank_rows(40)
    table = write_csv(tmp_path / "t.csv", rows)
    assert main(["task", "init", str(table), "--label", "逾期天数", "--max-labels", "3", "--out",
                 str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "s.yaml").exists()
    days = [r["逾期天数"] for r in rows]
    top = max(set(days), key=days.count)
    assert f"label column '逾期天数' has {len(set(days))} distinct values, more than --max-labels 3" in err
    assert f"(most common: {top} {days.count(top)}, " in err


def _bad_tables(tmp_path: Path) -> dict:
    rows = bank_rows(12)
    write_csv(tmp_path / "ok.csv", rows)
    write_xlsx(tmp_path / "merged.xlsx", rows, merge="A1:B1")
    write_xlsx(tmp_path / "ok.xlsx", rows)
    (tmp_path / "dup.csv").write_text("年龄,年龄,预警等级\n30,31,正常\n", encoding="utf-8")
    (tmp_path / "broken.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    (tmp_path / "old.xls").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "bad.jsonl").write_text('{"年龄": 30, "预警等级": "正常"}\n{"年龄": 31,\n', encoding="utf-8")
    return {
        "label column missing": (["ok.csv", "--label", "等级"], "--label: no column '等级' (columns: 客户编号"),
        "sheet missing": (["ok.xlsx", "--label", "预警等级", "--sheet", "Sheet1"],
                          "no sheet 'Sheet1' (sheets: '台账', '说明')"),
        "merged header": (["merged.xlsx", "--label", "预警等级"],
                          "merged header cells A1:B1 in row 1: unmerge them and give every column its own name"),
        "unreadable file": (["broken.xlsx", "--label", "预警等级"], "broken.xlsx: cannot read the workbook"),
        "unsupported suffix": (["old.xls", "--label", "预警等级"], "unsupported table format '.xls'"),
        "duplicate headers": (["dup.csv", "--label", "预警等级"], "duplicate column name '年龄' (columns 1 and 2)"),
        "bad jsonl line": (["bad.jsonl", "--label", "预警等级"], "bad.jsonl: line 2: not valid JSON"),
        "missing table": (["nope.csv", "--label", "预警等级"], "nope.csv: table not found"),
        "protected label": (["ok.csv", "--label", "预警等级", "--protected", "预警等级"],
                            "--protected '预警等级' is the label column"),
    }


@pytest.mark.parametrize("case", ["label column missing", "sheet missing", "merged header", "unreadable file",
                                  "unsupported suffix", "duplicate headers", "bad jsonl line", "missing table",
                                  "protected label"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, message = _bad_tables(tmp_path)[case]
    assert main(["task", "init", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not list(tmp_path.glob("*.yaml"))


# ------------------------------------------------------------------------------------------------ the library

def test_draft_spec_directly_infers_types_and_leaves_out_what_cannot_be_a_field():
    r = random.Random(1)
    rows = [{"合同号": f"HT{i:04d}", "value": i, "是否逾期": "Y" if i % 3 else "N", "有无担保": "有" if i % 2 else "无",
             "首次逾期": "1" if i % 4 else "0", "授信额度": f"{r.randint(1, 90) * 1000:,}", "利率(%)": r.choice([4.35, 5.1]),
             "月收入": r.randint(3, 40) * 1000, "空列": None, "放款日": dt.date(2024, 1, 1 + i % 28),
             "分类": r.choice(["A", "B"]), "结论": "通过" if i % 3 else "拒绝"} for i in range(40)]
    text, s = draft_spec(rows, label="结论", protected=["月收入"], source_name="审批台账.csv")
    spec = load_spec_text(text)
    f = spec.fields
    assert {n: f[n].type for n in f} == {"合同号": "text", "是否逾期": "boolean", "有无担保": "boolean",
                                          "首次逾期": "boolean", "授信额度": "integer", "利率(%)": "percent",
                                          "月收入": "integer", "放款日": "date", "分类": "category"}
    assert f["合同号"].show is False and (f["有无担保"].true_text, f["有无担保"].false_text) == ("有", "无")
    bands = f["月收入"].bands  # quartiles rounded to two significant digits, the last open
    tops = list(bands.values())
    assert f["月收入"].protected and tops[-1] is None and tops[:-1] == sorted(tops[:-1]) and len(tops) >= 3
    assert all(len(str(int(t)).rstrip("0")) <= 2 for t in tops[:-1])
    cols = {c["column"]: c for c in s["columns"]}
    assert cols["value"]["field"] is None and "reserved name" in cols["value"]["why"]
    assert cols["空列"]["why"] == "left out: no values"
    assert s["label_counts"] == {"通过": 26, "拒绝": 14} and s["favourable"] == "通过" and s["unlabelled"] == 0
    # every cell of the table reads as the drafted type: the spec checks against it
    assert spec.model.answer.favourable == "通过"
    examples = draft_examples(text, rows, 3, source_name="审批台账.csv")
    assert [e["answer"] for e in examples] == ["结论：拒绝", "结论：通过", "结论：通过"]
    assert all("HT000" not in e["prompt"] and "授信额度：" in e["prompt"] for e in examples)


def test_the_banks_reason_column_is_an_answer_key_never_an_input():
    """A column of the bank's reasons (理由) would give the label away in the prompt: it becomes the answer's
    reason key (auto-detected by name, or --reason), and ``--reason none`` keeps it an input."""
    rows = [{"逾期天数": 100 * (i % 4), "客户类型": "个人" if i % 2 else "企业", "分类": c,
             "分类理由": "" if i % 5 == 0 else f"逾期{100 * (i % 4)}天"}
            for i, c in enumerate(["正常", "次级", "可疑", "损失"] * 10)]
    text, s = draft_spec(rows, label="分类", source_name="t.csv")
    spec = load_spec_text(text)
    assert s["reason"] == "分类理由" and "分类理由" not in spec.fields
    assert list(spec.model.answer.keys) == ["分类", "分类理由"] and spec.model.answer.keys["分类理由"].type == "reason"
    assert spec.model.answer.keys["分类理由"].max_length == 10  # 7 characters, a fifth more, in tens
    examples = draft_examples(text, rows, 2, source_name="t.csv")
    assert [e["answer"] for e in examples] == ["分类：正常", "分类：次级；分类理由：逾期100天"]  # row 0 has none
    assert all("逾期100天" not in e["prompt"] or "逾期天数" in e["prompt"] for e in examples)
    text, s = draft_spec(rows, label="分类", source_name="t.csv", reason="none")
    assert s["reason"] is None and "分类理由" in load_spec_text(text).fields
    with pytest.raises(DraftError, match="--reason '备注': no such column"):
        draft_spec(rows, label="分类", source_name="t.csv", reason="备注")


def load_spec_text(text: str):
    from banklm.tasks import parse_spec

    return parse_spec(text, "draft.yaml")


def test_draft_spec_errors_and_names():
    rows = bank_rows(30)
    with pytest.raises(DraftError, match=r"--id: no column 'ID'"):
        draft_spec(rows, label="预警等级", id_col="ID", source_name="t.csv")
    with pytest.raises(DraftError, match="label column '预警等级' is empty in every row"):
        draft_spec([{**r, "预警等级": None} for r in rows], label="预警等级", source_name="t.csv")
    with pytest.raises(DraftError, match="a date column cannot be a protected attribute"):
        draft_spec(rows, label="预警等级", protected=["放款日期"], source_name="t.csv")
    with pytest.raises(DraftError, match="task name 'credit'"):
        draft_spec(rows, label="预警等级", source_name="t.csv", name="credit")
    assert [task_name(n) for n in ("贷后台账.xlsx", "Credit.csv", "2024 loans.csv", "A-b c.parquet")] == [
        "bank_task", "credit_bank", "t_2024_loans", "a_b_c"]
    # free text with a name now and then stays shown (scrubbed when printed), a column of names does not
    rows = [{**r, "备注": f"借款人{r['客户姓名']}近期资金周转紧张，已电话提醒按时还款。" if i % 4 == 0 else r["备注"]}
            for i, r in enumerate(bank_rows(40))]
    text, s = draft_spec(rows, label="预警等级", source_name="t.csv")
    cols = {c["column"]: c for c in s["columns"]}
    assert cols["备注"]["shown"] and cols["备注"]["pii"] is None and cols["备注"]["pii_share"] > 0
    assert "hold personal information: scrubbed when printed" in cols["备注"]["why"]
    assert cols["客户姓名"]["pii"] == "PERSON" and not cols["客户姓名"]["shown"]
    scrubbed = draft_examples(text, rows, 1, source_name="t.csv", scrub=lambda x: x.replace(rows[0]["客户姓名"], "<P>"))
    assert "借款人<P>" in scrubbed[0]["prompt"]


# ------------------------------------------------------------------------------------------------ the reader

def test_read_table_formats_cells_and_row_numbers(tmp_path):
    import openpyxl

    (tmp_path / "bom.csv").write_bytes("\ufeff姓名,年龄\n张三,30\n\n,\n\"李\n四\",40\n".encode())
    t = read_table(tmp_path / "bom.csv")
    assert t.columns == ["姓名", "年龄"] and t == [{"姓名": "张三", "年龄": "30"}, {"姓名": "李\n四", "年龄": "40"}]
    assert [row_label(tmp_path / "bom.csv", i, t) for i in range(2)] == ["row 2", "row 5"]
    (tmp_path / "g.tsv").write_bytes("姓名\t备注\n王五\t已还款\n".encode("gb18030"))
    assert read_table(tmp_path / "g.tsv") == [{"姓名": "王五", "备注": "已还款"}]
    (tmp_path / "trailing.csv").write_text("a,b,\n1,,\n", encoding="utf-8")  # an unnamed empty column is dropped
    assert read_table(tmp_path / "trailing.csv") == [{"a": "1", "b": None}]
    (tmp_path / "t.jsonl").write_text('{"a": 1}\n\n{"b": "x", "a": null}\n', encoding="utf-8")
    t = read_table(tmp_path / "t.jsonl")
    assert t == [{"a": 1, "b": None}, {"a": None, "b": "x"}] and t.lines == [1, 3]
    (tmp_path / "list.jsonl").write_text('[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"list.jsonl: line 1: a JSON object \(one row\) per line, got list"):
        read_table(tmp_path / "list.jsonl")
    with pytest.raises(ValueError, match="sheet '台账' given, but a .csv file has no sheets"):
        read_table(tmp_path / "bom.csv", sheet="台账")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["类型", "比例", "日期", None])
    ws.append(["企业", 0.453, dt.datetime(2024, 3, 1), None])
    ws.append([None, None, None, None])
    ws.append(["个人", 0.1, None, None])
    ws.append([None, 0.2, None, None])
    ws.merge_cells("A4:A5")  # a merged block of data cells: its value in every row it spans
    for r in range(2, 6):
        ws.cell(r, 2).number_format = "0.0%"
    extra = wb.create_sheet("第二页")
    extra.append(["x"])
    extra.append([1])
    wb.save(tmp_path / "t.xlsx")
    t = read_table(tmp_path / "t.xlsx")
    assert t == [{"类型": "企业", "比例": "45.3%", "日期": dt.datetime(2024, 3, 1)},
                 {"类型": "个人", "比例": "10%", "日期": None}, {"类型": "个人", "比例": "20%", "日期": None}]
    assert t.lines == [2, 4, 5] and t.where.endswith("sheet 'Sheet'")
    assert read_table(tmp_path / "t.xlsx", sheet="第二页") == [{"x": 1}]
    ws["D2"] = "有值"
    wb.save(tmp_path / "unnamed.xlsx")
    with pytest.raises(ValueError, match="sheet 'Sheet': column D has no name in the header row"):
        read_table(tmp_path / "unnamed.xlsx")


# ------------------------------------------------------------------------------------------------ end to end

RECIPE = """\
name: drafted
seed: 0
device: cpu
tasks: {{postloan: postloan.yaml}}
corpora:
  root: {root}
  scenario:
    tables: [{{path: postloan.xlsx, task: postloan}}]
tokenizer: {{train: true, vocab_size: 800}}
base:
  build: {{arch: llama, hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 4, intermediate_size: 128}}
train: {{method: full, lr: 1.0e-3, max_steps: 3, batch_size: 8, max_length: 384, compile: false}}
eval: {{limit: 4, max_new_tokens: 16, batch_size: 8}}
export: {{gguf: {{enabled: false}}, onnx: {{enabled: false}}}}
"""


@pytest.mark.slow
def test_the_drafted_spec_runs_unedited_in_a_recipe(tmp_path, monkeypatch):
    """task init on an Excel ledger (600 rows, 3 labels, 6 unlabelled), then a recipe naming the spec and the table
    runs corpus -> tokenizer -> base -> train -> eval -> report; the eval scores the task with fairness by the
    drafted bands."""
    monkeypatch.chdir(tmp_path)
    write_xlsx(tmp_path / "postloan.xlsx", bank_rows(600, unlabelled_every=100))
    assert main(["task", "init", "postloan.xlsx", "--label", "预警等级", "--protected", "年龄,性别"]) == 0
    (tmp_path / "r.yaml").write_text(RECIPE.format(root=tmp_path), encoding="utf-8")
    out = run_banklm("run", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    stats = json.loads((run / "corpora" / "scenario" / "stats.json").read_text(encoding="utf-8"))
    assert sum(split.get("postloan", 0) for split in stats["by_task"].values()) >= 594
    res = json.loads((run / "eval" / "sft" / "results.json").read_text(encoding="utf-8"))["tasks"]["postloan"]
    assert res["n"] == 4 and set(res["fairness"]) >= {"年龄_band", "性别"}
    assert (run / "sft" / "merged" / "tasks" / "postloan.yaml").read_bytes() == (tmp_path / "postloan.yaml").read_bytes()
    recorded = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))["tasks"]["postloan"]
    assert Path(recorded["path"]).name == "postloan.yaml"
    problems = check_table(task_from_spec(tmp_path / "postloan.yaml"), tmp_path / "postloan.xlsx").problems
    assert all(p.kind == "empty" and p.column == "预警等级" for p in problems)  # at most the unlabelled rows
