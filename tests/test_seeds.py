"""``banklm run --seeds``: one run folder per seed on the same data, and the table of how much the scores move."""

from __future__ import annotations

import json

import pytest

from banklm.io import atomic_write_json
from banklm.seeds import parse_seeds, render_seed_table, seed_table, write_seed_table
from tests.helpers import run_banklm


def test_seeds_are_parsed_with_clear_errors():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(" 3, 5 ") == [3, 5]
    for bad, msg in (("0", "at least two"), ("0,0", "distinct"), ("0,x", "whole numbers"), ("-1,2", "distinct")):
        with pytest.raises(ValueError, match=msg):
            parse_seeds(bad)


def _fake_run(folder, acc: dict, final="sft"):
    tasks = {t: {"accuracy": a, "macro_f1": a - 0.1, "coverage": 0.5, "answered_accuracy": 0.9, "ece": 0.04}
             for t, a in acc.items()}
    atomic_write_json(folder / "eval" / final / "results.json",
                      {"tasks": tasks, "overall": {"accuracy": sum(acc.values()) / len(acc)}})
    atomic_write_json(folder / "eval" / "cpt" / "results.json", {"tasks": {}, "overall": {"accuracy": 0.0}})
    return folder


def test_the_table_gives_each_seed_and_mean_sd_of_the_final_model(tmp_path):
    runs = {0: _fake_run(tmp_path / "a-s0", {"credit": 0.6, "aml": 0.3}),
            1: _fake_run(tmp_path / "a-s1", {"credit": 0.7, "aml": 0.5}),
            2: _fake_run(tmp_path / "a-s2", {"credit": 0.8, "aml": 0.4})}
    table = seed_table(runs)
    assert table["model"] == "sft"  # the final model, not the comparison rows (cpt)
    credit = table["summary"]["credit"]["accuracy"]
    # mean 0.7, sample sd sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1
    assert credit["mean"] == pytest.approx(0.7) and credit["sd"] == pytest.approx(0.1)
    assert (credit["min"], credit["max"]) == (pytest.approx(0.6), pytest.approx(0.8))
    assert table["summary"]["overall"]["accuracy"]["mean"] == pytest.approx((0.45 + 0.6 + 0.6) / 3)
    md = render_seed_table(table)
    assert "| credit | accuracy | 0.600 | 0.700 | 0.800 | 0.700 ± 0.100 | 0.600 | 0.800 |" in md
    md_path, js_path = write_seed_table(tmp_path, "a", runs)
    assert md_path.name == "seeds-a.md" and json.loads(js_path.read_text())["seeds"] == [0, 1, 2]


SEEDS_RECIPE = """
name: seeds-e2e
corpora:
  scenario:
    synth:
      audit: {train: 300, validation: 20, test: 20}
tokenizer: {train: true, vocab_size: 600}
base:
  build: {arch: llama, hidden_size: 48, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 96,
          max_position_embeddings: 512}
train: {method: full, lr: 2.0e-3, max_steps: 12, batch_size: 16, max_length: 256, logging_steps: 4}
eval: {tasks: [audit], batch_size: 20, max_new_tokens: 32, retention: false, calibration: {validation_limit: 20}}
export: {gguf: {enabled: false}}
report: {enabled: false}
"""


@pytest.mark.slow
def test_run_with_seeds_trains_each_seed_on_the_same_data(tmp_path):
    recipe = tmp_path / "seeds.yaml"
    recipe.write_text(SEEDS_RECIPE, encoding="utf-8")
    out = run_banklm("run", str(recipe), "--seeds", "0,1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    parent = tmp_path / "runs" / "seeds-e2e"
    runs = sorted(p for p in parent.iterdir() if p.is_dir() and not p.is_symlink())
    assert [p.name[-3:] for p in runs] == ["-s0", "-s1"] and runs[0].name[:-3] == runs[1].name[:-3]
    ledgers = [[json.loads(x) for x in (p / "ledger.jsonl").read_text().splitlines()] for p in runs]
    by_stage = [{e["stage"]: e for e in led} for led in ledgers]
    # the data is fixed: the second seed reuses the first's corpus and tokenizer; training differs
    assert by_stage[1]["corpus"]["status"] == "reused" and by_stage[1]["tokenizer"]["status"] == "reused"
    assert by_stage[1]["train"]["status"] == "done" and by_stage[1]["train"]["params"]["seed"] == 1
    assert by_stage[0]["train"]["params"]["data_seed"] == by_stage[1]["train"]["params"]["data_seed"] == 0
    weights = [{o["path"]: o["sha256"] for o in s["train"]["outputs"]} for s in by_stage]
    assert weights[0] != weights[1]
    run_id = runs[0].name[:-3]
    table = json.loads((parent / f"seeds-{run_id}.json").read_text(encoding="utf-8"))
    accs = [json.loads((p / "eval" / "sft" / "results.json").read_text())["tasks"]["audit"]["accuracy"] for p in runs]
    assert [table["per_seed"][s]["tasks"]["audit"]["accuracy"] for s in ("0", "1")] == accs
    assert table["summary"]["audit"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert f"seeds table: runs/seeds-e2e/seeds-{run_id}.md" in out.stdout
    bad = run_banklm("run", str(recipe), "--seeds", "0,1", "--run-dir", str(tmp_path / "x"), cwd=tmp_path)
    assert bad.returncode == 2 and "with --seeds each seed runs in" in bad.stderr
