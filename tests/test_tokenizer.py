"""SentencePiece tokenizer: HF ids == sentencepiece ids, special tokens, reloads, chat template."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from banklm.finetune.tokenizer import (  # noqa: E402
    CHAT_TEMPLATE,
    IM_END,
    IM_START,
    SPECIAL_IDS,
    load_tokenizer,
    normalize_text,
    render_chat,
    spm_processor,
    train_tokenizer,
)

_WORDS = ("借款人 月收入 元 负债 比率 结论 通过 拒绝 人工复核 风险等级 理由 逾期 次数 现金 存款 笔 交易 审计 发现 "
          "客户 账户 贷款 金额 期限 个月 年龄 岁 职业 教师 公务员 个体户 抵押 担保 征信 记录 良好 可疑 拆分 "
          "内部 控制 缺陷 授信 审批 流程 合规").split()


def corpus(n: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        facts = "，".join(f"{rng.choice(_WORDS)}{rng.randint(0, 99999)}{rng.choice(_WORDS)}" for _ in range(5))
        answer = f"结论：{rng.choice(['通过', '拒绝', '人工复核'])}；风险等级：{rng.choice('ABCD')}；理由：{rng.choice(_WORDS)}"
        if rng.random() < 0.5:
            out.append(render_chat([{"role": "user", "content": f"请审查：{facts}。"},
                                    {"role": "assistant", "content": answer}]))
        else:
            out.append(f"{facts}。\n{answer} Loan ratio 0.35 ok  done")
    return out


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    return train_tokenizer(corpus(), tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=2000)


SAMPLES = [
    "借款人月收入12000元，负债比率0.35；结论：拒绝。",
    "结论：人工复核；风险等级：C；理由：逾期次数3次",
    "  leading spaces, double  spaces and trailing ",
    "第一行\n第二行\n\n第三行\t制表",
    "English words mixed 中文 and 数字 2024-11-22 09:30",
    "生僻字：龘靐齉 emoji 🙂 and ‰",
    "▁literal metaspace char▁",
    "",
]


def test_ids_and_special_layout(tok_dir):
    sp = spm_processor(tok_dir)
    tok = load_tokenizer(tok_dir)
    for piece, idx in SPECIAL_IDS.items():
        assert sp.piece_to_id(piece) == idx
        assert tok.convert_tokens_to_ids(piece) == idx
    assert tok.eos_token == IM_END and tok.eos_token_id == 5
    assert tok.pad_token_id == 3 and tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token_id == 1 and tok.unk_token_id == 0
    assert len(tok) == sp.get_piece_size()
    # byte fallback pieces exist, vocab stops below the ceiling on a small corpus (hard_vocab_limit False)
    assert sp.piece_to_id("<0x0A>") > 5
    assert sp.get_piece_size() <= 2000


@pytest.mark.parametrize("text", SAMPLES)
def test_hf_ids_equal_sentencepiece(tok_dir, text):
    sp = spm_processor(tok_dir)
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    # a literal "▁" is SentencePiece's space marker: it decodes to a space in both implementations
    expected = text.replace("▁", " ")
    assert tok.decode(ids) == expected
    assert sp.decode(ids) == expected
    # no BOS/EOS added implicitly
    assert tok(text)["input_ids"] == ids


def test_chat_template_special_tokens_single_ids(tok_dir):
    sp = spm_processor(tok_dir)
    tok = load_tokenizer(tok_dir)
    msgs = [{"role": "user", "content": "借款人月收入12000元，请审批：通过还是拒绝？"},
            {"role": "assistant", "content": "结论：通过；风险等级：A；理由：收入稳定"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == render_chat(msgs)
    assert text.startswith(IM_START + "user\n") and text.endswith(IM_END + "\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text)
    assert ids.count(4) == 2 and ids.count(5) == 2
    pieces = tok.convert_ids_to_tokens(ids)
    for i, p in enumerate(pieces[:-1]):
        if p in (IM_START, IM_END):
            assert not pieces[i + 1].startswith("▁"), pieces
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace(IM_START, "").replace(IM_END, "")
    gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith(IM_START + "assistant\n")
    # special strings inside ordinary text still map to one id each
    assert tok.encode("a<|im_end|>b", add_special_tokens=False) == sp.encode("a<|im_end|>b")


def test_normalize_text_fullwidth_digits():
    assert normalize_text("月收入１２０００元：；，") == "月收入12000元：；，"


def test_fullwidth_punctuation_kept(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "结论：拒绝；理由，负债高"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert "：" in tok.convert_ids_to_tokens(tok.encode("：", add_special_tokens=False))


def test_folder_layout_and_autotokenizer_llama(tok_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig

    names = set(os.listdir(tok_dir))
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"} <= names
    assert not any(n.startswith(".") for n in os.listdir(tok_dir.parent))  # no temp dirs left
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE and cfg["tokenizer_class"] == "LlamaTokenizer"
    # a Llama model folder: AutoTokenizer picks the right class
    import shutil

    model_dir = tmp_path / "llama"
    shutil.copytree(tok_dir, model_dir)
    LlamaConfig(vocab_size=512).save_pretrained(model_dir)
    auto = AutoTokenizer.from_pretrained(model_dir)
    sp = spm_processor(tok_dir)
    for text in SAMPLES:
        assert auto.encode(text, add_special_tokens=False) == sp.encode(text)
    assert auto.eos_token == IM_END and auto.pad_token == "<pad>"


def test_load_tokenizer_qwen2_folder(tok_dir, tmp_path):
    import shutil

    from transformers import Qwen2Config

    model_dir = tmp_path / "qwen2"
    shutil.copytree(tok_dir, model_dir)
    Qwen2Config(vocab_size=512).save_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    sp = spm_processor(tok_dir)
    for text in SAMPLES:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


def test_user_defined_symbols_and_determinism(tmp_path):
    texts = corpus(400, seed=1)
    a = train_tokenizer(texts, tmp_path / "a", vocab_size=800, user_defined_symbols=["<|tool|>"])
    b = train_tokenizer(texts, tmp_path / "b", vocab_size=800, user_defined_symbols=["<|tool|>"])
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    tok = load_tokenizer(a)
    assert tok.convert_tokens_to_ids("<|tool|>") == 6
    assert tok.encode("x<|tool|>y", add_special_tokens=False) == spm_processor(a).encode("x<|tool|>y")


def test_errors(tmp_path):
    with pytest.raises(ValueError):
        train_tokenizer(["", "   "], tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope")
