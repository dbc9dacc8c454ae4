"""What limits the quickstart model? Held-out task accuracy against training steps, per task.

Fine-tunes a run's pre-SFT model (``cpt/merged`` or ``base``) on the run's scenario corpus with
``banklm.finetune.sft.train_causal_lm`` (the quickstart's own code path) and, every ``--eval-every`` steps,
greedy-decodes ``--eval-n`` held-out test prompts per task and scores them with ``banklm.evaluation``
(accuracy and unsupported-number rate). Writes ``curve.jsonl`` and ``curve.png`` to ``--out``.

    python scripts/study_learning_curve.py runs/quickstart/latest --steps 1500 --batch-size 16 \
        --out runs/study/b16

The learning-rate schedule is cosine over ``--steps`` (as the quickstart's); intermediate points are
therefore lower bounds of what a run stopped there would reach (its LR would have decayed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a quickstart run folder (its corpora/scenario and cpt/merged)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, help="start model (default: RUN/cpt/merged, else RUN/base)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--method", default="full")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=150)
    ap.add_argument("--eval-n", type=int, default=60, help="held-out prompts per task at each point")
    ap.add_argument("--tasks", default="credit,aml,audit")
    ap.add_argument("--train-per-task", type=int, default=None, help="cap training records per task")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from banklm.corpora.splits import load_split
    from banklm.finetune.sft import train_causal_lm
    from transformers import TrainerCallback

    from banklm.evaluation.evaluate import _messages, score_records
    from banklm.evaluation.generate import generate

    tasks = args.tasks.split(",")
    scen = args.run / "corpora" / "scenario"
    model_dir = args.model or (args.run / "cpt" / "merged" if (args.run / "cpt" / "merged").is_dir()
                               else args.run / "base")
    train = load_split(scen, "train", tasks, args.train_per_task)
    val = load_split(scen, "validation", tasks)
    test = [dict(r) for r in load_split(scen, "test", tasks, args.eval_n)]
    args.out.mkdir(parents=True, exist_ok=True)
    curve_path = args.out / "curve.jsonl"
    curve_path.unlink(missing_ok=True)
    t_start = time.time()

    class TaskEval(TrainerCallback):
        """Greedy-decode the held-out slice every ``eval_every`` steps and log per-task scores."""

        def __init__(self):
            self.model = self.tokenizer = None
            self.tokens = 0

        def on_step_end(self, a, state, control, model=None, processing_class=None, **kw):
            if state.global_step % args.eval_every and state.global_step != state.max_steps:
                return
            tok = processing_class or kw.get("tokenizer")
            was = model.config.use_cache
            model.config.use_cache = True
            texts = generate(model, tok, _messages(test), max_new_tokens=96, batch_size=100)
            model.config.use_cache = was
            res, _ = score_records(test, list(texts), model_name="curve")
            row = {"step": state.global_step, "seconds": round(time.time() - t_start, 1),
                   "num_tokens": int(getattr(state, "num_input_tokens_seen", 0) or 0),
                   **{f"{t}_acc": res["tasks"][t]["accuracy"] for t in res["tasks"]},
                   **{f"{t}_unsupported": res["tasks"][t]["unsupported_number_rate"]
                      for t in res["tasks"]}}
            with open(curve_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print("CURVE", json.dumps(row), flush=True)
            model.train()

    summary = train_causal_lm(
        model_dir, train, val, args.out / "sft", mode="sft", method=args.method, lr=args.lr,
        max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        callbacks=[TaskEval()], merge=False,
    )
    rows = [json.loads(x) for x in curve_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in tasks:
        ax.plot([r["step"] for r in rows], [r[f"{t}_acc"] for r in rows], marker="o", label=t)
    ax.axhline(0.9, ls="--", c="grey")
    ax.set_xlabel(f"step (batch {args.batch_size} x {args.max_length} packed tokens)")
    ax.set_ylabel("held-out accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "curve.png", dpi=110)
    print(json.dumps({"summary": {k: summary[k] for k in ("steps", "tokens_seen", "seconds", "tokens_per_s")},
                      "last": rows[-1]}, indent=1))


if __name__ == "__main__":
    main()
