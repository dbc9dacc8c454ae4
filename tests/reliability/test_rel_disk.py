"""Disk full, read-only output folders and missing permissions: one clear error naming the path, and nothing
reported as done (no ledger entry for the stage, no output under its final name, no temporary left)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from banklm.cli import main
from tests.reliability.relutil import (
    in_private_mount,
    ledger_stages,
    temp_leftovers,
    tiny_recipe,
    unshare_prefix,
)

CORPUS_ONLY = {"train": {"enabled": False}, "eval": {"enabled": False}, "export": {"gguf": {"enabled": False}},
               "report": {"enabled": False}}


def _recipe(tmp_path: Path) -> Path:
    return tiny_recipe(tmp_path / "r.yaml", **CORPUS_ONLY)


def _assert_nothing_done(run_dir: Path) -> None:
    assert ledger_stages(run_dir) == []
    assert not (run_dir / "corpora" / "scenario").exists()
    if run_dir.exists():
        assert temp_leftovers(run_dir) == []


def _disk_full_under(monkeypatch, folder: Path) -> None:
    """fsync of any file under ``folder`` fails with ENOSPC (Linux: the fd's path from /proc/self/fd)."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_mid_stage_names_the_path_and_records_nothing(tmp_path, capsys, monkeypatch):
    """ENOSPC surfaces at write or fsync; every banklm output is fsynced before it is renamed into place."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        _disk_full_under(m, run_dir / "corpora")
        rc = main(["corpus", "build", str(_recipe(tmp_path)), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1
    assert err.startswith("banklm: error: stage 'corpus' failed: ") and "No space left on device" in err
    assert str(run_dir / "corpora" / "scenario") in err  # the path that could not be written
    _assert_nothing_done(run_dir)
    # before any stage (the resolved recipe is written first): the same one line naming the file
    with monkeypatch.context() as m:
        _disk_full_under(m, run_dir)
        rc = main(["corpus", "build", str(_recipe(tmp_path)), "--run-dir", str(run_dir)])
    assert rc == 1 and capsys.readouterr().err.strip().splitlines() == [
        f"banklm: error: {run_dir / 'recipe.yaml'}: No space left on device"]
    _assert_nothing_done(run_dir)
    # with space again, the same command completes in the same folder
    assert main(["corpus", "build", str(_recipe(tmp_path)), "--run-dir", str(run_dir)]) == 0
    assert ledger_stages(run_dir) == [("corpus", "done")] and temp_leftovers(run_dir) == []


needs_mounts = pytest.mark.skipif(unshare_prefix() is None, reason="no private mount namespace here (unshare): the "
                                  "in-process disk-full and permission tests cover the code paths")


@needs_mounts
def test_real_full_filesystem(tmp_path):
    """A 64 KiB tmpfs in a private mount namespace: the real kernel error, end to end."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = in_private_mount(f"mount -t tmpfs -o size=64k tmpfs {disk}",
                           ["corpus", "build", _recipe(tmp_path), "--run-dir", disk / "run"], cwd=tmp_path)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1, out.stderr[-2000:]
    assert last.startswith("banklm: error: stage 'corpus' failed: ") and "No space left on device" in last
    assert str(disk / "run") in last


@needs_mounts
def test_read_only_run_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = in_private_mount(f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}",
                           ["corpus", "build", _recipe(tmp_path), "--run-dir", ro / "run"], cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"banklm: error: --run-dir {ro / 'run'}: cannot write here (Read-only file system)"]
    # an existing run folder that became read-only: refused the same way, its files untouched
    assert main(["corpus", "build", str(_recipe(tmp_path)), "--run-dir", str(ro / "run")]) == 0
    before = (ro / "run" / "ledger.jsonl").read_bytes()
    out = in_private_mount(f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}",
                           ["corpus", "build", _recipe(tmp_path), "corpora.scenario.synth.aml.train=41",
                            "--run-dir", ro / "run"], cwd=tmp_path)
    assert out.returncode == 2 and "cannot write here (Read-only file system)" in out.stderr
    assert (ro / "run" / "ledger.jsonl").read_bytes() == before


def test_run_folder_without_write_permission(tmp_path, capsys, monkeypatch):
    """chmod for ordinary users; as root (chmod does not stop root) the kernel's EACCES is simulated."""
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() == 0:
        real_mkdir = Path.mkdir

        def denied(self, *a, **k):
            if self == parent / "run":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", denied)
    else:
        parent.chmod(0o555)
    try:
        rc = main(["corpus", "build", str(_recipe(tmp_path)), "--run-dir", str(parent / "run")])
    finally:
        parent.chmod(0o755)
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"banklm: error: --run-dir {parent / 'run'}: cannot write here (Permission denied)"]
    assert not (parent / "run").exists()


def test_unreadable_source_file_is_quarantined_with_the_reason(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in" / "docs"
    src.mkdir(parents=True)
    text = "本行对个人经营性贷款实行贷前调查、贷时审查和贷后检查制度，客户经理应当如实记录调查情况。"
    for name in ("a.jsonl", "secret.jsonl"):
        (src / name).write_text("".join(json.dumps({"text": f"{name}{i}{text}"}, ensure_ascii=False) + "\n"
                                        for i in range(4)), encoding="utf-8")
    secret = src / "secret.jsonl"
    if os.geteuid() == 0:  # root reads anything: simulate what access(2) says for an ordinary user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == secret else real_access(p, mode, **k))
    else:
        secret.chmod(0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nbase: {{path: /m}}\ncorpora:\n  root: {tmp_path / 'in'}\n  vertical:\n"
                      "    sources: [{path: docs}]\n    steps: [normalize]\n", encoding="utf-8")
    try:
        rc = main(["corpus", "build", str(recipe), "--run-dir", str(tmp_path / "run")])
    finally:
        secret.chmod(0o644)
    assert rc == 0, capsys.readouterr().err
    q = [json.loads(x) for x in (tmp_path / "run" / "corpora" / "vertical" / "quarantine.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert q == [{"stage": "read", "file": str(secret), "line": 0, "reason": "unreadable_file: permission denied"}]
    entry = json.loads((tmp_path / "run" / "ledger.jsonl").read_text(encoding="utf-8"))
    assert [Path(i["path"]).name for i in entry["inputs"]] == ["a.jsonl"]


def test_unwritable_output_outside_a_stage_is_one_line(tmp_path, capsys, tiny_model):
    """``banklm eval --model DIR --out PATH`` writes outside any run folder: an OSError is one line naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    rc = main(["eval", "--model", str(tiny_model), "--tasks", "credit", "--limit", "1", "--max-new-tokens", "4",
               "--out", str(blocker / "eval")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("banklm: error: ") and str(blocker) in err[0], err
