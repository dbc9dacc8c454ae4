"""Tiny models, tokenizers and prompts shared by the export tests (GGUF and ONNX)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import transformers
from banklm.export.gguf_vocab import QWEN2_PRE_REGEX
from banklm.finetune.models import build_tiny_model
from banklm.finetune.tokenizer import CHAT_TEMPLATE, load_tokenizer, train_tokenizer

PROMPTS = [
    "<|im_start|>system\n你是银行信贷审批助手。<|im_end|>\n<|im_start|>user\n客户 张三 申请贷款 300000 元，"
    "期限 36 个月，月收入 12000 元。<|im_end|>\n<|im_start|>assistant\n",
    "结论：拒绝；风险等级：C；理由：负债率 65%",
    "AML check:  3 cash deposits of 48,500 within 7 days\n\n龘 😀",
]
CONVERSATION = [
    {"role": "system", "content": "你是银行审计助手。"},
    {"role": "user", "content": "凭证缺失，金额 1500.00 元，如何分类？"},
    {"role": "assistant", "content": "结论：内控缺陷；理由：凭证缺失"},
    {"role": "user", "content": "再说一遍\n谢谢"},
]


def texts(n=1500, seed=0):
    rnd = random.Random(seed)
    base = [
        "结论：拒绝；风险等级：C；理由：月收入 12000 元，负债率 65%。",
        "客户 张三 申请贷款 300000 元，期限 36 个月。",
        "AML: 3 笔现金存款 48000 元 within 7 days, 拆分交易",
        "审计发现：凭证缺失，金额 1500.00 元。内控缺陷",
        "The quick brown fox jumps over the lazy dog.\n",
        "你是银行信贷审批助手。通过 人工复核",
    ]
    return [rnd.choice(base) + " " + str(rnd.randint(0, 99999)) for _ in range(n)]


def sharpen(model_dir: Path, seed: int = 0) -> None:
    """Re-draw weights with a larger spread so attention is far from uniform (a wrong q/k row order
    then changes the logits) and logits have some spread; norms get non-trivial gains."""
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    for f in model_dir.glob("*.safetensors"):
        f.unlink()
    m.save_pretrained(str(model_dir))


def qwen2_style_bpe(folder: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts(seed=3), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
    }))



def spm_tokenizer(folder: Path) -> Path:
    """A ~500-piece SentencePiece BPE tokenizer folder (the quickstart's kind)."""
    return train_tokenizer(texts(), folder, vocab_size=600)


def spm_model(arch: str, tokenizer_dir: Path, folder: Path, tie: bool, seed: int = 1) -> Path:
    """A sharpened 2-layer, hidden-64, 4-head (2 KV heads) Llama or Qwen2 with our SentencePiece tokenizer."""
    d = build_tiny_model(arch, tokenizer_dir, folder, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=tie, seed=seed)
    sharpen(Path(d), seed=seed + 1)
    return Path(d)


def bpe_model(work: Path) -> Path:
    """A sharpened tiny Qwen2 with a Qwen2-style byte-level BPE tokenizer (tokenizer.json)."""
    tokdir = work / "bpe_tok"
    qwen2_style_bpe(tokdir)
    tok = load_tokenizer(tokdir)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    d = work / "m_bpe"
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(d))
    for f in tokdir.iterdir():
        shutil.copy(f, d / f.name)
    sharpen(d, seed=4)
    return d
