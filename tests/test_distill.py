"""distill/: KD losses, top-k teacher cache, sequence-level filter, student initialisation, KD training."""

from __future__ import annotations

import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from banklm.distill.losses import (  # noqa: E402
    completion_positions,
    divergence,
    full_logit_divergence,
    kd_loss,
    topk_divergence,
    topk_teacher,
)


def _logp(*probs):
    return torch.tensor([probs], dtype=torch.float64).log()


# --------------------------------------------------------------------------- losses: known distributions


def test_forward_and_reverse_kl_of_known_distributions():
    p, q = _logp(0.5, 0.5), _logp(0.9, 0.1)  # teacher p, student q
    fwd = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    rev = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert divergence(q, p, "forward").item() == pytest.approx(fwd, abs=1e-12)
    assert divergence(q, p, "reverse").item() == pytest.approx(rev, abs=1e-12)
    assert divergence(p, p, "forward").item() == pytest.approx(0.0, abs=1e-15)


def test_jsd_of_known_distributions():
    p, q = [0.5, 0.5], [0.9, 0.1]
    for beta in (0.5, 0.2):
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
        kl_pm = sum(a * math.log(a / c) for a, c in zip(p, m, strict=True))
        kl_qm = sum(b * math.log(b / c) for b, c in zip(q, m, strict=True))
        want = beta * kl_pm + (1 - beta) * kl_qm
        assert divergence(_logp(*q), _logp(*p), "jsd", beta).item() == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        divergence(_logp(*q), _logp(*p), "jsd", 1.0)


def test_zero_teacher_probability_is_exact():
    p = torch.tensor([[0.0, 0.25, 0.75]], dtype=torch.float64).log()  # -inf on token 0
    q = _logp(0.2, 0.3, 0.5)
    want = 0.25 * math.log(0.25 / 0.3) + 0.75 * math.log(0.75 / 0.5)
    assert divergence(q, p, "forward").item() == pytest.approx(want, abs=1e-12)


def test_temperature_softens_and_scales_by_t_squared():
    s = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0, 3.0]], dtype=torch.float64)
    T = 2.0
    ps = [math.exp(x / T) for x in (0.0, 1.0, 3.0)]
    qs = [math.exp(x / T) for x in (2.0, 0.0, -1.0)]
    ps = [x / sum(ps) for x in ps]
    qs = [x / sum(qs) for x in qs]
    kl = sum(a * math.log(a / b) for a, b in zip(ps, qs, strict=True))
    assert full_logit_divergence(s, t, temperature=T).item() == pytest.approx(T * T * kl, rel=1e-6)
    # T = 1: the plain KL of the softmaxes
    p1 = F.softmax(t, -1)[0].tolist()
    q1 = F.softmax(s, -1)[0].tolist()
    kl1 = sum(a * math.log(a / b) for a, b in zip(p1, q1, strict=True))
    assert full_logit_divergence(s, t).item() == pytest.approx(kl1, rel=1e-6)


def test_matches_trl_generalized_jsd():
    """Same definitions as TRL's GKD loss (which has no T^2 factor and maps beta 0/1 to forward/reverse)."""
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g)
    for kind, beta in (("forward", 0.0), ("reverse", 1.0), ("jsd", 0.3)):
        ours = full_logit_divergence(s, t, kind=kind, beta=beta, temperature=2.0).sum() / 2.0 ** 2
        theirs = GKDTrainer.generalized_jsd_loss(s[None], t[None], beta=beta, temperature=2.0, reduction="sum")
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


# --------------------------------------------------------------------------- losses: top-k


def test_topk_bucket_and_renorm_hand_computed():
    probs = [0.5, 0.3, 0.15, 0.05]
    teacher_logits = torch.tensor([probs]).log() + 1.7  # any shift: logits, not log-probs
    student_logits = torch.zeros(1, 4)  # uniform 0.25
    values, indices, lse = topk_teacher(teacher_logits, 2)
    assert indices.tolist() == [[0, 1]]
    bucket = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    got = topk_divergence(student_logits, values, indices, lse, tail="bucket")
    assert got.item() == pytest.approx(bucket, abs=1e-6)
    renorm = 0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.5)
    got = topk_divergence(student_logits, values, indices, None, tail="renorm")
    assert got.item() == pytest.approx(renorm, abs=1e-6)
    with pytest.raises(ValueError, match="lse"):
        topk_divergence(student_logits, values, indices, None, tail="bucket")


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_topk_with_whole_vocabulary_equals_full_logits(kind, tail):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g) * 2
    full = full_logit_divergence(s, t, kind=kind, beta=0.4, temperature=1.5)
    values, indices, lse = topk_teacher(t, 9, temperature=1.5)
    top = topk_divergence(s, values, indices, lse, kind=kind, beta=0.4, temperature=1.5, tail=tail)
    assert torch.allclose(full, top, atol=1e-5)


# --------------------------------------------------------------------------- losses: masking and mixing


def _batch(seed=0, vocab=6):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 5, vocab, generator=g)
    teacher = torch.randn(2, 5, vocab, generator=g)
    labels = torch.tensor([[-100, -100, 3, 1, -100], [-100, 2, 4, -100, -100]])
    return student, teacher, labels


def test_kd_loss_uses_completion_positions_only():
    student, teacher, labels = _batch()
    mask = completion_positions(labels)
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    out = kd_loss(student, labels, teacher_logits=teacher, alpha=1.0)
    # by hand: the mean KL over the positions t whose next token is labelled
    kls = [full_logit_divergence(student[b, t:t + 1], teacher[b, t:t + 1]).item()
           for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    assert out["tokens"] == 4
    assert out["loss"].item() == pytest.approx(sum(kls) / 4, rel=1e-6)
    # anything at positions that do not predict a label changes nothing
    s2, t2 = student.clone(), teacher.clone()
    s2[0, 0] += 5
    t2[0, 3] -= 7
    t2[1, 4] += 3
    s2[1, 2] *= 4
    assert kd_loss(s2, labels, teacher_logits=t2, alpha=1.0)["loss"].item() == pytest.approx(out["loss"].item())


def test_kd_loss_mixes_with_cross_entropy():
    student, teacher, labels = _batch(3)
    mask = completion_positions(labels)
    ce = F.cross_entropy(student[:, :-1][mask], labels[:, 1:][mask]).item()
    kd = kd_loss(student, labels, teacher_logits=teacher, alpha=1.0, temperature=2.0)["loss"].item()
    assert kd_loss(student, labels, teacher_logits=teacher, alpha=0.0)["loss"].item() == pytest.approx(ce, rel=1e-6)
    mixed = kd_loss(student, labels, teacher_logits=teacher, alpha=0.3, temperature=2.0)
    assert mixed["loss"].item() == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-6)
    assert mixed["ce"].item() == pytest.approx(ce, rel=1e-6)
    # num_items: the trainer's token count over gradient-accumulation steps divides the sums
    half = kd_loss(student, labels, teacher_logits=teacher, alpha=0.3, temperature=2.0, num_items=8)
    assert half["loss"].item() == pytest.approx(mixed["loss"].item() / 2, rel=1e-6)


def test_kd_loss_from_topk_matches_gathered_positions():
    student, teacher, labels = _batch(4)
    mask = completion_positions(labels)
    topk = topk_teacher(teacher[:, :-1][mask], 3)
    got = kd_loss(student, labels, teacher_topk=topk, alpha=1.0)["loss"]
    want = topk_divergence(student[:, :-1][mask], *topk).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="stale teacher cache"):
        kd_loss(student, labels, teacher_topk=tuple(x[:2] for x in topk), alpha=1.0)


# --------------------------------------------------------------------------- tiny models

from banklm.corpora.synth import generate_records  # noqa: E402
from banklm.finetune.models import build_tiny_model, load_model  # noqa: E402
from banklm.finetune.tokenizer import load_tokenizer, render_chat, train_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402

from banklm.tasks import get_task  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer trained on credit records and a 4-layer tiny teacher (random weights are enough here)."""
    root = tmp_path_factory.mktemp("distill")
    recs = generate_records("credit", 300, seed=11, split="train")
    tok = train_tokenizer([render_chat(r["messages"]) for r in recs], root / "tokenizer", vocab_size=600)
    teacher = build_tiny_model("llama", tok, root / "teacher", hidden_size=48, num_layers=4, num_heads=4,
                               num_kv_heads=2, intermediate_size=96, max_position_embeddings=512, seed=3)
    return {"root": root, "teacher": teacher, "tokenizer": tok, "records": recs}


def _prepared_rows(tok, records, pack_two=True):
    """Rows as TRL prepares them: input_ids, labels (prompt masked), seq_lengths (two examples packed)."""
    rows = []
    exs = []
    for r in records:
        prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(r["messages"], tokenize=False)
        p_ids, ids = tok.encode(prompt, add_special_tokens=False), tok.encode(full, add_special_tokens=False)
        exs.append((ids, [-100] * len(p_ids) + ids[len(p_ids):]))
    step = 2 if pack_two else 1
    for i in range(0, len(exs) - step + 1, step):
        group = exs[i:i + step]
        rows.append({"input_ids": sum((g[0] for g in group), []), "labels": sum((g[1] for g in group), []),
                     "seq_lengths": [len(g[0]) for g in group]})
    return rows


# --------------------------------------------------------------------------- teacher cache


def test_teacher_cache_round_trip(tiny, tmp_path):
    from banklm.distill.teacher_cache import build_teacher_cache, data_fingerprint, open_teacher_cache
    from banklm.finetune.sft import PackedRowsCollator

    tok = load_tokenizer(tiny["teacher"])
    teacher = load_model(tiny["teacher"], device="cpu")
    rows = _prepared_rows(tok, tiny["records"][:10])
    key = {"teacher": "t1", "top_k": 5, "temperature": 2.0}
    cache = build_teacher_cache(teacher, rows, tmp_path / "cache", pad_token_id=tok.pad_token_id, top_k=5,
                                temperature=2.0, key=key, batch_rows=2, shard_rows=2)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["cache.json"] + [f"shard-{i:05d}.safetensors" for i in range(3)]  # 5 rows, 2 per shard
    assert len(cache) == 5
    fp = data_fingerprint(rows)
    reopened = open_teacher_cache(tmp_path / "cache", key, fp)
    assert reopened is not None and reopened.top_k == 5
    # the stored values are the teacher's own top-k at each completion position of each row
    batch = PackedRowsCollator(tok.pad_token_id)(rows)
    with torch.no_grad():
        logits = teacher(**{k: batch[k] for k in ("input_ids", "position_ids") if k in batch},
                      use_cache=False).logits
    mask = completion_positions(batch["labels"])
    for i, row in enumerate(rows):
        values, indices, lse = reopened.lookup(row)
        row_logits = logits[i, :-1][mask[i]]
        assert values.dtype == torch.float16 and indices.dtype == torch.int32
        assert values.shape == (int(mask[i].sum()), 5)
        # the stored values are the logits at the stored ids, and no other id has a larger logit
        # (compared by value: a random teacher has near-ties that batch padding may reorder)
        assert torch.allclose(values.float(), row_logits.gather(1, indices.long()), atol=2e-3, rtol=1e-3)
        rest = row_logits.scatter(1, indices.long(), float("-inf"))
        assert (rest.max(1).values <= values.float().min(1).values + 1e-3).all()
        assert torch.allclose(lse, torch.logsumexp(row_logits / 2.0, -1), atol=1e-4)
    # safe reuse: another key, other data or an unknown row is never served
    assert open_teacher_cache(tmp_path / "cache", {**key, "top_k": 6}, fp) is None
    assert open_teacher_cache(tmp_path / "cache", key, data_fingerprint(rows[:4])) is None
    assert open_teacher_cache(tmp_path / "nowhere", key, fp) is None
    other = dict(rows[0], seq_lengths=[len(rows[0]["input_ids"])])  # same tokens, no pack boundary
    assert reopened.lookup(other) is None


def test_cache_collator_feeds_the_loss_like_a_live_teacher(tiny, tmp_path):
    from banklm.distill.logit import TeacherCacheCollator
    from banklm.distill.teacher_cache import build_teacher_cache

    tok = load_tokenizer(tiny["teacher"])
    teacher = load_model(tiny["teacher"], device="cpu")
    rows = _prepared_rows(tok, tiny["records"][10:16])
    vocab = len(tok)
    cache = build_teacher_cache(teacher, rows, tmp_path / "c", pad_token_id=tok.pad_token_id, top_k=vocab,
                                key={}, batch_rows=4)
    batch = TeacherCacheCollator(tok.pad_token_id, cache)(rows[1:3])
    assert batch["teacher_values"].shape[0] == int(completion_positions(batch["labels"]).sum())
    g = torch.Generator().manual_seed(0)
    student_logits = torch.randn(*batch["input_ids"].shape, vocab, generator=g)
    with torch.no_grad():
        live = teacher(**{k: batch[k] for k in ("input_ids", "position_ids") if k in batch},
                      use_cache=False).logits
    topk = (batch["teacher_values"], batch["teacher_indices"], batch["teacher_lse"])
    from_cache = kd_loss(student_logits, batch["labels"], teacher_topk=topk, alpha=1.0)["loss"]
    from_live = kd_loss(student_logits, batch["labels"], teacher_logits=live, alpha=1.0)["loss"]
    assert from_cache.item() == pytest.approx(from_live.item(), rel=2e-3)  # fp16 logits in the cache
    unknown = _prepared_rows(tok, tiny["records"][20:22])
    assert "teacher_values" not in TeacherCacheCollator(tok.pad_token_id, cache)(unknown)


# --------------------------------------------------------------------------- sequence-level filter


def test_seq_filter_keeps_and_rejects_the_right_answers():
    from banklm.distill.seqkd import check_answer, filter_answers

    credit = get_task("credit")
    recs = generate_records("credit", 6, seed=5, split="train")
    golds = [json.loads(r["gold"]) for r in recs]
    other = {"通过": "拒绝", "拒绝": "通过", "人工复核": "拒绝"}
    outputs = [
        credit.format_answer(golds[0]),                                        # exact: kept
        credit.format_answer(golds[1]).replace("；", "; "),                     # tolerant only: not strict
        "我认为应该批准。",                                                       # unparseable
        credit.format_answer({**golds[3], "decision": other[golds[3]["decision"]]}),  # wrong decision
        credit.format_answer({**golds[4], "grade": "A" if golds[4]["grade"] != "A" else "B"}),  # wrong grade only
        credit.format_answer(golds[5]),
    ]
    recs[5] = {**recs[5], "gold": json.dumps({**golds[5], "decision": other[golds[5]["decision"]]},
                                              ensure_ascii=False)}  # a gold that contradicts the rules
    kept, rejected, stats = filter_answers(recs, outputs)
    assert [k["id"] for k in kept] == [recs[0]["id"], recs[4]["id"]]  # match=label: the grade is not checked
    assert kept[0]["messages"][-1] == {"role": "assistant", "content": outputs[0]}
    assert kept[0]["messages"][:-1] == recs[0]["messages"][:-1]
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert reasons == {recs[1]["id"]: "not_strict_format", recs[2]["id"]: "unparseable",
                       recs[3]["id"]: "disagrees_with_gold", recs[5]["id"]: "disagrees_with_gold"}
    assert stats["prompts"] == 6 and stats["kept"] == 2 and stats["yield"] == pytest.approx(2 / 6)
    assert stats["rejected"] == {"unparseable": 1, "not_strict_format": 1, "disagrees_with_gold": 2}
    assert stats["by_task"]["credit"]["kept"] == 2
    # tolerant parsing keeps the loosely formatted answer; match=fields rejects the wrong grade
    kept_t, _, _ = filter_answers(recs, outputs, strict=False, match="fields")
    assert [k["id"] for k in kept_t] == [recs[0]["id"], recs[1]["id"]]
    # the rule label (recomputed from meta) checks records whose gold is missing, e.g. an unlabelled table
    unlabelled = {k: v for k, v in recs[5].items() if k != "gold"}
    assert check_answer(credit, credit.format_answer(golds[5]), **{"rule": golds[5]}) == (True, None)
    _, rej, st = filter_answers([unlabelled], [outputs[3].replace(golds[3]["reason"], "x")])
    assert st["kept"] == 0 and rej[0]["reason"] in ("disagrees_with_rule", "unparseable")
    _, rej, _ = filter_answers([unlabelled], [credit.format_answer({**golds[5], "decision": other[golds[5]["decision"]]})])
    assert rej[0]["reason"] == "disagrees_with_rule"
    bare = {"id": "x", "task": "credit", "messages": recs[0]["messages"][:1]}
    assert filter_answers([bare], [outputs[0]])[2]["kept"] == 1
    assert filter_answers([bare], [outputs[0]], require_reference=True)[1][0]["reason"] == "no_reference"


def test_prompt_file_problems_are_reported(tmp_path):
    from banklm.distill.seqkd import load_prompt_records

    p = tmp_path / "p.jsonl"
    p.write_text("\n".join([
        json.dumps({"task": "aml", "prompt": "账户近7日现金存入3笔。"}, ensure_ascii=False),
        json.dumps({"task": "loans", "prompt": "x"}),
        json.dumps({"task": "audit"}),
        json.dumps({"id": "m1", "task": "credit", "messages": [{"role": "user", "content": "请审批。"},
                                                                {"role": "assistant", "content": "旧答案"}]},
                   ensure_ascii=False),
    ]) + "\n", encoding="utf-8")
    recs, problems = load_prompt_records(p)
    assert [r["task"] for r in recs] == ["aml", "credit"]
    assert recs[1]["id"] == "m1" and recs[1]["messages"] == [{"role": "user", "content": "请审批。"}]
    assert [(q["line"], q["reason"].split()[0]) for q in problems] == [(2, "task"), (3, "no")]


def test_prompt_files_and_the_checker_take_a_registered_spec_task(tmp_path):
    from banklm.distill.seqkd import check_answer, load_prompt_records

    from banklm.tasks import register_spec, unregister
    from tests.test_task_spec import POST_LOAN

    spec = tmp_path / "post_loan.yaml"
    spec.write_text(POST_LOAN, encoding="utf-8")
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"task": "post_loan", "prompt": "逾期120天。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_prompt_records(p)[1][0]["reason"] == "task 'post_loan' is not one of credit, aml, audit"
    register_spec(spec)  # e.g. by the recipe's tasks: {post_loan: ...}
    try:
        recs, problems = load_prompt_records(p)
        assert [r["task"] for r in recs] == ["post_loan"] and problems == []
        answer = "预警等级：预警；风险标签：逾期；理由：逾期120天，超过90天"
        gold = {"预警等级": "预警", "风险标签": ["逾期"], "理由": "逾期120天，超过90天"}
        assert check_answer("post_loan", answer, gold=gold, match="fields") == (True, None)
        assert check_answer("post_loan", answer.replace("预警；", "关注；", 1), gold=gold) == (False,
                                                                                         "disagrees_with_gold")
    finally:
        unregister("post_loan")


# --------------------------------------------------------------------------- student initialisation


def test_pick_layers():
    from banklm.distill.student import pick_layers

    assert pick_layers(4, 2) == [0, 3]
    assert pick_layers(24, 2) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]
    assert pick_layers(28, 4) == [0, 4, 9, 14, 18, 22, 27]
    assert pick_layers(5, 1) == [0, 1, 2, 3, 4]
    assert pick_layers(3, 8) == [0]
    assert pick_layers(6, 2, keep=[5, 1]) == [1, 5]
    with pytest.raises(ValueError):
        pick_layers(4, 2, keep=[4])


def test_layer_dropped_student_copies_the_teacher(tiny, tmp_path):
    from banklm.distill.student import student_from_teacher_layers
    from safetensors.torch import load_file

    info = student_from_teacher_layers(tiny["teacher"], tmp_path / "student", every=2)
    assert info["layers"] == [0, 3] and info["num_layers"] == 2
    out = tmp_path / "student"
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "tokenizer.model" in names and "tokenizer_config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt"))]
    t = load_file(str(tiny["teacher"] / "model.safetensors"))
    s = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    for j, i in enumerate([0, 3]):
        layer = {k.split(f"model.layers.{i}.", 1)[1]: v for k, v in t.items() if k.startswith(f"model.layers.{i}.")}
        assert layer
        for name, v in layer.items():
            assert torch.equal(s[f"model.layers.{j}.{name}"], v), name
    assert not any(k.startswith("model.layers.2.") for k in s)
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    # a normal model folder: same tokenizer and chat template, generation stops at <|im_end|>
    tok_t, tok_s = load_tokenizer(tiny["teacher"]), load_tokenizer(out)
    assert tok_s.get_vocab() == tok_t.get_vocab() and tok_s.chat_template == tok_t.chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok_s.convert_tokens_to_ids("<|im_end|>") in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list)
                                                         else [gen["eos_token_id"]])


def test_keeping_every_layer_reproduces_the_teacher(tiny, tmp_path):
    from banklm.distill.student import student_from_teacher_layers

    student_from_teacher_layers(tiny["teacher"], tmp_path / "all", every=1)
    ids = torch.tensor([[4, 10, 20, 30, 40, 5]])
    with torch.no_grad():
        a = load_model(tiny["teacher"], device="cpu")(ids).logits
        b = load_model(tmp_path / "all", device="cpu")(ids).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_narrower_mlp_keeps_the_strongest_neurons(tiny, tmp_path):
    from banklm.distill.student import student_from_teacher_layers
    from safetensors.torch import load_file

    info = student_from_teacher_layers(tiny["teacher"], tmp_path / "narrow", layers=[1, 2], intermediate_size=40)
    assert info["layers"] == [1, 2] and info["intermediate_size"] == 40
    t = load_file(str(tiny["teacher"] / "model.safetensors"))
    s = load_file(str(tmp_path / "narrow" / "model.safetensors"))
    up, down = t["model.layers.2.mlp.up_proj.weight"], t["model.layers.2.mlp.down_proj.weight"]
    keep = torch.topk(up.norm(dim=1) * down.norm(dim=0), 40).indices.sort().values
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], up[keep])
    assert torch.equal(s["model.layers.1.mlp.gate_proj.weight"], t["model.layers.2.mlp.gate_proj.weight"][keep])
    assert torch.equal(s["model.layers.1.mlp.down_proj.weight"], down[:, keep])
    assert torch.equal(s["model.layers.1.self_attn.q_proj.weight"], t["model.layers.2.self_attn.q_proj.weight"])
    load_model(tmp_path / "narrow", device="cpu")  # loads as a normal model
    with pytest.raises(ValueError, match="intermediate_size"):
        student_from_teacher_layers(tiny["teacher"], tmp_path / "bad", intermediate_size=500)


# --------------------------------------------------------------------------- KD training (tiny, fast)


def _sft_data(records):
    return Dataset.from_list([{"id": r["id"], "messages": r["messages"]} for r in records])


@pytest.mark.parametrize("top_k", [None, 8])
def test_kd_training_live_and_cached(tiny, tmp_path, top_k):
    """A student identical to its teacher has zero KD loss at the first step; training writes a normal run."""
    from banklm.distill.logit import train_logit_kd
    from banklm.distill.student import student_from_teacher_layers

    student_from_teacher_layers(tiny["teacher"], tmp_path / "same", every=1)
    train = _sft_data(tiny["records"][:48])
    s = train_logit_kd(tmp_path / "same", tiny["teacher"], train, None, tmp_path / "run", alpha=0.5, top_k=top_k,
                       method="full", lr=3e-3, max_steps=4, batch_size=8, max_length=256, logging_steps=1,
                       warmup_ratio=0.0, device="cpu", mixed_precision="no", seed=0)
    assert s["steps"] == 4 and s["distill"]["mode"] == ("live" if top_k is None else "topk_cache")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "kd_loss" in r)
    assert first["kd_loss"] < 1e-3 and first["ce_loss"] > 1.0  # same weights -> same distribution
    later = [r["kd_loss"] for r in rows if "kd_loss" in r][1:]
    assert later and min(later) > 1e-4  # the cross-entropy half pulls the student away from the teacher
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()
    if top_k:
        meta = json.loads((tmp_path / "run" / "teacher_cache" / "cache.json").read_text())
        assert meta["top_k"] == 8 and s["distill"]["cache_reused"] is False
        s2 = train_logit_kd(tmp_path / "same", tiny["teacher"], train, None, tmp_path / "run", alpha=1.0,
                            top_k=top_k, method="full", lr=1e-3, max_steps=1, batch_size=8, max_length=256,
                            device="cpu", mixed_precision="no", seed=0)
        assert s2["distill"]["cache_reused"] is True


def test_kd_trainer_takes_its_extras_in_the_constructor(tiny, tmp_path):
    """The KD trainer's settings (the recipe's distill.kd names), the shared vocabulary and the live teacher are
    constructor arguments; its training loss is kd_loss with exactly those settings."""
    import torch
    from banklm.distill.logit import kd_trainer_class
    from banklm.distill.losses import kd_loss
    from banklm.distill.student import student_from_teacher_layers
    from banklm.finetune.sft import PackedRowsCollator, forward_inputs, prepare_sft_dataset
    from trl import SFTConfig

    tok = load_tokenizer(tiny["teacher"])
    student_from_teacher_layers(tiny["teacher"], tmp_path / "s", every=2)
    student = load_model(tmp_path / "s", device="cpu")
    teacher = load_model(tiny["teacher"], device="cpu")
    args = SFTConfig(output_dir=str(tmp_path / "ck"), packing=False, max_length=256, bf16=False, report_to="none",
                     use_cpu=True, dataloader_pin_memory=False)
    trainer = kd_trainer_class()(model=student, args=args, processing_class=tok, teacher=teacher,
                                 train_dataset=prepare_sft_dataset(_sft_data(tiny["records"][:8])),
                                 divergence="reverse", temperature=2.0, alpha=0.8, vocab_size=len(tok))
    assert trainer.kd == {"divergence": "reverse", "beta": 0.5, "temperature": 2.0, "alpha": 0.8, "tail": "bucket"}
    assert trainer.teacher is teacher and trainer.vocab_size == len(tok)
    batch = PackedRowsCollator(tok.pad_token_id)([trainer.train_dataset[i] for i in range(4)])
    student.train()
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
        v = len(tok)
        want = kd_loss(student(**forward_inputs(batch)).logits[..., :v], batch["labels"],
                       teacher_logits=teacher(**forward_inputs(batch)).logits[..., :v], kind="reverse",
                       temperature=2.0, alpha=0.8)["loss"]
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_kd_refuses_different_vocabularies(tiny, tmp_path):
    from banklm.distill.logit import train_logit_kd

    other_tok = train_tokenizer([render_chat(r["messages"]) for r in generate_records("aml", 200, 1, "train")],
                                tmp_path / "tok", vocab_size=700)
    other = build_tiny_model("llama", other_tok, tmp_path / "other", hidden_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="same tokenizer"):
        train_logit_kd(other, tiny["teacher"], _sft_data(tiny["records"][:8]), None, tmp_path / "r", max_steps=1,
                       device="cpu")


# --------------------------------------------------------------------------- end to end (slow)

# Why sequence-level KD with unlabelled prompts and a student built from scratch: measured on these tasks
# (audit, 120 test records), a student cut from the teacher's layers scores like the teacher before any
# training (0.75 vs 0.81 for layers 0 and 3 of 4), so KD and the no-teacher baseline tie whatever the loss,
# steps or data (ties at 15 and 40 steps, alpha 0.5 and 1, T 1 and 2, narrower MLPs, 105 examples); and a
# scratch student given the teacher's full labelled data matches the teacher without it (0.83 vs 0.84).
# Distillation pays when the teacher knows more than the student's labelled data can teach: here the bank
# has 10 labelled claims and 1000 unlabelled ones; the teacher (trained on 1500) answers them, the checker
# keeps what parses and agrees with the gold where there is one, and the student learns from that.
# Checked over seeds 0, 1, 2 (2026-12-06, batches of 20 answers, packing auto): teacher 0.600 / 0.783 / 0.750,
# student 0.492 / 0.458 / 0.458, baseline 0.300 / 0.200 / 0.225 (margins 0.19-0.26; the test asks for 0.15).
E2E_RECIPE = """
name: distill-e2e
seed: {seed}
corpora:
  scenario:
    synth:
      audit: {{train: 1500, validation: 30, test: 120}}
tokenizer: {{train: true, vocab_size: 800}}
base:
  build: {{arch: llama, hidden_size: 128, num_layers: 4, num_heads: 4, num_kv_heads: 4, intermediate_size: 384,
          max_position_embeddings: 512}}
train: {{method: full, lr: 1.0e-3, max_steps: 300, batch_size: 20, max_length: 256, logging_steps: 50}}
distill:
  enabled: true
  method: seq
  limit: 10
  student:
    from: build
    build: {{arch: llama, hidden_size: 96, num_layers: 2, num_heads: 4, num_kv_heads: 4, intermediate_size: 288,
            max_position_embeddings: 512}}
  seq: {{extra_prompts: [{prompts}], max_new_tokens: 64, batch_size: 128}}
  train: {{method: full, lr: 1.5e-3, max_steps: 300, batch_size: 20, max_length: 256, logging_steps: 50}}
eval: {{tasks: [audit], batch_size: 120, max_new_tokens: 64, retention: false, decoding: free}}  # the subject is distillation
export: {{gguf: {{enabled: false}}}}
"""


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """One tiny pipeline run: audit data, a 4-layer teacher trained from scratch, a 2-layer student distilled
    from the teacher's checked answers, and the same student trained on the labelled records alone."""
    from tests.helpers import run_banklm

    root = tmp_path_factory.mktemp("distill_e2e")
    prompts = root / "unlabelled.jsonl"
    with prompts.open("w", encoding="utf-8") as f:
        for r in generate_records("audit", 1000, seed=7, split="unlabelled"):
            f.write(json.dumps({"task": "audit", "prompt": r["messages"][0]["content"]}, ensure_ascii=False) + "\n")
    recipe = root / "distill.yaml"
    recipe.write_text(E2E_RECIPE.format(seed=0, prompts=prompts), encoding="utf-8")
    run_dir = root / "runs" / "distill-e2e" / "r1"
    out = run_banklm("run", str(recipe), "--run-dir", str(run_dir), cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, recipe, run_dir


@pytest.mark.slow
def test_e2e_distilled_student_beats_the_baseline(e2e_run):
    from banklm.ledger import Ledger, verify_run

    _, _, run_dir = e2e_run
    stages = [e["stage"] for e in Ledger(run_dir).entries()]
    assert stages == ["corpus", "tokenizer", "base", "train", "distill", "eval", "report"]
    assert verify_run(run_dir) == []
    stats = json.loads((run_dir / "distill" / "stats.json").read_text())
    assert stats["baseline"]["steps"] == stats["student"]["steps"] == 300
    seq = stats["seqkd"]
    kept = (run_dir / "distill" / "seqkd" / "kept.jsonl").read_text(encoding="utf-8").splitlines()
    rejected = (run_dir / "distill" / "seqkd" / "rejected.jsonl").read_text(encoding="utf-8").splitlines()
    assert seq["prompts"] == 1010 and seq["kept"] == len(kept) and len(kept) + len(rejected) == 1010
    assert seq["yield"] == pytest.approx(len(kept) / 1010) and sum(seq["rejected"].values()) == len(rejected)
    audit = get_task("audit")
    for line in kept:
        answer = json.loads(line)["messages"][-1]["content"]
        assert audit.parse(answer, strict=True) is not None
    assert stats["student"]["train_examples"] == len(kept) and stats["baseline"]["train_examples"] == 10
    res = {m: json.loads((run_dir / "eval" / m / "results.json").read_text()) for m in ("sft", "student", "baseline")}
    acc = {m: r["tasks"]["audit"]["accuracy"] for m, r in res.items()}
    assert res["student"]["overall"]["parameters"] < 0.5 * res["sft"]["overall"]["parameters"]
    assert acc["student"] >= acc["baseline"] + 0.15, acc
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    section = page.split("<h2>Distillation</h2>")[1].split("<h2>")[0]
    assert f"<td>audit</td><td>student</td><td>{acc['student']:.3f}</td>" in section
    assert f"<td>audit</td><td>baseline (no teacher)</td><td>{acc['baseline']:.3f}</td>" in section
    assert 'src="data:image/png;base64,' in section and "<td>1010</td>" in section
    card = (run_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "## 蒸馏 Distillation" in card and f"| audit | student | {acc['student']:.3f} |" in card


@pytest.mark.slow
def test_e2e_logit_distillation_with_a_teacher_cache(e2e_run):
    """`banklm distill` in a new run folder reuses the teacher from the first run and distils its logits."""
    from banklm.ledger import Ledger, verify_run
    from tests.helpers import run_banklm

    root, recipe, _ = e2e_run
    run_dir = root / "runs" / "distill-e2e" / "r2"
    out = run_banklm("distill", str(recipe), "distill.method=logit", "distill.student.from=teacher_layers",
                     "distill.student.build=null", "distill.kd.top_k=16", "distill.limit=40",
                     "distill.train.max_steps=6", "--run-dir", str(run_dir), cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    entries = Ledger(run_dir).entries()
    assert [(e["stage"], e["status"]) for e in entries] == [
        ("corpus", "reused"), ("tokenizer", "reused"), ("base", "reused"), ("train", "reused"), ("distill", "done")]
    assert verify_run(run_dir) == []
    stats = json.loads((run_dir / "distill" / "stats.json").read_text())
    assert stats["student_init"]["layers"] == [0, 3]
    assert stats["student"]["steps"] == stats["baseline"]["steps"] == 6
    kd = stats["student"]["distill"]
    assert kd["mode"] == "topk_cache" and kd["top_k"] == 16 and kd["cache"]["positions"] > 0
    cache = json.loads((run_dir / "distill" / "teacher_cache" / "cache.json").read_text())
    assert cache["top_k"] == 16 and cache["rows"] == kd["cache"]["rows"]
    rows = [json.loads(x) for x in (run_dir / "distill" / "student_train" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd_loss" in r for r in rows)
    assert json.loads((run_dir / "distill" / "student" / "config.json").read_text())["num_hidden_layers"] == 2
    assert (run_dir / "distill" / "baseline" / "model.safetensors").is_file()


def test_distill_cli_refuses_a_recipe_without_distillation(tmp_path, capsys):
    from banklm.cli import main

    p = tmp_path / "r.yaml"
    p.write_text("name: t\nbase: {path: /m}\n", encoding="utf-8")
    assert main(["distill", str(p)]) == 2
    assert "distill.enabled is false" in capsys.readouterr().err
    assert main(["distill", str(p), "distill.enabled=true", "distill.student.from=path"]) == 2
    assert "distill.student: set path exactly when from: path" in capsys.readouterr().err


def test_report_tables_and_plot_from_run_files(tmp_path):
    from banklm.modelcard import _distillation, _Lang
    from banklm.report import plot_distill, render_distill_section
    from banklm.results import distill_tables

    def results(acc, params, mb, tps):
        return {"tasks": {"credit": {"accuracy": acc, "macro_f1": acc - 0.1, "mcc": 0.5, "exact_match": acc - 0.2,
                                     "format_compliance": 1.0},
                          "aml": {"accuracy": acc / 2, "macro_f1": 0.1, "mcc": 0.0, "exact_match": 0.1,
                                  "format_compliance": 0.9}},
                "overall": {"accuracy": acc * 0.75, "parameters": params, "model_bytes": mb, "tokens_per_s": tps}}

    d = {"eval": {"student": results(0.8, 2_000_000, 8_000_000, 900.0), "sft": results(0.9, 4_000_000, 16_000_000, 500.0),
                  "baseline": results(0.6, 2_000_000, 8_000_000, 910.0)},
         "distill": {"method": "logit", "teacher": "sft/merged",
                     "student_init": {"from": "teacher_layers", "layers": [0, 3], "teacher_layers": 4},
                     "student": {"steps": 50, "distill": {"kind": "forward", "temperature": 1.0, "alpha": 0.5}},
                     "baseline": {"steps": 50}}}
    size_h, size_rows, task_h, task_rows = distill_tables(d)
    assert [r[0] for r in size_rows] == ["teacher", "student", "baseline (no teacher)"]
    assert size_rows[1] == ["student", "student", 2_000_000, 8.0, 900.0, 0.6000000000000001, 50]
    assert task_rows[0] == ["aml", "teacher", 0.45, 0.1, 0.0, 0.1, 0.9]
    assert ["credit", "baseline (no teacher)", 0.6, 0.5, 0.5, 0.39999999999999997, 1.0] in task_rows
    png = plot_distill(d, tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = render_distill_section(d, png)
    assert "teacher layers [0, 3] of 4" in page and "<td>credit</td><td>student</td><td>0.800</td>" in page
    card = "\n".join(_distillation(d, _Lang("en")))
    assert "| credit | student | 0.800 | 0.700 | 0.500 | 0.600 | 1.000 |" in card
    assert _distillation({"distill": None, "eval": {}}, _Lang("zh")) == []
