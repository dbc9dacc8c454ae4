"""The bank's instruction data in SFT (``train.mix``) and held out in evaluation (banklm.evaluation.instructions)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from banklm.finetune.models import build_tiny_model, load_model
from banklm.finetune.sft import prepare_sft_dataset
from banklm.finetune.tokenizer import IM_END, load_tokenizer, render_chat, train_tokenizer
from datasets import Dataset, DatasetDict

from banklm.evaluation.instructions import answer_tokens, score_instructions
from banklm.pipeline import RunContext
from banklm.recipe import RecipeError, validate_recipe
from banklm.stages import STAGES, evaluate, training


def _chat(i: int, answer: str, task: str = "credit") -> dict:
    return {"id": f"{task}-{i}", "task": task, "label": "通过",
            "messages": [{"role": "user", "content": f"借款人月收入{1000 + i}元，请给出审批结论。"},
                         {"role": "assistant", "content": answer}]}


def _save(folder, splits: dict[str, list[dict]]) -> None:
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder / "data"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A SentencePiece tokenizer and a random 1-layer Llama (seconds to build)."""
    root = tmp_path_factory.mktemp("mix_tiny")
    texts = [render_chat(_chat(i, f"结论：通过；风险等级：{'ABCD'[i % 4]}")["messages"]) for i in range(300)]
    texts += ["今天天气很好，适合出门散步。", "1 公里等于 1000 米。"] * 20
    tok_dir = train_tokenizer(texts, root / "tok", vocab_size=400)
    model_dir = build_tiny_model("llama", tok_dir, root / "model", hidden_size=32, num_layers=1, num_heads=2,
                                 num_kv_heads=2, intermediate_size=64, max_position_embeddings=256, seed=0)
    return model_dir


def _recipe(tmp_path, **train):
    src = [{"path": str(tmp_path / "x.jsonl")}]
    return validate_recipe({"name": "m", "seed": 3, "base": {"path": str(tmp_path)},
                            "corpora": {"scenario": {"synth": {"credit": {"train": 10}}},
                                        "general": {"sources": src}, "private": {"sources": src}},
                            "train": train})


@pytest.fixture()
def run(tmp_path):
    """A run folder with built-looking corpora: scenario (40 train, 8 validation; half labels-only targets),
    general instruction records (15 train, 3 validation, 4 test), private raw text."""
    run_dir = tmp_path / "run"
    sc = {"train": [{**_chat(i, "结论：通过"), "target": "labels" if i % 2 else "answer"} for i in range(40)],
          "validation": [{**_chat(100 + i, "结论：通过"), "target": "answer"} for i in range(8)],
          "test": [_chat(200 + i, "结论：通过") for i in range(4)]}
    _save(run_dir / "corpora" / "scenario", sc)
    gen = {split: [{"id": f"g-{split}-{i}", "source": "samples", "messages": [
        {"role": "user", "content": f"{i} 公里等于多少米？"}, {"role": "assistant", "content": f"{i * 1000} 米。"}]}
        for i in range(n)] for split, n in (("train", 15), ("validation", 3), ("test", 4))}
    _save(run_dir / "corpora" / "general", gen)
    _save(run_dir / "corpora" / "private", {"train": [{"id": f"p{i}", "text": "贷前调查记录。"} for i in range(5)]})
    return run_dir


def test_mix_reaches_sft_with_the_declared_shares(run, tmp_path, monkeypatch):
    """train.mix.general = 0.2 of the SFT examples: all 40 scenario records + 10 drawn from the 15 general ones,
    validation 8 + 2; targets kept (scenario) or answer (general); counts in the ledger notes."""
    ctx = RunContext(_recipe(tmp_path, mix={"general": 0.2}), run)
    train, val, counts = training.sft_data(ctx)
    assert counts["train"] == {"scenario": 40, "general": 10} and counts["validation"] == {"scenario": 8, "general": 2}
    assert sorted(train["source"]).count("general") == 10 and len(train) == 50
    by_id = {r["id"]: r for r in train}
    assert all(by_id[f"credit-{i}"]["target"] == ("labels" if i % 2 else "answer") for i in range(40))
    assert {r["target"] for r in train if r["source"] == "general"} == {"answer"}
    assert "repeated" not in counts
    # a share above what the corpus holds repeats records (copy ids), and says so
    ctx = RunContext(_recipe(tmp_path, mix={"general": 0.5}), run)
    train, _, counts = training.sft_data(ctx)
    ids = [r["id"] for r in train if r["source"] == "general"]
    assert len(ids) == 40 == len(set(ids)) and any("#2" in i for i in ids) and counts["repeated"]["train"] == ["general"]
    # the stage hands the mixed data to the trainer and records the counts
    calls = []
    monkeypatch.setattr(training, "train_causal_lm", lambda *a, **k: calls.append(a) or {"steps": 1})
    training.run_train(ctx)
    assert len(calls[0][1]) == 80 and ctx.notes["train"]["examples_by_source"]["train"] == {"scenario": 40,
                                                                                            "general": 40}
    # no mix: the scenario split alone, as before
    train, val, counts = training.sft_data(RunContext(_recipe(tmp_path), run))
    assert len(train) == 40 and len(val) == 8 and counts == {"train": {"scenario": 40}, "validation": {"scenario": 8}}


def test_mix_changes_the_sft_key_and_inputs(run, tmp_path):
    train_stage = next(s for s in STAGES if s.name == "train")
    a, b = _recipe(tmp_path, mix={"general": 0.1}), _recipe(tmp_path, mix={"general": 0.2})
    assert train_stage.params(a) != train_stage.params(b)
    assert run / "corpora" / "general" in train_stage.inputs(RunContext(a, run))
    assert run / "corpora" / "general" not in train_stage.inputs(RunContext(_recipe(tmp_path), run))


def test_text_only_corpus_in_the_mix_is_refused(run, tmp_path):
    ctx = RunContext(_recipe(tmp_path, mix={"general": 0.1, "private": 0.05}), run)
    with pytest.raises(RecipeError, match=r"^train\.mix\.private: corpora/private holds raw text only"):
        training.sft_data(ctx)
    with pytest.raises(RecipeError, match=r"train\.mix\.general: mixes corpora/general into SFT, but corpora\.general "
                                          "is not configured"):
        validate_recipe({"name": "m", "base": {"path": "/m"}, "train": {"mix": {"general": 0.1}}})
    with pytest.raises(RecipeError, match=r"train\.mix: general \+ private = 0\.95: the scenario tasks must keep"):
        _recipe(tmp_path, mix={"general": 0.5, "private": 0.45})
    with pytest.raises(RecipeError, match=r"corpora\.mix: builds corpora/mix for continued pre-training, but no stage "
                                          "reads it"):
        validate_recipe({"name": "m", "base": {"path": "/m"}, "corpora": {
            "scenario": {"synth": {"credit": {"train": 10}}}, "mix": {"scenario": 1.0}}})


def _by_hand(model, tok, messages) -> tuple[float, int]:
    """Summed NLL of the answer tokens (prompt with generation prompt masked), one conversation, no batching."""
    prompt = tok(tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return -sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids))), len(ids) - len(prompt)


def _greedy(model, tok, messages, steps: int) -> str:
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    eos = {tok.convert_tokens_to_ids(IM_END), tok.eos_token_id}
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_held_out_instructions_scored_like_a_hand_computation(tiny):
    model, tok = load_model(tiny, device="cpu"), load_tokenizer(tiny)
    model.eval()
    # a random model's greedy answer is often a special token (decoded: empty): give one text token a head start
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok("米", add_special_tokens=False)["input_ids"][-1]] = 5.0
    model.lm_head = head
    prompt = [{"role": "user", "content": "1 公里等于多少米？"}]
    said = _greedy(model, tok, prompt, steps=3)  # what greedy decoding answers (3 new tokens at most)
    assert said and len(said) <= 32
    records = [{"id": "hit", "messages": [*prompt, {"role": "assistant", "content": said}]},
               {"id": "miss", "messages": [*prompt, {"role": "assistant", "content": "1 公里等于 1000 米。"}]},
               {"id": "long", "messages": [*prompt, {"role": "assistant", "content": "今天天气很好，适合出门散步。" * 3}]}]
    res = score_instructions(model, tok, records, batch_size=1, max_new_tokens=3)
    hand = [_by_hand(model, tok, r["messages"]) for r in records]
    for row, (nll, n) in zip(res["records"], hand, strict=True):
        assert row["tokens"] == n and row["loss"] == pytest.approx(nll / n, rel=1e-4)
    assert res["n"] == 3 and res["answer_tokens"] == sum(n for _, n in hand)
    assert res["answer_loss"] == pytest.approx(sum(s for s, _ in hand) / res["answer_tokens"], rel=1e-4)
    assert math.isfinite(res["answer_loss"])
    # exact match only for references of at most 32 characters: "long" is not eligible
    assert res["n_exact_match"] == 2 and [r["exact_match"] for r in res["records"]] == [True, False, None]
    assert res["exact_match"] == 0.5 and res["skipped"] == {}


def test_eval_stage_writes_instructions_json(run, tiny, tmp_path):
    ctx = RunContext(_recipe(tmp_path, mix={"general": 0.2}), run)
    held_out = evaluate._held_out_instructions(ctx)
    assert len(held_out["general"]) == 4 and held_out["private"] == "no test split"
    path = evaluate._score_instructions(ctx, tiny, run / "eval" / "sft", held_out)
    out = json.loads(path.read_text(encoding="utf-8"))
    g = out["corpora"]["general"]
    assert g["n"] == 4 and g["n_exact_match"] == 4 and 0.0 <= g["exact_match"] <= 1.0 and g["answer_loss"] > 0
    assert out["not_scored"] == {"private": "no test split"} and "records" not in g
    assert not list(path.parent.glob("*.tmp*"))


def test_labels_target_learns_no_end_of_turn(tiny):
    """A labels-only row learns its content tokens only; an answer row also its <|im_end|>; an unknown target or
    a labels row without the tokenizer is an error naming the record."""
    tok = load_tokenizer(tiny)
    im_end = tok.convert_tokens_to_ids(IM_END)
    same = _chat(1, "结论：通过；风险等级：A")
    ds = Dataset.from_list([{**same, "target": "labels"}, {**same, "id": "b", "target": "answer"},
                            {**same, "id": "c", "target": None}])
    rows = prepare_sft_dataset(ds, tok).to_list()
    learnt = [[t for t in r["labels"] if t != -100] for r in rows]
    assert im_end not in learnt[0] and tok.decode(learnt[0]) == "结论：通过；风险等级：A"
    assert learnt[1] == learnt[2] and learnt[1][: len(learnt[0])] == learnt[0] and im_end in learnt[1]
    assert rows[0]["input_ids"] == rows[1]["input_ids"]  # the same tokens, only the labels differ
    spans = answer_tokens(tok, ds["messages"], ["labels", "answer", "answer"])
    assert spans[0].end < spans[1].end == len(spans[1].ids)
    with pytest.raises(ValueError, match=r"SFT record credit-9: target must be one of answer, labels, got 'gold'"):
        prepare_sft_dataset(Dataset.from_list([{**_chat(9, "结论：通过"), "target": "gold"}]), tok)
    with pytest.raises(ValueError, match=r"SFT record credit-1: target 'labels' needs the tokenizer"):
        prepare_sft_dataset(ds)


@pytest.mark.slow
def test_quickstart_mix_reaches_sft_and_instruction_data_is_scored(quickstart_run):
    """End to end (the quickstart's train.mix.general): the general records join SFT in their share, and the
    held-out general instruction records are scored for every evaluated model, in the report and the card."""
    from banklm.ledger import Ledger

    _, run_dir, _ = quickstart_run
    train_entry = next(e for e in Ledger(run_dir).entries() if e["stage"] == "train")
    by_source = train_entry["notes"]["examples_by_source"]["train"]
    scenario = by_source["scenario"]
    assert scenario == len(load_split_ids(run_dir / "corpora" / "scenario"))
    assert by_source["general"] == round(0.05 * scenario / 0.95) > 0
    summary = json.loads((run_dir / "sft" / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["train_examples_by_source"] == {"general": by_source["general"], "scenario": scenario}
    assert train_entry["params"]["train"]["mix"] == {"general": 0.05, "private": 0.0}
    for model in ("sft", "cpt"):
        out = json.loads((run_dir / "eval" / model / "instructions.json").read_text(encoding="utf-8"))
        g = out["corpora"]["general"]
        assert g["n"] > 0 and math.isfinite(g["answer_loss"]) and g["n_exact_match"] <= g["n"]
        assert out["not_scored"]["private"].startswith("raw text only")
    card = (run_dir / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Instruction data held out (the bank's own)" in card and "general 5%" in card
    assert "Instruction data held out (the bank's own): loss, exact match" in (
        run_dir / "report" / "index.html").read_text(encoding="utf-8")


def load_split_ids(corpus_dir) -> list[str]:
    from banklm.corpora.splits import load_split

    return load_split(corpus_dir, "train")["id"]
