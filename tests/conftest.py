import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from banklm.tasks.registry import registered, unregister
from tests.helpers import QUICKSTART_SMALL, REPO, run_banklm


@pytest.fixture(autouse=True)
def _tasks_registered_by_a_test_are_forgotten():
    """A task spec a test registers (a recipe's tasks, `banklm task check` called in-process) is forgotten after
    it, so the names a later test sees do not depend on test order; module and session fixtures keep theirs."""
    before = set(registered())
    yield
    for name in set(registered()) - before:
        unregister(name)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, repo):
    """``(root, run_dir, completed process)`` of one small quickstart run at ``root/runs/quickstart/r1``,
    shared by every test that needs a full run. Tests must not modify it (copy it first), nor add
    sibling runs next to it (test_quickstart checks which run the second run reuses from)."""
    root = tmp_path_factory.mktemp("qs")
    run_dir = root / "runs" / "quickstart" / "r1"
    out = run_banklm("run", str(repo / "recipes" / "quickstart.yaml"), *QUICKSTART_SMALL, "--run-dir", str(run_dir),
                     cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, run_dir, out
