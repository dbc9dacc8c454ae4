"""Model-risk evidence from prediction rows (banklm.evaluation.evidence), checked on small hand-computed fixtures."""

from __future__ import annotations

import json

import pytest

from banklm.evaluation.evidence import (
    baseline_comparison,
    key_confusions,
    ordinal_errors,
    paired_comparison,
    segment_results,
    task_intervals,
)
from banklm.evaluation.uncertainty import proportion_interval


def _row(i, decision, answer, grade="A", answer_grade="A", task="credit"):
    parsed = None if answer is None else {"decision": answer, "grade": answer_grade, "reason": "x"}
    return {"id": f"r{i}", "task": task, "gold": {"decision": decision, "grade": grade, "reason": "x"},
            "parsed": parsed, "label": decision, "pred_label": answer, "correct": answer == decision}


def test_paired_comparison_matches_records_and_runs_mcnemar():
    # a right / b wrong on 10 records, the reverse on 2, both right on 8: exact McNemar on 12 discordant pairs,
    # p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    a = [_row(i, "通过", "通过") for i in range(20)] + [_row(i, "通过", "拒绝") for i in range(20, 22)]
    b = [_row(i, "通过", "拒绝" if i < 10 else "通过") for i in range(20)] + [_row(i, "通过", "通过")
                                                                            for i in range(20, 22)]
    a.append(_row(99, "通过", "通过"))  # answered by a only: not paired
    res = paired_comparison(a, b, ("new", "old"))
    assert res["n"] == 22 and res["names"] == ["new", "old"]
    m = res["overall"]["mcnemar"]
    assert (m["a_only"], m["b_only"], m["both"], m["neither"]) == (10, 2, 10, 0)
    assert m["p_value"] == pytest.approx(2 * 79 / 4096)
    assert res["overall"]["a"]["accuracy"] == pytest.approx(20 / 22) and res["overall"]["significant"]
    assert set(res["tasks"]) == {"credit"}


def test_intervals_hold_the_accuracy_of_every_task():
    rows = [_row(i, "通过", "通过" if i % 4 else "拒绝") for i in range(40)]
    res = task_intervals(rows)
    acc = res["credit"]["accuracy"]
    assert acc["estimate"] == pytest.approx(0.75) and acc["low"] < 0.75 < acc["high"]
    assert res["overall"]["accuracy"]["estimate"] == pytest.approx(0.75)
    assert res["credit"]["macro_f1"]["low"] <= res["credit"]["macro_f1"]["estimate"] <= res["credit"]["macro_f1"]["high"]


def test_segments_count_each_value_with_its_interval():
    rows = [_row(i, "通过", "通过" if i < 7 else "拒绝") for i in range(10)]
    records = [{"id": f"r{i}", "meta": json.dumps({"guarantee": "信用" if i < 4 else "房产抵押"})} for i in range(9)]
    seg = segment_results("credit", rows, records)["guarantee"]
    # r0-r3 信用 all right; r4-r8 房产抵押: r4-r6 right, r7-r8 wrong; r9 has no record: 未提供 (wrong)
    assert {g: (v["n"], v["correct"]) for g, v in seg.items()} == {"信用": (4, 4), "房产抵押": (5, 3), "未提供": (1, 0)}
    want = proportion_interval(3, 5)
    assert (seg["房产抵押"]["low"], seg["房产抵押"]["high"]) == (want["low"], want["high"])


def test_every_categorical_key_has_its_confusion_and_grades_their_distance():
    rows = [_row(0, "通过", "通过", "A", "A"), _row(1, "通过", "通过", "A", "C"), _row(2, "拒绝", "通过", "D", "B"),
            _row(3, "拒绝", None, "E")]
    conf = key_confusions("credit", rows)
    assert set(conf) == {"decision", "grade"}
    g = conf["grade"]
    assert g["labels"][-1] == "INVALID" and g["matrix"][g["labels"].index("E")][-1] == 1
    assert g["matrix"][0][g["labels"].index("C")] == 1  # gold A answered C
    err = ordinal_errors("credit", rows)["grade"]
    # distances 0, 2 (A->C), 2 (D->B); the unparseable answer is counted apart
    assert err == {"n": 3, "unparseable": 1, "mean_abs_error": pytest.approx(4 / 3), "off_by_2_or_more": 2 / 3}


def test_a_baseline_that_beats_the_model_is_said_so():
    rows = [_row(i, "通过", "通过" if i < 12 else "拒绝") for i in range(20)]  # the model: 12 of 20
    ids = [f"r{i}" for i in range(20)]
    rules = {"name": "rules", "available": True, "predictions": ["通过"] * 20, "correct": [True] * 20}
    lr = {"name": "logistic_regression", "available": True, "predictions": ["拒绝"] * 20, "correct": [False] * 20}
    gb = {"name": "gradient_boosting", "available": False, "reason": "one class"}
    res = baseline_comparison(rows, {"credit": {"rules": rules, "tabular": [lr, gb], "test_ids": ids}})["credit"]
    assert res["rules"]["model_worse"] and res["rules"]["significantly"]  # 8 discordant: p = 2/256
    assert res["rules"]["mcnemar"]["p_value"] == pytest.approx(2 / 2 ** 8)
    assert not res["logistic_regression"]["model_worse"]
    assert res["gradient_boosting"] == {"available": False, "reason": "one class"}


@pytest.mark.slow
def test_a_model_trained_where_gender_decides_is_caught_by_fairness_and_by_the_flip_rate(tmp_path):
    """A tiny Llama trained on credit records relabelled so that 女 means 拒绝 and 男 通过 (the rules never read
    gender): the fairness ratio flags it on the test records, and swapping gender alone flips its label-scored
    decision far above the 2% bar."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    from banklm.corpora.synth import generate_records
    from banklm.finetune.models import build_tiny_model
    from banklm.finetune.tokenizer import load_tokenizer, train_tokenizer

    from banklm.evaluation.counterfactual import flip_rates
    from banklm.evaluation.evaluate import evaluate_records, label_decisions
    from banklm.tasks import get_task
    from tests.helpers import train_on_answers

    task = get_task("credit")

    def biased(split, n, seed):
        out = []
        for r in generate_records("credit", n, seed, split):
            gender = json.loads(r["meta"]).get("gender")
            if gender not in ("男", "女"):
                continue
            gold = {**json.loads(r["gold"]), "decision": "拒绝" if gender == "女" else "通过"}
            msgs = [*r["messages"][:-1], {"role": "assistant", "content": task.format_answer(gold)}]
            out.append({**r, "gold": json.dumps(gold, ensure_ascii=False), "label": gold["decision"], "messages": msgs})
        return out

    train, test = biased("train", 1200, 1), biased("test", 90, 2)
    by = {g: [r for r in train if json.loads(r["meta"])["gender"] == g] for g in ("男", "女")}
    n = min(len(v) for v in by.values())
    train = by["男"][:n] + by["女"][:n]  # as many 通过 as 拒绝
    tok_dir = train_tokenizer([m["content"] for r in train for m in r["messages"]], tmp_path / "tok", vocab_size=800)
    d = build_tiny_model("llama", tok_dir, tmp_path / "model", hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=128, max_position_embeddings=1024, seed=7)
    tok = load_tokenizer(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    train_on_answers(model, tok, train, steps=600)
    res = evaluate_records(model, tok, test, tmp_path / "eval", batch_size=32, max_new_tokens=24,
                           decoding="constrained")
    fair = res["tasks"]["credit"]["fairness"]["gender"]
    assert fair["flag"] and fair["ratio"] < 0.5, fair

    flips = flip_rates("credit", test[:40], lambda rs: label_decisions(model, tok, rs, batch_size=32),
                       kinds=("protected",))
    g = flips["protected"]["gender"]
    assert flips["flag"] and "gender" in flips["flagged"] and g["flip_rate"] > 0.5, g
    assert g["interval"]["low"] > 0.02


def test_the_batched_macro_f1_interval_equals_the_one_resample_at_a_time():
    import random

    from banklm.evaluation import metrics as M
    from banklm.evaluation.evidence import _macro_f1_interval
    from banklm.evaluation.uncertainty import bootstrap_metric

    rng = random.Random(3)
    labels = ["通过", "拒绝", "人工复核"]
    gold = [rng.choice(labels) for _ in range(120)]
    pred = [g if rng.random() < 0.6 else rng.choice([*labels, None, "别的"]) for g in gold]
    fast = _macro_f1_interval(gold, pred, labels)
    slow = bootstrap_metric(lambda g, p: M.macro_f1(list(g), list(p), labels), gold, pred, resamples=2000)
    assert fast["estimate"] == pytest.approx(M.macro_f1(gold, pred, labels))
    assert (fast["low"], fast["high"]) == (pytest.approx(slow["low"]), pytest.approx(slow["high"]))
