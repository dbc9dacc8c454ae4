"""Chat templates that reach Python internals: refused when a folder is loaded (training, evaluation, export) and
never written into GGUF metadata or an Ollama Modelfile; transformers' own rendering is sandboxed too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from banklm.finetune.tokenizer import CHAT_TEMPLATE, UnsafeTemplate, check_chat_template, load_tokenizer

from banklm.cli import main
from tests.reliability.relutil import base_path_recipe

PAYLOADS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch {marker}') }}",
    "{{ ''|attr('__class__') }}",
    "{% for m in messages %}{{ m['__class__'] }}{% endfor %}",
    "{% import 'os' as os %}{{ os }}",
]
# real-world templates must still pass: ChatML and a Qwen2.5/3-style template with namespaces and string methods
QWEN_LIKE = (
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and not message.content.startswith('<tool_response>') %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content.split('</think>')[-1].lstrip('\\n') + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _payloads(tmp_path: Path) -> list[str]:
    return [p.replace("{marker}", str(tmp_path / "PWNED")) for p in PAYLOADS]


def test_static_check_refuses_payloads_and_keeps_real_templates(tmp_path):
    check_chat_template(CHAT_TEMPLATE)
    check_chat_template(QWEN_LIKE)
    check_chat_template([{"name": "default", "template": CHAT_TEMPLATE}])
    for payload in _payloads(tmp_path):
        with pytest.raises(UnsafeTemplate, match="template injection|not valid Jinja"):
            check_chat_template(payload, "m")
        with pytest.raises(UnsafeTemplate):
            check_chat_template({"default": CHAT_TEMPLATE, "tool_use": payload}, "m")


def test_transformers_renders_chat_templates_in_a_sandbox(tiny_model, tmp_path):
    """Even past banklm's check (set on the object directly), apply_chat_template cannot reach os."""
    from jinja2.exceptions import SecurityError

    tok = load_tokenizer(tiny_model)
    for payload in _payloads(tmp_path)[:4]:
        tok.chat_template = payload
        with pytest.raises(SecurityError):
            tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert not (tmp_path / "PWNED").exists()


def _poisoned(tiny_model: Path, dst: Path, payload: str) -> Path:
    shutil.copytree(tiny_model, dst)
    (dst / "chat_template.jinja").write_text(payload, encoding="utf-8")
    cfg = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = payload
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dst


def test_poisoned_base_is_refused_before_training(tiny_model, tmp_path, capsys):
    folder = _poisoned(tiny_model, tmp_path / "model", _payloads(tmp_path)[1])
    with pytest.raises(UnsafeTemplate, match="__globals__"):
        load_tokenizer(folder)  # every stage loads tokenizers through this one function
    rc = main(["run", str(base_path_recipe(tmp_path / "r.yaml", folder)), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "base.path" in err[0] and "template injection" in err[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "PWNED").exists()


def test_export_never_writes_a_poisoned_template(tiny_model, tmp_path):
    from banklm.export.gguf import export_gguf
    from banklm.export.ollama import write_modelfile

    folder = _poisoned(tiny_model, tmp_path / "model", _payloads(tmp_path)[2])
    with pytest.raises(UnsafeTemplate, match="__globals__"):
        export_gguf(folder, tmp_path / "gguf", quant=("f16",))
    assert not list((tmp_path / "gguf").glob("*.gguf"))  # (a missing folder globs to nothing)
    for payload in _payloads(tmp_path):
        with pytest.raises(UnsafeTemplate):
            write_modelfile("m.gguf", payload, tmp_path / "Modelfile")
    assert not (tmp_path / "Modelfile").exists() and not (tmp_path / "PWNED").exists()
    # the clean folder still exports, with its template in the GGUF metadata
    import gguf

    (f16,) = export_gguf(tiny_model, tmp_path / "clean", quant=("f16",))
    field = gguf.GGUFReader(f16).get_field("tokenizer.chat_template")
    assert bytes(field.parts[field.data[0]]).decode("utf-8") == CHAT_TEMPLATE


def test_onnx_export_never_ships_a_poisoned_template(tiny_model, tmp_path):
    """The ONNX folders carry ``chat_template.jinja`` and ``tokenizer_config.json`` to runtimes that render the
    template (onnxruntime-genai, optimum): a poisoned template in either file is refused, naming the file,
    before anything is written; the int8 quantizer, which copies an fp32 folder's side files, refuses too."""
    pytest.importorskip("onnxruntime")
    from banklm.export.onnx import export_onnx, quantize_int8

    payload = _payloads(tmp_path)[1]
    folder = _poisoned(tiny_model, tmp_path / "model", payload)
    with pytest.raises(UnsafeTemplate, match=r"chat_template\.jinja: chat template .*__globals__"):
        export_onnx(folder, tmp_path / "onnx", quant=("fp32", "int8"))
    assert not (tmp_path / "onnx").exists()
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")  # only the config is poisoned now
    with pytest.raises(UnsafeTemplate, match=r"tokenizer_config\.json: chat template .*__globals__"):
        export_onnx(folder, tmp_path / "onnx", quant=("int8",))
    assert not (tmp_path / "onnx").exists()
    # a clean folder exports with its template; a poisoned copy of that fp32 folder is not quantized
    (fp32,) = export_onnx(tiny_model, tmp_path / "clean", quant=("fp32",))
    assert (fp32 / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    bad_fp32 = tmp_path / "bad_fp32"
    shutil.copytree(fp32, bad_fp32)
    (bad_fp32 / "chat_template.jinja").write_text(payload, encoding="utf-8")
    with pytest.raises(UnsafeTemplate, match=r"chat_template\.jinja: chat template .*__globals__"):
        quantize_int8(bad_fp32, tmp_path / "int8")
    assert not (tmp_path / "int8").exists() and not (tmp_path / "PWNED").exists()
