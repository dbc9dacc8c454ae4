"""Benchmark what the confidence check and the model-risk evidence add to the eval stage, on a finished run.

    python scripts/bench_eval_evidence.py RUN_DIR [--limit 200] [--validation 300] [--batch-size 100]
                                          [--max-new-tokens 96] [--counterfactual 100] [--json out.json]

In one process, on the run's final model (the distilled student, else the fine-tuned model) and its test split's
first ``--limit`` records per task:

- ``scoring``: the final model scored as the eval stage scores it (constrained decoding), without the check;
- ``scoring_with_confidence``: the same with the confidence check (label scoring of ``--validation`` validation
  records per task and of the test_prevalence split, the operating point fitted and applied);
- ``evidence``: what the stage adds after scoring (``eval/evidence.json``): bootstrap intervals of every model the
  run evaluated, paired tests, segments, confusions, the rule and scikit-learn baselines trained on the train
  split, and counterfactual flip rates by label scoring on ``--counterfactual`` records per task.

Reported: seconds of each, ``confidence_growth_s`` = scoring_with_confidence - scoring (issue 19's budget: 30 s on
the quickstart) and ``evidence_s`` (issue 20's: 30 s). The load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FINAL = (("student", ("distill", "student")), ("sft", ("sft", "merged")))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--validation", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--counterfactual", type=int, default=100)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from banklm.corpora.splits import corpus_splits, load_split

    from banklm.evaluation import evidence as EV
    from banklm.evaluation import metrics as M
    from banklm.evaluation.baselines import baselines
    from banklm.evaluation.counterfactual import flip_rates
    from banklm.evaluation.evaluate import (
        ConfidenceCheck,
        evaluate_model_dir,
        label_decisions,
        load_model_dir,
    )
    from banklm.io import read_jsonl

    run = args.run_dir
    scenario = run / "corpora" / "scenario"
    name, folder = next(((n, run.joinpath(*p)) for n, p in FINAL if run.joinpath(*p).is_dir()), (None, None))
    if folder is None:
        raise SystemExit(f"{run}: no final model folder (distill/student or sft/merged)")
    records = load_split(scenario, "test", limit_per_task=args.limit).to_list()
    have = corpus_splits(scenario)
    check = ConfidenceCheck(
        validation=load_split(scenario, "validation", limit_per_task=args.validation).to_list(),
        test_prevalence=load_split(scenario, "test_prevalence").to_list() if "test_prevalence" in have else [])
    out: dict = {"command": "python scripts/bench_eval_evidence.py " + " ".join(argv if argv is not None
                                                                                else sys.argv[1:]),
                 "model": name, "records": len(records), "validation": len(check.validation),
                 "test_prevalence": len(check.test_prevalence), "loadavg": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        for way, conf in (("scoring", None), ("scoring_with_confidence", check)):
            t0 = time.perf_counter()
            evaluate_model_dir(folder, records, Path(tmp) / way, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, model_name=name, decoding="constrained",
                               confidence=conf)
            out[way] = {"seconds": time.perf_counter() - t0}
            print(f"{way}: {out[way]['seconds']:.1f} s", flush=True)
        t0 = time.perf_counter()
        preds = {p.parent.name: list(read_jsonl(p)) for p in sorted((run / "eval").glob("*/predictions.jsonl"))}
        preds[name] = list(read_jsonl(Path(tmp) / "scoring_with_confidence" / "predictions.jsonl"))
        intervals = {n: EV.task_intervals(p) for n, p in preds.items()}
        pairs = [EV.paired_comparison(preds[name], p, (name, n)) for n, p in preds.items() if n != name]
        t_stats = time.perf_counter()
        train = M.by_task(load_split(scenario, "train").to_list())
        found = {t: baselines(t, train.get(t, []), recs) for t, recs in sorted(M.by_task(records).items())}
        EV.baseline_comparison(preds[name], found)
        t_base = time.perf_counter()
        model, tok = load_model_dir(folder)
        flips = {t: flip_rates(t, recs[: args.counterfactual],
                               lambda rs: label_decisions(model, tok, rs, batch_size=args.batch_size))
                 for t, recs in sorted(M.by_task(records).items())}
        t_end = time.perf_counter()
    out["evidence"] = {"seconds": t_end - t0, "intervals_and_pairs_s": t_stats - t0, "baselines_s": t_base - t_stats,
                       "counterfactual_s": t_end - t_base,
                       "counterfactual_variants": {t: f["n_variants"] for t, f in flips.items()},
                       "models": list(intervals), "pairs": len(pairs)}
    out["confidence_growth_s"] = out["scoring_with_confidence"]["seconds"] - out["scoring"]["seconds"]
    out["evidence_s"] = out["evidence"]["seconds"]
    print(f"confidence check: {out['confidence_growth_s']:+.1f} s; evidence: {out['evidence_s']:.1f} s "
          f"(intervals {out['evidence']['intervals_and_pairs_s']:.1f}, baselines {out['evidence']['baselines_s']:.1f}, "
          f"counterfactual {out['evidence']['counterfactual_s']:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, ensure_ascii=False, indent=2), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
