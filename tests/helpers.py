"""What several test modules share: the repository path, the small quickstart, the CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from banklm.runtime import llama_cpp_available

REPO = Path(__file__).resolve().parent.parent

# The quickstart recipe sized down to about two minutes on CPU (same code path; LoRA so that the
# adapter -> merge -> export path runs end to end). Built once per session by `quickstart_run`.
QUICKSTART_SMALL = [
    "corpora.scenario.synth.credit.train=400", "corpora.scenario.synth.aml.train=400",
    "corpora.scenario.synth.audit.train=400", "corpora.scenario.synth.credit.test=20",
    "corpora.scenario.synth.aml.test=20", "corpora.scenario.synth.audit.test=20",
    "corpora.scenario.synth.credit.validation=40", "corpora.scenario.synth.aml.validation=40",
    "corpora.scenario.synth.audit.validation=40", "corpora.scenario.synth.aml.test_prevalence=100",
    "cpt.time_budget_s=15", "train.time_budget_s=20", "eval.limit=20", "tokenizer.vocab_size=1500",
    "train.method=lora", "train.lr=3e-3", "eval.robustness=[distractor]",
    "distill.enabled=false",  # the sft model stays the final one here; distillation: tests/test_distill.py
]


def run_banklm(*args, cwd):
    """The real CLI in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "banklm.cli", *args], capture_output=True, text=True, cwd=cwd)


def require_llama_cpp() -> None:
    """scripts/test.sh installs llama-cpp-python and sets BANKLM_REQUIRE_LLAMACPP=1: there, a missing
    binding fails the llama.cpp tests instead of skipping them."""
    if not llama_cpp_available():
        if os.environ.get("BANKLM_REQUIRE_LLAMACPP") == "1":
            pytest.fail("llama-cpp-python is not installed but BANKLM_REQUIRE_LLAMACPP=1 (pip install 'banklm[llamacpp]')")
        pytest.skip("llama-cpp-python not installed (scripts/test.sh installs it)")
