import json
import os
import subprocess
import sys
import textwrap

import pytest

from banklm.io import atomic_dir, atomic_open, atomic_write_json, read_jsonl


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "out.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [f.name for f in tmp_path.iterdir()] == ["out.json"]


def test_exception_mid_write_keeps_old_content(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old complete content")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as fh:
            fh.write("new partial")
            raise RuntimeError("boom")
    assert p.read_text() == "old complete content"
    assert [f.name for f in tmp_path.iterdir()] == ["out.txt"]


def test_sigkill_mid_write_leaves_no_partial_file(tmp_path):
    """A process killed while writing never leaves a file under the final name."""
    target = tmp_path / "big.bin"
    script = textwrap.dedent(f"""
        import os, signal
        from banklm.io import atomic_open
        with atomic_open({str(target)!r}, "wb") as fh:
            fh.write(b"x" * 1_000_000)
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    assert not target.exists()
    leftovers = [f.name for f in tmp_path.iterdir()]
    assert all(name.startswith(".big.bin.") and name.endswith(".tmp") for name in leftovers)


def test_sigkill_mid_dir_build_leaves_old_dir(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "w").write_text("old")
    script = textwrap.dedent(f"""
        import os, signal
        from banklm.io import atomic_dir
        with atomic_dir({str(target)!r}) as tmp:
            (tmp / "w").write_text("new half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    assert (target / "w").read_text() == "old"


def test_atomic_dir_swaps_in(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(target)) == ["b"]
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.jsonl:3: invalid JSON"):
        list(read_jsonl(p))
    p.write_text('[1]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.jsonl:1: expected a JSON object"):
        list(read_jsonl(p))


def test_atomic_files_get_ordinary_permissions(tmp_path):
    """mkstemp creates 0600 files; outputs (e.g. a GGUF for an Ollama service user) must get open()'s mode."""
    mask = os.umask(0o022)
    try:
        p = atomic_write_json(tmp_path / "x.json", {})
        plain = tmp_path / "plain"
        plain.write_text("x")
        assert (p.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(mask)
