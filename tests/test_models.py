"""finetune.models: device/dtype choice, tiny model building, safe loading, quantized loading."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from banklm.finetune.models import (  # noqa: E402
    ModelFolderError,
    build_tiny_model,
    count_parameters,
    load_model,
    load_model_and_tokenizer,
    pick_attn_implementation,
    pick_device,
    pick_dtype,
    resolve_dtype,
)
from banklm.finetune.tokenizer import load_tokenizer, render_chat, spm_processor, train_tokenizer  # noqa: E402

_WORDS = "借款人 月收入 元 负债 比率 结论 通过 拒绝 人工复核 风险等级 理由 逾期 现金 存款 交易 审计 客户 账户".split()


def _corpus(n=800, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        facts = "，".join(f"{rng.choice(_WORDS)}{rng.randint(0, 9999)}" for _ in range(5))
        out.append(render_chat([{"role": "user", "content": facts},
                                {"role": "assistant", "content": f"结论：{rng.choice(['通过', '拒绝'])}"}]))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_tokenizer(_corpus(), tmp_path_factory.mktemp("mtok") / "tokenizer", vocab_size=1000)


def test_pick_device_dtype():
    assert pick_device("cpu") == "cpu"
    dev = pick_device("auto")
    assert dev in ("cpu", "cuda", "mps")
    assert pick_dtype("cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert pick_attn_implementation("cpu") == "sdpa"
    with pytest.raises(ValueError):
        pick_device("tpu")
    with pytest.raises(ValueError):
        resolve_dtype("int3", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            pick_device("cuda")


@pytest.mark.parametrize("arch,kv", [("llama", 4), ("qwen2", 2)])
def test_build_and_load_tiny(tok_dir, tmp_path, arch, kv):
    out = build_tiny_model(arch, tok_dir, tmp_path / arch, hidden_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=kv, intermediate_size=128, seed=3)
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
            "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not any(n.endswith(".bin") for n in names)
    cfg = json.loads((out / "config.json").read_text())
    tok = load_tokenizer(out)
    assert cfg["model_type"] == arch and cfg["vocab_size"] == len(tok)
    assert cfg["num_key_value_heads"] == kv and cfg["tie_word_embeddings"] is True
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [5, 2] and gen["pad_token_id"] == 3

    model, tok2 = load_model_and_tokenizer(out, device="cpu")
    assert model.dtype == torch.float32 and not model.training
    # the tokenizer of a qwen2 folder is still our SentencePiece tokenizer
    text = render_chat([{"role": "user", "content": "月收入12000元，负债：3笔"}])
    assert tok2.encode(text, add_special_tokens=False) == spm_processor(out).encode(text)
    # seeded: rebuilding gives identical weights
    out2 = build_tiny_model(arch, tok_dir, tmp_path / (arch + "2"), hidden_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=kv, intermediate_size=128, seed=3)
    m2 = load_model(out2, device="cpu")
    for (n, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    # generation stops at <|im_end|>
    ids = tok2(tok2.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                        add_generation_prompt=True), return_tensors="pt")
    out_ids = model.generate(**ids, max_new_tokens=4)
    assert out_ids.shape[1] <= ids["input_ids"].shape[1] + 4


def test_load_model_errors(tok_dir, tmp_path):
    with pytest.raises(ModelFolderError, match="not found"):
        load_model(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFolderError, match="config.json"):
        load_model(empty)
    src = build_tiny_model("llama", tok_dir, tmp_path / "m", hidden_size=32, num_layers=1, num_heads=2,
                           num_kv_heads=2, intermediate_size=64)
    # pickled weights only -> refused with the reason
    pick = tmp_path / "pickled"
    shutil.copytree(src, pick)
    model = load_model(src, device="cpu")
    (pick / "model.safetensors").unlink()
    torch.save(model.state_dict(), pick / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="pickle"):
        load_model(pick)
    m = load_model(pick, allow_pickle=True)
    assert isinstance(m, torch.nn.Module)
    # no tokenizer
    notok = tmp_path / "notok"
    shutil.copytree(src, notok)
    for n in ("tokenizer.model", "tokenizer_config.json"):
        (notok / n).unlink()
    with pytest.raises(ModelFolderError, match="tokenizer"):
        load_model(notok)
    assert isinstance(load_model(notok, require_tokenizer=False), torch.nn.Module)
    with pytest.raises(ValueError):
        build_tiny_model("gpt2", tok_dir, tmp_path / "x")


def test_quantized_load_cpu(tok_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    src = build_tiny_model("llama", tok_dir, tmp_path / "q", hidden_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=4, intermediate_size=128)
    full = load_model(src, device="cpu")
    q4 = load_model(src, device="cpu", quantization="4bit")
    assert any(p.__class__.__name__ == "Params4bit" for p in q4.parameters())
    ids = torch.tensor([[4, 10, 20, 30, 5]])
    with torch.no_grad():
        a, b = full(ids).logits, q4(ids).logits.float()
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() < 1.0
    assert count_parameters(q4)[1] == count_parameters(full)[1]
    with pytest.raises(ValueError):
        load_model(src, quantization="3bit")
