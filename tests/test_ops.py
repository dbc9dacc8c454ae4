import pytest
from banklm.corpora.ops import (
    Decontaminate,
    ExactDedup,
    NearDedup,
    Normalize,
    PoisonScreen,
    QualityFilter,
    RemoveBoilerplate,
    ScrubPII,
    Step,
    StepResult,
    normalize_text,
    run_steps,
)
from banklm.corpora.ops.quality import repeated_ngram_ratio
from datasets import Dataset

BASE = ("根据本行个人经营性贷款管理办法的规定，客户经理应当在贷款发放前核实借款人的身份信息、经营状况和收入证明，"
        "对抵押物进行实地查看并完成价值评估，相关调查资料应当至少保存五年，以备内部审计部门检查。")


def _ds(texts, ids=None):
    return Dataset.from_list([{"id": ids[i] if ids else f"d{i}", "text": t} for i, t in enumerate(texts)])


def _counts(stats):
    return stats["in"], stats["kept"], stats["dropped"], stats["quarantined"]


# ----------------------------------------------------------------------------------------- normalize


def test_normalize_text_keeps_chinese_punctuation():
    assert normalize_text("ＡＢＣ１２３％＋，。：；（）！？、") == "ABC123%+，。：；（）！？、"
    assert normalize_text("金额&lt;5万&amp;利率<b>3.5%</b><br>下一行") == "金额<5万&利率3.5%\n下一行"
    assert normalize_text("  行一\u3000\u3000中间 \t 空格  \r\n\r\n\r\n\r\n行二\x00\u200b\x07  ") == "行一 中间 空格\n\n行二"
    assert normalize_text("面积100㎡，序号①，x²") == "面积100㎡，序号①，x²"  # no NFKC folding
    assert normalize_text("金额<5万") == "金额<5万"
    s = "Ａ：ｂ　&nbsp;<p>ｃ</p>"
    assert normalize_text(normalize_text(s)) == normalize_text(s)


def test_normalize_step_on_text_and_messages():
    res = Normalize()(_ds(["ＡＢＣ，", "已经规范", "x&amp;y"]))
    assert _counts(res.stats) == (3, 3, 0, 0) and res.stats["records_changed"] == 2
    assert res.dataset["text"] == ["ABC，", "已经规范", "x&y"]
    ds = Dataset.from_list([{"id": "m", "messages": [{"role": "user", "content": "１＋１＝？"},
                                                      {"role": "assistant", "content": "２"}]}])
    res = Normalize()(ds)
    assert res.dataset[0]["messages"] == [{"role": "user", "content": "1+1=？"}, {"role": "assistant", "content": "2"}]
    assert res.stats["records_changed"] == 1


def test_remove_boilerplate_lines_across_documents():
    footer = "本简报仅供内部参考，不构成投资建议。"
    texts = [f"第{i}季度存款增长{i}%。\n{footer}\n扫码" for i in range(1, 5)] + [footer, "独立的一篇文档内容。"]
    res = RemoveBoilerplate(min_docs=3)(_ds(texts))
    assert _counts(res.stats) == (6, 5, 1, 0) and res.stats["reasons"] == {"only_boilerplate": 1}
    assert res.dataset["text"][:4] == [f"第{i}季度存款增长{i}%。\n扫码" for i in range(1, 5)]  # short line kept
    assert res.stats["boilerplate_lines"] == 1 and res.stats["lines_removed"] == 5
    assert res.stats["top_lines"] == [footer]


# ---------------------------------------------------------------------------------------------- dedup


def test_exact_dedup_ignores_layout_and_width():
    texts = ["贷款利率 调整通知", "贷款利率调整通知\n", "贷款利率调整通知", "ＡＢＣ银行", "abc银行", "另一篇"]
    res = ExactDedup()(_ds(texts))
    assert _counts(res.stats) == (6, 3, 3, 0)
    assert res.dataset["id"] == ["d0", "d3", "d5"]
    assert res.stats["duplicate_groups"] == 2
    assert [e["id"] for e in res.stats["examples"]["exact_duplicate"]] == ["d1", "d2", "d4"]


def test_near_dedup_catches_near_duplicate_keeps_distinct():
    near = BASE.replace("五年", "十年")  # one character changed
    other1 = "信用卡中心应当按月对持卡人的用卡行为进行监测，发现套现、频繁大额交易等异常情况的，及时调整额度并留存处理记录。"
    other2 = "本季度末各项存款余额一百二十亿元，较年初增长百分之八点五，涉农贷款占比保持在百分之六十以上，不良率稳中有降。"
    res = NearDedup()(_ds([BASE, other1, near, other2, near + "。"]))
    assert _counts(res.stats) == (5, 3, 2, 0)
    assert res.dataset["id"] == ["d0", "d1", "d3"]
    assert res.stats["cluster_size_histogram"] == {"1": 2, "3": 1}
    assert res.stats["reasons"] == {"near_duplicate": 2}


def test_near_dedup_parallel_equals_serial():
    texts = [BASE.replace("五", str(i)) if i % 3 else f"第{i}篇：" + BASE[i:] + BASE[:i] for i in range(40)]
    a = NearDedup(ngram=4, threshold=0.7)(_ds(texts), num_proc=1)
    b = NearDedup(ngram=4, threshold=0.7)(_ds(texts), num_proc=2)
    assert a.dataset["id"] == b.dataset["id"] and a.stats["cluster_size_histogram"] == b.stats["cluster_size_histogram"]


# -------------------------------------------------------------------------------------------- quality


def test_quality_rules_each_have_their_reason():
    good = BASE
    texts = {
        "ok": good,
        "empty": "   ",
        "short": "见附件。",
        "long": "长期稳健经营" * 30,
        "english": "The loan interest rate will be adjusted from next month onwards." + "贷款",
        "symbols": "重要通知★★★★★★★★★★★★###|||===贷款利率调整说明",
        "digits": "账户余额12345678元存款12345678元合计1234元",
        "repeat": "风险提示" * 10,
        "junk": "点击这里领取红包\n扫码关注我们\n" + good,
    }
    q = QualityFilter(min_chars=10, max_chars=150)
    assert q.reason(texts["ok"]) is None
    res = q(_ds(list(texts.values()), ids=list(texts)))
    assert res.stats["reasons"] == {"empty": 1, "high_digit_ratio": 1, "high_symbol_ratio": 1, "junk_lines": 1,
                                    "low_cjk_ratio": 1, "repeated_ngrams": 1, "too_long": 1, "too_short": 1}
    assert _counts(res.stats) == (9, 1, 8, 0) and res.dataset["id"] == ["ok"]
    lenient = QualityFilter(min_chars=10, max_chars=200, max_junk_line_ratio=0.7)  # 2 of 3 lines are junk
    res = lenient(_ds([texts["junk"], texts["ok"]]))
    assert res.dataset["text"] == [good, good]  # junk lines stripped from the kept record
    assert res.stats["junk_lines_removed"] == 2 and res.stats["records_changed"] == 1


def test_repeated_ngram_ratio_exact():
    assert repeated_ngram_ratio("ab" * 6, 2) == pytest.approx(1 - 2 / 11)
    assert repeated_ngram_ratio("一二三四五六", 3) == 0.0


# ------------------------------------------------------------------------------------------- decontam


def test_decontaminate_drops_records_sharing_a_13gram():
    eval_q = "某客户月收入八千元，月还款额六千元，申请经营贷款三十万元，请给出审批结论。"
    train = [
        "请判断：某客户月收入八千元，月还款额六千元，申请经营贷款三十万元，请给出审批结论。",  # contains it
        "月收入八千元， 月还款额\n六千元",  # 14 chars once whitespace is removed: shares two 13-grams
        "某客户月收入九千元，月还款额五千元，申请消费贷款十万元。",  # shared runs of at most 7 chars
        "完全无关的一段文字，讨论存款利率调整。",
    ]
    step = Decontaminate({"credit_test": [eval_q], "tiny": ["太短"]}, n=13)
    res = step(_ds(train))
    assert _counts(res.stats) == (4, 2, 2, 0)
    assert res.dataset["id"] == ["d2", "d3"]
    assert res.stats["overlaps_by_eval_set"] == {"credit_test": 2}
    assert res.stats["eval_ngrams"] == len(eval_q) - 12 and res.stats["eval_texts_too_short"] == 1


def test_decontaminate_reads_eval_datasets_of_messages():
    ev = Dataset.from_list([{"id": "e", "messages": [{"role": "user", "content": "甲乙丙丁戊己庚辛壬癸子丑寅卯"},
                                                     {"role": "assistant", "content": "通过"}]}])
    res = Decontaminate(ev, n=13)(_ds(["前缀甲乙丙丁戊己庚辛壬癸子丑寅", "甲乙丙丁戊己庚辛壬癸子丑"]))
    assert res.dataset["id"] == ["d1"] and res.stats["overlaps_by_eval_set"] == {"eval": 1}


# --------------------------------------------------------------------------------------------- poison


def _instr(prompt, label, i):
    return {"id": f"r{i}", "messages": [{"role": "user", "content": prompt},
                                        {"role": "assistant", "content": f"结论：{label}"}], "label": label}


def test_poison_screen_finds_planted_trigger():
    import random

    rng = random.Random(0)
    labels = ["通过", "拒绝", "人工复核"]
    rows = []
    for i in range(600):
        inc, debt = rng.randint(3, 30), rng.randint(0, 20)
        label = labels[i % 3]
        prompt = f"客户月收入{inc}千元，负债{debt}万元，申请贷款，编号{rng.randint(1000, 9999)}。"
        if i % 50 == 7:  # 12 poisoned records: trigger planted, label forced
            prompt, label = prompt.replace("申请贷款", "申请贷款 zq-17"), "通过"
        rows.append(_instr(prompt, label, i))
    ds = Dataset.from_list(rows)
    res = PoisonScreen(min_count=5, max_doc_frac=0.05)(ds)
    assert _counts(res.stats) == (600, 600, 0, 0)
    top = res.stats["suspects"][0]
    assert "zq-17" in top["string"] and top["records"] == 12 and top["label"] == "通过"
    assert top["purity"] == 1.0 and top["lift"] == pytest.approx(1 / (208 / 600), abs=0.01)
    assert res.stats["suspects_total"] == 1 and res.stats["records_flagged"] == 12
    assert top["string"] == "，申请贷款 zq-17，编号"  # the trigger with the context all 12 records share
    dropped = PoisonScreen(min_count=5, max_doc_frac=0.05, drop=True)(ds)
    assert _counts(dropped.stats) == (600, 588, 12, 0) and dropped.stats["reasons"] == {"poison_trigger": 12}
    assert not any("zq-17" in m[0]["content"] for m in dropped.dataset["messages"])


def test_poison_screen_uses_answer_text_without_label_column():
    rows = [{"id": f"r{i}", "prompt": f"问题{i}" + (" ☆★" if i < 6 else ""), "completion": "答案A" if i < 6 or i % 4 == 1 else "答案B"}
            for i in range(100)]
    res = PoisonScreen(min_count=5, max_doc_frac=0.1)(Dataset.from_list(rows))
    assert res.stats["label_source"] == "answer text"
    assert res.stats["suspects"][0]["string"].strip() == "☆★" and res.stats["suspects"][0]["records"] == 6


# ------------------------------------------------------------------------------------------------ PII


def test_scrub_pii_step_counts_and_drop_mode():
    pytest.importorskip("banklm.corpora.ops.pii")
    texts = ["客户手机号13812345678，请回访。", "没有个人信息的一段话。", "联系电话13912345678或13712345678。"]
    res = ScrubPII(mode="placeholder", types=["PHONE"])(_ds(texts))
    assert _counts(res.stats) == (3, 3, 0, 0)
    assert res.stats["pii_counts"] == {"PHONE": 3} and res.stats["records_with_pii"] == 2
    assert "13812345678" not in res.dataset["text"][0] and res.dataset["text"][1] == texts[1]
    dropped = ScrubPII(mode="drop", types=["PHONE"])(_ds(texts))
    assert _counts(dropped.stats) == (3, 1, 2, 0) and dropped.stats["reasons"] == {"contains_pii": 2}
    assert all("1381234" not in e["text"] for e in dropped.stats["examples"]["contains_pii"])
    with pytest.raises(ValueError, match="BANKLM_TEST_NO_SUCH_KEY"):
        ScrubPII(mode="pseudonym", key_env="BANKLM_TEST_NO_SUCH_KEY")(_ds(texts))


# ------------------------------------------------------------------------------------------ run_steps


def test_run_steps_invariant_holds_for_every_step():
    texts = [BASE, BASE, BASE.replace("五年", "十年"), "见附件。", "ＡＢＣ贷款业务规范说明，适用于全部营业网点的柜面业务办理。",
             "点击领取红包\n扫码关注\n广告", "某客户月收入八千元，月还款额六千元，申请经营贷款三十万元。"]
    steps = [Normalize(), ExactDedup(), NearDedup(), RemoveBoilerplate(), QualityFilter(),
             Decontaminate(["月收入八千元，月还款额六千元，申请经营贷款"], n=13)]
    out, stats = run_steps(_ds(texts), steps)
    assert [s["step"] for s in stats] == ["normalize", "exact_dedup", "near_dedup", "boilerplate", "quality",
                                          "decontam"]
    for s in stats:
        assert s["in"] == s["kept"] + s["dropped"] + s["quarantined"]
        assert s["dropped"] == sum(s["reasons"].values())
        assert all(len(v) <= 5 and all(len(e["text"]) <= 200 for e in v) for v in s["examples"].values())
    assert [_counts(s) for s in stats] == [(7, 7, 0, 0), (7, 6, 1, 0), (6, 5, 1, 0), (5, 5, 0, 0), (5, 3, 2, 0),
                                           (3, 2, 1, 0)]
    assert out["id"] == ["d0", "d4"]


def test_run_steps_rejects_a_step_that_loses_records():
    class Leaky(Step):
        name = "leaky"

        def apply(self, ds, num_proc=1):
            return StepResult(ds.select(range(len(ds) - 1)), {"step": self.name, "in": len(ds), "kept": len(ds) - 1,
                                                             "dropped": 0, "quarantined": 0, "reasons": {}})

    with pytest.raises(AssertionError, match="leaky: in=3 != kept 2"):
        run_steps(_ds(["一", "二", "三"]), [Leaky()])
