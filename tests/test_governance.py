"""Governance: the complete ledger, MODEL_CARD.md, the report in a real browser, `banklm compare`,
`banklm verify` against the card, and no PII value anywhere in a run folder.

The slow tests read the session's small quickstart run (tests/conftest.py: `quickstart_run`) and never
modify it: tamper tests work on copies.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from banklm.compare import FROM_RECIPE_FILE, compare_runs, format_comparison, previous_run
from banklm.io import sha256_file
from banklm.ledger import (
    Ledger,
    card_artefacts_section,
    data_lineage,
    file_records,
    read_card_artefacts,
    verify_run,
)
from banklm.modelcard import render_model_card
from banklm.pipeline import run_stages
from banklm.recipe import validate_recipe
from banklm.results import collect
from banklm.stages import STAGES
from tests.headless import check_page, find_chromium, non_blank_fraction
from tests.helpers import QUICKSTART_SMALL, run_banklm

SECTIONS = ["Intended use", "Out-of-scope use", "Responsible entity and contact", "Base model and licence",
            "Training data", "De-identification", "Training method and hyper-parameters", "Evaluation results",
            "Before/after quantization", "Exported artefacts", "Known limitations and failure examples",
            "Change log", "Traceability"]
REPORT_SECTIONS = ["Pipeline", "Corpora", "Training", "Evaluation", "Export", "Ledger"]


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _card_section(card: str, title: str) -> str:
    m = re.search(rf"^## [^\n]*{re.escape(title)}\n(.*?)(?=^## |\Z)", card, flags=re.S | re.M)
    assert m, f"card has no section {title!r}"
    return m.group(1)


def _row(text: str, first_cells: str) -> list[str]:
    """The cells of the Markdown table row that starts with ``first_cells``."""
    for line in text.splitlines():
        if line.startswith(f"| {first_cells} |"):
            return [c.strip() for c in line.strip().strip("|").split(" | ")]
    raise AssertionError(f"no row starting with {first_cells!r}")


# ----------------------------------------------------------------------------------------- fast tests

@pytest.fixture
def tiny_run(tmp_path):
    """A run folder with an export stage and a card that lists its files."""
    rd = tmp_path / "run"
    (rd / "export" / "gguf").mkdir(parents=True)
    (rd / "export" / "gguf" / "m-f16.gguf").write_bytes(b"GGUF f16 weights")
    (rd / "export" / "gguf" / "m-q8_0.gguf").write_bytes(b"GGUF q8_0 weights!")
    led = Ledger(rd)
    led.append("export", params={}, inputs=[], outputs=file_records([rd / "export"], rd), started_at="t0",
               finished_at="t1")
    (rd / "MODEL_CARD.md").write_text("# card\n\n" + card_artefacts_section(file_records([rd / "export"], rd))
                                      + "\n\n## next\n| `x` | 1 | " + "0" * 64 + " |\n", encoding="utf-8")
    return rd


def test_card_table_reads_back(tiny_run):
    rows = read_card_artefacts((tiny_run / "MODEL_CARD.md").read_text(encoding="utf-8"))
    assert [(r["path"], r["bytes"]) for r in rows] == [("export/gguf/m-f16.gguf", 16), ("export/gguf/m-q8_0.gguf", 18)]
    assert rows[0]["sha256"] == sha256_file(tiny_run / "export" / "gguf" / "m-f16.gguf")  # the row under "next" is not read
    assert verify_run(tiny_run) == []


def test_verify_catches_card_that_names_other_files(tiny_run):
    card = tiny_run / "MODEL_CARD.md"
    text = card.read_text(encoding="utf-8")
    q8 = sha256_file(tiny_run / "export" / "gguf" / "m-q8_0.gguf")
    card.write_text(text.replace(q8, "ab" * 32), encoding="utf-8")
    problems = verify_run(tiny_run)
    assert [(p.path, "MODEL_CARD.md gives sha256" in p.message) for p in problems] == [("export/gguf/m-q8_0.gguf", True)]
    card.write_text(text.replace("export/gguf/m-q8_0.gguf", "export/gguf/other.gguf"), encoding="utf-8")
    problems = verify_run(tiny_run)
    assert [p.path for p in problems] == ["export/gguf/other.gguf"] and "no ledger entry wrote it" in problems[0].message
    assert verify_run(tiny_run, check_card=False) == []


def test_verify_names_swapped_export_files_against_ledger_and_card(tiny_run):
    card = tiny_run / "MODEL_CARD.md"
    g = tiny_run / "export" / "gguf"
    os.replace(g / "m-f16.gguf", g / "tmp")
    os.replace(g / "m-q8_0.gguf", g / "m-f16.gguf")
    os.replace(g / "tmp", g / "m-q8_0.gguf")
    msgs = [str(p) for p in verify_run(tiny_run)]
    for name in ("m-f16.gguf", "m-q8_0.gguf"):
        assert any(name in m and "file changed since it was recorded" in m for m in msgs), msgs
        assert any(name in m and "not the one MODEL_CARD.md names" in m for m in msgs), msgs
    assert card.exists()


def test_data_lineage_keeps_counts_never_values():
    stats = {"kind": "private", "seed": 7, "sources": [{"name": "notes", "path": "in/notes.jsonl", "format": "auto",
                                                         "weight": 2.0, "files": 1, "records_read": 3, "sampled": 6,
                                                         "licence": "internal", "encoding_notes": []}],
             "records_after_weights": 6,
             "steps": [{"step": "pii", "in": 6, "kept": 6, "dropped": 0, "quarantined": 0,
                        "examples": {"x": ["客户上官婉清 13800138000"]}}],
             "counts": {"in": 6, "kept": 6, "dropped": 0, "quarantined": 0},
             "splits": {"train": 5, "validation": 0, "test": 1},
             "split": {"seed": 7, "fractions": {"train": 0.9, "validation": 0.0, "test": 0.1}, "stratified_by": "label",
                       "by_label": {"train": {"": 5}}},
             "pii": {"mode": "placeholder", "counts": {"PHONE": 4, "PERSON": 2}, "records_with_pii": 3}}
    lin = data_lineage(stats, seed=7)
    assert lin["pii"] == {"mode": "placeholder", "counts_by_type": {"PERSON": 2, "PHONE": 4}, "records_with_pii": 3}
    assert lin["sources"] == [{"name": "notes", "path": "in/notes.jsonl", "format": "auto", "weight": 2.0, "files": 1,
                               "records_read": 3, "sampled": 6, "licence": "internal"}]
    assert lin["sampling"]["source_weights"] == {"notes": 2.0} and lin["sampling"]["records_after_weights"] == 6
    assert lin["sampling"]["split"] == {"seed": 7, "fractions": {"train": 0.9, "validation": 0.0, "test": 0.1},
                                        "stratified_by": "label"}
    assert lin["counts"]["splits"] == {"train": 5, "validation": 0, "test": 1}
    blob = json.dumps(lin, ensure_ascii=False)
    assert "上官婉清" not in blob and "13800138000" not in blob
    synth = data_lineage({"sources": [{"type": "synth", "task": "aml", "train": 10, "validation": 2, "test": 3,
                                       "difficulty": 0.5}], "splits": {"train": 10}}, seed=3)
    assert synth["sampling"]["synth"] == {"generator_seed": 3, "per_task": {"aml": {"train": 10, "validation": 2,
                                                                                    "test": 3, "difficulty": 0.5}}}
    mix = data_lineage({"proportions": {"scenario": 0.7, "general": 0.3}, "seed": 5,
                        "splits": {"train": {"total": 100, "sources": {"scenario": {"taken": 70}, "general": {"taken": 30}}},
                                   "validation": {"skipped": "no validation split in general"}}})
    assert mix["sampling"]["mix"] == {"proportions": {"scenario": 0.7, "general": 0.3}, "seed": 5,
                                      "taken": {"train": {"scenario": 70, "general": 30}}}
    assert mix["counts"]["splits"] == {"train": 100, "validation": "no validation split in general"}


def _fake_run(root, name, lr, acc, n_train, started=None, recipe_name="demo"):
    """A run folder whose ledger records corpus, train and eval like the pipeline does (params are recipe
    sections plus top-level keys), with aml accuracy ``acc`` and a credit accuracy that does not change."""
    rd = root / name
    (rd / "corpora" / "scenario").mkdir(parents=True)
    (rd / "eval" / "sft").mkdir(parents=True)
    (rd / "sft").mkdir()
    (rd / "recipe.yaml").write_text(yaml.safe_dump({"name": recipe_name, "train": {"lr": lr, "epochs": 1},
                                                    "eval": {"limit": 20}, "report": {"owner": "risk dept."}}),
                                    encoding="utf-8")
    (rd / "corpora" / "scenario" / "stats.json").write_text(json.dumps({"splits": {"train": n_train, "test": 5}}))
    (rd / "sft" / "model.bin").write_text(f"weights trained with lr={lr}")
    (rd / "eval" / "sft" / "results.json").write_text(json.dumps(
        {"tasks": {"aml": {"accuracy": acc, "positive": {"key": "conclusion", "value": "可疑", "recall": 0.5}},
                   "credit": {"accuracy": 0.6}},
         "overall": {"accuracy": acc}}))
    led, t = Ledger(rd), started or name
    corpus = led.append("corpus", params={"corpora": {"scenario": {"synth": {"aml": {"train": n_train}}}}, "seed": 0},
                        inputs=[], outputs=file_records([rd / "corpora"], rd), started_at=t, finished_at=t)
    train = led.append("train", params={"train": {"lr": lr, "epochs": 1}, "device": "cpu", "seed": 0, "processes": 1},
                       inputs=corpus["outputs"], outputs=file_records([rd / "sft"], rd), started_at=t, finished_at=t)
    led.append("eval", params={"eval": {"limit": 20}, "device": "cpu"}, inputs=train["outputs"],
               outputs=file_records([rd / "eval"], rd), started_at=t, finished_at=t)
    return rd


def test_compare_tables_on_two_small_folders(tmp_path):
    a = _fake_run(tmp_path, "a", 1e-3, 0.5, 10)
    b = _fake_run(tmp_path, "b", 3e-3, 0.75, 12)
    diff = compare_runs(a, b)
    assert diff["recipe"] == [("corpora.scenario.synth.aml.train", 10, 12, "corpus"), ("train.lr", 1e-3, 3e-3, "train")]
    assert diff["warnings"] == {"a": [], "b": []}
    assert diff["data"] == [("scenario", "train", 10, 12), ("scenario", "test", 5, 5)]
    assert diff["data_content_changed"] == ["scenario"]
    assert ("sft/aml/accuracy", 0.5, 0.75) in diff["scores"] and ("sft/overall/accuracy", 0.5, 0.75) in diff["scores"]
    text = format_comparison(diff)
    assert "WARNING" not in text
    assert re.search(r"^train\.lr\s+0\.001\s+0\.003\s+train$", text, flags=re.M)
    assert re.search(r"^scenario\s+train\s+10\s+12\s+\+2$", text, flags=re.M)
    scores = text.split("\nscores\n")[1]
    assert re.match(r"model/task/metric\s+a\s+b\s+B - A\n", scores)
    assert re.search(r"^sft/aml/accuracy\s+0\.5\s+0\.75\s+\+0\.25$", scores, flags=re.M)  # both values, the delta
    assert re.search(r"^sft/credit/accuracy\s+0\.6\s+0\.6\s+0$", scores, flags=re.M)
    out = run_banklm("compare", "--json", str(a), str(b), cwd=tmp_path)
    assert out.returncode == 0 and ["train.lr", 1e-3, 3e-3, "train"] in json.loads(out.stdout)["recipe"]
    out = run_banklm("compare", str(a), str(b), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == text
    out = run_banklm("compare", str(a), str(tmp_path / "nope"), cwd=tmp_path)
    assert out.returncode == 2 and "nope: not a folder" in out.stderr
    (tmp_path / "empty").mkdir()
    out = run_banklm("compare", str(a), str(tmp_path / "empty"), cwd=tmp_path)
    assert out.returncode == 2 and "not a banklm run folder" in out.stderr


def _en_recipe(name="demo"):
    return validate_recipe({"name": name, "base": {"path": "/nowhere"}, "report": {"language": "en"}})


def test_change_log_in_the_model_card_shows_changed_parameters_and_scores(tmp_path):
    runs = tmp_path / "runs" / "demo"
    a = _fake_run(runs, "a", 1e-3, 0.5, 10, started="2026-01-01T10:00:00")
    b = _fake_run(runs, "b", 3e-3, 0.75, 10, started="2026-01-02T10:00:00")
    log = _card_section(render_model_card(collect(b), _en_recipe()), "Change log")
    assert f"Compared with the previous run `a` (`banklm compare {a.resolve()} {b}`)" in log
    assert "Warning" not in log
    params = log.split("### Parameters")[1].split("### Data")[0]
    assert _row(params, "key") == ["key", "a", "this run", "recorded by"]
    assert _row(params, "train.lr") == ["train.lr", "0.001", "0.003", "train"]
    assert len(re.findall(r"^\| (?!key |---)", params, flags=re.M)) == 1  # corpus and eval params are equal
    assert "Records per corpus and split unchanged (counts and content)." in log
    scores = log.split("### Scores")[1]
    assert _row(scores, "model/task/metric") == ["model/task/metric", "a", "this run", "change"]
    assert _row(scores, "sft/aml/accuracy") == ["sft/aml/accuracy", "0.5", "0.75", "+0.25"]
    assert _row(scores, "sft/overall/accuracy") == ["sft/overall/accuracy", "0.5", "0.75", "+0.25"]
    assert "sft/credit/accuracy" not in scores and "conclusion=可疑" not in scores  # unchanged: left out
    first = _card_section(render_model_card(collect(a), _en_recipe()), "Change log")
    assert "First run of this recipe" in first


def test_previous_run_is_the_newest_earlier_run_of_the_same_recipe(tmp_path):
    runs = tmp_path / "runs" / "demo"
    older = _fake_run(runs, "r1", 1e-3, 0.5, 10, started="2026-01-01T10:00:00")
    prev = _fake_run(runs, "r2", 1e-3, 0.5, 10, started="2026-01-02T10:00:00")
    _fake_run(runs, "other", 1e-3, 0.5, 10, started="2026-01-02T12:00:00", recipe_name="other")
    mine = _fake_run(runs, "r3", 1e-3, 0.5, 10, started="2026-01-03T10:00:00")
    later = _fake_run(runs, "r4", 1e-3, 0.5, 10, started="2026-01-04T10:00:00")
    (runs / "latest").symlink_to("r4")
    unreadable = runs / "r2b"
    unreadable.mkdir()
    (unreadable / "recipe.yaml").write_text("name: demo\n", encoding="utf-8")
    (unreadable / "ledger.jsonl").write_text("not json\n", encoding="utf-8")
    (runs / "recipe-only").mkdir()
    (runs / "recipe-only" / "recipe.yaml").write_text("name: demo\n", encoding="utf-8")
    assert previous_run(mine, "demo") == prev.resolve()  # not r4 (later), other (another recipe), r1 (older)
    assert previous_run(later, "demo") == mine.resolve()  # nor the `latest` link to itself
    assert previous_run(prev, "demo") == older.resolve()
    assert previous_run(older, "demo") is None
    assert previous_run(runs / "other", "other") is None


def test_a_hand_edited_recipe_yaml_does_not_change_the_reported_parameters(tmp_path):
    a = _fake_run(tmp_path, "a", 1e-3, 0.5, 10)
    b = _fake_run(tmp_path, "b", 3e-3, 0.75, 10)
    before = compare_runs(a, b)
    edited = yaml.safe_load((b / "recipe.yaml").read_text(encoding="utf-8"))
    edited["train"]["lr"] = 1e-3       # as if b had trained with a's lr
    edited["eval"]["limit"] = 5
    edited["seed"] = 7
    (b / "recipe.yaml").write_text(yaml.safe_dump(edited), encoding="utf-8")
    assert verify_run(b, check_unrecorded=True) == []  # banklm verify does not read recipe.yaml
    assert compare_runs(a, b) == before
    edited["report"]["owner"] = "someone else"  # a key no stage records: shown, but marked as such
    (b / "recipe.yaml").write_text(yaml.safe_dump(edited), encoding="utf-8")
    after = compare_runs(a, b)
    assert after["recipe"] == before["recipe"] + [("report.owner", "risk dept.", "someone else", FROM_RECIPE_FILE)]
    assert re.search(r"^report\.owner\s+risk dept\.\s+someone else\s+recipe\.yaml \(not recorded\)$",
                     format_comparison(after), flags=re.M)
    (b / "recipe.yaml").unlink()  # not needed: the ledger has what a comparison shows
    assert compare_runs(a, b) == before


def test_compare_says_when_a_ledger_or_a_score_file_was_tampered_with(tmp_path):
    a = _fake_run(tmp_path, "a", 1e-3, 0.5, 10)
    b = _fake_run(tmp_path, "b", 1e-3, 0.5, 10)
    ledger = b / "ledger.jsonl"
    ledger.write_text(ledger.read_text(encoding="utf-8").replace('"lr":0.001', '"lr":0.0003', 1), encoding="utf-8")
    results = a / "eval" / "sft" / "results.json"
    results.write_text(results.read_text().replace('"accuracy": 0.6', '"accuracy": 0.9'))
    diff = compare_runs(a, b)
    assert diff["recipe"] == [("train.lr", 1e-3, 3e-4, "train")]  # compared all the same, but:
    assert diff["warnings"] == {
        "a": ["ledger check failed: entry 3 (eval): eval/sft/results.json: file changed since it was recorded "
              "(sha256 differs)"],
        "b": ["ledger check failed: entry 2 (train): content was edited: its hash does not match"]}
    text = format_comparison(diff)
    assert text.split("\n")[3] == "WARNING: the tables below may not show what made these runs' outputs"
    assert "  A (a): ledger check failed: entry 3 (eval): eval/sft/results.json: file changed" in text
    assert "  B (b): ledger check failed: entry 2 (train): content was edited" in text
    assert f"`banklm verify {a}` re-checks every file of run A" in text
    (a / "eval" / "extra").mkdir()
    (a / "eval" / "extra" / "results.json").write_text(json.dumps({"tasks": {"aml": {"accuracy": 1.0}}}))
    assert "ledger check failed: eval/extra/results.json: not recorded by any ledger entry (added or replaced " \
           "after its stage ran)" in compare_runs(a, b)["warnings"]["a"]
    card = render_model_card(collect(b), _en_recipe())  # previous_run needs siblings: a is one here
    assert "- **Warning** this run: ledger check failed: entry 2 (train): content was edited" in card


def _stand_in_stages():
    """The real corpus, train and eval stages (their params: the ledger keys the pipeline really writes)
    doing stand-in work: the "model" is its lr, and its score depends on the lr it was trained with."""
    def corpus(ctx):
        d = ctx.path("corpora", "scenario")
        d.mkdir(parents=True, exist_ok=True)
        (d / "stats.json").write_text(json.dumps({"splits": {"train": 10, "test": 4}}))
        return [d]

    def train(ctx):
        ctx.path("sft").mkdir(exist_ok=True)
        (ctx.path("sft", "model.json")).write_text(json.dumps({"lr": ctx.recipe.train.lr}))
        return [ctx.path("sft")]

    def evaluate(ctx):
        lr = json.loads(ctx.path("sft", "model.json").read_text())["lr"]
        ctx.path("eval", "sft").mkdir(parents=True, exist_ok=True)
        acc = 0.5 if lr < 2e-3 else 0.75
        ctx.path("eval", "sft", "results.json").write_text(json.dumps({"tasks": {"credit": {"accuracy": acc}}}))
        return [ctx.path("eval")]

    by_name = {st.name: st for st in STAGES}
    return [dataclasses.replace(by_name["corpus"], inputs=lambda ctx: [], run=corpus),
            dataclasses.replace(by_name["train"], inputs=lambda ctx: [ctx.path("corpora")], run=train),
            dataclasses.replace(by_name["eval"], inputs=lambda ctx: [ctx.path("sft")], run=evaluate)]


def test_a_partial_rerun_with_an_override_is_not_taken_for_a_training_change(tmp_path):
    """`banklm corpus build RECIPE train.lr=3e-3` runs one stage but rewrites recipe.yaml with the override."""
    def recipe(*over):
        data = {"name": "demo", "base": {"path": "/nowhere"}, "train": {"lr": 1e-3}, "eval": {"limit": 20},
                "corpora": {"scenario": {"synth": {"credit": {"train": 10, "test": 4}}}}}
        for o in over:
            key, value = o.split("=")
            section, name = key.split(".")
            data[section][name] = json.loads(value)
        return validate_recipe(data)

    stages, runs = _stand_in_stages(), tmp_path / "runs" / "demo"
    a = run_stages(recipe(), stages, run_dir=runs / "a")
    b = run_stages(recipe(), stages, run_dir=runs / "b")
    assert compare_runs(a, b)["recipe"] == []

    run_stages(recipe("train.lr=3e-3"), stages, run_dir=b, only={"corpus"})
    assert yaml.safe_load((b / "recipe.yaml").read_text(encoding="utf-8"))["train"]["lr"] == 3e-3  # what misled
    diff = compare_runs(a, b)
    assert diff["recipe"] == [] and diff["warnings"] == {"a": [], "b": []}

    run_stages(recipe("train.lr=3e-3", "eval.limit=5"), stages, run_dir=b, only={"eval"})
    diff = compare_runs(a, b)
    assert diff["recipe"] == [("eval.limit", 20, 5, "eval")] and diff["warnings"]["b"] == []
    assert ("sft/credit/accuracy", 0.5, 0.5) in diff["scores"]  # still the model trained with lr 1e-3
    log = _card_section(render_model_card(collect(b), _en_recipe()), "Change log")
    assert "train.lr" not in log and _row(log, "eval.limit") == ["eval.limit", "20", "5", "eval"]
    assert "No score changed." in log

    # the train stage alone with the new lr: now the ledger does record it, but the scores on disk are
    # from the eval of the old model, and the comparison says so
    run_stages(recipe("train.lr=3e-3"), stages, run_dir=b, only={"train"})
    diff = compare_runs(a, b)
    assert diff["recipe"] == [("eval.limit", 20, 5, "eval"), ("train.lr", 1e-3, 3e-3, "train")]
    seq = {e["stage"]: e["seq"] for e in Ledger(b).entries()}
    assert diff["warnings"]["b"] == [f"eval (entry {seq['eval']}) read sft/model.json, which train (entry "
                                     f"{seq['train']}) rewrote afterwards: eval's outputs were made from the earlier "
                                     "version, not with the newest train parameters shown here"]
    assert ("sft/credit/accuracy", 0.5, 0.5) in diff["scores"]
    assert verify_run(b, check_unrecorded=True) == []  # nothing was tampered with: the run is just stale
    log = _card_section(render_model_card(collect(b), _en_recipe()), "Change log")
    assert "- **Warning** this run: eval (entry" in log


def _chromium():
    exe = find_chromium()
    if exe is None:
        pytest.fail("chromium is not installed: the report check needs a real headless browser. Install it with "
                    "`apt-get install -y chromium` (bash scripts/test.sh does this when apt-get is available).")
    return exe


def test_browser_check_catches_a_broken_page(tmp_path):
    """The headless check itself can fail: a broken image, a missing file, console.error, an exception."""
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><html><head><meta charset=utf-8><title>bad</title></head><body><h2>A</h2>'
                    '<img alt=broken src="data:image/png;base64,AAAA"><img alt=missing src="missing.png">'
                    '<script>console.error("boom"); undefinedFunction();</script></body></html>', encoding="utf-8")
    res = check_page(page, exe=_chromium())
    assert {i["alt"]: i["width"] for i in res.images} == {"broken": 0, "missing": 0}
    assert any("console.error: boom" in e for e in res.errors)
    assert any("undefinedFunction" in e for e in res.errors)
    assert any("missing.png" in e for e in res.errors)
    assert res.headings == ["A"] and res.title == "bad"
    assert non_blank_fraction(res.screenshot_png) < 0.01  # next to nothing drawn


# ----------------------------------------------------------------------------------------- on the small run

@pytest.mark.slow
def test_ledger_entries_are_complete(quickstart_run, repo):
    _, run_dir, _ = quickstart_run
    entries = Ledger(run_dir).entries()
    in_git = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True).returncode == 0
    for e in entries:
        assert isinstance(e["params"], dict) and isinstance(e["inputs"], list) and e["outputs"], e["stage"]
        assert e["code"]["banklm"] and (not in_git or (len(e["code"]["git_commit"]) == 40
                                                       and isinstance(e["code"]["git_dirty"], bool)))
        assert {"python", "torch", "transformers", "peft", "trl", "datasets"} <= set(e["versions"])
        assert e["device"] == "cpu" and e["seed"] == 0 and isinstance(e["wall_s"], float)
        assert e["host"]["cpu_count"] >= 1 and e["host"]["cuda"] == []
        assert e["started_at"] <= e["finished_at"]
    corpus = next(e for e in entries if e["stage"] == "corpus")
    notes = corpus["notes"]
    assert set(notes) == {"scenario", "general", "vertical", "private"}
    for kind, lin in notes.items():
        stats = _json(run_dir / "corpora" / kind / "stats.json")
        assert lin["counts"]["splits"] == stats["splits"], kind
    assert notes["scenario"]["sampling"]["synth"]["per_task"]["aml"] == {"train": 400, "validation": 40, "test": 20,
                                                                           "test_prevalence": 100, "difficulty": 0.0}
    assert notes["scenario"]["sampling"]["synth"]["generator_seed"] == 0
    private_stats = _json(run_dir / "corpora" / "private" / "stats.json")
    assert notes["private"]["pii"]["counts_by_type"] == private_stats["pii"]["counts"]
    assert sum(notes["private"]["pii"]["counts_by_type"].values()) > 0
    assert notes["private"]["sources"][0]["path"] == "samples:private/records.jsonl"
    assert notes["private"]["sampling"]["split"]["seed"] == 0
    assert any(r["path"].endswith("corpora/samples/private/records.jsonl") for r in corpus["inputs"])
    tok = next(e for e in entries if e["stage"] == "tokenizer")
    assert tok["notes"]["training_texts"] == _json(run_dir / "corpora" / "token_counts.json")["training_texts"]


@pytest.mark.slow
def test_model_card_has_every_section_with_the_runs_numbers(quickstart_run):
    _, run_dir, _ = quickstart_run
    card = (run_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## .+$", card, flags=re.M)
    for title in SECTIONS:
        assert any(h.endswith(title) for h in headings), title
    assert all(re.search(r"[\u4e00-\u9fff]", h) for h in headings)  # Chinese with English headings
    assert "to be filled" in _card_section(card, "Responsible entity and contact")

    ev = _card_section(card, "Evaluation results")
    res = _json(run_dir / "eval" / "sft" / "results.json")
    for task, r in res["tasks"].items():
        row = _row(ev, f"{task} | {r['n']}")
        assert row[2:8] == [f"{r[k]:.3f}" for k in ("accuracy", "macro_f1", "mcc", "format_compliance",
                                                     "hallucination_rate", "unsupported_number_rate")], task
    aml = res["tasks"]["aml"]["positive"]
    assert _row(ev, "aml | conclusion=可疑")[:6] == ["aml", "conclusion=可疑", f"{aml['recall']:.3f}",
                                                    f"{aml['false_positive_rate']:.3f}", str(aml["n_positive"]),
                                                    str(aml["n_true_positive"])]
    for attr, f in res["tasks"]["credit"]["fairness"].items():
        if isinstance(f, dict):
            assert _row(ev, f"credit | {attr}")[2:4] == [f"{f['ratio']:.3f}", f"{f['accuracy_gap']:.3f}"]
    assert _row(ev, "distractor")[1:] == [f"{res['robustness']['distractor']['accuracy']:.3f}",
                                          f"{res['robustness']['distractor']['drop']:.3f}"]

    deid = _card_section(card, "De-identification")
    pii = _json(run_dir / "corpora" / "private" / "stats.json")["pii"]
    row = _row(deid, "private")
    assert row[1:4] == [pii["mode"], str(pii["records_with_pii"]), str(sum(pii["counts"].values()))]
    for ptype, n in pii["counts"].items():
        assert f" {n}" in row[4] and len(re.findall(r"\d+", row[4])) == len(pii["counts"]), ptype

    data = _card_section(card, "Training data")
    for kind in ("scenario", "general", "vertical", "private"):
        splits = _json(run_dir / "corpora" / kind / "stats.json")["splits"]
        row = _row(data, kind)
        assert row[1:4] == [str(splits["train"]), str(splits["validation"]), str(splits["test"])]
        assert f"(corpora/{kind}/card.md)" in row[-1] and (run_dir / "corpora" / kind / "card.md").exists()

    train = _card_section(card, "Training method and hyper-parameters")
    s = _json(run_dir / "sft" / "train_summary.json")
    row = _row(train, "sft")
    lora = s["lora"]
    assert row[1:3] == ["lora", "0.003"] and row[9] == f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}"
    assert row[10:13] == [str(s["steps"]), str(s["tokens_seen"]), f"{s['final_loss']:.3f}"]

    quant = _card_section(card, "Before/after quantization")
    verify = _json(run_dir / "export" / "verify.json")
    checks = [c for fmt in ("gguf", "onnx") for c in verify.get(fmt, [])]
    assert checks
    for c in checks:
        row = _row(quant, c["file"])
        assert row[2:4] == [c["type"], str(c["bytes"])]
        assert row[7] == f"{c['logits']['top1_agreement']:.3f}" and row[-1] == "pass"
        if c.get("task_eval"):
            assert row[10:12] == [f"{c['task_eval']['accuracy']:.3f}", f"{0.0 - c['task_eval']['accuracy_drop']:.3f}"]

    listed = read_card_artefacts(card)
    export_entry = next(e for e in Ledger(run_dir).entries() if e["stage"] == "export")
    assert {r["path"] for r in listed} == {r["path"] for r in export_entry["outputs"]}
    assert {"export/gguf/quickstart-f16.gguf", "export/gguf/quickstart-q8_0.gguf"} <= {r["path"] for r in listed}
    for r in listed:
        assert r["sha256"] == sha256_file(run_dir / r["path"]) and r["bytes"] == (run_dir / r["path"]).stat().st_size

    lim = _card_section(card, "Known limitations and failure examples")
    preds = {p["id"]: p for p in map(json.loads, (run_dir / "eval" / "sft" / "predictions.jsonl").read_text(
        encoding="utf-8").splitlines())}
    wrong = [p for p in preds.values() if not p["correct"]]
    shown = re.findall(r"^\| ((?:credit|aml|audit)-test-\d+) \| (\w+) \| ([^|]+) \|", lim, flags=re.M)
    assert len(shown) == min(5, len(wrong))
    for pid, task, gold in shown:
        assert preds[pid]["task"] == task and not preds[pid]["correct"] and preds[pid]["label"] == gold.strip()
    worst = min(res["tasks"], key=lambda t: res["tasks"][t]["accuracy"])
    assert f"{worst}（准确率 {res['tasks'][worst]['accuracy']:.3f}）" in lim

    assert "首次运行" in _card_section(card, "Change log")
    trace = _card_section(card, "Traceability")
    entries = Ledger(run_dir).entries()
    for e in entries[:-1]:  # the report entry is written after the card
        assert _row(trace, f"{e['seq']} | {e['stage']}")[3] == f"{e['wall_s']:.3f}"

    from banklm.modelcard import render_model_card
    from banklm.recipe import load_recipe
    from banklm.results import collect

    recipe = load_recipe(run_dir / "recipe.yaml", ["report.language=en", "report.owner=Example Rural Bank, risk dept."])
    en = render_model_card(collect(run_dir), recipe)
    assert re.findall(r"^## .+$", en, flags=re.M) == headings
    assert "- Responsible entity: Example Rural Bank, risk dept.\n" in en and "First run of this recipe" in en
    assert not re.search(r"[\u4e00-\u9fff]", _card_section(en, "Intended use"))


@pytest.mark.slow
def test_report_is_self_contained_with_every_section(quickstart_run):
    _, run_dir, _ = quickstart_run
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    for title in REPORT_SECTIONS:
        assert f"<h2>{title}</h2>" in page, title
    assert "<style>" in page and not re.search(r"<link|<script[^>]+src=|src=\"(?!data:image/png;base64,)", page)
    assert page.count('src="data:image/png;base64,') >= 6  # timings, corpora, labels, loss, scores, confusion
    for e in Ledger(run_dir).entries()[:-1]:
        assert f"<td>{e['stage']}</td><td>{e['status']}</td><td>{e['wall_s']:.3f}</td>" in page
    res = _json(run_dir / "eval" / "sft" / "results.json")
    assert f"<td>credit</td><td>20</td><td>{res['tasks']['credit']['accuracy']:.3f}</td>" in page
    pii = _json(run_dir / "corpora" / "private" / "stats.json")["pii"]["counts"]
    for ptype, n in pii.items():
        assert f"<td>private</td><td>placeholder</td><td>{ptype}</td><td>{n}</td>" in page
    for c in _json(run_dir / "export" / "verify.json")["gguf"]:
        assert f"<td>{c['file']}</td>" in page and f"<td>{c['bytes']}</td>" in page
    assert "verified at report time" in page and Ledger(run_dir).entries()[-2]["hash"] in page  # head at report time


@pytest.mark.slow
def test_report_renders_in_headless_chromium(quickstart_run, tmp_path):
    _, run_dir, _ = quickstart_run
    page = run_dir / "report" / "index.html"
    res = check_page(page, exe=_chromium())
    assert res.errors == []
    n_img = page.read_text(encoding="utf-8").count("<img ")
    assert len(res.images) == n_img >= 6
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in res.images), res.images
    assert set(REPORT_SECTIONS) <= set(res.headings)
    assert res.screenshot_png[:8] == b"\x89PNG\r\n\x1a\n"
    assert non_blank_fraction(res.screenshot_png) > 0.02
    (tmp_path / "report.png").write_bytes(res.screenshot_png)


def _copy_run(run_dir, dst):
    shutil.copytree(run_dir, dst, symlinks=True)
    return dst


@pytest.mark.slow
def test_verify_catches_swapped_export_changed_shard_and_edited_ledger(quickstart_run, tmp_path):
    _, run_dir, _ = quickstart_run
    assert run_banklm("verify", str(run_dir), cwd=tmp_path).returncode == 0
    seq = {e["stage"]: e["seq"] for e in Ledger(run_dir).entries()}

    swapped = _copy_run(run_dir, tmp_path / "swapped")
    g = swapped / "export" / "gguf"
    os.replace(g / "quickstart-f16.gguf", g / "tmp.gguf")
    os.replace(g / "quickstart-q8_0.gguf", g / "quickstart-f16.gguf")
    os.replace(g / "tmp.gguf", g / "quickstart-q8_0.gguf")
    out = run_banklm("verify", str(swapped), cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith(f"TAMPERED: entry {seq['export']} (export): export/gguf/quickstart-f16.gguf")
    assert "quickstart-q8_0.gguf: the file on disk is not the one MODEL_CARD.md names" in out.stderr

    shard = _copy_run(run_dir, tmp_path / "shard")
    f = shard / "corpora" / "private" / "data" / "train" / "data-00000-of-00001.arrow"
    data = bytearray(f.read_bytes())
    i = data.index(b"<PERSON>")
    data[i + 1:i + 7] = b"PHONE>"  # "<PERSON>" -> "<PHONE>>": same size, different bytes
    f.write_bytes(bytes(data))
    out = run_banklm("verify", str(shard), cwd=tmp_path)
    assert out.returncode == 1
    assert "TAMPERED: entry 1 (corpus): corpora/private/data/train/data-00000-of-00001.arrow: file changed" in out.stderr

    edited = _copy_run(run_dir, tmp_path / "edited")
    ledger = edited / "ledger.jsonl"
    lines = ledger.read_text(encoding="utf-8").splitlines()
    i = seq["train"] - 1
    assert json.loads(lines[i])["params"]["train"]["lr"] == 0.003
    lines[i] = lines[i].replace('"lr":0.003', '"lr":0.0003', 1)
    ledger.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = run_banklm("verify", str(edited), cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith(f"TAMPERED: entry {seq['train']} (train): content was edited")


# The scan of every file of the run for the private samples' PII values (issue 8) is
# tests/reliability/test_rel_pii.py::test_no_canary_or_other_private_value_leaves_the_run.


def _leaves(a, b, prefix=""):
    """``(dotted key, value in a, value in b)`` for every leaf of two nested dicts."""
    for k in sorted(set(a or {}) | set(b or {})):
        va, vb = (a or {}).get(k), (b or {}).get(k)
        key = f"{prefix}{k}"
        if (isinstance(va, dict) and va) or (isinstance(vb, dict) and vb):
            yield from _leaves(va if isinstance(va, dict) else {}, vb if isinstance(vb, dict) else {}, key + ".")
        else:
            yield key, va, vb


@pytest.mark.slow
def test_compare_two_runs_with_a_changed_learning_rate(quickstart_run, repo, tmp_path):
    """A second run with another train.lr next to a clone of the session run (which it reuses stages from
    when the code is unchanged) and retrains."""
    _, run_dir, _ = quickstart_run
    runs = tmp_path / "runs" / "quickstart"
    runs.mkdir(parents=True)
    first = runs / "r1"
    shutil.copytree(run_dir, first, symlinks=True, copy_function=os.link)  # read-only use: hard links suffice
    second = runs / "r_lr"
    # the export stage is not compared here: it stays off in the second run (it adds nothing a comparison reads)
    out = run_banklm("run", str(repo / "recipes" / "quickstart.yaml"), *QUICKSTART_SMALL, "train.lr=1e-3",
                     "export.gguf.enabled=false", "export.onnx.enabled=false", "--run-dir", str(second), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    status = {e["stage"]: e["status"] for e in Ledger(second).entries()}
    assert status["train"] == "done"

    out = run_banklm("compare", str(first), str(second), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stdout
    table = out.stdout.split("parameters (changed; from each stage's newest ledger entry)\n")[1]
    table = table.split("\n\ndata (records")[0].splitlines()
    assert re.match(r"key\s+r1\s+r_lr\s+recorded by$", table[0])
    # the keys the newest entries of each stage recorded differently: only train.lr, unless the schema's
    # defaults moved between the two runs (code edited meanwhile)
    newest = [{e["stage"]: e["params"] for e in Ledger(d).entries()} for d in (first, second)]
    changed = sorted({k for st in set(newest[0]) & set(newest[1])
                      for k, va, vb in _leaves(newest[0][st], newest[1][st]) if va != vb})
    assert "train.lr" in changed
    assert sorted({line.split()[0] for line in table[2:] if not line.startswith("export stage")}) == changed
    assert any(re.match(r"export stage\s+ran\s+not run\s", line) for line in table)
    assert any(re.match(r"train\.lr\s+0\.003\s+0\.001\s+train$", line) for line in table)
    for kind in ("scenario", "private"):
        n = _json(first / "corpora" / kind / "stats.json")["splits"]["train"]
        assert re.search(rf"^{kind}\s+train\s+{n}\s+{n}\s+0$", out.stdout, flags=re.M)
    a, b = (_json(d / "eval" / "sft" / "results.json") for d in (first, second))
    for task in ("credit", "aml", "audit"):
        va, vb = a["tasks"][task]["accuracy"], b["tasks"][task]["accuracy"]
        m = re.search(rf"^sft/{task}/accuracy\s+(\S+)\s+(\S+)\s+(\S+)$", out.stdout, flags=re.M)
        assert m and float(m.group(1)) == pytest.approx(va, abs=1e-4) and float(m.group(2)) == pytest.approx(vb, abs=1e-4)
    as_json = json.loads(run_banklm("compare", "--json", str(first), str(second), cwd=tmp_path).stdout)
    assert ["train.lr", 0.003, 0.001, "train"] in as_json["recipe"]
    assert {r[0] for r in as_json["recipe"]} == {*changed, "export stage"}
    assert as_json["warnings"] == {"a": [], "b": []}

    log = _card_section((second / "MODEL_CARD.md").read_text(encoding="utf-8"), "Change log")
    assert "`r1`" in log and _row(log, "train.lr") == ["train.lr", "0.003", "0.001", "train"]
    assert "Warning" not in log and "警告" not in log
    scores = log.split("### 分数 Scores")[1]
    for task in ("credit", "aml", "audit"):  # the card lists a score only when it changed
        va, vb = a["tasks"][task]["accuracy"], b["tasks"][task]["accuracy"]
        if va != vb:
            row = _row(scores, f"sft/{task}/accuracy")
            assert [float(x) for x in row[1:4]] == [pytest.approx(va, abs=1e-4), pytest.approx(vb, abs=1e-4),
                                                    pytest.approx(vb - va, abs=1e-4)]
        else:
            assert f"sft/{task}/accuracy" not in scores
    if status["corpus"] == "reused":  # else the corpus code changed in between: its rows say "content changed"
        assert "各语料各划分的记录数与内容均无变化" in log
    assert run_banklm("verify", str(second), cwd=tmp_path).returncode == 0


def _predictions(rd, right: int, n: int = 20, old: bool = False):
    rows = [{"id": f"aml-{i}", "task": "aml", "label": "无", "pred_label": "无" if i < right else "拆分交易",
             "correct": i < right} for i in range(n)]
    if old:  # a results folder from before predictions carried labels
        rows = [{"id": r["id"], "output": "x"} for r in rows]
    (rd / "eval" / "sft" / "predictions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))


def test_compare_shows_paired_deltas_with_intervals_and_tolerates_older_runs(tmp_path):
    a = _fake_run(tmp_path, "a", 1e-3, 0.5, 10)
    b = _fake_run(tmp_path, "b", 3e-3, 0.9, 10)
    _predictions(a, 10)
    _predictions(b, 18)
    diff = compare_runs(a, b)
    row = next(r for r in diff["paired"] if r["task"] == "aml")
    # B right on 8 records A got wrong, never the reverse: +0.4, exact McNemar p = 2 / 2^8
    assert (row["model"], row["n"], row["difference"]) == ("sft", 20, pytest.approx(0.4))
    assert row["p_value"] == pytest.approx(2 / 256) and 0 < row["low"] <= 0.4 <= row["high"]
    text = format_comparison(diff)
    assert re.search(r"^sft/aml\s+20\s+\+0\.400\s+\[\+0\.\d{3}, \+0\.\d{3}\]\s+0\.0078", text, flags=re.M)
    _predictions(a, 10, old=True)  # older predictions: no paired rows, no failure
    diff = compare_runs(a, b)
    assert diff["paired"] == [] and "accuracy B - A on the same test records" not in format_comparison(diff)
