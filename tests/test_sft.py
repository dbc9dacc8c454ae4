"""finetune.sft / finetune.merge: SFT + CPT through TRL + PEFT on tiny CPU models."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from finetune.merge import merge_adapter  # noqa: E402
from finetune.models import build_tiny_model, load_model  # noqa: E402
from finetune.sft import PackedRowsCollator, prepare_cpt_dataset, prepare_sft_dataset, train_causal_lm  # noqa: E402
from finetune.tokenizer import IM_END, load_tokenizer, render_chat, train_tokenizer  # noqa: E402

LABELS = ("通过", "人工复核", "拒绝")


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


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    texts = [render_chat(r["messages"]) for r in _records(800, seed=99)]
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
                              batch_size=8, max_length=256, lora_r=8, lora_alpha=16, logging_steps=2, seed=0,
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


def test_cpt_full_and_time_budget(base_dir, data, tmp_path):
    train, _ = data
    texts = Dataset.from_list([{"id": r["id"], "text": render_chat(r["messages"])} for r in train])
    tok = load_tokenizer(base_dir)
    prepared = prepare_cpt_dataset(texts.select(range(2)), tok)
    assert prepared[0]["input_ids"][-1] == tok.convert_tokens_to_ids("</s>")
    assert prepared[0]["input_ids"][-2] == tok.convert_tokens_to_ids("\n")
    s = train_causal_lm(base_dir, texts, None, tmp_path / "cpt", mode="cpt", method="full", lr=6e-4,
                        max_steps=10_000, time_budget_s=4, batch_size=8, max_length=256, logging_steps=1,
                        device="cpu")
    assert s["stopped_by"] == "time_budget" and 0 < s["steps"] < 10_000
    assert s["seconds"] < 60
    assert s["trainable_params"] == s["total_params"]
    assert (tmp_path / "cpt" / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "cpt" / "adapter").exists()
    rows = [json.loads(line) for line in (tmp_path / "cpt" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["learning_rate"] for r in rows if "learning_rate" in r]
    assert max(lrs) > lrs[-1]  # the time-based schedule decays before the budget ends
    # the full-FT model reloads and generates
    model = load_model(tmp_path / "cpt" / "merged", device="cpu")
    assert model.config.use_cache is True


def test_full_sft_runs(base_dir, data, tmp_path):
    train, ev = data
    s = train_causal_lm(base_dir, train, ev, tmp_path / "full", method="full", lr=1e-3, max_steps=3,
                        batch_size=8, max_length=256, device="cpu", packing=False)
    assert s["steps"] == 3 and s["method"] == "full" and s["eval_loss"] is not None
    assert (tmp_path / "full" / "merged" / "model.safetensors").is_file()


def test_lora_variants_gradient_checkpointing(base_dir, data, tmp_path):
    """rsLoRA + DoRA + gradient checkpointing + explicit targets train and merge."""
    train, _ = data
    s = train_causal_lm(base_dir, train, None, tmp_path / "v", method="lora", lr=3e-3, max_steps=3, batch_size=8,
                        max_length=256, device="cpu", use_rslora=True, use_dora=True, gradient_checkpointing=True,
                        lora_targets=["q_proj", "v_proj"], mixed_precision="no")
    assert s["steps"] == 3 and s["lora"]["dora"] and s["final_loss"] is not None
    cfg = json.loads((tmp_path / "v" / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["use_dora"] and cfg["use_rslora"]
    assert (tmp_path / "v" / "merged" / "model.safetensors").is_file()


def test_qlora_cpu(base_dir, data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    train, ev = data
    s = train_causal_lm(base_dir, train, None, tmp_path / "q", method="qlora", lr=3e-3, max_steps=4,
                        batch_size=8, max_length=256, lora_r=8, device="cpu")
    assert s["steps"] == 4 and s["method"] == "qlora"
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
