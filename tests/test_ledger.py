import json
import subprocess
import sys

import pytest

from banklm.chain import entry_hash
from banklm.ledger import Ledger, file_records, verify_run


@pytest.fixture
def run(tmp_path):
    """A run folder with three chained entries and their files."""
    rd = tmp_path / "run"
    (rd / "corpora").mkdir(parents=True)
    (rd / "corpora" / "a.txt").write_text("corpus", encoding="utf-8")
    (rd / "model").mkdir()
    (rd / "model" / "w.bin").write_bytes(b"\x00\x01weights")
    (rd / "eval.json").write_text('{"acc": 0.9}', encoding="utf-8")
    led = Ledger(rd)
    for stage, ins, outs in [("corpus", [], ["corpora"]), ("train", ["corpora"], ["model"]),
                             ("eval", ["model"], ["eval.json"])]:
        led.append(stage, params={"stage": stage}, inputs=file_records([rd / p for p in ins], rd),
                   outputs=file_records([rd / p for p in outs], rd), started_at="t0", finished_at="t1")
    return rd


def _lines(rd):
    return (rd / "ledger.jsonl").read_text(encoding="utf-8").splitlines()


def test_clean_run_verifies(run):
    assert verify_run(run) == []
    entries = Ledger(run).entries()
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] is None and entries[1]["prev"] == entries[0]["hash"]
    assert all(e["hash"] == entry_hash(e) for e in entries)
    assert entries[1]["outputs"][0] == {"path": "model/w.bin", "sha256": entries[1]["outputs"][0]["sha256"],
                                        "bytes": 9}
    assert {"torch", "transformers", "banklm"} <= set(entries[0]["versions"])


def test_one_byte_edit_of_output_is_named(run):
    p = run / "model" / "w.bin"
    data = bytearray(p.read_bytes())
    data[0] ^= 1
    p.write_bytes(bytes(data))
    problems = verify_run(run)
    assert len(problems) == 1
    assert problems[0].seq == 2 and problems[0].stage == "train" and problems[0].path == "model/w.bin"
    assert "changed" in str(problems[0])


def test_deleted_file_is_named(run):
    (run / "eval.json").unlink()
    problems = verify_run(run)
    assert [(p.seq, p.path) for p in problems] == [(3, "eval.json")]
    assert "missing" in problems[0].message


def test_deleted_entry_is_caught(run):
    lines = _lines(run)
    (run / "ledger.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n", encoding="utf-8")
    problems = verify_run(run)
    assert problems and problems[0].seq == 3 and problems[0].stage == "eval"
    assert any("deleted or reordered" in p.message for p in problems)


def test_reordered_entries_are_caught(run):
    lines = _lines(run)
    (run / "ledger.jsonl").write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n", encoding="utf-8")
    problems = verify_run(run)
    assert problems[0].seq in (1, 2)
    assert any("position 1 but has seq 2" in p.message for p in problems)


def test_edited_entry_is_caught(run):
    lines = _lines(run)
    e = json.loads(lines[1])
    e["params"]["stage"] = "trainX"  # an edit that keeps valid JSON
    lines[1] = json.dumps(e, ensure_ascii=False)
    (run / "ledger.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = verify_run(run)
    assert problems[0].seq == 2 and "edited" in problems[0].message


def test_rehashed_edit_still_breaks_chain(run):
    """An attacker who recomputes the edited entry's hash still breaks the next entry's prev link."""
    lines = _lines(run)
    e = json.loads(lines[1])
    e["params"]["stage"] = "trainX"
    e["hash"] = entry_hash(e)
    lines[1] = json.dumps(e, ensure_ascii=False)
    (run / "ledger.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    problems = verify_run(run)
    assert [p.seq for p in problems] == [3] and "prev" in problems[0].message


def test_garbage_line_and_missing_ledger(run, tmp_path):
    with open(run / "ledger.jsonl", "a", encoding="utf-8") as fh:
        fh.write("{not json\n")
    problems = verify_run(run)
    assert "not valid JSON" in problems[0].message and ":4:" in problems[0].message
    assert "no ledger" in str(verify_run(tmp_path)[0])


def test_newest_entry_wins_for_rewritten_file(run):
    """A later stage may rewrite a file; only the newest record of it is checked."""
    (run / "eval.json").write_text('{"acc": 0.95}', encoding="utf-8")
    Ledger(run).append("eval", params={}, inputs=[], outputs=file_records([run / "eval.json"], run),
                       started_at="t", finished_at="t")
    assert verify_run(run) == []


def test_cli_verify_exit_codes(run):
    cmd = [sys.executable, "-m", "banklm.cli", "verify", str(run)]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and "chain intact" in ok.stdout
    (run / "corpora" / "a.txt").write_text("corpuz", encoding="utf-8")
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "entry 1 (corpus)" in bad.stderr and "corpora/a.txt" in bad.stderr
