"""Run by tests/test_sft.py under ``torchrun --nproc_per_node 2``: train_causal_lm calls in one process group.

Usage: ddp_worker.py BASE_DIR TRAIN.jsonl RUNS_JSON REPORT_DIR   (RUNS_JSON: [[out_dir, kwargs], ...])
Writes REPORT_DIR/rank<r>.jsonl, one JSON line per run: a file per rank, because two ranks printing to one
pipe can interleave their lines.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from banklm.finetune.sft import train_causal_lm  # noqa: E402
from datasets import Dataset  # noqa: E402


def main() -> None:
    base, train_path, runs, report_dir = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    with open(train_path, encoding="utf-8") as fh:
        train = Dataset.from_list([json.loads(line) for line in fh])
    rank = int(os.environ.get("RANK", "0"))
    for out, kwargs in runs:
        s = train_causal_lm(base, train, None, out, **kwargs)
        report = {"out": out, **{k: s[k] for k in ("steps", "final_loss", "world_size", "stopped_by")}}
        with open(os.path.join(report_dir, f"rank{rank}.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
