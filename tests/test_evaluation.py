"""Evaluation plumbing: scoring planted outputs, and generation + files on a tiny random Llama (CPU)."""

from __future__ import annotations

import json
import os
import random

import pytest
from banklm.corpora.synth import generate_all, generate_records

from banklm.evaluation.evaluate import evaluate_model_dir, evaluate_records, score_records
from banklm.evaluation.generate import generate
from banklm.results import task_rows
from banklm.tasks import get_task

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _gold_answers(recs):
    return [r["messages"][1]["content"] for r in recs]


def test_score_records_counts_unparseable_as_wrong():
    recs = generate_records("credit", 8, seed=0, split="test")
    outs = _gold_answers(recs)
    outs[0] = "我不知道"  # unparseable
    outs[1] = outs[1].replace("：", ":").replace("；", ";")  # parseable, not strict layout
    res, preds = score_records(recs, outs, model_name="m")
    t = res["tasks"]["credit"]
    # 7 of 8 correct; 6 of 8 in the exact layout; 7 of 8 parse
    assert t["accuracy"] == pytest.approx(7 / 8)
    assert t["format_compliance"] == pytest.approx(6 / 8)
    assert t["parse_rate"] == pytest.approx(7 / 8)
    assert preds[0]["parsed"] is None and preds[0]["correct"] is False and preds[0]["pred_label"] is None
    assert t["confusion"]["labels"][-1] == "INVALID"
    assert t["hallucination_rate"] == 0.0
    assert set(t["fairness"]) >= {"gender", "hukou", "age_band", "region"}
    assert res["overall"]["n"] == 8 and res["model"] == "m"


def test_score_records_all_tasks_perfect_and_planted_errors():
    recs = generate_all(14, seed=3, split="test")
    res, _ = score_records(recs, _gold_answers(recs))
    for name, t in res["tasks"].items():
        assert t["accuracy"] == 1.0 and t["mcc"] == pytest.approx(1.0) and t["exact_match"] == 1.0, name
        assert t["format_compliance"] == 1.0 and t["hallucination_rate"] == 0.0
        assert set(t["per_branch"]) == set(get_task(name).branches)
    assert res["tasks"]["aml"]["positive"]["recall"] == 1.0 and res["tasks"]["aml"]["positive"]["value"] == "可疑"
    assert "positive" not in res["tasks"]["credit"] and "fairness" in res["tasks"]["credit"]
    assert set(res["tasks"]["credit"]["per_class"]) == {"decision", "grade"}
    # plant a wrong grade and a hallucinated number in one credit answer
    outs = _gold_answers(recs)
    i = next(
        k for k, r in enumerate(recs) if r["label"] == "拒绝" and "负债收入比" in r["messages"][1]["content"]
    )
    outs[i] = "结论：拒绝；风险等级：A；理由：负债收入比99.9%过高"
    res, preds = score_records(recs, outs)
    c = res["tasks"]["credit"]
    assert c["accuracy"] == 1.0 and c["exact_match"] == pytest.approx(13 / 14)
    assert c["hallucination_rate"] == pytest.approx(1 / 14)
    assert preds[i]["unsupported_numbers"] == ["99.9%"]


# ------------------------------------------------------------------------------------------------
# a tiny randomly initialised Llama with a SentencePiece tokenizer trained on generated prompts


def _train_tokenizer(folder, texts):
    try:
        from banklm.finetune.tokenizer import load_tokenizer, train_tokenizer

        train_tokenizer(texts, folder, vocab_size=800)
        return load_tokenizer(folder)
    except ImportError:  # finetune.tokenizer not there yet: build the folder of docs/ARCHITECTURE.md
        import io

        import sentencepiece as spm
        from transformers import AutoTokenizer

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            model_type="bpe",
            vocab_size=800,
            hard_vocab_limit=False,
            byte_fallback=True,
            split_digits=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            user_defined_symbols=["<|im_start|>", "<|im_end|>"],
            minloglevel=2,
        )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.model").write_bytes(buf.getvalue())
        tpl = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        cfg = {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "<|im_end|>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "chat_template": tpl,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    recs = generate_all(40, seed=0, split="tok")
    tok = _train_tokenizer(folder / "tok", [m["content"] for r in recs for m in r["messages"]])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=1,
        eos_token_id=im_end,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = [im_end, 2]
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok, folder


def test_generate_batched_left_padding_matches_single(tiny):
    model, tok, _ = tiny
    recs = generate_all(3, seed=9, split="test")
    msgs = [r["messages"][:1] for r in recs]
    batched = generate(model, tok, msgs, max_new_tokens=6, batch_size=4)
    single = generate(model, tok, msgs, max_new_tokens=6, batch_size=1)
    assert isinstance(batched, list) and len(batched) == len(recs)
    assert list(batched) == list(single)  # left padding + mask do not change greedy outputs; order kept
    assert batched.new_tokens > 0 and batched.seconds > 0 and batched.tokens_per_s > 0
    assert generate(model, tok, [], max_new_tokens=4).texts == []


def test_evaluate_records_random_model_counts_garbage_wrong(tiny, tmp_path):
    model, tok, _ = tiny
    recs = generate_all(4, seed=1, split="test")
    out = tmp_path / "eval"
    res = evaluate_records(
        model,
        tok,
        recs,
        out,
        batch_size=5,
        max_new_tokens=8,
        model_name="tiny",
        robustness=["fullwidth_digits"],
    )
    assert (out / "results.json").is_file() and (out / "predictions.jsonl").is_file()
    on_disk = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert on_disk["model"] == "tiny" and on_disk["n"] == len(recs)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["id"] for p in preds] == [r["id"] for r in recs]
    assert set(preds[0]) >= {"id", "task", "output", "parsed", "gold", "correct"}
    # a random model's 8 tokens never form a parseable answer: everything counts as wrong
    assert all(p["parsed"] is None and not p["correct"] for p in preds)
    for name in ("credit", "aml", "audit"):
        t = res["tasks"][name]
        assert t["n"] == 4 and t["accuracy"] == 0.0 and t["format_compliance"] == 0.0
        assert t["confusion"]["labels"][-1] == "INVALID"
    assert res["overall"]["tokens_per_s"] > 0 and res["overall"]["seconds"] > 0
    assert res["robustness"]["fullwidth_digits"]["drop"] == 0.0


def test_evaluate_model_dir_loads_safetensors(tiny, tmp_path):
    model, tok, folder = tiny
    mdir = tmp_path / "model"
    model.save_pretrained(mdir, safe_serialization=True)
    for f in (folder / "tok").iterdir():
        (mdir / f.name).write_bytes(f.read_bytes())
    assert any(p.suffix == ".safetensors" for p in mdir.iterdir())
    recs = generate_records("aml", 3, seed=0, split="test")
    res = evaluate_model_dir(mdir, recs, tmp_path / "out", device="cpu", max_new_tokens=4)
    assert res["model"] == "model" and res["tasks"]["aml"]["n"] == 3
    assert (tmp_path / "out" / "results.json").is_file()
    with pytest.raises(FileNotFoundError):
        evaluate_model_dir(tmp_path / "missing", recs, tmp_path / "o2")


def test_prompts_are_folded_like_the_training_corpora():
    """Full-width digits in a served prompt reach the model as the ASCII the corpora trained it on."""
    from banklm.corpora.ops.normalize import normalize_text

    from banklm.evaluation.evaluate import _messages
    from banklm.tasks.base import fold_fullwidth, to_fullwidth_digits

    text = "月收入１５６００元，负债收入比４０．０％；结论：拒绝（近２４个月逾期６次）"
    rec = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "结论：拒绝"}]}
    folded = _messages([rec])[0]
    assert folded == [{"role": "user", "content": "月收入15600元，负债收入比40.0%；结论：拒绝（近24个月逾期6次）"}]
    assert _messages([rec], fold_inputs=False)[0][0]["content"] == text
    # one table: the corpora's normaliser and the serving fold agree, and folding undoes the perturbation
    assert normalize_text(text) == fold_fullwidth(text)
    plain = "资金回流比例81.5%，转入对手方12个"
    assert fold_fullwidth(to_fullwidth_digits(plain)) == plain


def _bank_prompt_only(tmp_path):
    """A bank's own AML table in prompt mode: free-text prompts, so no input fields to re-render."""
    from banklm.tasks.tables import from_table

    p = tmp_path / "bank_aml.csv"
    p.write_text("prompt,conclusion,typology\n"
                 "客户近7日存入现金3笔，每笔4.9万元，均低于5万元,可疑,拆分交易\n"
                 "账户当日转入80万元，当日转出79.5万元,可疑,快进快出\n"
                 "工资入账8500元，日常消费12笔,正常,无\n"
                 "与高风险地区往来2笔，合计36万元,可疑,与高风险地区往来\n", encoding="utf-8")
    return from_table("aml", p)


def test_perturb_names_records_it_cannot_rerender(tmp_path):
    import random

    from banklm.tasks.perturb import CannotPerturb, can_perturb, perturb

    bank = _bank_prompt_only(tmp_path)
    gen = generate_records("aml", 1, seed=0, split="test")[0]
    for kind in ("shuffle_fields", "distractor"):
        assert not can_perturb("aml", bank[0], kind) and can_perturb("aml", gen, kind)
        with pytest.raises(CannotPerturb, match="aml-bank-000000: meta has no input fields"):
            perturb("aml", bank[0], random.Random(0), kind)
    assert can_perturb("aml", bank[0], "fullwidth_digits")
    with pytest.raises(ValueError, match="unknown perturbation 'typo'"):
        can_perturb("aml", gen, "typo")


def test_robustness_skips_prompt_only_records_and_compares_the_same_subset(tmp_path, monkeypatch):
    """A mix of generated and prompt-only records: re-rendering kinds skip (and count) the prompt-only ones,
    and the drop is measured against the clean accuracy of the records actually perturbed."""
    import banklm.evaluation.evaluate as E
    from banklm.evaluation.generate import GenerationResult
    from banklm.tasks.base import fold_fullwidth

    generated = generate_all(2, seed=3, split="test")  # 2 per task, fields in meta
    bank = _bank_prompt_only(tmp_path)
    records = generated + bank
    assert len(generated) == 6 and len(bank) == 4
    # an oracle that knows some clean prompts: right on every bank row and on half of the generated records,
    # unparseable on anything else (every re-rendered prompt is new to it)
    known = {fold_fullwidth(r["messages"][0]["content"]): r["messages"][1]["content"] for r in bank + generated[::2]}
    calls = []

    def oracle(model, tokenizer, convs, max_new_tokens, batch_size):
        calls.append(len(convs))
        return GenerationResult([known.get(c[-1]["content"], "不知道") for c in convs], seconds=1.0,
                                new_tokens=len(convs))

    monkeypatch.setattr(E, "generate", oracle)
    res = E.evaluate_records(None, None, records, tmp_path / "ev", model_name="oracle",
                             robustness=["shuffle_fields", "distractor", "fullwidth_digits"])
    assert res["overall"]["accuracy"] == pytest.approx(7 / 10)
    for kind in ("shuffle_fields", "distractor"):
        rb = res["robustness"][kind]
        assert rb["n"] == 6 and rb["skipped"] == 4
        assert rb["accuracy"] == 0.0
        assert rb["clean_accuracy"] == pytest.approx(3 / 6)  # the same six records, not 7/10 over all ten
        assert rb["drop"] == pytest.approx(0.5)
        assert set(rb["per_task"]) == {"credit", "aml", "audit"}
    fw = res["robustness"]["fullwidth_digits"]  # needs no fields: every record, and serving folds it back
    assert fw["n"] == 10 and fw["skipped"] == 0 and fw["drop"] == pytest.approx(0.0)
    assert calls == [10, 6, 6, 10]
    on_disk = json.loads((tmp_path / "ev" / "results.json").read_text(encoding="utf-8"))
    assert on_disk["robustness"]["distractor"]["skipped"] == 4

    # nothing perturbable: no generation, no made-up score
    calls.clear()
    res = E.evaluate_records(None, None, bank, tmp_path / "ev2", robustness=["distractor"])
    assert res["robustness"]["distractor"] == {"n": 0, "skipped": 4, "accuracy": None, "clean_accuracy": None,
                                               "drop": None, "per_task": {}}
    assert calls == [4]


def test_comparison_table_and_chart(tmp_path):
    from banklm.evaluation.comparison import write_comparison

    recs = generate_all(3, seed=2, split="test")
    gold = _gold_answers(recs)
    good, _ = score_records(recs, gold, model_name="good")
    bad, _ = score_records(recs, ["?"] * 3 + gold[3:], model_name="bad")  # credit comes first: all wrong
    good["overall"].update({"tokens_per_s": 123.45, "model_bytes": 2_500_000})
    bad["overall"].update({"tokens_per_s": 9.0, "model_bytes": 700_000, "runtime": "llama.cpp"})
    md, png, table = write_comparison({"lora": good, "q4": bad}, tmp_path / "cmp",
                                      sources={"lora": "runs/x/sft/merged", "q4": "x-q4_0.gguf"})
    assert md == tmp_path / "cmp" / "comparison.md" and md.read_text(encoding="utf-8").endswith(table)
    lines = table.splitlines()
    assert lines[0] == ("| task | model | n | accuracy | macro-F1 | MCC | format compliance | unsupported-number rate "
                        "| coverage at threshold | accuracy answered | tokens/s | size (MB) |")
    c = bad["tasks"]["credit"]
    assert (f"| credit | q4 | 3 | {c['accuracy']:.3f} | {c['macro_f1']:.3f} | {c['mcc']:.3f} | "
            f"{c['format_compliance']:.3f} | {c['unsupported_number_rate']:.3f} | – | – | 9.0 | 0.70 |") in lines
    assert c["accuracy"] == 0.0
    # models side by side within each task
    i = lines.index("| aml | lora | 3 | 1.000 | 1.000 | 1.000 | 1.000 | 0.000 | – | – | 123.5 | 2.50 |")
    assert lines[i + 1] == "| aml | q4 | 3 | 1.000 | 1.000 | 1.000 | 1.000 | 0.000 | – | – | 9.0 | 0.70 |"
    assert "| q4 | 0.667 | 9 | x-q4_0.gguf (llama.cpp) |" in lines
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_come_from_the_spec_of_a_bank_task(tmp_path):
    """A bank's own task (贷后预警, favourable 正常, a multi-label key, two data sources): fairness counts 正常,
    the multi-label key gets per-value metrics, every categorical key per-class ones, results per source."""
    from banklm.tasks.registry import register_spec, unregister
    from tests.test_task_spec import POST_LOAN, fields

    path = tmp_path / "post_loan.yaml"
    path.write_text(POST_LOAN, encoding="utf-8")
    task = register_spec(path)
    try:
        recs = []
        for i in range(8):
            f = fields(逾期天数=0 if i % 2 else 120, 借款人性别="男" if i < 4 else "女", 借款人年龄=30 + i)
            task.derive(f)
            rec = task.make_record(f"post_loan-test-{i:06d}", f, random.Random(i))
            if i >= 6:
                meta = json.loads(rec["meta"])
                rec["meta"] = json.dumps({**meta, "source": "bank_table.csv"}, ensure_ascii=False)
            recs.append(rec)
        outs = [r["messages"][-1]["content"] for r in recs]
        # women's 正常 cases answered 关注: the favourable value goes to men only
        for i in (5, 7):
            outs[i] = outs[i].replace("预警等级：正常", "预警等级：关注")
        res, _ = score_records(recs, outs)
        t = res["tasks"]["post_loan"]
        fair = t["fairness"]["借款人性别"]
        assert fair["rates"] == {"女": 0.0, "男": 0.5} and fair["flag"]
        assert "借款人年龄_band" in t["fairness"]  # the numeric protected attribute, by its declared bands
        assert set(t["per_class"]) == {"预警等级"} and t["per_class"]["预警等级"]["关注"]["support"] == 0
        assert t["multi_label"]["风险标签"]["exact_set_match"] == 1.0
        assert set(t["by_source"]) == {"synthetic", "bank_table.csv"} and t["by_source"]["bank_table.csv"]["n"] == 2
        bank = t["by_source"]["bank_table.csv"]  # every metric again on the bank's rows alone (7 wrong, 6 right)
        assert bank["accuracy"] == 0.5 and t["by_source"]["synthetic"]["accuracy"] == 5 / 6
        assert {"mcc", "macro_f1", "per_class", "multi_label", "format_compliance"} <= set(bank)
        assert "by_source" not in bank
        rows = task_rows(res["tasks"])
        assert [r[0] for r in rows] == ["post_loan", "post_loan · bank_table.csv", "post_loan · synthetic"]
        assert rows[1][:3] == ["post_loan · bank_table.csv", 2, 0.5]
        assert "positive" not in t
    finally:
        unregister("post_loan")


def test_fairness_is_skipped_with_a_reason_when_the_spec_has_no_favourable_value():
    recs = generate_records("audit", 6, seed=0, split="test")
    res, _ = score_records(recs, _gold_answers(recs))
    t = res["tasks"]["audit"]
    assert "fairness" not in t and t["fairness_skipped"].startswith("the task spec declares no")


def test_a_reason_may_cite_numbers_of_the_system_prompt_and_the_specs_constants(tmp_path):
    """The faithfulness metric reads what the answer grammar allows: every message the model saw and the
    spec's citable constants; a number found in none of them is still unsupported."""
    from banklm.tasks.registry import register_spec, unregister
    from tests.test_task_spec import POST_LOAN, fields

    path = tmp_path / "post_loan.yaml"
    path.write_text(POST_LOAN, encoding="utf-8")
    task = register_spec(path)
    try:
        rec = task.make_record("post_loan-test-000000", fields(逾期天数=120), random.Random(0))
        user = rec["messages"][-2]["content"]
        assert "90" not in user and "90天" in rec["messages"][0]["content"]  # the policy names the 90-day line
        outs = ["预警等级：预警；风险标签：逾期；理由：逾期120天，超过90天", "预警等级：预警；风险标签：逾期；理由：逾期120天，超过77天"]
        res, preds = score_records([rec, rec], outs)
        assert [p["unsupported_numbers"] for p in preds] == [[], ["77"]]
        assert res["tasks"]["post_loan"]["unsupported_number_rate"] == 0.25
    finally:
        unregister("post_loan")
