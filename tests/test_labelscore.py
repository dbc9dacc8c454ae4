"""Label scoring (banklm.evaluation.labelscore) on PyTorch, ONNX and llama.cpp against the slow way: one full
forward pass over prompt + answer prefix per candidate, no cache, the candidate's probability read from the
whole sequence's likelihood."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from banklm.finetune.models import build_tiny_model  # noqa: E402

from banklm.evaluation.labelscore import (  # noqa: E402
    MAX_LISTS,
    choose_combo,
    label_scores_record,
    label_space,
    score_labels,
)
from banklm.runtime import LlamaCppLM, OnnxCausalLM, TorchLM, llama_cpp_available  # noqa: E402
from banklm.tasks import TASKS, parse_spec, task_from_spec  # noqa: E402
from banklm.tasks.base import iter_user_messages  # noqa: E402
from tests.helpers import post_loan_records, sharpened_tiny_model, train_on_answers  # noqa: E402
from tests.test_task_spec import POST_LOAN  # noqa: E402

PER_TASK = 4


def _records(task, n, seed=0):
    rng = random.Random(seed)
    return [task.make_record(f"{task.name}-{i}", task.sample(rng, task.branches[i % len(task.branches)]), rng)
            for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two spin in OpenMP barriers when other work shares the CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("labelscore")


@pytest.fixture(scope="module")
def tiny(work):
    """A sharpened 2-layer Llama (hidden 64) with a SentencePiece tokenizer trained on the tasks' records: far
    from uniform, so the candidates' probabilities differ and a wrong position or cache shows."""
    return sharpened_tiny_model(work, [m["content"] for t in TASKS.values() for r in _records(t, 60, seed=1)
                                       for m in r["messages"]])


@pytest.fixture(scope="module")
def trained(work, tiny):
    """A tiny Llama trained from scratch to answer the three built-in tasks (150 steps, loss on the answers, about
    15 s on one thread): it writes the answer layout on every held-out prompt, its labels only partly right."""
    tok = tiny[2]
    d = build_tiny_model("llama", work / "tok", work / "trained", hidden_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=128, max_position_embeddings=1024, seed=7)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    return train_on_answers(model, tok, [r for t in TASKS.values() for r in _records(t, 200, seed=7)], steps=150), tok


def _prefix(task, combo):
    """The answer up to and without the ``；`` before the reason, cut from format_answer itself."""
    reason = task.reason_key
    text = task.format_answer({**combo, reason: "理由文字"})
    return text[: text.rindex("；" + task._key(reason).zh + "：")]


def _slow_probs(full_logprob, encode, tokenizer, task, rec, combos, eos):
    """Normalised probabilities of ``combos`` from whole-sequence log-likelihoods (no cache)."""
    prompt = tokenizer.apply_chat_template(iter_user_messages(rec), add_generation_prompt=True, tokenize=False)
    lps = []
    for c in combos:
        text = prompt + _prefix(task, c)
        lps.append(np.logaddexp(full_logprob(encode(text + "；")), full_logprob(encode(text) + [eos])))
    lps = np.array(lps)
    p = np.exp(lps - lps.max())
    return p / p.sum()


def _seq_logprob(logits_fn):
    def f(ids):
        x = np.asarray(logits_fn(ids), dtype=np.float64)[:-1]
        m = x.max(axis=-1, keepdims=True)
        lp = x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))
        return float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
    return f


def _check_runtime(lm, tokenizer, full_logprob, encode, tol, batch_size=8):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    worst = 0.0
    for task in TASKS.values():
        recs = _records(task, PER_TASK)
        got = score_labels(lm, tokenizer, task, recs, batch_size=batch_size, eos_ids=[eos], fold_inputs=False)
        combos = list(label_space(task).combos)
        for rec, g in zip(recs, got, strict=True):
            assert [c for c, _ in g["combos"]] == combos
            want = _slow_probs(full_logprob, encode, tokenizer, task, rec, combos, eos)
            p = np.array([q for _, q in g["combos"]])
            worst = max(worst, float(np.abs(p - want).max()))
            assert g["chosen"] == choose_combo(combos, want)
            for k in label_space(task).keys:
                assert g["confidence"][k] == pytest.approx(float(sum(w for c, w in zip(combos, want, strict=True)
                                                                    if c[k] == g["chosen"][k])), abs=tol)
            assert g["prefix"] == _prefix(task, g["chosen"]) + "；"
            assert task.format_answer({**g["chosen"], task.reason_key: "x"}).startswith(g["prefix"])
    assert worst < tol, worst
    return worst


def test_torch_equals_the_slow_way(tiny):
    d, model, tok = tiny
    lm = TorchLM(model)
    worst = _check_runtime(lm, tok, _seq_logprob(lm.logits), lambda t: tok(t, add_special_tokens=False)["input_ids"],
                           tol=1e-5, batch_size=3)
    # the same result through a bare transformers model and a batch of one
    recs = _records(TASKS["credit"], 2)
    a = score_labels(model, tok, "credit", recs, batch_size=1)
    b = score_labels(lm, tok, TASKS["credit"], recs, batch_size=2)
    assert all(np.allclose([p for _, p in x["combos"]], [p for _, p in y["combos"]], atol=1e-6)
               for x, y in zip(a, b, strict=True))
    print(f"torch: max |p - slow| = {worst:.1e}")


def test_torch_tree_rows_equal_one_row_per_candidate(tiny, monkeypatch):
    """PyTorch scores a prompt's candidates as one token trie in one row (4D mask); eager attention reads the
    same mask, and an attention that may not falls back to one row per candidate on copies of the cache."""
    from banklm.evaluation import labelscore

    d, model, tok = tiny
    recs = _records(TASKS["aml"], 3)
    probs = lambda got: np.array([[p for _, p in g["combos"]] for g in got])  # noqa: E731
    tree = probs(score_labels(model, tok, "aml", recs))
    eager = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    assert np.abs(probs(score_labels(eager, tok, "aml", recs)) - tree).max() < 1e-5
    monkeypatch.setattr(labelscore, "TREE_ATTENTION", ())
    called = []
    flat = labelscore._KVBackend.score
    monkeypatch.setattr(labelscore._KVBackend, "score", lambda *a: called.append(1) or flat(*a))
    assert np.abs(probs(score_labels(model, tok, "aml", recs)) - tree).max() < 1e-5 and called


def test_onnx_equals_the_slow_way(tiny, work):
    pytest.importorskip("onnxruntime")
    from banklm.export.onnx import export_onnx

    d, _, tok = tiny
    (folder,) = export_onnx(d, work / "onnx", quant=("fp32",))
    lm = OnnxCausalLM(folder, threads=1)
    worst = _check_runtime(lm, tok, _seq_logprob(lm.logits), lambda t: tok(t, add_special_tokens=False)["input_ids"],
                           tol=2e-5)
    print(f"onnx fp32: max |p - slow| = {worst:.1e}")


def test_llama_cpp_equals_the_slow_way(tiny, work):
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python not installed")
    import llama_cpp
    from banklm.export.gguf import export_gguf

    d, _, tok = tiny
    (path,) = export_gguf(d, work / "gguf", quant=("f16",), name="tiny")
    slow = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=1024, n_threads=1, n_threads_batch=1,
                           logits_all=True, verbose=False)

    def logits(ids):
        slow.reset()
        slow.eval(list(ids))
        return np.array(slow.scores[: len(ids)])

    try:
        with LlamaCppLM(path, n_ctx=1024, threads=1) as lm:
            worst = _check_runtime(lm, tok, _seq_logprob(logits), lm.tokenize, tol=5e-4)
    finally:
        slow.close()
    print(f"llama.cpp f16: max |p - slow| = {worst:.1e}")


def test_allowed_combinations_come_from_the_rules():
    aml = label_space("aml")
    assert aml.keys == ("conclusion", "typology") and aml.multi == ()
    typologies = [v for v in TASKS["aml"].values_of("typology") if v != "无"]
    assert [tuple(c.values()) for c in aml.combos] == [("可疑", t) for t in typologies] + [("正常", "无")]
    assert [tuple(c.values()) for c in label_space("credit").combos] == [
        ("通过", "A"), ("通过", "B"), ("拒绝", "D"), ("拒绝", "E"), ("人工复核", "C")]
    audit = {tuple(c.values()) for c in label_space("audit").combos}
    assert ("无异常", "低") in audit and not any(c == "无异常" and s != "低" for c, s in audit) and len(audit) == 7
    # without rules (a bank's labels): every combination; the abstain value is a candidate either way
    bare = task_from_spec(parse_spec(POST_LOAN.split("\nrules:")[0] + "\n", "bare.yaml"))
    space = label_space(bare)
    assert [c["预警等级"] for c in space.combos] == ["正常", "关注", "预警", "转人工"]
    assert len(space.lists("风险标签", {"预警等级": "预警"})) == 63  # every non-empty subset of 6 values
    assert 0 < MAX_LISTS


def test_multi_label_key_scores_per_value(tiny):
    _, model, tok = tiny
    task = task_from_spec(parse_spec(POST_LOAN, "post_loan.yaml"))
    recs = post_loan_records(task, 4)
    lm = TorchLM(model)
    got = score_labels(lm, tok, task, recs, batch_size=4)
    space = label_space(task)
    assert space.keys == ("预警等级",) and space.multi == ("风险标签",)
    assert [c["预警等级"] for c in space.combos] == ["正常", "关注", "预警", "转人工"]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    full = _seq_logprob(lm.logits)
    for rec, g in zip(recs, got, strict=True):
        level = g["chosen"]["预警等级"]
        lists = space.lists("风险标签", {"预警等级": level})
        # the rule outcomes' lists for that level, in declared order (涉诉且逾期 writes [逾期, 涉诉])
        assert lists == list(dict.fromkeys(tuple(r.outcome["风险标签"]) for r in task.spec.rules
                                           if r.outcome["预警等级"] == level))
        prompt = tok.apply_chat_template(iter_user_messages(rec), add_generation_prompt=True, tokenize=False)
        lps = []
        for lst in lists:
            text = prompt + f"预警等级：{level}；风险标签：{'、'.join(lst)}"
            ids = tok(text, add_special_tokens=False)["input_ids"]
            lps.append(np.logaddexp(full(tok(text + "；", add_special_tokens=False)["input_ids"]), full(ids + [eos])))
        p = np.exp(np.array(lps) - max(lps))
        p /= p.sum()
        for v in task.values_of("风险标签"):
            want = sum(q for lst, q in zip(lists, p, strict=True) if v in lst)
            assert g["multi"]["风险标签"][v] == pytest.approx(want, abs=1e-5)
        assert g["chosen"]["风险标签"] == list(lists[int(p.argmax())])
        assert g["confidence"]["风险标签"] == pytest.approx(float(p.max()), abs=1e-5)
        assert task.format_answer({**g["chosen"], "理由": "x"}).startswith(g["prefix"])
        row = label_scores_record(g, task)
        assert row["scored_label"] == level and row["scored"] == g["chosen"]
    # without rules the lists are every non-empty subset: the marginals still come out
    bare = task_from_spec(parse_spec(POST_LOAN.split("\nrules:")[0] + "\n", "bare.yaml"))
    (g,) = score_labels(lm, tok, bare, recs[:1])
    assert len(g["combos"]) == 4 and 0 < sum(g["multi"]["风险标签"].values())
    assert all(0 <= p <= 1 for p in g["multi"]["风险标签"].values())


def test_chosen_label_agrees_with_greedy_decoding_on_a_trained_model(trained):
    """Greedy decoding and label scoring pick the same primary label where the model is sure of the combination
    (greedy then follows it token by token); where it is torn they may differ: the scored choice reads each key's
    whole value (its marginal given the keys before it), greedy the most probable next token."""
    from banklm.evaluation.generate import generate

    model, tok = trained
    recs = [r for t in TASKS.values() for r in _records(t, 20, seed=99)]
    t0 = time.perf_counter()
    outs = generate(model, tok, [r["messages"][:-1] for r in recs], max_new_tokens=64, batch_size=20)
    t_greedy = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = [s for t in TASKS for s in score_labels(TorchLM(model), tok, t, [r for r in recs if r["task"] == t],
                                                         batch_size=20)]
    t_score = time.perf_counter() - t0
    agree, sure, sure_agree = 0, 0, 0
    for rec, out, s in zip(recs, outs, scores, strict=True):
        task = TASKS[rec["task"]]
        parsed = task.parse(out)
        assert parsed is not None, out  # trained to answer: every greedy answer parses
        same = parsed[task.primary_key] == s["chosen"][task.primary_key]
        agree += same
        if max(p for _, p in s["combos"]) > 0.5:
            sure += 1
            sure_agree += same
    print(f"trained tiny model: chosen label = greedy label on {agree}/{len(recs)} records, "
          f"{sure_agree}/{sure} where the chosen combination has p > 0.5; records/s: label scoring "
          f"{len(recs) / t_score:.0f}, greedy generation {len(recs) / t_greedy:.0f}")
    assert agree > len(recs) / 2 and sure >= 10 and sure_agree == sure


def test_candidates_tokenize_after_the_prompts_last_special_token_as_in_one_piece(tiny):
    """The candidates are tokenized joined to the prompt's tail only (the long prompt once per batch): the same
    ids as tokenizing each prompt + candidate whole; a prompt without special tokens, or one whose split reads
    otherwise, is tokenized whole."""
    from banklm.evaluation.generate import _chat_text
    from banklm.evaluation.labelscore import _TorchBackend

    _, model, tok = tiny
    backend = _TorchBackend(model, tok)
    recs = _records(TASKS["credit"], 3)
    prompts = [_chat_text(tok, iter_user_messages(r)) for r in recs] + ["没有特殊记号的提示：", ""]
    suffixes = [["结论：通过；", "结论：拒绝", "结论：人工复核；风险等级：C；"]] * 4 + [["结论：通过"]]
    want = [backend.encode([p + x for x in sfx]) for p, sfx in zip(prompts, suffixes, strict=True)]
    calls = []
    encode = backend.encode
    backend.encode = lambda texts: calls.append(len(texts)) or encode(texts)
    assert backend.encode_joined(prompts, suffixes) == want
    assert len(calls) == 3  # heads and checks, tails, the prompts tokenized whole: one call each

    class Shifted:  # a tokenizer whose split does not read as the whole: the check catches it
        def __init__(self, inner):
            self.inner, self.added_tokens_decoder, self.pad_token_id = inner, inner.added_tokens_decoder, 0

        def __call__(self, texts, add_special_tokens=False):
            ids = self.inner(texts, add_special_tokens=add_special_tokens)["input_ids"]
            return {"input_ids": [[7, *x] if t.startswith("<|im_start|>assistant") else x
                                  for t, x in zip(texts, ids, strict=True)]}

    odd = _TorchBackend(model, Shifted(tok))
    assert odd.encode([prompts[0][prompts[0].rfind("<|im_start|>"):]])[0][0] == 7  # the tail alone reads otherwise
    assert odd.encode_joined(prompts, suffixes) == want


def test_keys_are_chosen_in_answer_order_each_by_its_marginal():
    """The leading decision by its marginal, then the next key given it: not the single most probable pair."""
    combos = [{"decision": "通过", "grade": "A"}, {"decision": "通过", "grade": "B"},
              {"decision": "拒绝", "grade": "D"}, {"decision": "人工复核", "grade": "C"}]
    assert choose_combo(combos, [0.3, 0.25, 0.35, 0.1]) == {"decision": "通过", "grade": "A"}  # 0.55 > 0.35
    assert choose_combo(combos, [0.1, 0.1, 0.7, 0.1]) == {"decision": "拒绝", "grade": "D"}
    assert choose_combo(combos, [0.25, 0.25, 0.25, 0.25]) == {"decision": "通过", "grade": "A"}  # ties: declared first
    aml = [{"conclusion": "可疑", "typology": t} for t in ("拆分交易", "快进快出", "循环交易")] + \
        [{"conclusion": "正常", "typology": "无"}]
    assert choose_combo(aml, [0.2, 0.2, 0.2, 0.4]) == {"conclusion": "可疑", "typology": "拆分交易"}
