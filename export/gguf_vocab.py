"""The tokenizer side of a GGUF: a Hugging Face tokenizer folder translated into llama.cpp's vocabulary keys.

SentencePiece ``tokenizer.model`` -> ``tokenizer.ggml.model = "llama"`` (pieces, scores, token types);
byte-level BPE ``tokenizer.json`` -> ``"gpt2"`` (byte-encoded vocabulary, merges) with a ``tokenizer.ggml.pre``
derived from its pre-tokenizer regex (:func:`derive_bpe_pre`); special token ids (the ChatML end-of-turn is
EOS and EOT when the chat template uses it), ``add_bos_token`` (false when the chat template renders BOS
itself, :func:`chat_template_renders_bos`) and the training chat template, refused when it reaches Python
internals. :func:`read_tokenizer` returns a :class:`TokenizerData` that ``banklm.export.gguf.write_gguf``
writes into every file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
from banklm.finetune.tokenizer import check_chat_template
from gguf import TokenType

from .ollama import render_jinja_chat

log = logging.getLogger(__name__)

# Known byte-level BPE pre-tokenizer split regexes -> the name llama.cpp knows them by.
# Qwen2 (same as transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_PRE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3 ("llama-bpe" in llama.cpp): digits in groups of up to three.
LLAMA3_PRE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (QWEN2_PRE_REGEX,): "qwen2",
    (LLAMA3_PRE_REGEX,): "llama-bpe",
}

#: Chat special tokens always stored as CONTROL (llama.cpp then parses them only as specials and
#: never prints them; the ChatML end-of-turn is an end-of-generation token).
CHAT_SPECIAL_RE = re.compile(r"^<\|[^|\s]+\|>$")
IM_END = "<|im_end|>"


@dataclass
class TokenizerData:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    chat_template: str | list | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        for fn, val in ((w.add_bos_token_id, self.bos_id), (w.add_eos_token_id, self.eos_id),
                        (w.add_eot_token_id, self.eot_id), (w.add_eom_token_id, self.eom_id),
                        (w.add_unk_token_id, self.unk_id), (w.add_pad_token_id, self.pad_id)):
            if val is not None:
                fn(int(val))
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            w.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def read_tokenizer(folder: str | os.PathLike, n_vocab: int | None = None) -> TokenizerData:
    """Read the tokenizer files of ``folder`` into GGUF form.

    ``tokenizer.model`` (SentencePiece) wins over ``tokenizer.json``; the vocabulary is padded with
    ``[PAD<i>]`` UNUSED entries up to ``n_vocab`` (the embedding rows) when the model is larger.
    """
    folder = Path(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    if (folder / "tokenizer.model").is_file():
        tok = _read_spm(folder, cfg)
    elif (folder / "tokenizer.json").is_file():
        tok = _read_hf_bpe(folder, cfg)
    else:
        raise ValueError(f"{folder}: no tokenizer.model or tokenizer.json (the tokenizer must live in the model folder)")
    n = len(tok.tokens)
    if n_vocab is not None:
        if n > n_vocab:
            raise ValueError(f"{folder}: tokenizer has {n} tokens but the embedding only {n_vocab} rows")
        for i in range(n, n_vocab):
            tok.tokens.append(f"[PAD{i}]")
            tok.types.append(int(TokenType.UNUSED))
            if tok.scores is not None:
                tok.scores.append(-1000.0)
    tok.chat_template = _chat_template(folder, cfg)
    _set_special_ids(tok, cfg, folder)
    bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
    if tok.add_bos and chat_template_renders_bos(tok.chat_template, bos):
        # training tokenized the rendered template without adding specials: its one BOS came from the
        # template, and llama.cpp would put a second one in front of it
        log.info("gguf: %s: the chat template renders the BOS token itself; writing add_bos_token=false",
                 folder)
        tok.add_bos = False
    return tok


def chat_template_renders_bos(template: str | list | dict | None, bos_token: str | None) -> bool:
    """Whether ``template`` (the default one of a named list) starts its output with ``bos_token``, as
    Llama-3 templates do (``{{ bos_token }}...``): llama.cpp must then not add BOS again.

    Rendered (sandboxed, as transformers does) for a one-user-message conversation; raises ``ValueError``
    when the template cannot render that, since the GGUF's readers could not render it either.
    """

    if isinstance(template, dict):
        template = template.get("default")
    elif isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template or not bos_token:
        return False
    try:
        text = render_jinja_chat(template, [{"role": "user", "content": "x"}], add_generation_prompt=True,
                                 bos_token=bos_token, eos_token="", unk_token="", pad_token="")
    except Exception as e:  # noqa: BLE001  (any Jinja error: say which template)
        raise ValueError(f"chat template does not render a one-user-message conversation "
                         f"({type(e).__name__}: {e}); cannot tell whether it emits the BOS token") from e
    return text.startswith(bos_token)


def _chat_template(folder: Path, cfg: dict) -> str | list | None:
    """The folder's chat template; one that reaches Python internals is refused, never written to the GGUF
    (its readers render it, and not all of them sandbox Jinja)."""

    jinja = folder / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else cfg.get("chat_template")
    check_chat_template(template, folder)
    return template


def _special_strings(cfg: dict) -> set[str]:
    """Token strings the tokenizer config declares special."""
    out: set[str] = set()
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out.add(v)
    for key in ("additional_special_tokens", "extra_special_tokens"):
        vals = cfg.get(key) or []
        if isinstance(vals, dict):
            vals = list(vals.values())
        for v in vals:
            out.add(v.get("content") if isinstance(v, dict) else v)
    for v in (cfg.get("added_tokens_decoder") or {}).values():
        if v.get("special"):
            out.add(v["content"])
    return out


def _read_spm(folder: Path, cfg: dict) -> TokenizerData:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = folder / "tokenizer.model"
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM):
        raise ValueError(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} not supported")
    if proto.normalizer_spec.precompiled_charsmap:
        raise ValueError(
            f"{path}: the SentencePiece normalizer has a precompiled char map (e.g. NFKC); llama.cpp's "
            "'llama' tokenizer does not apply it, so GGUF tokenization would differ. Train with "
            "normalization_rule_name='identity'."
        )
    sp = spm.SentencePieceProcessor(model_file=str(path))
    special = _special_strings(cfg)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        tokens.append(piece)
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            t = TokenType.UNKNOWN
        elif sp.is_control(i):
            t = TokenType.CONTROL
        elif sp.is_byte(i):
            t = TokenType.BYTE
        elif sp.is_unused(i):
            t = TokenType.UNUSED
        elif proto.pieces[i].type == pb.ModelProto.SentencePiece.USER_DEFINED:
            t = TokenType.CONTROL if (piece in special or CHAT_SPECIAL_RE.match(piece)) else TokenType.USER_DEFINED
        else:
            t = TokenType.NORMAL
        types.append(int(t))
    ts = proto.trainer_spec
    tok = TokenizerData(
        model="llama", tokens=tokens, types=types, scores=scores,
        bos_id=ts.bos_id if ts.bos_id >= 0 else None,
        eos_id=ts.eos_id if ts.eos_id >= 0 else None,
        unk_id=ts.unk_id if ts.unk_id >= 0 else None,
        pad_id=ts.pad_id if ts.pad_id >= 0 else None,
        add_bos=bool(cfg.get("add_bos_token", True)),  # HF's LlamaTokenizer default is True
        add_eos=bool(cfg.get("add_eos_token", False)),
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
        remove_extra_whitespaces=bool(proto.normalizer_spec.remove_extra_whitespaces),
    )
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def derive_bpe_pre(pre_tokenizer: dict | None, where: str = "tokenizer.json") -> str:
    """Name of the llama.cpp pre-tokenizer matching a ``tokenizer.json`` ``pre_tokenizer`` config.

    Collects the ``Split`` regexes (and checks the ``ByteLevel`` step) and compares them with the
    known Qwen2 / Llama-3 patterns; raises ``ValueError`` when they match none (llama.cpp would
    otherwise refuse the file or, worse, split text differently from training).
    """
    if not pre_tokenizer:
        raise ValueError(f"{where}: byte-level BPE without a pre_tokenizer; cannot name a llama.cpp pre-tokenizer")
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    regexes: list[str] = []
    byte_level = None
    for s in steps:
        if s.get("type") == "Split":
            pat = s.get("pattern") or {}
            if "Regex" not in pat or s.get("invert") or s.get("behavior", "Isolated").lower() != "isolated":
                raise ValueError(f"{where}: unsupported Split pre-tokenizer step {json.dumps(s)[:200]}")
            regexes.append(pat["Regex"])
        elif s.get("type") == "ByteLevel":
            byte_level = s
        else:
            raise ValueError(f"{where}: unsupported pre-tokenizer step {s.get('type')!r}")
    if byte_level is None:
        raise ValueError(f"{where}: pre_tokenizer has no ByteLevel step: not a byte-level BPE tokenizer")
    if byte_level.get("add_prefix_space"):
        raise ValueError(f"{where}: ByteLevel add_prefix_space=true is not supported by llama.cpp's BPE")
    if not regexes and byte_level.get("use_regex", True):
        return "gpt-2"
    if byte_level.get("use_regex", True) and regexes:
        raise ValueError(f"{where}: ByteLevel use_regex=true after a Split regex: unknown combination")
    name = KNOWN_PRE_TOKENIZERS.get(tuple(regexes))
    if name is None:
        raise ValueError(
            f"{where}: unknown pre-tokenizer regex {regexes!r}; known: "
            + "; ".join(f"{v} = {k[0]!r}" for k, v in KNOWN_PRE_TOKENIZERS.items())
        )
    return name


def _read_hf_bpe(folder: Path, cfg: dict) -> TokenizerData:
    path = folder / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model {model.get('type')!r} not supported (byte-level BPE or SentencePiece)")
    pre = derive_bpe_pre(tj.get("pre_tokenizer"), str(path))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens") or []}
    for content, a in added.items():
        vocab[content] = int(a["id"])
    n = max(vocab.values()) + 1
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    alphabet = set(_bytes_to_unicode().values())
    special = _special_strings(cfg)
    tokens, types = [], []
    for i in range(n):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        tokens.append(t)
        if t in added:
            is_special = added[t].get("special") or t in special
            types.append(int(TokenType.CONTROL if is_special else TokenType.USER_DEFINED))
        elif not set(t) <= alphabet:
            raise ValueError(f"{path}: vocabulary token {t!r} (id {i}) is not byte-level encoded")
        else:
            types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return TokenizerData(
        model="gpt2", tokens=tokens, types=types, merges=merges, pre=pre,
        add_bos=bool(cfg.get("add_bos_token", False)), add_eos=bool(cfg.get("add_eos_token", False)),
    )


def _set_special_ids(tok: TokenizerData, cfg: dict, folder: Path) -> None:
    index = {t: i for i, t in enumerate(tok.tokens)}

    def tid(key: str) -> int | None:
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return index.get(v) if isinstance(v, str) else None

    for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("unk_id", "unk_token"),
                      ("pad_id", "pad_token")):
        v = tid(key)
        if v is not None:
            setattr(tok, attr, v)
    # Chat models stop at the end of an assistant turn: EOS (and EOT) = <|im_end|> when the chat
    # template uses it, whatever the tokenizer config calls eos.
    tmpl = tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template or "")
    if IM_END in index and IM_END in tmpl:
        tok.eos_id = index[IM_END]
        tok.eot_id = index[IM_END]
        tok.types[index[IM_END]] = int(TokenType.CONTROL)
    if "<|eot_id|>" in index:
        tok.eot_id = index["<|eot_id|>"]
    if "<|eom_id|>" in index:
        tok.eom_id = index["<|eom_id|>"]
    for attr in ("bos_id", "eos_id", "unk_id", "pad_id"):
        v = getattr(tok, attr)
        if v is not None and tok.types[v] == TokenType.NORMAL:
            tok.types[v] = int(TokenType.CONTROL)


__all__ = ["KNOWN_PRE_TOKENIZERS", "QWEN2_PRE_REGEX", "LLAMA3_PRE_REGEX", "TokenizerData", "read_tokenizer",
           "derive_bpe_pre", "chat_template_renders_bos"]
