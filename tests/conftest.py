import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


# The quickstart recipe sized down to about two minutes on CPU (same code path; LoRA so that the
# adapter -> merge -> export path runs end to end). Built once per session by `quickstart_run`.
QUICKSTART_SMALL = [
    "corpora.scenario.synth.credit.train=400", "corpora.scenario.synth.aml.train=400",
    "corpora.scenario.synth.audit.train=400", "corpora.scenario.synth.credit.test=20",
    "corpora.scenario.synth.aml.test=20", "corpora.scenario.synth.audit.test=20",
    "cpt.time_budget_s=15", "train.time_budget_s=20", "eval.limit=20", "tokenizer.vocab_size=1500",
    "train.method=lora", "train.lr=3e-3", "eval.robustness=[distractor]",
    "distill.enabled=false",  # the sft model stays the final one here; distillation: tests/test_distill.py
]


def run_banklm(*args, cwd):
    """The real CLI in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "banklm.cli", *args], capture_output=True, text=True, cwd=cwd)


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


# Test modules import this file's helpers as `banklm_tests_conftest`: the bare name `conftest` is ambiguous
# once tests/reliability/conftest.py is loaded too.
sys.modules["banklm_tests_conftest"] = sys.modules[__name__]
