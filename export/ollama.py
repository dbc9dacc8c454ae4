"""Ollama ``Modelfile`` for an exported GGUF, with the chat template translated from Jinja to Go.

Ollama formats prompts with a Go ``text/template`` over ``.Messages``; Hugging Face (and training)
uses the Jinja ``chat_template``. :func:`jinja_to_ollama_template` derives the Go template by
*rendering* the Jinja template with sentinel messages, so whatever the training template writes per
role (ChatML here: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``), the generation prompt and any
fixed prefix end up verbatim in the Go template. It refuses templates that are not a plain
concatenation of per-message blocks (those need a hand-written Go template).

:func:`render_ollama_template` is a small Python renderer of the Go-template subset we emit (range,
if / else if / else, ``eq``, field access, ``{{-``/``-}}`` trimming), used by the tests to check the
Modelfile produces exactly the prompt text the Jinja template produces.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from banklm.finetune.tokenizer import check_chat_template

from banklm.io import atomic_write_text

DEFAULT_STOP_TOKENS = ("<|im_end|>", "<|im_start|>")
_ROLES = ("system", "user", "assistant")
_ROLE_MARK = "\x00ROLE\x00"
_CONTENT_MARK = "\x00CONTENT\x00"


# --------------------------------------------------------------------------------------------------
# Jinja side
# --------------------------------------------------------------------------------------------------


def render_jinja_chat(chat_template: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                      **extra) -> str:
    """Render a HF chat template the way transformers does (sandboxed Jinja, trim/lstrip blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **extra)


def _go_text(s: str) -> str:
    if "{{" in s or "}}" in s:
        # literal braces would need {{ "{{" }}; no chat template we ship contains them
        raise ValueError(f"chat template literal text contains Go template delimiters: {s!r}")
    return s


def _to_go(block: str) -> str:
    out = []
    for p in re.split(f"({re.escape(_ROLE_MARK)}|{re.escape(_CONTENT_MARK)})", block):
        if p == _ROLE_MARK:
            out.append("{{ .Role }}")
        elif p == _CONTENT_MARK:
            out.append("{{ .Content }}")
        elif p:
            out.append(_go_text(p))
    return "".join(out)


def jinja_to_ollama_template(chat_template: str, **extra) -> str:
    """Translate a per-message Jinja chat template into an Ollama Go template.

    The Go template renders ``.Messages`` exactly as the Jinja template does with
    ``add_generation_prompt=True`` (a conversation that ends with a user turn, the Ollama case).
    Raises ``ValueError`` when the Jinja template is not a fixed prefix + one block per message
    (chosen by role) + a generation prompt.
    """

    check_chat_template(chat_template, "Modelfile TEMPLATE")  # refused before rendering (also sandboxed)

    def render(msgs, gen=False):
        return render_jinja_chat(chat_template, msgs, add_generation_prompt=gen, **extra)

    empty = render([])
    gen_prompt = render([], gen=True)[len(empty):] if render([], gen=True).startswith(empty) else None
    if gen_prompt is None:
        raise ValueError("chat template: generation prompt is not appended after the messages")
    blocks: dict[str, str] = {}
    for role in _ROLES:
        msg = {"role": role, "content": _CONTENT_MARK}
        out = render([msg])
        if not out.startswith(empty):
            raise ValueError(f"chat template: a {role} message changes the fixed prefix {empty!r}")
        block = out[len(empty):]
        if block.count(_CONTENT_MARK) != 1:
            raise ValueError(f"chat template: {role} content is not rendered exactly once")
        blocks[role] = block
    # Where does the role name go? Render once with a sentinel role: when that generic block gives
    # every role's block back, one Go block with {{ .Role }} serves all roles.
    generic = render([{"role": _ROLE_MARK, "content": _CONTENT_MARK}])[len(empty):]
    if all(generic.replace(_ROLE_MARK, r) == blocks[r] for r in _ROLES):
        go_blocks = {r: _to_go(generic) for r in _ROLES}
    else:
        go_blocks = {r: _to_go(b) for r, b in blocks.items()}
    # check the concatenation property on a multi-turn conversation before trusting the blocks
    conv = [{"role": r, "content": f"c{i}"} for i, r in enumerate(("system", "user", "assistant", "user"))]
    expect = render(conv, gen=True)
    built = empty + "".join(blocks[m["role"]].replace(_CONTENT_MARK, m["content"]) for m in conv) + gen_prompt
    if built != expect:
        raise ValueError("chat template is not a plain concatenation of per-message blocks; "
                         "write the Ollama TEMPLATE by hand")
    if len(set(go_blocks.values())) == 1:
        body = next(iter(go_blocks.values()))
    else:
        body = "".join(
            ("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{r}" }}}}' + go_blocks[r]
            for i, r in enumerate(_ROLES)
        ) + "{{ end }}"
    return _go_text(empty) + "{{ range .Messages }}" + body + "{{ end }}" + _go_text(gen_prompt)


# --------------------------------------------------------------------------------------------------
# Modelfile
# --------------------------------------------------------------------------------------------------


def _quote(s: str, what: str) -> str:
    if '"""' in s:
        raise ValueError(f"Modelfile {what} contains triple quotes")
    return f'"""{s}"""'


#: the Modelfile's word on answer checking: Ollama constrains output only by a JSON schema (``format``), and a
#: banklm answer is ``键：值；…`` text, not JSON, so the task's answer grammar (``grammar/<task>.gbnf``) cannot
#: be applied there
UNCONSTRAINED_NOTE = (
    "Answers served by Ollama are NOT grammar-constrained: Ollama takes only a JSON schema (format) and the\n"
    "task answers (key: value; ...) are not JSON. Check every answer with the task parser (banklm's\n"
    "Task.parse(text, strict=True), the spec in tasks/<name>.yaml) before use, or serve the GGUF with\n"
    "llama.cpp and the request's grammar (grammar/<task>.gbnf plus the prompt's numbers; docs/export.md).")


def write_modelfile(
    gguf_path: str | os.PathLike,
    chat_template: str,
    out_path: str | os.PathLike,
    system: str | None = None,
    stop_tokens: Sequence[str] = DEFAULT_STOP_TOKENS,
    num_ctx: int = 2048,
    parameters: dict | None = None,
    comments: Sequence[str] = (),
) -> Path:
    """Write an Ollama ``Modelfile`` next to (or pointing at) ``gguf_path``; returns ``out_path``.

    ``FROM`` is relative (``./name.gguf``) when the GGUF sits in the Modelfile's folder, so the pair
    can be copied together to the serving host. ``TEMPLATE`` is the Go translation of
    ``chat_template``; ``stop_tokens`` become ``PARAMETER stop`` lines; ``parameters`` adds more
    ``PARAMETER`` lines (e.g. ``{"temperature": 0}`` for deterministic decisions); ``comments`` are
    ``#`` lines after ``FROM`` (one per line of text), for whoever deploys the file.
    """
    gguf_path, out_path = Path(gguf_path), Path(out_path)
    if gguf_path.resolve().parent == out_path.resolve().parent:
        src = f"./{gguf_path.name}"
    else:
        src = str(gguf_path.resolve())
    lines = [f"FROM {src}", *(f"# {x}".rstrip() for c in comments for x in c.splitlines()),
             f"TEMPLATE {_quote(jinja_to_ollama_template(chat_template), 'TEMPLATE')}"]
    if system:
        lines.append(f"SYSTEM {_quote(system, 'SYSTEM')}")
    for s in stop_tokens:
        if '"' in s:
            raise ValueError(f"stop token with a double quote is not supported: {s!r}")
        lines.append(f'PARAMETER stop "{s}"')
    lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    for k, v in (parameters or {}).items():
        lines.append(f"PARAMETER {k} {v}")
    return atomic_write_text(out_path, "\n".join(lines) + "\n")


def read_modelfile_template(path: str | os.PathLike) -> tuple[str, str | None]:
    """``(TEMPLATE, SYSTEM)`` of a Modelfile written by :func:`write_modelfile`."""
    text = Path(path).read_text(encoding="utf-8")
    tm = re.search(r'^TEMPLATE """(.*?)"""', text, re.S | re.M)
    sm = re.search(r'^SYSTEM """(.*?)"""', text, re.S | re.M)
    if not tm:
        raise ValueError(f"{path}: no TEMPLATE")
    return tm.group(1), (sm.group(1) if sm else None)


# --------------------------------------------------------------------------------------------------
# Go template renderer (subset)
# --------------------------------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokenize_go(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with ``{{-``/``-}}`` whitespace trimming applied."""
    items: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            items.append(("text", text))
        items.append(("action", m.group(2)))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = template[pos:]
    if trim_next:
        text = text.lstrip()
    if text:
        items.append(("text", text))
    return items


def _parse(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int, str | None]:
    nodes: list = []
    while i < len(items):
        kind, val = items[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        head = val.split()[0] if val.split() else ""
        if head in stop or (head == "else" and "else" in stop):
            return nodes, i, val
        if head == "range":
            body, i, end = _parse(items, i + 1, ("end",))
            nodes.append(("range", val[len("range"):].strip(), body))
            i += 1
        elif head == "if":
            branches = []
            cond = val[len("if"):].strip()
            while True:
                body, i, end = _parse(items, i + 1, ("end", "else"))
                branches.append((cond, body))
                if end is None:
                    raise ValueError("unterminated {{ if }}")
                if end.startswith("else if"):
                    cond = end[len("else if"):].strip()
                elif end == "else":
                    cond = None
                else:
                    break
            nodes.append(("if", branches))
            i += 1
        elif head in ("end", "else"):
            raise ValueError(f"unexpected {{{{ {val} }}}}")
        else:
            nodes.append(("expr", val))
            i += 1
    if stop:
        raise ValueError(f"missing {{{{ {stop[0]} }}}}")
    return nodes, i, None


def _value(expr: str, dot, root):
    expr = expr.strip()
    if expr.startswith('"') and expr.endswith('"'):
        return expr[1:-1]
    parts = expr.split()
    if parts[0] == "eq" and len(parts) == 3:
        return _value(parts[1], dot, root) == _value(parts[2], dot, root)
    if parts[0] == "not" and len(parts) == 2:
        return not _value(parts[1], dot, root)
    if expr.startswith("$."):
        return root.get(expr[2:], "")
    if expr == ".":
        return dot
    if expr.startswith("."):
        return (dot if isinstance(dot, dict) else {}).get(expr[1:], "")
    raise ValueError(f"unsupported Go template expression {expr!r}")


def _exec(nodes: list, dot, root, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            v = _value(node[1], dot, root)
            out.append("" if v is None else str(v))
        elif node[0] == "range":
            for item in _value(node[1], dot, root) or []:
                _exec(node[2], item, root, out)
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond is None or _value(cond, dot, root):
                    _exec(body, dot, root, out)
                    break


def render_ollama_template(template: str, messages: Sequence[dict], system: str | None = None) -> str:
    """Render an Ollama Go chat template for ``messages`` as Ollama would.

    Like Ollama, a Modelfile ``system`` prompt is put first in ``.Messages`` as a system message when
    the conversation has none. Supports ``{{ range .Messages }}``, ``{{ if }}`` / ``{{ else if }}`` /
    ``{{ else }}`` / ``{{ end }}``, ``eq``, ``not``, field access (``.Role``, ``.Content``, ``$.System``)
    and ``{{-``/``-}}`` trimming.
    """
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system and not any(m["Role"] == "system" for m in msgs):
        msgs.insert(0, {"Role": "system", "Content": system})
    root = {"Messages": msgs, "System": system or "", "Prompt": "", "Response": ""}
    nodes, _, _ = _parse(_tokenize_go(template), 0, ())
    out: list[str] = []
    _exec(nodes, root, root, out)
    return "".join(out)
