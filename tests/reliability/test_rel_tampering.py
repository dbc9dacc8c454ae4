"""Tampering with a finished run is caught by ``banklm verify`` (exit 1, the first problem named). The chain,
file hashes and card cases live in tests/test_ledger.py and tests/test_governance.py; here: the end-to-end
cases on a real run that those do not cover."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.reliability.relutil import banklm


@pytest.fixture
def run_copy(reference_run, tmp_path):
    _, ref = reference_run
    dst = tmp_path / "run"
    shutil.copytree(ref, dst, symlinks=True)
    return dst


def _verify(run_dir):
    out = banklm("verify", run_dir, cwd=run_dir.parent)
    return out.returncode, out.stdout + out.stderr


def test_intact_run_verifies(run_copy):
    rc, text = _verify(run_copy)
    assert rc == 0 and text.startswith("ok: 7 ledger entries"), text


def test_cutting_the_ledger_short_to_hide_an_edit_is_caught(run_copy):
    """Dropping the last entries keeps the hash chain valid; their outputs are then unrecorded, so edits to
    them (here the card's intended use) would pass unseen if verify only checked what the ledger names."""
    ledger = run_copy / "ledger.jsonl"
    lines = ledger.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[-1])["stage"] == "report"
    ledger.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    card = run_copy / "MODEL_CARD.md"
    card.write_text(card.read_text(encoding="utf-8") + "\n本模型可直接用于自动审批。\n", encoding="utf-8")
    rc, text = _verify(run_copy)
    assert rc == 1
    assert "TAMPERED: ledger: MODEL_CARD.md: not recorded by any ledger entry" in text


def test_a_file_slipped_into_an_export_folder_is_caught(run_copy):
    gguf = run_copy / "export" / "gguf"
    shutil.copy(gguf / "tiny-f16.gguf", gguf / "tiny-q4_0.gguf")  # looks like one more quantisation
    rc, text = _verify(run_copy)
    assert rc == 1 and "export/gguf/tiny-q4_0.gguf: not recorded by any ledger entry" in text


def test_swapped_weights_with_a_patched_record_are_caught(run_copy):
    """Replacing the model and patching the sha256 in its ledger entry breaks that entry's hash."""
    from banklm.io import sha256_file

    weights = run_copy / "sft" / "merged" / "model.safetensors"
    old = sha256_file(weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    ledger = run_copy / "ledger.jsonl"
    ledger.write_text(ledger.read_text(encoding="utf-8").replace(old, sha256_file(weights)), encoding="utf-8")
    rc, text = _verify(run_copy)
    assert rc == 1 and text.startswith("TAMPERED: entry 4 (train): content was edited")
