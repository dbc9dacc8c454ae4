"""The answer grammar (banklm.tasks.grammar) and its token mask (banklm.evaluation.constrained).

Every gold answer of generated records passes its grammar; malformed answers do not; decoding under the mask
gives answers the strict parser reads and the faithfulness metric (the same number reader) finds no unsupported
number in, on a SentencePiece and a byte-level BPE vocabulary; the GBNF parses in llama.cpp.
"""

from __future__ import annotations

import random
import re
from importlib import resources

import numpy as np
import pytest
import torch
from banklm.corpora.synth import generate_records
from banklm.export.gguf_vocab import read_tokenizer
from banklm.finetune.tokenizer import IM_END, load_tokenizer, train_tokenizer

from banklm.evaluation.constrained import GrammarError, GrammarMask, check_grammar, grammar_logits_processor
from banklm.evaluation.faithfulness import faithfulness, field_binding
from banklm.tasks import get_task
from banklm.tasks.formats import extract_numbers, read_numbers
from banklm.tasks.grammar import (
    answer_grammar,
    binding_names,
    binding_values,
    binds,
    bound_alternatives,
    citable_values,
    number_alternatives,
    support_texts,
    task_grammar,
    task_units,
)
from banklm.tasks.registry import task_from_spec
from banklm.tasks.spec import SpecError, parse_spec
from tests.export_models import qwen2_style_bpe
from tests.test_task_spec import POST_LOAN

BUILTINS = ("credit", "aml", "audit")


@pytest.fixture(scope="module")
def records():
    return {t: generate_records(t, 50, 7, "test", difficulty=0.5) for t in BUILTINS}


@pytest.fixture(scope="module")
def post_loan():
    return task_from_spec(parse_spec(POST_LOAN, "post_loan.yaml"))


@pytest.fixture(scope="module")
def post_loan_records(post_loan):
    """50 records of the bank spec (no sampler: random fields, labelled by its rules)."""
    rng = random.Random(3)
    t, out = post_loan, []
    for _ in range(50):
        f = {"客户名称": rng.choice(["王五", "甲公司"]), "客户类型": rng.choice(["个人", "个体工商户", "企业"]),
             "贷款余额": round(rng.uniform(1, 500), 1), "逾期天数": rng.choice([0, 0, 12, 45, 95, 120, 400]),
             "五级分类": rng.choice(["正常", "关注", "次级", "可疑", "损失"]),
             "抵押物估值变化": rng.choice([None, round(rng.uniform(-40, 10), 1)]),
             "经营状况": rng.choice([None, "正常", "下滑", "停业"]), "是否涉诉": rng.random() < 0.2,
             "借款人年龄": rng.randint(20, 70), "借款人性别": rng.choice(["男", "女"]),
             "近期大额交易": [{"日期": f"2024-03-0{rng.randint(1, 9)}", "金额": rng.randint(1000, 90000),
                          "摘要": "现金存入"}] * rng.randint(0, 2)}
        t.derive(f)
        out.append({"messages": t.messages(t.render_prompt(f, rng), t.format_answer(t.gold(f)))})
    return out


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory, records):
    texts = [m["content"] for rs in records.values() for r in rs for m in r["messages"]]
    return load_tokenizer(train_tokenizer(texts * 3, tmp_path_factory.mktemp("spm"), vocab_size=1200))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    qwen2_style_bpe(d)
    return load_tokenizer(d)


def accepts_all(tok, grammars: list[str], texts: list[str]) -> list[bool]:
    """Per text: whether its grammar takes it, then EOS, token by token through one batched mask."""
    eos = tok.convert_tokens_to_ids(IM_END)
    m = GrammarMask(tok, grammars, [eos])
    seqs = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    ok = [True] * len(texts)
    for step in range(max(map(len, seqs))):
        allowed = m.allowed()
        ids = [s[step] if step < len(s) else eos for s in seqs]
        for i, t in enumerate(ids):
            if step < len(seqs[i]) and not allowed[i, t]:
                ok[i] = False
        m.advance([t if ok[i] else eos for i, t in enumerate(ids)])
    return [o and d and e is None for o, d, e in zip(ok, m.done, m.errors, strict=True)]


def accepts(tok, grammar: str, text: str) -> bool:
    return accepts_all(tok, [grammar], [text])[0]


# ------------------------------------------------------------------------------------------- the number reader

def test_the_reader_keeps_units_and_the_metric_reads_the_same():
    found = read_numbers("近7日单笔4.5万至5万元现金存入3笔，负债收入比79.8%，近24个月逾期4次，2024年3月5日，18,500元")
    assert [n.text for n in found] == ["7日", "4.5万", "5万元", "3笔", "79.8%", "24个月", "4次", "2024年3月5日",
                                       "18,500元"]
    assert [n.value for n in found][1:3] == [("num", 45000.0), ("num", 50000.0)]
    for n in found:  # a mention read alone gives its value back; the metric reads the same values
        assert [m.value for m in read_numbers(n.text)] == [n.value] == extract_numbers(n.text)
    assert read_numbers("逾期12期", units=("期",))[0].text == "12期"
    assert read_numbers("逾期12期", units=())[0].text == "12"


# ------------------------------------------------------------------------------------------- grammar text

@pytest.mark.parametrize("task", BUILTINS)
def test_every_gold_answer_passes_its_grammar(task, records, spm_tok):
    t = get_task(task)
    golds = [r["messages"][-1]["content"] for r in records[task]]
    ok = accepts_all(spm_tok, [answer_grammar(t, r["messages"]) for r in records[task]], golds)
    assert all(ok), [g for g, o in zip(golds, ok, strict=True) if not o]


def test_bank_spec_gold_answers_and_multi_labels(post_loan, post_loan_records, spm_tok):
    t = post_loan
    golds = [r["messages"][-1]["content"] for r in post_loan_records]
    tags = {gold.split("；")[1] for gold in golds}
    ok = accepts_all(spm_tok, [answer_grammar(t, r["messages"]) for r in post_loan_records], golds)
    assert all(ok), [g for g, o in zip(golds, ok, strict=True) if not o]
    assert "风险标签：逾期" in tags and len(tags) >= 4
    g = answer_grammar(t, post_loan_records[0]["messages"])
    assert accepts(spm_tok, g, "预警等级：转人工；风险标签：无；理由：经营状况未提供，需人工核实")  # the abstain value
    assert accepts(spm_tok, g, "预警等级：预警；风险标签：逾期、涉诉；理由：涉诉且逾期")
    assert not accepts(spm_tok, g, "预警等级：预警；风险标签：涉诉、逾期；理由：涉诉且逾期")  # not the declared order
    assert not accepts(spm_tok, g, "预警等级：预警；风险标签：逾期、逾期；理由：涉诉且逾期")
    # the policy (system message) and the cited constant 逾期预警天数 = 90 supply numbers too
    assert "90天" in number_alternatives(t, post_loan_records[0]["messages"])
    assert "90" in number_alternatives(t, "no numbers here") and citable_values(t) == [("num", 90.0)]


def test_malformed_answers_are_rejected(records, spm_tok):
    t = get_task("credit")
    r = next(r for r in records["credit"] if "负债收入比" in r["messages"][-1]["content"])
    prompt = r["messages"][0]["content"]
    gold = r["messages"][-1]["content"]
    g = answer_grammar(t, r["messages"])
    pct = re.search(r"负债收入比(\d+\.\d%)", prompt).group(1)
    assert accepts(spm_tok, g, f"结论：拒绝；风险等级：D；理由：负债收入比{pct}过高")
    absent = next(f"{x}.9%" for x in range(10, 99) if f"{x}.9%" not in prompt)
    limit = t.reason_max_length
    bad = [
        gold.replace("结论：" + gold.split("；")[0][3:], "结论：批准"),                  # not a label
        "风险等级：D；结论：拒绝；理由：负债收入比过高",                                   # key order
        f"结论：拒绝；风险等级：D；理由：负债收入比{absent}过高",                          # number not in the prompt
        f"结论：拒绝；风险等级：D；理由：负债收入比{pct[:-1]}过高",                        # the unit dropped
        f"结论：拒绝；风险等级：D；理由：负债收入比{pct}.{pct}",                            # two numbers joined
        "结论：拒绝；风险等级：D；理由：" + "负" * (limit + 1),                            # over max_length
        "结论：拒绝；风险等级：D；理由：负债过高。",                                        # ends with 。
        "结论：拒绝；风险等级：D；理由：",                                                  # no reason
        "结论：拒绝；风险等级：D；理由：审批结论：拒绝",                                    # a colon reads as a key
        "结论：拒绝；风险等级：D；理由：负债收入比过高\n",
    ]
    assert not any(accepts_all(spm_tok, [g] * len(bad), bad))
    assert accepts(spm_tok, g, "结论：拒绝；风险等级：D；理由：" + "负" * limit)
    # the static grammar: the same layout, a reason without digits
    static = task_grammar(t)
    assert accepts(spm_tok, static, "结论：通过；风险等级：B；理由：申请人资质良好")
    assert not accepts(spm_tok, static, f"结论：拒绝；风险等级：D；理由：负债收入比{pct}过高")


def test_grammar_texts_parse_in_the_matcher_and_errors_name_the_problem(post_loan):
    for t in [*map(get_task, BUILTINS), post_loan]:
        check_grammar(task_grammar(t))
    with pytest.raises(GrammarError, match="parse"):
        check_grammar('root ::= "a" undefined-rule')
    with pytest.raises(ValueError, match="eos_ids"):
        GrammarMask(None, "root ::= \"a\"", [])


def test_gbnf_parses_in_llama_cpp(tmp_path, records, post_loan, post_loan_records, spm_tok):
    """llama.cpp's own grammar parser (llama_sampler_init_grammar on a vocabulary-only GGUF): our grammars parse,
    a malformed one does not. (LlamaGrammar.from_string checks nothing until sampling.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    for fn, v in ((w.add_context_length, 64), (w.add_embedding_length, 8), (w.add_block_count, 1),
                  (w.add_feed_forward_length, 8), (w.add_head_count, 1)):
        fn(v)
    w.add_layer_norm_rms_eps(1e-5)
    read_tokenizer(spm_tok.name_or_path).write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model
    vocab = llama_cpp.llama_model_get_vocab(model)

    def parses(text: str) -> bool:
        s = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        if s:
            llama_cpp.llama_sampler_free(s)
        return bool(s)

    try:
        texts = [task_grammar(post_loan), answer_grammar(post_loan, post_loan_records[0]["messages"])]
        texts += [g for name in BUILTINS for g in (task_grammar(get_task(name)),
                                                   answer_grammar(get_task(name), records[name][0]["messages"]))]
        assert all(parses(g) for g in texts)
        assert not parses(texts[0].replace("::=", ":=", 1))
        assert not parses('root ::= [\\^]')
    finally:
        llama_cpp.llama_model_free(model)


# ------------------------------------------------------------------------------------------- the mask

@pytest.mark.parametrize("tok_name", ["spm_tok", "bpe_tok"])
def test_random_logits_under_the_mask_give_parseable_faithful_answers(tok_name, request, records, post_loan,
                                                                      post_loan_records):
    """Whatever the model prefers, the masked answer parses strictly and cites only the prompt's numbers (the
    metric, given the same support texts, finds none unsupported)."""
    tok = request.getfixturevalue(tok_name)
    eos = tok.convert_tokens_to_ids(IM_END)
    cases = [(get_task(n), r) for n in BUILTINS for r in records[n][:6]] + [(post_loan, r) for r in
                                                                             post_loan_records[:6]]
    gen = torch.Generator().manual_seed(1)
    mask = GrammarMask(tok, [answer_grammar(t, r["messages"]) for t, r in cases], [eos], vocab_size=len(tok) + 5)
    outs: list[list[int]] = [[] for _ in cases]
    for step in range(400):
        logits = torch.randn(len(cases), len(tok) + 5, generator=gen)
        logits[:, eos] -= 3.0  # answers run long: the reason bound must end them
        if step % 2 == 0:
            logits[:, -5:] += 100.0  # a padded LM head's extra columns are never taken
        chosen = mask.choose(logits).tolist()  # greedy's fast path: the argmax checked first, masks only if forbidden
        nxt = mask.apply(logits).argmax(-1).tolist()
        assert chosen == nxt, step
        for i, tid in enumerate(nxt):
            if not mask.done[i]:
                outs[i].append(tid)
        mask.advance(nxt)
        if all(mask.done):
            break
    assert all(mask.done) and mask.errors == [None] * len(cases)
    for (t, r), ids in zip(cases, outs, strict=True):
        assert ids[-1] == eos
        text = tok.decode(ids[:-1])
        parsed = t.parse(text, strict=True)
        assert parsed is not None, text
        reason = parsed[t.reason_key]
        assert len(reason) <= t.reason_max_length
        fa = faithfulness(["\n".join(support_texts(r["messages"]))], [reason], allowed=citable_values(t))
        assert fa["per_answer"] == [[]], (text, fa)


class FixedLM(torch.nn.Module):
    """A toy LM with fixed preferences: it follows the tokens of ``script`` while its output is a prefix of them,
    and otherwise prefers digit tokens (it wants to write numbers), then EOS."""

    def __init__(self, tok, script: str):
        super().__init__()
        self.tok, self.eos = tok, tok.convert_tokens_to_ids(IM_END)
        self.script = tok(script, add_special_tokens=False)["input_ids"] + [self.eos]
        pieces = [tok.decode([i]) for i in range(len(tok))]
        self.digit = torch.tensor([bool(re.match(r"\d", p)) for p in pieces])

    def forward(self, generated: list[int]) -> torch.Tensor:
        logits = torch.zeros(len(self.tok))
        logits[self.digit] = 3.0
        logits[self.eos] = 1.0
        if generated == self.script[: len(generated)] and len(generated) < len(self.script):
            logits[self.script[len(generated)]] = 10.0
        return logits


def _greedy(lm: FixedLM, processor=None, steps: int = 120) -> str:
    out: list[int] = []
    for _ in range(steps):
        scores = lm(out)[None, :]
        if processor is not None:
            scores = processor(torch.tensor([[0, *out]]), scores)
        t = int(scores.argmax(-1))
        out.append(t)
        if t == lm.eos:
            break
    return lm.tok.decode([t for t in out if t != lm.eos])


def test_a_model_that_wants_an_absent_number_copies_one_from_the_prompt_with_its_unit(records, spm_tok, bpe_tok):
    t = get_task("credit")
    r = next(r for r in records["credit"] if "负债收入比" in r["messages"][-1]["content"])
    prompt = r["messages"][0]["content"]
    absent = next(f"{x}.9%" for x in range(98, 10, -1) if f"{x}.9%" not in prompt and f"{x}." not in prompt)
    script = f"结论：拒绝；风险等级：D；理由：负债收入比{absent}过高"
    for tok in (spm_tok, bpe_tok):
        lm = FixedLM(tok, script)
        free = _greedy(lm)
        assert free == script  # unconstrained it writes the invented number ...
        assert faithfulness([prompt], [t.parse(free)["reason"]])["per_answer"] == [[absent]]
        eos = tok.convert_tokens_to_ids(IM_END)
        constrained = _greedy(lm, grammar_logits_processor(GrammarMask(tok, answer_grammar(t, r["messages"]),
                                                                       [eos])))
        parsed = t.parse(constrained, strict=True)
        assert parsed is not None, constrained
        reason = parsed["reason"]
        assert reason.startswith("负债收入比") and absent not in reason
        cited = read_numbers(reason)
        assert cited, reason  # ... under the mask it still writes a number: one of the prompt's, unit included
        prompt_mentions = {m.text for m in read_numbers(prompt, task_units(t))}
        assert all(m.text in prompt_mentions for m in read_numbers(reason, task_units(t))), reason
        assert faithfulness([prompt], [reason])["per_answer"] == [[]]


def test_generate_with_the_logits_processor_on_a_tiny_model(records, spm_tok):
    """model.generate (a random tiny Llama, greedy, batched, left padding) under the processor: every answer
    parses strictly and ends before max_new_tokens."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(spm_tok) + 3, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()  # a padded LM head: 3 ids the tokenizer lacks
    t = get_task("aml")
    rs = records["aml"][:2]
    eos = spm_tok.convert_tokens_to_ids(IM_END)
    texts = [spm_tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False) for r in rs]
    spm_tok.padding_side = "left"
    enc = spm_tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    mask = GrammarMask(spm_tok, [answer_grammar(t, r["messages"]) for r in rs], [eos],
                       vocab_size=model.config.vocab_size)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=160, do_sample=False, eos_token_id=eos,
                             pad_token_id=spm_tok.pad_token_id, logits_processor=[grammar_logits_processor(mask)])
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        assert eos in row
        text = spm_tok.decode(row[: row.index(eos)], skip_special_tokens=True)
        assert t.parse(text, strict=True) is not None, text


def test_mask_on_numpy_logits_and_a_forbidden_token_fails_only_its_row(spm_tok):
    eos = spm_tok.convert_tokens_to_ids(IM_END)
    g = 'root ::= "结论：" ("可疑" | "正常")'
    mask = GrammarMask(spm_tok, g, [eos], batch=2)
    logits = np.zeros((2, len(spm_tok)), dtype=np.float32)
    mask.apply(logits)
    ok = np.isfinite(logits)
    assert ok.any(axis=1).all() and not ok[:, eos].any()
    first = int(np.flatnonzero(ok[0])[0])
    bad = int(np.flatnonzero(~ok[0])[5])
    mask.advance([first, bad])
    assert mask.errors[0] is None and mask.errors[1] and mask.done == [False, True]
    assert mask.allowed()[1].tolist() == [i == eos for i in range(len(spm_tok))]  # a failed row may only end
    mask.reset()
    assert mask.errors == [None, None] and mask.done == [False, False]


# ------------------------------------------------------------------------------------------- field binding

@pytest.fixture(scope="module")
def credit_bind():
    """The built-in credit spec: its reason binds numbers to their fields (``bind: true``)."""
    return get_task("credit")


@pytest.fixture(scope="module")
def credit_free():
    """The credit spec without ``bind`` (its YAML text, modified): numbers after any words."""
    text = (resources.files("banklm.tasks") / "specs" / "credit.yaml").read_text(encoding="utf-8")
    assert text.count("      bind: true") == 1
    lines = [ln for ln in text.splitlines(keepends=True) if not ln.startswith("      bind: true")]
    return task_from_spec(parse_spec("".join(lines), "credit.yaml"))


def test_bind_grammar_takes_the_gold_answers_and_only_numbers_after_their_own_field(credit_bind, credit_free,
                                                                                      records, spm_tok):
    t, recs = credit_bind, records["credit"]
    assert binds(t) and not binds(credit_free)
    fields = [t.fields_from_meta(r["meta"]) for r in recs]
    grammars = [answer_grammar(t, r["messages"], fields=f) for r, f in zip(recs, fields, strict=True)]
    golds = [r["messages"][-1]["content"] for r in recs]
    ok = accepts_all(spm_tok, grammars, golds)
    assert all(ok), [g for g, o in zip(golds, ok, strict=True) if not o]
    assert sum(bool(re.search(r"\d", g)) for g in golds) >= 20  # the golds cite numbers
    # without the request's fields a binding spec falls back to the unbound grammar; no bind: unchanged by fields
    assert answer_grammar(t, recs[0]["messages"]) == answer_grammar(credit_free, recs[0]["messages"])
    assert (answer_grammar(credit_free, recs[0]["messages"], fields=fields[0])
            == answer_grammar(credit_free, recs[0]["messages"]))
    f = fields[0]
    dti, debt = f"{f['dti']:.1f}%", f"{f['monthly_debt']}元"
    head = "结论：拒绝；风险等级：D；理由："
    good = [f"{head}负债收入比{dti}过高", f"{head}房产抵押，负债收入比{dti}，近24个月逾期{f['overdue_24m']}次"]
    swapped = [f"{head}负债收入比{debt}过高",              # 月还款's value after 负债收入比
               f"{head}月还款{dti}偏高",                  # and the other way round (月还款 is not cited: no piece)
               f"{head}{dti}过高",                        # a number after no name
               f"{head}近24个月逾期{f['overdue_24m'] + 50}次"]  # a value of no field
    assert all(accepts_all(spm_tok, [grammars[0]] * len(good), good))
    assert not any(accepts_all(spm_tok, [grammars[0]] * len(swapped), swapped))
    plain = answer_grammar(credit_free, recs[0]["messages"])
    assert accepts(spm_tok, plain, swapped[0]) and accepts(spm_tok, plain, swapped[2])  # the unbound grammar takes both


def test_every_bound_piece_reads_back_bound_to_its_own_field(credit_bind, records):
    """What the bind grammar may write, the field-binding metric reads as right and faithfulness as supported."""
    t = credit_bind
    names, units = binding_names(t), task_units(t)
    n = 0
    for r in records["credit"][:20]:
        f = t.fields_from_meta(r["meta"])
        pieces = bound_alternatives(t, r["messages"], f)
        n += len(pieces)
        res = field_binding(pieces, [binding_values(t, f)] * len(pieces), names, units)
        assert res["n_binding_errors"] == 0 and res["n_bound_numbers"] == len(pieces), pieces
        fa = faithfulness(["\n".join(support_texts(r["messages"]))] * len(pieces), pieces,
                          allowed=citable_values(t))
        assert fa["unsupported_number_rate"] == 0.0
        assert f"负债收入比{f['dti']:.1f}%" in pieces and not any(p.startswith("月还款") for p in pieces)  # not cited
    assert n >= 20 * 8


def test_bind_applies_to_the_reason_key_only():
    text = (resources.files("banklm.tasks") / "specs" / "credit.yaml").read_text(encoding="utf-8")
    bad = text.replace("ordinal: true}", "ordinal: true, bind: true}", 1)
    assert bad != text
    with pytest.raises(SpecError, match=r"answer\.keys\.grade\.bind: bind applies to the reason key"):
        parse_spec(bad, "credit.yaml")


def test_a_request_grammar_converts_like_the_whole_text_from_a_cached_shape(records):
    """Per request only the number alternatives change: the cached conversion of the grammar's shape with the
    request's literals put back reads exactly as converting the request's GBNF in full (up to layout)."""
    from banklm.evaluation.constrained import _compiled, _converted

    def norm(text: str) -> str:
        text = re.sub(r"\n\s*\|", " |", text)
        return "\n".join(ln for ln in text.splitlines() if ln.strip())

    n = 0
    for name in BUILTINS:
        t = get_task(name)
        for r in records[name][:15]:
            for fields in (None, t.fields_from_meta(r["meta"])):
                g = answer_grammar(t, r["messages"], fields=fields)
                assert norm(_compiled(g)) == norm(_converted(g)), (name, r["id"])
                n += "-n" in g
    assert n >= 60  # the requests had number alternatives to put back


def test_banklm_gbnf_converts_to_the_same_lark_as_llguidance(records, post_loan):
    """The fast converter of banklm's own GBNF writes exactly llguidance's conversion (same rules, names and
    layout) for every task's grammars; GBNF outside its subset goes to llguidance's converter."""
    from llguidance.gbnf_to_lark import gbnf_to_lark

    from banklm.evaluation.constrained import _converted, _fast_lark, _Unsupported

    texts = [task_grammar(t) for t in [*map(get_task, BUILTINS), post_loan]]
    for name in BUILTINS:
        t = get_task(name)
        for r in records[name][:10]:
            texts += [answer_grammar(t, r["messages"]), answer_grammar(t, r["messages"], fields=t.fields_from_meta(
                r["meta"])), answer_grammar(t, r["messages"], max_reason_chars=7)]
    texts += ['# a comment\nroot ::= "a" ( "b" | "c" )* x\nx ::= [^a-z/\\x0A[] | "\\\\" y+\ny ::= ("q" "r")? | x',
              'root ::= ("a" "b") "c" rec\nrec ::= "x" rec | "y"']
    for g in texts:
        assert _fast_lark(g) == gbnf_to_lark(g)
    for g in ('root ::= "a"{1,3}', 'root ::= "\\u0041"', 'root ::= .', 'root ::= "a"\nroot ::= "b"'):
        with pytest.raises(_Unsupported):
            _fast_lark(g)
    assert '"a"{1,3}' in _converted('root ::= "a"{1,3}')  # llguidance's converter took it
