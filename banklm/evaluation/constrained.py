"""Token masks from GBNF grammars: decoding in which every generated token keeps the answer inside its grammar.

:class:`GrammarMask` steps one grammar per batch row (``banklm.tasks.grammar.answer_grammar``: each request has
its own numbers) over a tokenizer's vocabulary: ``apply(logits)`` sets every token the grammar forbids next to
``-inf`` (torch tensors or numpy arrays, so banklm's own greedy loops on PyTorch and ONNX use it alike),
``advance(token_ids)`` feeds the chosen tokens, ``reset()`` starts over. The model's EOS ids are allowed exactly
when a row's answer is complete. :func:`grammar_logits_processor` wraps a mask for ``model.generate``.

The matcher is llguidance (Rust, no dependencies; it reads GBNF and masks SentencePiece and byte-level BPE
vocabularies): grammars are compiled per request in milliseconds, none of the per-grammar vocabulary
precomputation of xgrammar (which also requires triton). The tokenizer's matcher view takes about a second for a
150k vocabulary and is cached per tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import re
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

__all__ = ["GrammarMask", "GrammarError", "GrammarCache", "PreparedGrammar", "grammar_logits_processor", "check_grammar"]


class GrammarError(ValueError):
    """A grammar the matcher cannot read (its message says where)."""


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: matcher views by (tokenizer fingerprint, vocabulary size, EOS ids): tokenizers loaded from the same files (the
#: models of one run) share one view, so grammars prepared for one model serve the next (:class:`GrammarCache`)
_VIEWS: OrderedDict = OrderedDict()
_MAX_VIEWS = 8


def _fingerprint(tokenizer) -> str:
    """The tokenizer's identity by content (its ``tokenizer.json``), else by object."""
    try:
        return _FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        fp = hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else f"id:{id(tokenizer)}"
    except Exception:  # noqa: BLE001 - a tokenizer that cannot serialise itself is known by object only
        fp = f"id:{id(tokenizer)}"
    try:
        _FINGERPRINTS[tokenizer] = fp
    except TypeError:
        pass
    return fp


def _ll_tokenizer(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    """The matcher's view of an HF tokenizer (cached by the tokenizer's content, vocabulary size and EOS ids)."""
    import llguidance.hf

    key = (_fingerprint(tokenizer), vocab_size, eos_ids)
    if key not in _VIEWS:
        _VIEWS[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids))
        while len(_VIEWS) > _MAX_VIEWS:
            _VIEWS.popitem(last=False)
    _VIEWS.move_to_end(key)
    return _VIEWS[key]


_OPTIONS = "%llguidance {}"
_NO_FORCING = '%llguidance {"no_forcing": true}'


#: a rule of a reason's number alternatives (``k2-n4 ::= "30万元" | "1.2万元"``, banklm.tasks.grammar): the only
#: part of an answer grammar that changes from request to request
_NUMBER_RULE = re.compile(r'^(?P<name>k\d+-n\d+) ::= (?P<body>"[^"\\\n]*"(?: \| "[^"\\\n]*")*)$', re.M)


def _compiled(gbnf: str) -> str:
    """GBNF text -> the matcher's grammar. The conversion costs about 25 ms per request, and requests differ only
    in their number alternatives: those rules are cut out, the rest converted once per shape (cached), and each
    request's literals put back into the converted text (plain literals read alike in both formats)."""
    bodies: list[str] = []

    def cut(m: re.Match) -> str:
        bodies.append(m.group("body"))
        return f'{m.group("name")} ::= "\u2983{len(bodies) - 1}\u2984"'

    template = _NUMBER_RULE.sub(cut, gbnf)
    if not bodies:
        return _converted(gbnf)
    out = _converted(template)
    for j, body in enumerate(bodies):
        mark = f'"\u2983{j}\u2984"'
        if out.count(mark) != 1:  # the converter did not keep the literal as written: convert this one in full
            return _converted(gbnf)
        out = out.replace(mark, body)
    return out


# --------------------------------------------------------------------------------------------------
# GBNF -> Lark for the GBNF banklm writes: llguidance's converter is a Python character-by-character parser (about
# 85 ms for an answer grammar, paid once per grammar shape: a few dozen shapes per task). The GBNF
# ``banklm.tasks.grammar`` writes (one rule per line; literals, classes with ``\xNN`` escapes, rule names, groups,
# ``? * +``) converts here with the same rules and output (tests compare the two texts); anything else goes to
# llguidance's converter.

_TOKEN = re.compile(r'\s+|(?P<lit>"(?:[^"\\\n]|\\["\\\[\]nrt]|\\x[0-9A-Fa-f]{2})*")'
                    r'|(?P<cls>\[(?:[^\]\\\n]|\\["\\\[\]nrt]|\\x[0-9A-Fa-f]{2})*\])'
                    r'|(?P<name>[A-Za-z0-9_-]+)|(?P<op>[()|?*+])')
_RULE = re.compile(r"([A-Za-z0-9_-]+)[ \t]*::=[ \t]*(.*)")


class _Unsupported(Exception):
    """GBNF outside the subset :func:`_fast_lark` reads (llguidance's converter takes it)."""


def _fast_lark(gbnf: str) -> str:
    """``llguidance.gbnf_to_lark`` for banklm's own GBNF: same AST rules (groups simplified, terminal rules found
    by fixpoint, names upper-cased for terminals, ``root`` renamed ``start``), same layout."""
    rules: dict[str, list] = {}  # name -> [node, comment]
    comment = ""
    for line in gbnf.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            comment += "//" + line[1:] + "\n"
            continue
        m = _RULE.fullmatch(line)
        if m is None or m.group(1) in rules:
            raise _Unsupported(line)
        rules[m.group(1)] = [_parse_body(m.group(2)), comment]
        comment = ""
    if "root" not in rules:
        raise _Unsupported("no root")
    # llguidance's fixpoint: a rule is terminal when it is not the root and everything it refers to is terminal
    # (so a rule on a cycle, or reaching one, is not): a depth-first walk with a memo, an unfinished rule reads False
    terminal: dict[str, bool] = {}

    def node_terminal(node) -> bool:
        kind = node[0]
        if kind in ("lit", "cls"):
            return True
        if kind == "ref":
            return rule_terminal(node[1])
        if kind == "rep":
            return node_terminal(node[1][0])
        return all([node_terminal(c) for c in node[1]])

    def rule_terminal(n: str) -> bool:
        if n not in rules:
            raise _Unsupported(n)
        if n not in terminal:
            terminal[n] = False
            terminal[n] = node_terminal(rules[n][0]) and n != "root"  # every reference checked, the root's too
        return terminal[n]

    for n in rules:
        rule_terminal(n)
    names = {}
    for n in rules:
        new = "start" if n == "root" else re.sub(r"([a-z])([A-Z])", r"\1_\2", n.replace("-", "_")).lower()
        names[n] = new.upper() if terminal[n] else new
    if len(set(names.values())) != len(names) or any(v in rules and v != k for k, v in names.items()):
        raise _Unsupported("names collide after renaming")

    def text(node, top: bool = False) -> str:
        kind = node[0]
        if kind == "lit":
            return node[1]
        if kind == "cls":
            return "/" + node[1] + "/"
        if kind == "ref":
            return names[node[1]]
        if kind == "seq":
            return " ".join(text(c) for c in node[1]) if node[1] else '""'
        if kind == "alt":
            parts = [text(c) for c in node[1]]
            return "\n     | ".join(parts) if top else "(" + " | ".join(parts) + ")"
        inner = text(node[1][0])  # repetition: (rep, [node, op])
        if node[1][0][0] in ("seq", "alt"):
            inner = f"({inner})"
        return inner + node[1][1]

    out = "%llguidance {}\n\n"
    prev_nl = True
    for n, (node, cmt) in rules.items():
        r = f"{cmt}{names[n]}: {text(node, top=True)}"
        if not prev_nl and "\n" in r:
            out += "\n"
        out += r + "\n"
        prev_nl = "\n" in r
        if prev_nl:
            out += "\n"
    return out


def _parse_body(body: str):
    tokens = []
    pos = 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if m is None:
            raise _Unsupported(body[pos:pos + 20])
        pos = m.end()
        if m.lastgroup == "lit":
            tokens.append(("lit", m.group("lit")))
        elif m.lastgroup == "cls":
            raw = m.group("cls")[1:-1]
            # llguidance escapes an unescaped / or [ inside a class (its regex syntax)
            inner = re.sub(r'(\\(?:x[0-9A-Fa-f]{2}|.))|([/\[])', lambda t: t.group(1) or "\\" + t.group(2), raw)
            tokens.append(("cls", "[" + inner + "]"))
        elif m.lastgroup == "name":
            tokens.append(("ref", m.group("name")))
        elif m.lastgroup == "op":
            tokens.append(("op", m.group("op")))
    node, at = _alternatives(tokens, 0)
    if at != len(tokens):
        raise _Unsupported(body)
    return node


def _alternatives(tokens, at):
    alts = []
    while True:
        seq = []
        while at < len(tokens) and tokens[at] not in (("op", "|"), ("op", ")")):
            tok = tokens[at]
            if tok == ("op", "("):
                node, at = _alternatives(tokens, at + 1)
                if at >= len(tokens) or tokens[at] != ("op", ")"):
                    raise _Unsupported("unclosed group")
                at += 1
            elif tok[0] == "op":
                raise _Unsupported(tok[1])
            else:
                node, at = tok, at + 1
            if at < len(tokens) and tokens[at][0] == "op" and tokens[at][1] in "?*+":
                node = ("rep", [node, tokens[at][1]])
                at += 1
            seq.append(node)
        alts.append(seq[0] if len(seq) == 1 else ("seq", seq))
        if at < len(tokens) and tokens[at] == ("op", "|"):
            at += 1
            continue
        return (alts[0] if len(alts) == 1 else ("alt", alts)), at


@functools.lru_cache(maxsize=512)
def _converted(gbnf: str) -> str:
    """GBNF text -> the matcher's grammar (the conversion is the costly part: cached by text)."""
    import llguidance

    try:
        grammar = _fast_lark(gbnf)
    except _Unsupported:
        try:
            grammar = llguidance.grammar_from("gbnf", gbnf)
        except ValueError as e:
            raise GrammarError(f"grammar does not parse: {e}") from None
    # every tokenization of the allowed text, as llama.cpp's grammar sampler decodes the same GBNF: llguidance's
    # default admits only the canonical tokens of text the grammar forces (``结论：``), which llama.cpp cannot do
    grammar = grammar.replace(_OPTIONS, _NO_FORCING, 1) if grammar.startswith(_OPTIONS) else grammar
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise GrammarError("grammar is invalid: " + "; ".join(messages))
    return grammar


def check_grammar(gbnf: str) -> None:
    """Raise :class:`GrammarError` when the matcher cannot read ``gbnf``."""
    _compiled(gbnf)


class GrammarCache:
    """Grammars of requests that come again, within one scope (the eval stage scores every model of a run on the
    same records): the grammar text by request, and each grammar's fresh matcher, which a new decoding copies
    (microseconds) instead of building (about 5 ms). At most ``max_matchers`` matchers are kept (about 0.7 MB
    each); further ones are built each time."""

    def __init__(self, max_matchers: int = 1024):
        self.max_matchers = int(max_matchers)
        self.texts: dict = {}
        self._fresh: dict = {}
        self.built = self.copied = 0

    def text(self, key, make) -> str:
        if key not in self.texts:
            self.texts[key] = make()
        return self.texts[key]

    def matcher(self, tok, compiled: str):
        import llguidance

        got = self._fresh.get((id(tok), compiled))
        if got is not None and got[0] is tok:
            self.copied += 1
            return got[1].deep_copy()
        self.built += 1
        m = llguidance.LLMatcher(tok, compiled, log_level=0)
        if len(self._fresh) < self.max_matchers and not m.is_error():
            self._fresh[(id(tok), compiled)] = (tok, m.deep_copy())
        return m


class PreparedGrammar:
    """One request's grammar made ready before decoding: converted and its matcher built (several milliseconds,
    in Rust, which lets other threads run: a worker thread prepares the next batch's grammars while the model
    runs). :class:`GrammarMask` takes it in place of the GBNF text, for the same tokenizer, EOS ids and vocabulary
    size; its matcher serves one decoding, a later reset builds a new one from the text."""

    def __init__(self, tokenizer, gbnf: str, eos_ids: Sequence[int], *, vocab_size: int | None = None,
                 cache: GrammarCache | None = None):
        import llguidance

        self.gbnf = gbnf
        self.compiled = _compiled(gbnf)
        self.tok = _ll_tokenizer(tokenizer, int(vocab_size or len(tokenizer)), tuple(int(e) for e in eos_ids))
        self.matcher = cache.matcher(self.tok, self.compiled) if cache is not None else \
            llguidance.LLMatcher(self.tok, self.compiled, log_level=0)


class GrammarMask:
    """Per-row grammar matchers over a tokenizer's vocabulary, stepped token by token.

    ``grammars``: one GBNF text (or :class:`PreparedGrammar`) for every row, or one text for ``batch`` rows.
    ``eos_ids``: the ids that end a
    generation (allowed once the answer is complete, and the only ids allowed after it). ``vocab_size``: the
    logits' width (default: the tokenizer's length); ids the tokenizer does not have are never allowed.
    """

    def __init__(self, tokenizer, grammars: Sequence[str] | str, eos_ids: Sequence[int], *,
                 vocab_size: int | None = None, batch: int | None = None):
        import llguidance

        if not eos_ids:
            raise ValueError("GrammarMask: eos_ids is empty (a constrained answer could never end)")
        self.vocab_size = int(vocab_size or len(tokenizer))
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self._tok = _ll_tokenizer(tokenizer, self.vocab_size, self.eos_ids)
        self._ll = llguidance
        self._words = (self.vocab_size + 31) // 32
        self.reset(grammars, batch=batch)

    def reset(self, grammars: Sequence[str] | str | None = None, *, batch: int | None = None) -> None:
        """Start every row over (with new ``grammars`` if given)."""
        ready: list = []
        if grammars is not None:
            texts = [grammars] * int(batch or 1) if isinstance(grammars, str) else list(grammars)
            if not texts:
                raise ValueError("GrammarMask: no grammar")
            ready = [t.matcher if isinstance(t, PreparedGrammar) and t.tok is self._tok else None for t in texts]
            for t, m in zip(texts, ready, strict=True):
                if m is not None:
                    t.matcher = None  # a matcher serves one decoding
            self._grammars = [t.compiled if isinstance(t, PreparedGrammar) else _compiled(t) for t in texts]
        self._matchers = [(ready[i] if i < len(ready) else None) or self._ll.LLMatcher(self._tok, g, log_level=0)
                          for i, g in enumerate(self._grammars)]
        for i, m in enumerate(self._matchers):
            if m.is_error():
                raise GrammarError(f"row {i}: {m.get_error()}")
        self._bits = np.zeros((len(self._matchers), self._words), dtype=np.int32)
        self.errors: list[str | None] = [None] * len(self._matchers)
        self._ended = [False] * len(self._matchers)

    @property
    def batch(self) -> int:
        return len(self._matchers)

    @property
    def done(self) -> list[bool]:
        """Per row: an EOS id was taken after a complete answer (or the row failed)."""
        return [e or err is not None for e, err in zip(self._ended, self.errors, strict=True)]

    def _closed(self, i: int) -> bool:
        """Row ``i`` can take nothing but EOS: it ended, failed, or its answer admits no continuation."""
        return self._ended[i] or self.errors[i] is not None or self._matchers[i].is_stopped()

    def accepting(self) -> list[bool]:
        """Per row: the text so far is a complete answer."""
        return [m.is_accepting() for m in self._matchers]

    def allowed(self) -> np.ndarray:
        """``(batch, vocab_size)`` booleans: the tokens each row may take next."""
        closed = [self._closed(i) for i in range(self.batch)]
        # one row after another in this thread: llguidance's parallel executor keeps worker threads spinning that
        # slow the model's own CPU threads down about tenfold (measured on 2 cores)
        for i, m in enumerate(self._matchers):
            if not closed[i]:
                m.unsafe_compute_mask_ptr(self._bits.ctypes.data + i * self._words * 4, self._words * 4)
        out = np.unpackbits(self._bits.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size].astype(bool)
        for i in range(self.batch):
            if closed[i]:
                out[i] = False
                out[i, list(self.eos_ids)] = True
        return out

    def takes(self, row: int, token: int) -> bool:
        """Whether row ``row`` may take ``token`` next (one matcher call, no mask)."""
        if token >= self.vocab_size or token < 0:
            return False
        if self._closed(row):
            return token in self.eos_ids
        m = self._matchers[row]
        if token in self.eos_ids:
            return m.is_accepting()
        return m.validate_tokens([token]) == 1

    def _row_allowed(self, row: int) -> np.ndarray:
        if self._closed(row):
            out = np.zeros(self.vocab_size, dtype=bool)
            out[list(self.eos_ids)] = True
            return out
        self._matchers[row].unsafe_compute_mask_ptr(self._bits.ctypes.data + row * self._words * 4, self._words * 4)
        return np.unpackbits(self._bits[row].view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)

    def choose(self, logits) -> np.ndarray:
        """Greedy under the grammar: per row the highest-scoring allowed token, equal to ``apply(logits).argmax(-1)``
        at a fraction of its cost: a row's unconstrained argmax is checked first (one matcher call) and only a row
        whose argmax the grammar forbids gets its mask computed (most steps of a trained model need none)."""
        x = logits.detach().float().cpu().numpy() if hasattr(logits, "detach") else np.asarray(logits, np.float32)
        if x.ndim != 2 or x.shape[0] != self.batch:
            raise ValueError(f"GrammarMask.choose: logits of shape {tuple(x.shape)} for {self.batch} rows")
        out = x.argmax(-1)
        for i in range(self.batch):
            if not self.takes(i, int(out[i])):
                row = np.full(x.shape[1], -np.inf, dtype=np.float32)
                ok = self._row_allowed(i)
                n = min(x.shape[1], self.vocab_size)
                row[:n] = np.where(ok[:n], x[i, :n], -np.inf)
                out[i] = int(row.argmax())
        return out

    def apply(self, logits):
        """Set the logits of forbidden tokens to ``-inf`` in place (torch ``(batch, V)`` or numpy) and return them.
        Columns beyond ``vocab_size`` (a padded LM head) are forbidden too."""
        ok = self.allowed()
        width = logits.shape[-1]
        if logits.shape[0] != ok.shape[0] or len(logits.shape) != 2:
            raise ValueError(f"GrammarMask.apply: logits of shape {tuple(logits.shape)} for {self.batch} rows")
        n = min(width, self.vocab_size)
        forbid = np.ones((ok.shape[0], width), dtype=bool)
        forbid[:, :n] = ~ok[:, :n]
        if hasattr(logits, "masked_fill_"):
            import torch

            return logits.masked_fill_(torch.from_numpy(forbid).to(logits.device), float("-inf"))
        logits[forbid] = -np.inf
        return logits

    def advance(self, token_ids: Sequence[int]) -> None:
        """Feed each row its chosen token. A finished row ignores its token (padding); a token the grammar
        forbids (only possible when the mask was not applied) fails that row: its reason is in ``errors``."""
        ids = [int(t) for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)]
        if len(ids) != self.batch:
            raise ValueError(f"GrammarMask.advance: {len(ids)} tokens for {self.batch} rows")
        for i, (m, t) in enumerate(zip(self._matchers, ids, strict=True)):
            if self._ended[i] or self.errors[i] is not None:
                continue
            if t in self.eos_ids:
                if m.is_accepting() or m.is_stopped():
                    self._ended[i] = True
                else:
                    self.errors[i] = f"EOS (token {t}) before the answer is complete"
            elif m.is_stopped() or not m.consume_token(t):
                self.errors[i] = m.get_error() or f"token {t} after the answer is complete"

    def force(self, row: int, token_ids: Sequence[int]) -> None:
        """Feed row ``row`` tokens chosen before decoding (a forced answer prefix, e.g. scored labels); raise
        :class:`GrammarError` when its grammar does not take them (the caller's prefix is outside the grammar)."""
        m = self._matchers[row]
        for t in token_ids:
            if m.is_stopped() or not m.consume_token(int(t)):
                raise GrammarError(f"row {row}: the forced prefix leaves the grammar at token {int(t)}: "
                                   f"{m.get_error() or 'the answer is already complete'}")


def grammar_logits_processor(mask: GrammarMask, greedy: bool = False):
    """A ``transformers`` logits processor applying ``mask`` in ``model.generate``: each call after the first feeds
    the previous step's tokens (the last column of ``input_ids``), then masks the scores (any decoding), or, with
    ``greedy``, leaves only the token :meth:`GrammarMask.choose` picks (the same tokens, far fewer masks: greedy
    decoding only). Reset the mask before reusing it for another ``generate`` call."""
    from transformers import LogitsProcessor

    class GrammarLogitsProcessor(LogitsProcessor):
        def __init__(self):
            self.mask = mask
            self._width: int | None = None

        def __call__(self, input_ids, scores):
            if self._width is None:
                self._width = input_ids.shape[1]
            elif input_ids.shape[1] > self._width:
                self.mask.advance(input_ids[:, -1].tolist())
                self._width = input_ids.shape[1]
            if not greedy:
                return self.mask.apply(scores)
            import torch

            pick = torch.as_tensor(self.mask.choose(scores), device=scores.device).long()
            only = torch.full_like(scores, float("-inf"))
            return only.scatter_(1, pick[:, None], 0.0)

    return GrammarLogitsProcessor()
