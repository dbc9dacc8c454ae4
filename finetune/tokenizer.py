"""SentencePiece BPE tokenizers for from-scratch bases, and the one place that loads tokenizer folders.

Layout written by :func:`train_tokenizer` (see docs/ARCHITECTURE.md)::

    tokenizer.model            SentencePiece BPE (the source of truth; GGUF export reads it)
    tokenizer_config.json      explicit ``tokenizer_class``, special tokens, ChatML ``chat_template``
    special_tokens_map.json
    chat_template.jinja

Ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3, ``<|im_start|>``=4, ``<|im_end|>``=5, then any
extra user-defined symbols, then learned pieces (byte pieces ``<0x00>``..``<0xFF>`` included).

Design decisions
----------------
* **Identity normalisation** inside the SentencePiece model. The default NFKC rule rewrites
  full-width ``：；，`` to ASCII, which changes the text a Chinese bank user sees; worse, HF, sentencepiece
  and llama.cpp would each have to replay the same precompiled char map. With identity there is no
  char map at all, so the three implementations trivially agree.
* **Full-width digits** (``０``-``９``) are the one rewrite we want (numbers are the facts the models
  reason about, and ``split_digits`` only helps when every digit is one of ten pieces). Instead of a
  char map inside the model we map them in Python with :func:`normalize_text` on the training texts;
  data builders call the same function on the records they write. Encoding un-normalised full-width
  digits is still lossless (they become ordinary pieces or byte-fallback bytes), merely less useful.
* ``add_dummy_prefix=False`` and ``remove_extra_whitespaces=False``: no "▁" is ever inserted at the
  start of a text or after a special token, and spaces/newlines survive a round trip exactly.
* ``tokenizer.eos_token`` is ``<|im_end|>`` so ``generate`` stops at the end of an assistant turn and
  TRL appends/keeps it in the completion labels; ``pad_token`` is ``<pad>`` (id 3), never an EOS, so
  padding masks never hide the trained EOS. ``</s>`` stays in the vocabulary as a document separator.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from banklm.io import atomic_dir, atomic_write_json, atomic_write_text

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_IDS = {UNK: 0, BOS: 1, EOS: 2, PAD: 3, IM_START: 4, IM_END: 5}

#: ChatML (see docs/ARCHITECTURE.md). ``add_generation_prompt`` appends ``<|im_start|>assistant\n``.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- endif -%}"
)

_FULLWIDTH_DIGITS = {0xFF10 + i: ord("0") + i for i in range(10)}

#: tokenizer_class values we know how to build from a SentencePiece ``tokenizer.model``.
_SPM_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def normalize_text(text: str) -> str:
    """Map full-width digits ``０``-``９`` to ASCII; everything else is left untouched (identity)."""
    return text.translate(_FULLWIDTH_DIGITS)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render ``messages`` with :data:`CHAT_TEMPLATE` without needing a tokenizer (pure Python)."""
    out = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        out += f"{IM_START}assistant\n"
    return out


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 2000,
    seed: int = 0,
    user_defined_symbols: Sequence[str] = (),
    *,
    character_coverage: float = 0.9995,
    max_sentence_length: int = 1 << 15,
    num_threads: int | None = None,
) -> Path:
    """Train a SentencePiece BPE tokenizer on ``texts`` and write an HF-loadable folder at ``out_dir``.

    ``vocab_size`` is a ceiling (``hard_vocab_limit=False``): small corpora stop earlier. Texts are
    passed through :func:`normalize_text` first; empty texts are skipped. The folder is written
    atomically and reloads with ``AutoTokenizer.from_pretrained`` (Llama configs) and
    :func:`load_tokenizer` (any config). Returns ``out_dir``.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    extra = [s for s in user_defined_symbols if s not in (IM_START, IM_END)]
    for s in extra:
        if not s or s in SPECIAL_IDS:
            raise ValueError(f"user_defined_symbols: invalid or reserved symbol {s!r}")

    def sentences():
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"train_tokenizer: texts must be str, got {type(t).__name__}")
            t = normalize_text(t)
            if t.strip():
                yield t

    it = sentences()
    first = next(it, None)
    if first is None:
        raise ValueError("train_tokenizer: no non-empty texts to train on")
    stream = itertools.chain([first], it)

    model = io.BytesIO()
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=stream,
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=max_sentence_length,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        user_defined_symbols=[IM_START, IM_END, *extra],
        num_threads=num_threads or min(os.cpu_count() or 1, 8),
        minloglevel=2,
    )
    with atomic_dir(out_dir) as tmp:
        (tmp / "tokenizer.model").write_bytes(model.getvalue())
        write_tokenizer_config(tmp, extra_special=extra)
        # Self-check before publishing the folder: HF must reproduce sentencepiece's ids.
        _self_check(tmp)
    return out_dir


def tokenizer_config_dict(extra_special: Sequence[str] = ()) -> dict:
    """The ``tokenizer_config.json`` content for our SentencePiece folders."""
    added = {}
    for tok, idx in SPECIAL_IDS.items():
        added[str(idx)] = _added_token(tok)
    for i, tok in enumerate(extra_special):
        added[str(6 + i)] = _added_token(tok)
    return {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_prefix_space": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": BOS,
        "eos_token": IM_END,
        "unk_token": UNK,
        "pad_token": PAD,
        "additional_special_tokens": [IM_START, IM_END, *extra_special],
        "added_tokens_decoder": added,
        "model_max_length": 1_000_000,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
        "sp_model_kwargs": {},
        "banklm": {"normalization": "identity + full-width digits to ASCII (finetune.tokenizer.normalize_text)"},
    }


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}


def write_tokenizer_config(folder: str | os.PathLike, extra_special: Sequence[str] | None = None) -> None:
    """(Re)write ``tokenizer_config.json``, ``special_tokens_map.json`` and ``chat_template.jinja``.

    Used after ``save_pretrained`` too: transformers 5 no longer writes ``tokenizer.model`` or
    ``added_tokens_decoder`` faithfully, so model folders get our files back verbatim.
    """
    folder = Path(folder)
    if extra_special is None:
        extra_special = _extra_from_model(folder / "tokenizer.model")
    cfg = tokenizer_config_dict(extra_special)
    atomic_write_json(folder / "tokenizer_config.json", cfg)
    atomic_write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": _added_token(BOS),
            "eos_token": _added_token(IM_END),
            "unk_token": _added_token(UNK),
            "pad_token": _added_token(PAD),
            "additional_special_tokens": [_added_token(t) for t in (IM_START, IM_END, *extra_special)],
        },
    )
    atomic_write_text(folder / "chat_template.jinja", CHAT_TEMPLATE)


def _extra_from_model(model_path: Path) -> list[str]:
    """User-defined symbols after ``<|im_end|>`` (ids 6..), read from the SentencePiece model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    out = []
    for i in range(6, sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.encode(piece) != [i]:
            break
        if not (piece.startswith("<") and piece.endswith(">")):
            break
        out.append(piece)
    return out


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a tokenizer folder's files (whatever layout) into a model folder."""
    import shutil

    src, dst = Path(src), Path(dst)
    names = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json"]
    for n in names:
        if (src / n).is_file():
            shutil.copyfile(src / n, dst / n)


def load_tokenizer(folder: str | os.PathLike):
    """Load the tokenizer of a tokenizer or model folder with an explicit class.

    For our SentencePiece folders (``tokenizer.model`` + ``tokenizer_class: LlamaTokenizer``) the
    class is built directly, bypassing ``AutoTokenizer``'s model-type mapping (transformers 5 forces
    ``Qwen2Tokenizer`` on ``model_type: qwen2`` folders, silently mangling SentencePiece vocabularies).
    Other folders (pretrained bases from elsewhere) use the class their ``tokenizer_config.json`` names,
    falling back to ``AutoTokenizer``.
    """
    import transformers

    folder = Path(folder)
    cfg_path = folder / "tokenizer_config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    if not cfg_path.is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer_config.json / tokenizer.json (not a tokenizer folder)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cls_name = cfg.get("tokenizer_class")
    if (folder / "tokenizer.model").is_file() and cls_name in _SPM_CLASSES:
        tok = transformers.LlamaTokenizer.from_pretrained(str(folder))
    elif cls_name and hasattr(transformers, cls_name):
        tok = getattr(transformers, cls_name).from_pretrained(str(folder))
    else:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if tok.chat_template is None and cls_name in _SPM_CLASSES:
        tok.chat_template = CHAT_TEMPLATE
    check_chat_template(tok.chat_template, folder)
    return tok


class UnsafeTemplate(ValueError):
    """A chat template that reaches for Python internals (a template-injection attempt)."""


def check_chat_template(template, where: str | os.PathLike = "chat template") -> None:
    """Refuse a Jinja chat template that reaches for Python internals; raise :class:`UnsafeTemplate`.

    transformers renders chat templates in jinja2's ``ImmutableSandboxedEnvironment``, which already
    blocks ``''.__class__.__mro__`` and ``cycler.__init__.__globals__`` at render time. This static check
    refuses such templates when a folder is loaded, before training or export, because the template
    also travels on in exported files (GGUF ``tokenizer.chat_template``, the Ollama Modelfile) to
    renderers that may not sandbox. Refused: attributes or names starting with ``_``, string constants
    containing ``__``, the ``attr`` filter, and ``import``/``include``/``extends``. ``template`` may be a
    string, a ``{name: template}`` dict or a list of ``{name, template}`` (tokenizer_config forms).
    """
    from jinja2 import TemplateSyntaxError, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if template is None:
        return
    if isinstance(template, dict):
        items = list(template.values())
    elif isinstance(template, list):
        items = [t.get("template") if isinstance(t, dict) else t for t in template]
    else:
        items = [template]
    env = ImmutableSandboxedEnvironment()
    for text in items:
        if not isinstance(text, str):
            raise UnsafeTemplate(f"{where}: chat template is {type(text).__name__}, expected Jinja text")
        try:
            tree = env.parse(text)
        except TemplateSyntaxError as e:
            raise UnsafeTemplate(f"{where}: chat template is not valid Jinja ({e.message}, line {e.lineno})") from None
        for node in tree.find_all((nodes.Getattr, nodes.Name, nodes.Const, nodes.Filter, nodes.Import,
                                   nodes.FromImport, nodes.Include, nodes.Extends)):
            reason = None
            if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
                reason = f"reads the attribute {node.attr!r}"
            elif isinstance(node, nodes.Name) and node.name.startswith("_"):
                reason = f"uses the name {node.name!r}"
            elif isinstance(node, nodes.Const) and isinstance(node.value, str) and "__" in node.value:
                reason = f"contains the string {node.value[:40]!r}"
            elif isinstance(node, nodes.Filter) and node.name == "attr":
                reason = "uses the attr filter"
            elif isinstance(node, (nodes.Import, nodes.FromImport, nodes.Include, nodes.Extends)):
                reason = f"uses {type(node).__name__.lower()}"
            if reason:
                raise UnsafeTemplate(f"{where}: chat template {reason} (line {node.lineno}): templates may not reach "
                                     "Python internals; refusing it (template injection)")


def spm_processor(folder: str | os.PathLike):
    """The reference ``sentencepiece`` processor of a folder (for parity checks)."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(Path(folder) / "tokenizer.model"))


def _self_check(folder: Path) -> None:
    tok = load_tokenizer(folder)
    sp = spm_processor(folder)
    probe = "结论：拒绝；风险等级：C，理由：月收入 12000 元\n\nAML 3 笔 ok"
    chat = render_chat([{"role": "user", "content": probe}, {"role": "assistant", "content": "通过"}])
    for text in (probe, chat):
        hf = tok.encode(text, add_special_tokens=False)
        ref = sp.encode(text)
        if hf != ref:
            raise RuntimeError(
                f"tokenizer self-check failed: transformers ids differ from sentencepiece for {text!r}:\n"
                f"  hf={hf}\n  sp={ref}"
            )
    for tok_str, idx in SPECIAL_IDS.items():
        if tok.convert_tokens_to_ids(tok_str) != idx or sp.piece_to_id(tok_str) != idx:
            raise RuntimeError(f"tokenizer self-check failed: {tok_str} is not id {idx}")
