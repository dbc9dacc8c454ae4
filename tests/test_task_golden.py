"""The built-in tasks reproduce their golden records exactly: fields, prompt, the full gold answer, the rule branch.

``tests/data/task_golden/<task>.jsonl.gz`` was written at commit a3d5591 (before the tasks became YAML specs)
by ``generate_records(task, 5000, seed=20261207, split="golden")`` plus 5,000 more at ``split="golden-hard",
difficulty=0.9`` (values near the thresholds). Any change to a task's sampler, rules, wording or answer text
shows here, record by record.
"""

from __future__ import annotations

import gzip
import json

import pytest
from banklm.corpora.synth import generate_records

from tests.helpers import REPO

GOLDEN = REPO / "tests" / "data" / "task_golden"


@pytest.mark.parametrize("task", ["credit", "aml", "audit"])
def test_generated_records_equal_the_golden_file(task):
    with gzip.open(GOLDEN / f"{task}.jsonl.gz", "rt", encoding="utf-8") as fh:
        golden = [json.loads(line) for line in fh]
    now = (generate_records(task, 5000, seed=20261207, split="golden", difficulty=0.0)
           + generate_records(task, 5000, seed=20261207, split="golden-hard", difficulty=0.9))
    assert len(now) == len(golden) == 10000
    for want, got in zip(golden, now, strict=True):
        assert got.pop("target") == "answer"  # added after the golden files: the whole answer is the target
        assert got == want, f"{want['id']} differs"
    assert {json.loads(r["meta"])["branch"] for r in golden} == {json.loads(r["meta"])["branch"] for r in now}
