"""Two banklm processes on one run folder: the second refuses with a clear message; a lock left by a killed
process (or naming a pid the OS has since reused) never blocks the next run."""

from __future__ import annotations

import os
import signal
import time

from banklm.cli import main
from tests.reliability.relutil import banklm, banklm_frozen_at, ledger_stages, temp_leftovers, tiny_recipe

CORPUS_ONLY = {"train": {"enabled": False}, "eval": {"enabled": False}, "export": {"gguf": {"enabled": False}},
               "report": {"enabled": False}}


def _wait_for(predicate, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.2)


def test_second_process_refuses_then_a_killed_holder_does_not_block(tmp_path):
    recipe = tiny_recipe(tmp_path / "r.yaml", **CORPUS_ONLY)
    run_dir = tmp_path / "run"
    # the first process holds the lock, frozen in the middle of writing the corpus
    first = banklm_frozen_at("banklm.corpora.build:_save", "after", 1, "corpus", "build", recipe, "--run-dir", run_dir,
                             cwd=tmp_path)
    try:
        _wait_for(lambda: any(p.name.startswith(".scenario.tmp-") for p in (run_dir / "corpora").glob(".*"))
                  if (run_dir / "corpora").is_dir() else False)
        assert first.poll() is None
        second = banklm("corpus", "build", recipe, "--run-dir", run_dir, cwd=tmp_path)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == (
            f"banklm: error: {run_dir}: another banklm process (pid {first.pid}) is using this run folder; wait "
            "for it or choose another --run-dir")
        assert ledger_stages(run_dir) == []  # the second one wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # the kernel dropped the dead process's lock: the next run takes the folder, cleans up and completes
    assert (run_dir / ".lock").exists()
    third = banklm("corpus", "build", recipe, "--run-dir", run_dir, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    assert ledger_stages(run_dir) == [("corpus", "done")]
    assert temp_leftovers(run_dir) == [] and not (run_dir / ".lock").exists()
    assert banklm("verify", run_dir, cwd=tmp_path).returncode == 0


def test_lock_naming_a_live_but_unrelated_pid_does_not_block(tmp_path, capsys):
    """A crashed run's lock file whose pid now belongs to another process (pids are reused) is no lock."""
    recipe = tiny_recipe(tmp_path / "r.yaml", **CORPUS_ONLY)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(str(os.getppid()), encoding="utf-8")  # alive, and not a banklm run
    assert main(["corpus", "build", str(recipe), "--run-dir", str(run_dir)]) == 0, capsys.readouterr().err
    assert ledger_stages(run_dir) == [("corpus", "done")]
