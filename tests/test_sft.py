"""banklm.finetune.sft / finetune.merge: SFT + CPT through TRL + PEFT on tiny CPU models."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from banklm.finetune import callbacks as cb_module  # noqa: E402
from banklm.finetune.checkpoints import STATE_FILE, find_resumable, rotate  # noqa: E402
from banklm.finetune.config import LoraSettings, TaskEval, TrainConfig  # noqa: E402
from banklm.finetune.merge import merge_adapter  # noqa: E402
from banklm.finetune.models import build_tiny_model, load_model  # noqa: E402
from banklm.finetune.sft import (  # noqa: E402
    PackedRowsCollator,
    batch_layout,
    cpu_attention,
    length_grouped_sampler,
    precision_plan,
    prepare_cpt_dataset,
    prepare_sft_dataset,
    token_lengths,
    train_causal_lm,
    training_attention,
)
from banklm.finetune.tokenizer import IM_END, load_tokenizer, render_chat, train_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

LABELS = ("通过", "人工复核", "拒绝")
# a valid credit-task answer (banklm.tasks parser): the 'stop' fixture trains every prompt to give it
CONSTANT_ANSWER = "结论：拒绝；风险等级：D；理由：负债收入比过高"


def _record(rng: random.Random, i: int) -> dict:
    inc = rng.randint(3000, 30000)
    pay = rng.randint(0, 20000)
    r = pay / inc
    label = LABELS[0] if r < 0.4 else (LABELS[1] if r < 0.6 else LABELS[2])
    return {
        "id": f"credit-{i:05d}",
        "task": "credit",
        "label": label,
        "messages": [
            {"role": "user", "content": f"借款人月收入{inc}元，月还款{pay}元，负债比{r:.2f}。请给出审批结论。"},
            {"role": "assistant", "content": f"结论：{label}"},
        ],
    }


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_record(rng, i) for i in range(n)]


def _constant_answer_records(n: int, seed: int) -> list[dict]:
    """The toy prompts, each answered with CONSTANT_ANSWER; ``gold`` is the toy rule's decision, so a model
    that learned the constant answer scores exactly the share of 拒绝 among them."""
    out = []
    for r in _records(n, seed):
        gold = {"decision": r["label"], "grade": "D", "reason": "负债收入比过高"}
        out.append({**r, "gold": json.dumps(gold, ensure_ascii=False), "meta": "{}",
                    "messages": [r["messages"][0], {"role": "assistant", "content": CONSTANT_ANSWER}]})
    return out


class _Interrupted(Exception):
    pass


class _CrashAt(TrainerCallback):
    """Simulates a crash (kill, power loss) before optimizer step ``step + 1``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise _Interrupted()


class _FakeTime:
    """Wall clock of finetune.callbacks advanced by exactly 1 s per optimizer step (``_Tick``): a time budget
    then stops at a known step and the time-based schedule is reproducible."""

    def __init__(self):
        self.t = 1000.0

    def perf_counter(self) -> float:
        return self.t


class _Tick(TrainerCallback):
    def __init__(self, fake: _FakeTime):
        self.fake = fake

    def on_step_begin(self, args, state, control, **kw):
        self.fake.t += 1.0


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _losses(folder) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(folder) if "loss" in r}


def _adapter_tensors(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    texts = [render_chat(r["messages"]) for r in _records(800, seed=99)]
    texts += [render_chat(r["messages"]) for r in _constant_answer_records(200, seed=98)]
    tok = train_tokenizer(texts, root / "tokenizer", vocab_size=1000)
    return build_tiny_model("llama", tok, root / "base", hidden_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, intermediate_size=128, max_position_embeddings=512, seed=0)


@pytest.fixture(scope="session")
def data():
    return Dataset.from_list(_records(240, seed=1)), Dataset.from_list(_records(8, seed=2))


@pytest.fixture(scope="session")
def lora_run(base_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    train, ev = data
    summary = train_causal_lm(base_dir, train, ev, out, mode="sft", method="lora", lr=3e-3, max_steps=24,
                              batch_size=8, max_length=256, lora={"r": 8, "alpha": 16}, logging_steps=2, seed=0,
                              device="cpu", mixed_precision="no")
    return out, summary


def _completion_example(tok, rec):
    """(input_ids, labels) built independently of TRL: prompt with generation prompt masked."""
    prompt = tok.apply_chat_template(rec["messages"][:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(rec["messages"], tokenize=False)
    assert full.startswith(prompt)
    p_ids = tok.encode(prompt, add_special_tokens=False)
    ids = tok.encode(full, add_special_tokens=False)
    assert ids[: len(p_ids)] == p_ids
    return ids, [-100] * len(p_ids) + ids[len(p_ids):]


def _completion_loss(model, tok, records) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in records:
            ids, labels = _completion_example(tok, rec)
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            tgt = torch.tensor(labels[1:])
            total += torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum").item()
            count += int((tgt != -100).sum())
    return total / count


def test_completion_only_mask_via_trl(base_dir, data):
    """TRL's prepared labels == prompt masked, answer + <|im_end|> (+ newline) trained, pad never a label."""
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(base_dir)
    model = load_model(base_dir, device="cpu")
    ds = Dataset.from_list(_records(6, seed=5))
    args = SFTConfig(output_dir=str(base_dir.parent / "mask_ck"), packing=False, max_length=256, bf16=False,
                     completion_only_loss=True, report_to="none", use_cpu=True, dataloader_pin_memory=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=prepare_sft_dataset(ds), processing_class=tok)
    im_end = tok.convert_tokens_to_ids(IM_END)
    for rec, row in zip(ds, trainer.train_dataset, strict=True):
        ids, labels = _completion_example(tok, rec)
        assert row["input_ids"] == ids
        assert row["labels"] == labels
        trained = [t for t in row["labels"] if t != -100]
        assert im_end in trained
        assert tok.decode(trained) == rec["messages"][-1]["content"] + IM_END + "\n"
        assert tok.pad_token_id not in trained
        assert row["labels"][: len(ids) - len(trained)] == [-100] * (len(ids) - len(trained))


def test_own_tokenization_equals_trl_and_labels_target_learns_no_end_of_turn(base_dir):
    """prepare_sft_dataset(ds, tokenizer) gives answer rows exactly TRL's tokens and labels; a ``target: labels``
    row learns its content only: no label on its end-of-turn tokens, in the rows the trainer prepared (padded and
    packed) and in the flat batch the collator builds."""
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(base_dir)
    im_end = tok.convert_tokens_to_ids(IM_END)
    recs = _records(6, seed=21)
    ds = Dataset.from_list([{**r, "target": "labels" if i % 2 else "answer"} for i, r in enumerate(recs)])
    answers = ds.filter(lambda t: t == "answer", input_columns="target")
    args = dict(max_length=256, bf16=False, completion_only_loss=True, report_to="none", use_cpu=True,
                dataloader_pin_memory=False, shuffle_dataset=False)
    trl_rows = SFTTrainer(model=load_model(base_dir, device="cpu"), processing_class=tok,
                          args=SFTConfig(output_dir=str(base_dir.parent / "own_ck0"), packing=False, **args),
                          train_dataset=prepare_sft_dataset(answers)).train_dataset
    own = prepare_sft_dataset(answers, tok)
    assert own["input_ids"] == trl_rows["input_ids"] and own["labels"] == trl_rows["labels"]
    for packing in (False, True):
        trainer = SFTTrainer(model=load_model(base_dir, device="cpu"), processing_class=tok,
                             args=SFTConfig(output_dir=str(base_dir.parent / f"own_ck{int(packing) + 1}"),
                                            packing=packing, **args),
                             train_dataset=prepare_sft_dataset(ds, tok))
        rows = trainer.train_dataset.to_list()
        examples = []  # (input_ids, labels) per example, packed rows cut at their seq_lengths
        for row in rows:
            at = 0
            for n in row.get("seq_lengths") or [len(row["input_ids"])]:
                examples.append((row["input_ids"][at:at + n], row["labels"][at:at + n]))
                at += n
        assert len(examples) == 6
        by_answer = {tok.decode(ids): (ids, labels) for ids, labels in examples}
        for rec, target in zip(recs, ds["target"], strict=True):
            ids, labels = next(v for text, v in by_answer.items() if rec["messages"][0]["content"] in text)
            learnt = [t for t in labels if t != -100]
            if target == "labels":
                assert im_end not in learnt and tok.decode(learnt) == rec["messages"][-1]["content"]
                end = len(ids) - 1 - ids[::-1].index(im_end)  # the answer's end of turn: in the input, not learnt
                assert end >= len(ids) - 2 and set(labels[end:]) == {-100}
            else:
                assert learnt[-2] == im_end and tok.decode(learnt) == rec["messages"][-1]["content"] + IM_END + "\n"
        batch = PackedRowsCollator(tok.pad_token_id, flat=True)(rows)
        assert batch["labels"][0].tolist().count(im_end) == 3  # the three answer rows' ends only


def test_packed_rows_equal_unpacked(base_dir):
    """Two examples packed in one row give the same per-example logits and loss as run alone."""
    tok = load_tokenizer(base_dir)
    model = load_model(base_dir, device="cpu")
    model.config.use_cache = False
    recs = _records(3, seed=7)
    exs = [_completion_example(tok, r) for r in recs]
    packed = {"input_ids": exs[0][0] + exs[1][0], "labels": exs[0][1] + exs[1][1],
              "seq_lengths": [len(exs[0][0]), len(exs[1][0])]}
    single = {"input_ids": exs[2][0], "labels": exs[2][1], "seq_lengths": [len(exs[2][0])]}
    batch = PackedRowsCollator(tok.pad_token_id)([packed, single])
    assert "attention_mask" not in batch
    assert batch["position_ids"][0, len(exs[0][0])] == 0
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "position_ids")}).logits
        off = 0
        for ids, _ in exs[:2]:
            alone = model(torch.tensor([ids])).logits[0]
            assert torch.allclose(logits[0, off:off + len(ids)], alone, atol=1e-5)
            off += len(ids)
        alone = model(torch.tensor([exs[2][0]])).logits[0]
        assert torch.allclose(logits[1, : len(exs[2][0])], alone, atol=1e-5)
        # per-sample loss: packed == unpacked
        packed_loss = model(**batch).loss.item()
        unpacked = _completion_loss(model, tok, recs)
    assert abs(packed_loss - unpacked) < 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_without_mask_equals_unpadded(base_dir, attn):
    """The padded layout: one example per row, right-padded, no attention mask, plain positions. Causal
    attention never reaches the pads after a token, so every real position's logits equal the example run
    alone, and the batch loss is the per-example completion loss."""
    tok = load_tokenizer(base_dir)
    model = load_model(base_dir, device="cpu", attn_implementation=attn)
    model.config.use_cache = False
    recs = _records(4, seed=11)
    exs = [_completion_example(tok, r) for r in recs]
    assert len({len(ids) for ids, _ in exs}) > 1  # the shorter rows are padded
    batch = PackedRowsCollator(tok.pad_token_id)([{"input_ids": ids, "labels": lab} for ids, lab in exs])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no mask: plain causal attention
    assert (batch["position_ids"] == torch.arange(batch["input_ids"].shape[1])).all()  # pads too: nothing packed
    assert (batch["input_ids"] == tok.pad_token_id).any()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for i, (ids, _) in enumerate(exs):
            alone = model(torch.tensor([ids])).logits[0]
            assert torch.allclose(logits[i, : len(ids)], alone, atol=1e-5)
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(_completion_loss(model, tok, recs), abs=1e-5)


def test_batch_layout_and_attention():
    assert batch_layout("auto", "sft") == "unpadded"
    assert batch_layout("auto", "sft", group_by_length=True) == "grouped"
    assert batch_layout("auto", "cpt") == "packed"  # raw documents: full rows
    assert batch_layout(True, "sft") == "packed"
    assert batch_layout(True, "sft", group_by_length=True) == "packed"  # packed rows have no length to group
    assert batch_layout(False, "cpt") == "padded"
    assert batch_layout(False, "sft", group_by_length=True) == "grouped"
    with pytest.raises(ValueError, match="'auto'"):
        batch_layout("yes", "sft")
    bf16 = {"bf16": True, "attn_implementation": "sdpa"}
    assert cpu_attention("cpu", bf16, 256) == "eager"
    assert cpu_attention("cpu", bf16, 257) == "sdpa"  # long rows: the flash kernel wins
    assert cpu_attention("cpu", {**bf16, "bf16": False}, 128) == "sdpa"  # fp32: sdpa as fast or faster
    assert cpu_attention("cuda", bf16, 128) == "sdpa"
    assert cpu_attention("cuda", {**bf16, "attn_implementation": "flash_attention_2"}, 128) == "flash_attention_2"
    flash = {**bf16, "attn_implementation": "flash_attention_2"}
    for layout in ("unpadded", "packed"):  # flat rows: a varlen kernel, flash-attention's or banklm's
        assert training_attention("cpu", bf16, layout, 128) == "banklm_varlen"
        assert training_attention("cuda", bf16, layout, 128) == "banklm_varlen"
        assert training_attention("cuda", flash, layout, 128) == "flash_attention_2"
    assert training_attention("cpu", bf16, "padded", 128) == "eager"
    assert training_attention("cpu", bf16, "grouped", 512) == "sdpa"


def test_length_grouped_sampler_is_seeded_per_epoch_and_groups_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(20, 200) for _ in range(400)]
    s = length_grouped_sampler(lengths, 8, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(400))
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) == sorted(e0)
    s.set_epoch(0)
    assert list(s) == e0
    resumed = length_grouped_sampler(lengths, 8, seed=3)  # a new process (resume) in epoch 1
    resumed.set_epoch(1)
    assert list(resumed) == e1
    assert list(length_grouped_sampler(lengths, 8, seed=4)) != e0

    def padding(order):
        batches = [order[k:k + 8] for k in range(0, len(order), 8)]
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(e0) < 0.2 * padding(shuffled)


def test_bf16_lora_step_skips_the_fp32_round_trip_exactly(base_dir, data):
    """LoRA on a bf16 base under autocast: the training step turns off PEFT's cast of each adapter input to
    fp32 (autocast casts it straight back); loss and gradients are bit-identical either way."""
    from banklm.finetune.sft import make_trainer_classes
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from trl import SFTConfig

    tok = load_tokenizer(base_dir)
    BudgetTrainer, _ = make_trainer_classes()
    model = get_peft_model(load_model(base_dir, device="cpu", dtype=torch.bfloat16),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = SFTConfig(output_dir=str(base_dir.parent / "bf16_ck"), packing=False, max_length=256, bf16=True,
                     completion_only_loss=True, report_to="none", use_cpu=True, dataloader_pin_memory=False)
    trainer = BudgetTrainer(model=model, args=args, train_dataset=prepare_sft_dataset(data[0].select(range(8))),
                            processing_class=tok, sparse_head=True)
    trainer.current_gradient_accumulation_steps = 1  # set by train(); this test calls training_step alone
    batch = PackedRowsCollator(tok.pad_token_id)([trainer.train_dataset[i] for i in range(4)])
    layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.cast_input_dtype_enabled))
    results = []
    for skip in (False, True):
        trainer.banklm_autocast_lora = skip
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate wraps the prepared forward in
            loss = trainer.training_step(model, dict(batch))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    assert seen == [True, False] and layer.cast_input_dtype_enabled  # restored after the step
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("packing,flat", [(True, False), (False, False), (False, True)])
def test_label_positions_head_equals_trl_loss(base_dir, data, packing, flat):
    """banklm's CPU loss path (LM head on label positions only) gives TRL's loss and the same gradients, in
    training mode (TRL's path, kept on CUDA, counts tokens from the batch's position ids), for packed rows,
    padded rows and one flat row."""
    from banklm.finetune.sft import make_trainer_classes
    from trl import SFTConfig

    tok = load_tokenizer(base_dir)
    BudgetTrainer, _ = make_trainer_classes()
    args = SFTConfig(output_dir=str(base_dir.parent / "head_ck"), packing=packing, max_length=256, bf16=False,
                     completion_only_loss=True, report_to="none", use_cpu=True, dataloader_pin_memory=False)
    model = load_model(base_dir, device="cpu")
    trainer = BudgetTrainer(model=model, args=args, train_dataset=prepare_sft_dataset(data[0].select(range(24))),
                            processing_class=tok)
    model.train()
    batch = PackedRowsCollator(tok.pad_token_id, flat=flat)([trainer.train_dataset[i] for i in range(3)])
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    results = []
    for sparse in (False, True):
        trainer.banklm_sparse_head = sparse
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n_items))
        loss.backward()
        results.append((loss.item(), model.model.layers[0].mlp.down_proj.weight.grad.clone()))
    (trl_loss, trl_grad), (loss, grad) = results
    assert loss == pytest.approx(trl_loss, rel=1e-5) and loss == pytest.approx(_completion_loss_from_batch(model, batch))
    assert torch.allclose(grad, trl_grad, atol=1e-6)


def _completion_loss_from_batch(model, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[:, :-1]
    tgt = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)).item()


def test_lora_sft_outputs_and_loss_down(lora_run, base_dir, data):
    out, s = lora_run
    assert s["method"] == "lora" and s["mode"] == "sft" and s["steps"] == 24 and s["device"] == "cpu"
    assert 0 < s["trainable_params"] < s["total_params"]
    assert s["tokens_seen"] > 0 and s["seconds"] > 0
    assert json.loads((out / "train_summary.json").read_text()) == s
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all("learning_rate" in r and "tokens_per_s" in r for r in rows if "loss" in r and r["step"] > 1)
    assert any("eval_loss" in r for r in rows)
    assert {"adapter", "merged", "metrics.jsonl", "train_summary.json"} <= set(os.listdir(out))
    assert not (out / "checkpoints").exists()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = set(os.listdir(out / "merged"))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model",
            "tokenizer_config.json"} <= merged
    assert not any(n.endswith(".bin") for n in merged)
    gen = json.loads((out / "merged" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [5, 2] and gen["pad_token_id"] == 3


def test_tensorboard_logs_the_same_losses(lora_run):
    """With the tensorboard package installed (dev extra), sft/tensorboard holds the metrics.jsonl losses."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = lora_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert logged and logged == pytest.approx(_losses(out), rel=1e-6)
    assert "eval/loss" in acc.Tags()["scalars"]


def test_adapter_reload_and_merge_equal(lora_run, base_dir, data):
    from peft import PeftModel

    out, s = lora_run
    tok = load_tokenizer(base_dir)
    _, ev = data
    base = load_model(base_dir, device="cpu")
    with_adapter = PeftModel.from_pretrained(load_model(base_dir, device="cpu"), str(out / "adapter"))
    with_adapter.eval()
    merged = load_model(out / "merged", device="cpu")
    ids = torch.tensor([_completion_example(tok, ev[0])[0]])
    with torch.no_grad():
        a = with_adapter(ids).logits
        m = merged(ids).logits
        b = base(ids).logits
    assert (a - b).abs().max() > 1e-2  # the adapter changed something
    assert torch.allclose(a, m, atol=1e-4)
    # the reloaded adapter reproduces the trainer's own final eval loss (in-memory model)
    assert abs(_completion_loss(with_adapter, tok, list(ev)) - s["eval_loss"]) < 1e-4 * max(1.0, s["eval_loss"])
    # merge_adapter on its own (explicit dtype) gives the same model
    again = merge_adapter(base_dir, out / "adapter", out / "merged_again", "fp32")
    with torch.no_grad():
        assert torch.allclose(load_model(again, device="cpu")(ids).logits, m, atol=1e-6)


def test_cpt_full_and_time_budget(base_dir, data, tmp_path, monkeypatch):
    """CPT, full fine-tuning, and a 5 s budget on a simulated clock (1 s per step): training stops after
    step 5 and the learning rate follows max(step, time) progress, decaying to ~0 as the budget ends."""
    from banklm.finetune.callbacks import lr_factor

    train, _ = data
    texts = Dataset.from_list([{"id": r["id"], "text": render_chat(r["messages"])} for r in train])
    tok = load_tokenizer(base_dir)
    prepared = prepare_cpt_dataset(texts.select(range(2)), tok)
    assert prepared[0]["input_ids"][-1] == tok.convert_tokens_to_ids("</s>")
    assert prepared[0]["input_ids"][-2] == tok.convert_tokens_to_ids("\n")
    fake = _FakeTime()
    monkeypatch.setattr(cb_module, "time", fake)
    s = train_causal_lm(base_dir, texts, None, tmp_path / "cpt", mode="cpt", method="full", lr=6e-4,
                        epochs=100, time_budget_s=5, batch_size=8, max_length=256, logging_steps=1,
                        device="cpu", callbacks=[_Tick(fake)])
    assert s["stopped_by"] == "time_budget" and s["steps"] == 5 and s["train_seconds_total"] == 5.0
    assert s["trainable_params"] == s["total_params"]
    assert (tmp_path / "cpt" / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "cpt" / "adapter").exists()
    rows = [r for r in _rows(tmp_path / "cpt") if "loss" in r]
    planned = s["planned_steps"]  # 100 epochs: the step term alone would barely move the LR
    for r in rows:  # the LR used by step k: progress after k-1 steps and k-1 simulated seconds
        k = r["step"]
        assert r["learning_rate"] == pytest.approx(6e-4 * lr_factor(max((k - 1) / planned, (k - 1) / 5), 0.05,
                                                                    "cosine"))
    assert rows[-1]["learning_rate"] < 0.2 * max(r["learning_rate"] for r in rows)  # step 5 runs at 80% progress
    assert rows[-1]["loss"] < rows[0]["loss"]
    # the full-FT model reloads and generates
    model = load_model(tmp_path / "cpt" / "merged", device="cpu")
    assert model.config.use_cache is True


def test_lora_variants_gradient_checkpointing(base_dir, data, tmp_path, capsys):
    """rsLoRA + DoRA + gradient checkpointing + explicit targets train and merge; the progress bar shows
    steps, tokens/s and ETA on stderr when asked for (off by default when stderr is not a terminal)."""
    train, _ = data
    s = train_causal_lm(base_dir, train, None, tmp_path / "v", method="lora", lr=3e-3, max_steps=3, batch_size=8,
                        max_length=256, device="cpu", gradient_checkpointing=True, mixed_precision="no",
                        lora=LoraSettings(rslora=True, dora=True, targets=["q_proj", "v_proj"]), progress=True,
                        logging_steps=1)
    assert s["steps"] == 3 and s["lora"]["dora"] and s["final_loss"] is not None
    err = capsys.readouterr().err
    assert "3/3" in err and "tok/s=" in err and "loss=" in err
    cfg = json.loads((tmp_path / "v" / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["use_dora"] and cfg["use_rslora"]
    assert (tmp_path / "v" / "merged" / "model.safetensors").is_file()


def test_qlora_cpu(base_dir, data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    train, ev = data
    s = train_causal_lm(base_dir, train, None, tmp_path / "q", method="qlora", lr=3e-3, max_steps=6,
                        batch_size=8, max_length=256, lora={"r": 8}, device="cpu", logging_steps=1)
    assert s["steps"] == 6 and s["method"] == "qlora"
    losses = _losses(tmp_path / "q")
    assert losses[6] < losses[1] - 0.1, losses
    merged = load_model(tmp_path / "q" / "merged", device="cpu")
    assert not getattr(merged.config, "quantization_config", None)
    # merged (de-quantized base + adapter) == quantized base + adapter, up to 4-bit kernel rounding
    qbase = load_model(base_dir, device="cpu", quantization="4bit")
    qa = PeftModel.from_pretrained(qbase, str(tmp_path / "q" / "adapter"))
    ids = torch.tensor([[4, 20, 30, 40, 50, 5]])
    with torch.no_grad():
        d = (qa(ids).logits.float() - merged(ids).logits).abs().max().item()
    assert d < 0.05, d


def test_bad_inputs(base_dir, data, tmp_path):
    train, _ = data
    with pytest.raises(ValueError, match="mode"):
        train_causal_lm(base_dir, train, None, tmp_path / "x", mode="rlhf", lr=1e-3)
    with pytest.raises(ValueError, match="method"):
        train_causal_lm(base_dir, train, None, tmp_path / "x", method="adapter", lr=1e-3)
    bad = Dataset.from_list([{"messages": [{"role": "user", "content": "只有问题"}]}])
    with pytest.raises(ValueError, match="assistant"):
        prepare_sft_dataset(bad)
    with pytest.raises(ValueError, match="text"):
        prepare_cpt_dataset(Dataset.from_list([{"foo": "bar"}]), load_tokenizer(base_dir))


# --------------------------------------------------------------------------- EOS, padding, labels


def test_collator_keeps_eos_in_labels_and_masks_pad(base_dir):
    """The pad id never hides the EOS: every example's <|im_end|> stays a label, pad positions are -100."""
    tok = load_tokenizer(base_dir)
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert tok.pad_token_id not in (im_end, tok.eos_token_id)
    exs = [_completion_example(tok, r) for r in _records(3, seed=11)]
    packed = {"input_ids": exs[0][0] + exs[1][0], "labels": exs[0][1] + exs[1][1],
              "seq_lengths": [len(exs[0][0]), len(exs[1][0])]}
    single = {"input_ids": exs[2][0], "labels": exs[2][1]}
    batch = PackedRowsCollator(tok.pad_token_id)([packed, single])
    short = len(exs[2][0])
    assert batch["input_ids"].shape[1] > short  # the second row is padded
    assert (batch["input_ids"][1, short:] == tok.pad_token_id).all()
    assert (batch["labels"][1, short:] == -100).all()
    for row, n_examples in ((0, 2), (1, 1)):
        labels = batch["labels"][row].tolist()
        assert labels.count(im_end) == n_examples  # the answer's <|im_end|> of each example is trained
        trained = [t for t in labels if t != -100]
        assert tok.decode(trained).count(IM_END) == n_examples


def test_trl_padded_collator_keeps_eos(base_dir):
    """packing=False: TRL pads the batch with <pad>; the labels still end each answer with <|im_end|>."""
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(base_dir)
    im_end = tok.convert_tokens_to_ids(IM_END)
    ds = Dataset.from_list(_records(4, seed=12))
    args = SFTConfig(output_dir=str(base_dir.parent / "pad_ck"), packing=False, max_length=256, bf16=False,
                     completion_only_loss=True, report_to="none", use_cpu=True, dataloader_pin_memory=False)
    trainer = SFTTrainer(model=load_model(base_dir, device="cpu"), args=args,
                         train_dataset=prepare_sft_dataset(ds), processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(4)]
    # banklm's own count (row length for packing, truncation warning) agrees with TRL's tokenization
    assert token_lengths(prepare_sft_dataset(ds), tok, "sft") == [len(r["input_ids"]) for r in rows]
    batch = trainer.data_collator(rows)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        labels = batch["labels"][i].tolist()
        assert im_end in labels[:n]
        assert all(t == -100 for t in labels[n:])  # padding
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()


@pytest.fixture(scope="session")
def stop_run(base_dir, tmp_path_factory):
    """Full fine-tuning until every prompt gets CONSTANT_ANSWER and <|im_end|>, with the periodic task check."""
    out = tmp_path_factory.mktemp("stop_run")
    train = Dataset.from_list(_constant_answer_records(240, seed=21))
    ev = Dataset.from_list(_constant_answer_records(8, seed=22))
    task_records = _constant_answer_records(12, seed=23)
    summary = train_causal_lm(base_dir, train.select_columns(["id", "messages"]), ev.select_columns(["messages"]),
                              out, method="full", lr=5e-3, max_steps=48, batch_size=8, max_length=256,
                              logging_steps=6, seed=0, device="cpu", mixed_precision="no", packing=True,
                              task_eval=TaskEval(task_records, max_new_tokens=48), task_eval_steps=24)
    return out, summary, task_records


def test_full_sft_learns_to_stop(stop_run, base_dir):
    """EOS learned: on held-out prompts the fine-tuned model answers and ends with <|im_end|> well before
    max_new_tokens; the untrained base does not."""
    from banklm.evaluation.generate import eos_token_ids

    out, s, _ = stop_run
    assert s["method"] == "full" and s["steps"] == 48 and s["trainable_params"] == s["total_params"]
    assert s["batch_layout"] == "packed"  # packing=True: rows of several examples, position ids restarting
    assert s["examples_truncated"] == 0 and s["attn_implementation"] == "banklm_varlen"
    losses = _losses(out)
    assert losses[48] < losses[1] - 3.0, losses
    tok = load_tokenizer(out / "merged")
    prompts = [[r["messages"][0]] for r in _records(6, seed=24)]
    max_new = 48

    def run(model):
        eos = eos_token_ids(model, tok)
        results = []
        for msgs in prompts:
            ids = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok.encode(ids, add_special_tokens=False)])
            with torch.no_grad():
                new = model.generate(ids, max_new_tokens=max_new, do_sample=False)[0, ids.shape[1]:].tolist()
            results.append((new, new[-1] in eos))
        return results

    tuned = run(load_model(out / "merged", device="cpu"))
    for new, stopped in tuned:
        assert stopped and len(new) < max_new
        assert tok.decode(new[:-1]) == CONSTANT_ANSWER
    base = run(load_model(base_dir, device="cpu"))
    assert not all(stopped for _, stopped in base)


def test_task_eval_during_training(stop_run):
    """task_accuracy in metrics.jsonl every 24 steps, from the same parser and metrics as the final evaluation:
    at the end the model answers CONSTANT_ANSWER (拒绝) everywhere, so accuracy = share of 拒绝 golds."""
    from banklm.evaluation.evaluate import evaluate_records

    out, s, records = stop_run
    rows = [r for r in _rows(out) if "task_accuracy" in r]
    assert [r["step"] for r in rows] == [24, 48]
    assert all("loss" in r for r in rows)  # logged with that step's training loss, which is not lost
    expected = sum(json.loads(r["gold"])["decision"] == "拒绝" for r in records) / len(records)
    assert 0 < expected < 1
    last = rows[-1]
    assert last["task_format_compliance"] == 1.0
    assert last["task_accuracy"] == pytest.approx(expected) == last["task_accuracy_credit"]
    assert s["task_eval"]["step"] == 48 and s["task_eval"]["task_accuracy"] == pytest.approx(expected)
    # the same figure from the stage's evaluation of the saved model
    model = load_model(out / "merged", device="cpu")
    res = evaluate_records(model, load_tokenizer(out / "merged"), records, out.parent / "eval_check",
                           max_new_tokens=48)
    assert res["overall"]["accuracy"] == pytest.approx(last["task_accuracy"])


def test_full_merged_reproduces_eval_loss(stop_run):
    out, s, _ = stop_run
    tok = load_tokenizer(out / "merged")
    ev = _constant_answer_records(8, seed=22)
    loss = _completion_loss(load_model(out / "merged", device="cpu"), tok, ev)
    assert loss == pytest.approx(s["eval_loss"], rel=1e-4)


# --------------------------------------------------------------------------- devices


def test_precision_plan_by_device(monkeypatch):
    """CUDA: bf16 where supported, else fp16 (GradScaler via the Trainer's fp16 flag); flash-attention 2 when
    installed, else sdpa; MPS and CPU: fp32 weights; auto device prefers cuda, then mps, then cpu."""
    import importlib.util

    from banklm.finetune.models import pick_device

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn"
                        else real_find_spec(name, *a))
    assert pick_device("auto") == "cuda"
    p = precision_plan("cuda", "lora")
    assert (p["bf16"], p["fp16"], p["model_dtype"], p["attn_implementation"]) == (True, False, torch.bfloat16, "sdpa")
    assert precision_plan("cuda", "full")["model_dtype"] == torch.float32  # fp32 master weights
    assert precision_plan("cuda", "qlora")["quantization"] == "4bit"
    assert precision_plan("cuda", "lora", "no")["model_dtype"] == torch.float32

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a T4 / 2080
    p = precision_plan("cuda", "lora")
    assert (p["bf16"], p["fp16"], p["model_dtype"]) == (False, True, torch.float16)
    from banklm.finetune.models import bnb_config

    if real_find_spec("bitsandbytes") is not None:
        assert bnb_config("4bit", "cuda").bnb_4bit_compute_dtype == torch.float16

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn"
                        else real_find_spec(name, *a))
    assert precision_plan("cuda", "lora")["attn_implementation"] == "flash_attention_2"
    assert precision_plan("cpu", "lora")["attn_implementation"] == "sdpa"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == "mps"
    p = precision_plan("mps", "lora")
    assert (p["bf16"], p["fp16"], p["model_dtype"]) == (False, False, torch.float32)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    p = precision_plan("cpu", "lora")
    assert (p["bf16"], p["fp16"], p["model_dtype"]) == (True, False, torch.bfloat16)
    assert precision_plan("cpu", "full")["model_dtype"] == torch.float32
    assert precision_plan("cpu", "lora", "no")["model_dtype"] == torch.float32
    with pytest.raises(ValueError, match="fp16.*needs CUDA"):
        precision_plan("cpu", "lora", "fp16")


# --------------------------------------------------------------------------- checkpoints and resume


def test_checkpoint_completeness_fingerprint_and_rotation(tmp_path):
    ck = tmp_path / "checkpoints"

    def make(step: int, fingerprint: str | None):
        d = ck / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x")
        if fingerprint is not None:
            (d / STATE_FILE).write_text(json.dumps({"fingerprint": fingerprint, "step": step}))

    for step in (2, 4, 6):
        make(step, "A")
    make(8, None)  # interrupted while saving
    make(10, "B")  # left by other settings
    assert find_resumable(ck, "A", clean=False)[0].name == "checkpoint-6"
    assert len(list(ck.iterdir())) == 5  # clean=False (non-main processes) deletes nothing
    path, state = find_resumable(ck, "A")
    assert path.name == "checkpoint-6" and state["step"] == 6
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    make(12, None)
    assert [p.name for p in rotate(ck, 1)] == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint-12", "checkpoint-6"]  # incomplete one not counted
    assert find_resumable(ck, "C") is None and not list(ck.iterdir())


@pytest.mark.parametrize("packing,group_by_length", [("auto", False), ("auto", True), (True, False)])
def test_resume_mid_epoch_equals_uninterrupted(base_dir, data, tmp_path, packing, group_by_length):
    """Crash two steps after a checkpoint taken one batch into the second epoch (keep 1): the re-run resumes
    there and reaches the very same losses and adapter weights (LoRA dropout on: RNG states restored), in
    every layout: unpadded examples, grouped by length (the sampler's order is seeded per epoch), packed rows."""
    train, ev = data
    kw = dict(method="lora", lr=3e-3, max_steps=12, batch_size=16 if packing is True else 40, max_length=256,
              lora={"r": 8, "dropout": 0.1}, logging_steps=1, seed=0, device="cpu", mixed_precision="no",
              keep_checkpoints=1, merge=False, packing=packing, group_by_length=group_by_length)
    ref = train_causal_lm(base_dir, train, ev, tmp_path / "ref", **kw)
    per_epoch = round(ref["planned_steps"] / ref["trained_epochs"])
    save = per_epoch + 1  # one batch into epoch 2
    assert 2 <= per_epoch and save + 3 < 12
    out = tmp_path / "run"
    with pytest.raises(_Interrupted):
        train_causal_lm(base_dir, train, ev, out, callbacks=[_CrashAt(save + 2)], save_steps=save, **kw)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == [f"checkpoint-{save}"]
    partial = out / "checkpoints" / f"checkpoint-{save + 2}"  # a save cut short by the crash: no banklm_state.json
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"partial")
    res = train_causal_lm(base_dir, train, ev, out, resume=True, save_steps=save, **kw)
    assert res["resumed_from_step"] == save and res["steps"] == ref["steps"] == 12
    assert _losses(out) == pytest.approx(_losses(tmp_path / "ref"), abs=1e-6)
    assert res["final_loss"] == pytest.approx(ref["final_loss"], abs=1e-6)
    assert res["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-6)
    a, b = _adapter_tensors(tmp_path / "ref"), _adapter_tensors(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert res["tokens_seen"] == ref["tokens_seen"]
    assert not (out / "checkpoints").exists()  # the completed stage removes them
    # other settings never resume from a foreign checkpoint
    with pytest.raises(_Interrupted):
        train_causal_lm(base_dir, train, ev, out, callbacks=[_CrashAt(save + 1)], save_steps=save, **kw)
    other = train_causal_lm(base_dir, train, ev, out, resume=True, save_steps=save, **{**kw, "lr": 2e-3,
                                                                                        "max_steps": 2})
    assert other["resumed_from_step"] is None and other["steps"] == 2


def test_time_budget_resume(base_dir, data, tmp_path, monkeypatch):
    """A budgeted run resumes with the training time it had at the checkpoint: on a simulated clock (1 s per
    step) the interrupted + resumed run stops at the same step with the same schedule and weights."""
    train, _ = data
    fake = _FakeTime()
    monkeypatch.setattr(cb_module, "time", fake)
    kw = dict(method="lora", lr=3e-3, epochs=50, time_budget_s=6, batch_size=8, max_length=256, lora={"r": 8},
              logging_steps=1, seed=0, device="cpu", mixed_precision="no", save_steps=2, merge=False)
    ref = train_causal_lm(base_dir, train, None, tmp_path / "ref", callbacks=[_Tick(fake)], **kw)
    assert ref["stopped_by"] == "time_budget" and ref["steps"] == 6 and ref["train_seconds_total"] == 6.0
    out = tmp_path / "run"
    with pytest.raises(_Interrupted):
        train_causal_lm(base_dir, train, None, out, callbacks=[_Tick(fake), _CrashAt(3)], **kw)
    res = train_causal_lm(base_dir, train, None, out, callbacks=[_Tick(fake)], resume=True, **kw)
    assert res["resumed_from_step"] == 2 and res["stopped_by"] == "time_budget"
    assert res["steps"] == 6 and res["train_seconds_total"] == 6.0 and res["seconds"] < 60
    lr = {r["step"]: r["learning_rate"] for r in _rows(out) if "learning_rate" in r}
    ref_lr = {r["step"]: r["learning_rate"] for r in _rows(tmp_path / "ref") if "learning_rate" in r}
    assert lr == pytest.approx(ref_lr, rel=1e-9) and len(lr) == 6
    a, b = _adapter_tensors(tmp_path / "ref"), _adapter_tensors(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_early_stopping(base_dir, data, tmp_path):
    """A learning rate far too high makes the eval loss worse; patience 2 stops long before max_steps."""
    train, ev = data
    s = train_causal_lm(base_dir, train, ev, tmp_path / "es", method="full", lr=0.5, scheduler="constant_with_warmup",
                        warmup_ratio=0.0, max_steps=30, batch_size=8, max_length=256, eval_steps=1,
                        early_stopping_patience=2, device="cpu", mixed_precision="no")
    assert s["stopped_by"] == "early_stopping" and s["steps"] < 30
    evals = [r["eval_loss"] for r in _rows(tmp_path / "es") if "eval_loss" in r]
    best = min(evals[:-2])
    assert all(e >= best for e in evals[-2:])
    with pytest.raises(ValueError, match="eval_steps"):
        train_causal_lm(base_dir, train, ev, tmp_path / "x", early_stopping_patience=2)


# --------------------------------------------------------------------------- two processes (DDP on gloo)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(base_dir, data, tmp_path, repo):
    """torchrun --nproc_per_node 2 on CPU/gloo, 4 examples per process == one process with 8: same losses and
    weights, in each layout (unpadded examples, the default; grouped by length; packed rows); only rank 0
    writes; a time budget stops both ranks at the same step (no hang)."""
    import subprocess
    import sys

    train, _ = data
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in train.to_list()), encoding="utf-8")
    kw = dict(method="lora", lr=3e-3, max_steps=4, max_length=256, lora={"r": 8, "dropout": 0.0}, logging_steps=1,
              seed=0, device="cpu", mixed_precision="no")
    budget_kw = {**kw, "max_steps": 10_000, "time_budget_s": 3, "merge": False}
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = [[str(tmp_path / "ddp"), {**kw, "batch_size": 4}], [str(tmp_path / "ddp_budget"), {**budget_kw, "batch_size": 4}],
            [str(tmp_path / "ddp_packed"), {**kw, "batch_size": 2, "packing": True, "merge": False}],
            [str(tmp_path / "ddp_grouped"), {**kw, "batch_size": 4, "group_by_length": True, "merge": False}]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(repo / "tests" / "ddp_worker.py"), str(base_dir), str(train_file), json.dumps(runs), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for rank in (0, 1) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
    assert len(reports) == 8
    by_run = {}
    for r in reports:
        by_run.setdefault(r["out"], []).append(r)
    ddp, budget = by_run[runs[0][0]], by_run[runs[1][0]]
    assert {r["world_size"] for r in ddp} == {2} and len({r["final_loss"] for r in ddp}) == 1
    assert budget[0]["steps"] == budget[1]["steps"] > 0 and {r["stopped_by"] for r in budget} == {"time_budget"}

    one = train_causal_lm(base_dir, train, None, tmp_path / "one", batch_size=8, **kw)
    assert one["world_size"] == 1
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "one"), abs=1e-4)
    a, b = _adapter_tensors(tmp_path / "one"), _adapter_tensors(tmp_path / "ddp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["batch_layout"] == "unpadded"
    for name, layout, extra in (("packed", "packed", {"batch_size": 4, "packing": True}),
                                ("grouped", "grouped", {"batch_size": 8, "group_by_length": True})):
        one_run = train_causal_lm(base_dir, train, None, tmp_path / f"one_{name}", **{**kw, **extra, "merge": False})
        assert one_run["batch_layout"] == layout
        assert _losses(tmp_path / f"ddp_{name}") == pytest.approx(_losses(tmp_path / f"one_{name}"), abs=1e-4)
        a, b = _adapter_tensors(tmp_path / f"one_{name}"), _adapter_tensors(tmp_path / f"ddp_{name}")
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert (tmp_path / "ddp" / "merged" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- resume through the CLI


RESUME_RECIPE = """
name: resume
seed: 0
corpora:
  scenario:
    synth:
      credit: {{train: 200, validation: 8, test: 8}}
base:
  path: {base}
train:
  method: lora
  lr: 3.0e-3
  max_steps: 80
  batch_size: 8
  max_length: 512       # this test tokenizer (395 pieces) makes credit examples 300-480 tokens long
  save_steps: 5
  logging_steps: 5
eval: {{enabled: false}}
export: {{gguf: {{enabled: false}}}}
report: {{enabled: false}}
"""


@pytest.mark.slow
def test_banklm_train_resumes_after_kill(base_dir, tmp_path):
    """`banklm train` killed (SIGKILL) mid-training and run again on the same --run-dir: training continues from
    the last complete checkpoint in sft/checkpoints/, the metrics rows continue, the ledger verifies."""
    import signal
    import subprocess
    import sys
    import time

    from banklm.ledger import Ledger, verify_run
    from tests.helpers import run_banklm

    recipe = tmp_path / "resume.yaml"
    recipe.write_text(RESUME_RECIPE.format(base=base_dir), encoding="utf-8")
    run_dir = tmp_path / "runs" / "resume" / "r1"
    args = ["train", str(recipe), "--run-dir", str(run_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "banklm.cli", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run_dir / "sft" / "checkpoints"
    deadline = time.time() + 300
    try:
        while not list(ckpts.glob("checkpoint-*/banklm_state.json")):
            assert proc.poll() is None, "banklm train ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [e["stage"] for e in Ledger(run_dir).entries()] == ["corpus"]  # killed inside the train stage
    out = run_banklm(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "sft" / "train_summary.json").read_text())
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= 5
    assert summary["steps"] == 80
    steps = [r["step"] for r in _rows(run_dir / "sft") if "loss" in r]
    assert steps == [1, *range(5, 81, 5)]  # rows before the checkpoint restored, none repeated or lost
    entries = Ledger(run_dir).entries()
    assert [e["stage"] for e in entries][-1] == "train" and entries[-1]["status"] == "done"
    assert not ckpts.exists() and verify_run(run_dir) == []


def test_truncated_examples_are_counted(base_dir, data, tmp_path, caplog):
    """Examples longer than max_length are cut by the trainer: never silently (summary + a log warning)."""
    import logging

    train, _ = data
    small = train.select(range(16))
    lengths = token_lengths(prepare_sft_dataset(small), load_tokenizer(base_dir), "sft")
    limit = sorted(lengths)[len(lengths) // 2]
    expected = sum(n > limit for n in lengths)
    assert 0 < expected < len(lengths)
    with caplog.at_level(logging.WARNING, logger="banklm"):
        s = train_causal_lm(base_dir, small, None, tmp_path / "t", max_steps=1, batch_size=4, max_length=limit,
                            merge=False, device="cpu")
    assert s["examples_truncated"] == expected
    assert f"{expected} of 16 training examples are longer than max_length={limit}" in caplog.text


@pytest.mark.parametrize("packing", ["auto", True])
def test_examples_that_lose_their_answer_are_counted(base_dir, data, tmp_path, caplog, packing):
    """An example whose prompt alone fills max_length has no answer token left after the cut (TRL leaves it
    out of unpacked data; packed, it stays fully masked). banklm counts it (summary + warning), and stops
    with a clear error when no example is left to learn from."""
    import logging

    train, _ = data
    small = train.select(range(16))
    tok = load_tokenizer(base_dir)
    prompt_lengths = [_completion_example(tok, r)[1].count(-100) for r in small.to_list()]
    limit = sorted(prompt_lengths)[len(prompt_lengths) // 2]
    expected = sum(n >= limit for n in prompt_lengths)
    assert 0 < expected < len(prompt_lengths)
    with caplog.at_level(logging.WARNING, logger="banklm"):
        s = train_causal_lm(base_dir, small, None, tmp_path / "t", max_steps=1, batch_size=4, max_length=limit,
                            merge=False, device="cpu", packing=packing)
    assert s["examples_without_answer"] == expected
    assert f"{expected} of 16 training examples lose their whole answer at max_length={limit}" in caplog.text
    with pytest.raises(ValueError, match="no training example is left: all 16"):
        train_causal_lm(base_dir, small, None, tmp_path / "u", max_steps=1, batch_size=4,
                        max_length=min(prompt_lengths), merge=False, device="cpu", packing=packing)


def test_compile_auto_compiles_long_runs_only():
    from banklm.finetune.sft import COMPILE_MIN_SECONDS, COMPILE_MIN_STEPS, wants_compile

    assert wants_compile("auto", COMPILE_MIN_SECONDS, 1) and not wants_compile("auto", COMPILE_MIN_SECONDS - 1, 10**6)
    assert wants_compile("auto", None, COMPILE_MIN_STEPS) and not wants_compile("auto", None, COMPILE_MIN_STEPS - 1)
    assert wants_compile(True, 1, 1) and not wants_compile(False, 10**6, 10**6)
    with pytest.raises(ValueError, match="'auto'"):
        wants_compile("yes", None, 1)


@pytest.mark.slow
@pytest.mark.parametrize("precision,tol", [("no", 1e-4), ("bf16", 2e-2)])
def test_compiled_decoder_layers_train_like_eager(base_dir, data, tmp_path, precision, tol):
    """compile=True: every decoder layer, with banklm's varlen attention inside, runs through inductor (fp32:
    sdpa on the padded examples; bf16: the eager kernel); the losses equal the eager run's within float
    tolerance, and the merged model keeps the eager run's tensor names (nothing of the compiled wrappers)."""
    from safetensors.torch import load_file

    train, _ = data
    kw = dict(method="lora", lr=3e-3, max_steps=3, batch_size=8, max_length=256, lora={"r": 8}, logging_steps=1,
              seed=0, device="cpu", mixed_precision=precision)
    ref = train_causal_lm(base_dir, train, None, tmp_path / "eager", **kw)  # auto: 3 steps are too few to compile
    s = train_causal_lm(base_dir, train, None, tmp_path / "compiled", compile=True, **kw)
    assert ref["compiled"] is None and s["compiled"] == "decoder layers"
    assert s["batch_layout"] == "unpadded" and s["attn_implementation"] == "banklm_varlen"
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), abs=tol)
    a = load_file(str(tmp_path / "eager" / "merged" / "model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "merged" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < tol


def test_compile_is_skipped_with_a_warning_where_inductor_cannot_build(base_dir, monkeypatch, caplog):
    import logging
    import shutil

    from banklm.finetune.sft import compile_decoder_layers

    model = load_model(base_dir, device="cpu")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="banklm"):
        assert compile_decoder_layers(model, "cpu") is None
        assert compile_decoder_layers(model, "mps") is None
    assert "compile: skipped, a C++ compiler (g++) is not available" in caplog.text
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())


# --------------------------------------------------------------------------- the training config object


def test_train_config_checks_its_fields():
    """TrainConfig checks each field where it is built (the bounds the recipe schema also enforces), builds
    the nested LoRA settings from a mapping, and is frozen."""
    import dataclasses

    assert TrainConfig(lora={"r": 8}).lora == LoraSettings(r=8)
    assert dataclasses.replace(TrainConfig(), lr=1e-3).lr == 1e-3
    for bad, match in (({"lr": 0}, "lr must be > 0"), ({"lr": "fast"}, "lr must be a number"),
                       ({"method": "adapter"}, "method must be one of 'lora', 'qlora', 'full'"),
                       ({"packing": "yes"}, "packing must be one of True, False, 'auto'"),
                       ({"lora": {"dropout": 1.0}}, "dropout must be < 1.0"),
                       ({"early_stopping_patience": 2}, "needs eval_steps")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0  # type: ignore[misc]


def test_recipe_train_sections_are_the_config():
    """The recipe's train/cpt/distill.train sections have exactly the config's fields (nested LoRA settings
    included) with its defaults, and build the config from what the file says."""
    import dataclasses

    from banklm.recipe import CptSection, DistillTrain, TrainHyper, validate_recipe

    assert list(TrainHyper.model_fields) == [f.name for f in dataclasses.fields(TrainConfig)]
    lora_section = TrainHyper.model_fields["lora"].annotation
    assert list(lora_section.model_fields) == [f.name for f in dataclasses.fields(LoraSettings)]
    assert TrainHyper().to_config() == TrainConfig()
    assert CptSection().to_config() == DistillTrain().to_config() == TrainConfig(method="full")
    r = validate_recipe({"name": "t", "base": {"path": "/m"},
                         "train": {"lr": 1e-3, "epochs": 3, "lora": {"r": 8, "targets": ["q_proj"]},
                                   "eval_steps": 5, "early_stopping_patience": 2}})
    assert r.train.to_config() == TrainConfig(lr=1e-3, epochs=3, lora=LoraSettings(r=8, targets=["q_proj"]),
                                              eval_steps=5, early_stopping_patience=2)


def test_train_stage_passes_the_recipe_config(monkeypatch, tmp_path):
    """`banklm train` hands train_causal_lm the recipe section's config object itself, the recipe's seed and
    device, resume, and the task-eval records (the first task_eval_samples per task are kept by the trainer)."""
    from banklm.pipeline import RunContext
    from banklm.recipe import validate_recipe
    from banklm.stages import common, training

    records = [dict(r, gold="{}") for r in _records(6, seed=3)]
    monkeypatch.setattr(training, "load_split", lambda *a, **k: Dataset.from_list(records))
    monkeypatch.setattr(common, "load_split", lambda *a, **k: Dataset.from_list(records))
    calls = []
    monkeypatch.setattr(training, "train_causal_lm", lambda *a, **k: calls.append((a, k)) or {})
    recipe = validate_recipe({"name": "t", "seed": 7, "device": "cpu", "base": {"path": str(tmp_path)},
                              "train": {"lr": 1e-3, "max_steps": 9, "task_eval_steps": 3, "lora": {"r": 4}},
                              "eval": {"max_new_tokens": 40}})
    training.run_train(RunContext(recipe, tmp_path / "run"))
    (args, kwargs), = calls
    assert args[4] == recipe.train.to_config() and args[4].lora.r == 4
    assert kwargs["mode"] == "sft" and kwargs["seed"] == 7 and kwargs["device"] == "cpu" and kwargs["resume"]
    assert kwargs["task_eval"] == TaskEval(records, max_new_tokens=40)


def _another(value, kind):
    """A valid value of a config field other than ``value``."""
    import typing

    if typing.get_origin(kind) is typing.Literal:
        return next(c for c in typing.get_args(kind) if c != value)
    if isinstance(value, bool):
        return not value
    if value is None:
        return 1
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    return [str(value), "v_proj"]  # lora targets


def test_fingerprint_changes_with_every_config_field(base_dir):
    """The checkpoint fingerprint is derived from the whole config: changing any field, nested LoRA settings
    included, gives another fingerprint (so a checkpoint of other settings is never resumed)."""
    import dataclasses
    import typing

    from banklm.finetune.checkpoints import training_fingerprint

    ds = Dataset.from_list(_records(4, seed=5))
    base = TrainConfig(eval_steps=5)  # early_stopping_patience may then change too

    def fp(config):
        return training_fingerprint(config, base_dir, ds, None, seed=0, device="cpu")

    seen = {fp(base)}
    variants = []
    for f in dataclasses.fields(TrainConfig):
        kind = typing.get_type_hints(TrainConfig)[f.name]
        if dataclasses.is_dataclass(kind):
            hints = typing.get_type_hints(kind)
            variants += [dataclasses.replace(base, lora=dataclasses.replace(
                base.lora, **{g.name: _another(getattr(base.lora, g.name), hints[g.name])}))
                for g in dataclasses.fields(kind)]
        else:
            variants.append(dataclasses.replace(base, **{f.name: _another(getattr(base, f.name), kind)}))
    assert len(variants) == len(dataclasses.fields(TrainConfig)) - 1 + len(dataclasses.fields(LoraSettings))
    for v in variants:
        seen.add(fp(v))
    assert len(seen) == len(variants) + 1
    assert fp(base) != training_fingerprint(base, base_dir, ds, None, seed=1, device="cpu")


def test_trainer_extras_are_constructor_arguments(base_dir, data):
    """BudgetTrainer takes banklm's extras in its constructor, as TRL's trainers take theirs: the clock, the
    collator (installed even for padding-free packed rows, where TRL refuses a custom one), the grouped
    sampler, the extra logs; the summary's run settings come from the config."""
    from banklm.finetune.callbacks import TrainClock
    from banklm.finetune.sft import make_trainer_classes
    from trl import SFTConfig

    tok = load_tokenizer(base_dir)
    BudgetTrainer, _ = make_trainer_classes()
    clock, logs = TrainClock(60.0, 0.1, "cosine"), {"task_accuracy": 0.5}
    collator = PackedRowsCollator(tok.pad_token_id, flat=True)
    args = SFTConfig(output_dir=str(base_dir.parent / "extras_ck"), packing=True, max_length=256, bf16=False,
                     report_to="none", use_cpu=True, dataloader_pin_memory=False)
    trainer = BudgetTrainer(model=load_model(base_dir, device="cpu"), args=args, processing_class=tok,
                            train_dataset=prepare_sft_dataset(data[0].select(range(16))), clock=clock,
                            collator=collator, grouped=True, sparse_head=False, extra_logs=logs)
    assert trainer.banklm_clock is clock and trainer.data_collator is collator and trainer.banklm_extra_logs is logs
    assert not trainer.banklm_sparse_head and trainer.banklm_grouped
    assert type(trainer._get_train_sampler()).__name__ == "EpochLengthGroupedSampler"
    default = BudgetTrainer(model=load_model(base_dir, device="cpu"), args=args, processing_class=tok,
                            train_dataset=prepare_sft_dataset(data[0].select(range(16))))
    assert default.banklm_clock.budget_s is None and default.banklm_extra_logs == {}


def test_summary_is_derived_from_the_config(lora_run):
    """train_summary.json holds every config field under its recipe name, then what the run did."""
    import dataclasses

    _, s = lora_run
    config = TrainConfig(method="lora", lr=3e-3, max_steps=24, batch_size=8, max_length=256,
                         lora=LoraSettings(r=8, alpha=16), logging_steps=2)
    assert {k: s[k] for k in dataclasses.asdict(config)} == dataclasses.asdict(config)
    assert s["trained_epochs"] > 0 and s["seed"] == 0
