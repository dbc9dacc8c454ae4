"""Benchmark the eval pass: constrained decoding against free decoding on the same model and records.

    python scripts/bench_decoding.py --model RUN/sft/merged --data RUN [--limit 200] [--rounds 3]
                                     [--batch-size 100] [--max-new-tokens 96] [--threads N] [--json out.json]

Loads the model once, then runs ``banklm.evaluation.evaluate.evaluate_records`` on the first ``--limit`` test
records per task of ``--data`` (a run folder or a corpus folder, as ``banklm eval --data``) with free decoding
(the baseline) and with constrained decoding (label scoring, then the reason under each request's grammar),
alternating, ``--rounds`` times. Reported per decoding: records per second of the whole pass (median over rounds),
generation seconds, accuracy per task; and ``ratio`` = constrained records/s / free records/s, the median of the
per-round ratios (range in brackets). The load average is recorded with the figures (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a fine-tuned model folder (e.g. RUN/sft/merged)")
    ap.add_argument("--data", required=True, help="a run folder or corpus folder holding the test split")
    ap.add_argument("--limit", type=int, default=200, help="test records per task")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from banklm.corpora.splits import first_per_task, load_split

    from banklm.evaluation.evaluate import evaluate_records, load_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    recs = load_split(data if (data / "data").is_dir() else data / "corpora" / "scenario", "test").to_list()
    records = [recs[i] for i in first_per_task([r["task"] for r in recs], args.limit)]
    model, tokenizer = load_model_dir(args.model)
    runs: dict[str, list[dict]] = {"free": [], "constrained": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for decoding in ("free", "constrained"):
                t0 = time.perf_counter()
                res = evaluate_records(model, tokenizer, records, Path(tmp) / f"{decoding}{r}",
                                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                       decoding=decoding)
                seconds = time.perf_counter() - t0
                runs[decoding].append({
                    "seconds": seconds, "records_per_s": len(records) / seconds,
                    "generation_seconds": res["overall"]["generation_seconds"],
                    "accuracy": {t: v["accuracy"] for t, v in res["tasks"].items()},
                    "unsupported_number_rate": {t: v["unsupported_number_rate"] for t, v in res["tasks"].items()},
                    "format_compliance": {t: v["format_compliance"] for t, v in res["tasks"].items()},
                })
                print(f"round {r} {decoding}: {seconds:.1f} s, {len(records) / seconds:.1f} records/s", flush=True)
    ratios = [c["records_per_s"] / f["records_per_s"] for f, c in zip(runs["free"], runs["constrained"], strict=True)]
    out = {
        "command": "python scripts/bench_decoding.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "records": len(records), "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
        "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
        **{d: {"records_per_s": statistics.median(x["records_per_s"] for x in v),
               "seconds": statistics.median(x["seconds"] for x in v),
               "generation_seconds": statistics.median(x["generation_seconds"] for x in v),
               "accuracy": v[0]["accuracy"], "unsupported_number_rate": v[0]["unsupported_number_rate"],
               "format_compliance": v[0]["format_compliance"]} for d, v in runs.items()},
    }
    print(f"constrained / free records/s: {out['ratio']:.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}); "
          f"free {out['free']['records_per_s']:.1f}, constrained {out['constrained']['records_per_s']:.1f} records/s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
