"""Benchmark the PII step: recall per type, keep rate and MB/s, against the previous version and Presidio.

    python scripts/bench_pii.py --n 1200 [--baseline-commit a3d5591] [--json out.json] [--extras DIR]
                                [--heldout dev [final]]
    python scripts/bench_pii.py --fit-names      # refit the weights of corpora/ops/namescore.py

1. Generates ``--n`` labelled records with ``scripts/make_pii_bench.py`` (which does not import the
   detectors) and loads the held-out hand-written records of ``tests/test_pii.py`` (``HELDOUT``).
   ``--heldout dev final`` also scores ``tests/data/pii_heldout_{dev,final}.jsonl`` (hand-written records in
   styles of their own; ``final`` is for the one score at the end of a change, never for tuning).
2. Scores each detector on every set: a labelled PII span is *caught* when every non-space character of
   it lies inside a detected span (any type: what matters is that the value is gone); a labelled value to
   keep is *kept* when no detected span touches it. Recall per type, overall recall (all PII spans) and
   keep rate (all keep spans).
3. Times each detector on ordinary banking prose (no PII, a few numbers), best of ``--repeat`` runs, in MB/s
   of UTF-8 input, and on the benchmark records themselves.

Detectors:
  ``banklm``     ``banklm.corpora.ops.pii.find_pii`` (the working tree);
  ``baseline``   ``corpora/ops/pii.py`` of ``--baseline-commit`` (default a3d5591, the version before issue 26),
                 loaded from ``git show`` into a temporary module;
  ``+jieba``     banklm plus jieba's person-name tag (``nr``, from the dictionary inside jieba's wheel), to
                 measure whether a statistical segmenter adds recall (only when jieba imports);
  ``presidio``   Presidio's AnalyzerEngine with its own pattern recognizers (e-mail, credit card, phone via
                 ``phonenumbers`` for CN, IBAN, IP, URL ...) on a blank spaCy pipeline, i.e. without an NER
                 model (none can be downloaded here), alone and with banklm's detectors plugged in as a
                 recognizer (only when presidio-analyzer imports).

``--extras DIR`` puts DIR at the end of ``sys.path`` (e.g. a ``pip install --target DIR presidio-analyzer
jieba``) so the comparison packages need not be installed into the project's environment.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "a3d5591"
PROSE = ("本行坚持稳健经营，持续加强对小微企业和个人客户的金融服务，客户经理应当按照规定开展贷前调查、贷时审查和贷后检查，"
         "确保信贷资金用于约定用途。2024年3月15日发放贷款¥12,000.00元，年利率4.35%。"
         "截至2024年末，全行各项存款余额1,234.56亿元，较年初增长8.2%；不良贷款率1.02%，拨备覆盖率286%。"
         "支行应加强对高峰时段柜面业务的分流管理，引导客户通过手机银行和自助设备办理转账、缴费等业务。"
         "风险管理部按季开展压力测试，重点关注房地产、地方政府融资平台和产能过剩行业的信用风险。"
         "The branch completed its annual review of credit files on 15 March 2024; no material findings were raised. ")


# ------------------------------------------------------------------------------------------- loading

def load_module_from_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_baseline(commit: str) -> types.ModuleType:
    """``corpora/ops/pii.py`` at ``commit`` as a module of its own (it imports nothing relative)."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:corpora/ops/pii.py"], check=True,
                         capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="pii_baseline_")) / "pii_baseline.py"
    tmp.write_text(src, encoding="utf-8")
    return load_module_from_file("pii_baseline", tmp)


def load_benchmark(n: int, seed: int) -> list[dict]:
    gen = load_module_from_file("make_pii_bench", REPO / "scripts" / "make_pii_bench.py")
    return gen.generate(n, seed)


HELDOUT_DIR = REPO / "tests" / "data"


def load_heldout_file(name: str) -> list[dict]:
    """``tests/data/pii_heldout_<name>.jsonl``: records with ``text``, ``pii`` and ``keep`` spans."""
    path = HELDOUT_DIR / f"pii_heldout_{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_heldout() -> list[dict]:
    """The hand-written records of ``tests/test_pii.py`` (``HELDOUT``, parsed by ``heldout_records``)."""
    path = REPO / "tests" / "test_pii.py"
    if "def heldout_records" not in path.read_text(encoding="utf-8"):
        return []
    return load_module_from_file("test_pii_heldout", path).heldout_records()


# ------------------------------------------------------------------------------------------- scoring

def covered_mask(length: int, spans) -> bytearray:
    mask = bytearray(length)
    for s, e in spans:
        mask[s:e] = b"\x01" * (e - s)
    return mask


def type_key(label: dict) -> str:
    return "PERSON (romanised)" if label["type"] == "PERSON" and label.get("kind") == "roman" else label["type"]


def score(records: list[dict], detect) -> dict:
    """``detect(text) -> [(start, end)]``; returns caught/total per type, kept/total, and the misses."""
    caught: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    kept = [0, 0]
    over = [0, 0]  # characters replaced outside every PII label / characters outside every PII label
    misses: list[tuple[str, str, str]] = []
    destroyed: list[tuple[str, str, str]] = []
    for rec in records:
        text = rec["text"]
        mask = covered_mask(len(text), detect(text))
        labelled = covered_mask(len(text), [(lab["start"], lab["end"]) for lab in rec["pii"]])
        over[0] += sum(1 for m, lab in zip(mask, labelled, strict=True) if m and not lab)
        over[1] += len(text) - sum(labelled)
        for lab in rec["pii"]:
            ok = all(mask[i] or text[i].isspace() for i in range(lab["start"], lab["end"]))
            c = caught[type_key(lab)]
            c[0] += ok
            c[1] += 1
            if not ok:
                misses.append((type_key(lab), text[lab["start"]:lab["end"]], _context(text, lab)))
        for lab in rec["keep"]:
            ok = not any(mask[lab["start"]:lab["end"]])
            kept[0] += ok
            kept[1] += 1
            if not ok:
                destroyed.append((lab["kind"], text[lab["start"]:lab["end"]], _context(text, lab)))
    total = [sum(v[0] for v in caught.values()), sum(v[1] for v in caught.values())]
    names = [sum(v[0] for k, v in caught.items() if k.startswith("PERSON")),
             sum(v[1] for k, v in caught.items() if k.startswith("PERSON"))]
    return {"per_type": {k: caught[k] for k in sorted(caught)}, "overall": total, "names": names, "keep": kept,
            "over_redaction": over, "misses": misses, "destroyed": destroyed}


def _context(text: str, lab: dict) -> str:
    return text[max(0, lab["start"] - 12):lab["end"] + 8].replace("\n", "⏎")


def ratio(pair) -> float:
    return pair[0] / pair[1] if pair[1] else float("nan")


# ----------------------------------------------------------------------------------------- detectors

def spans_of(find_pii):
    return lambda text: [(s.start, s.end) for s in find_pii(text)]


def jieba_detector(base):
    """banklm's spans plus jieba's ``nr`` words of two or more characters."""
    import jieba
    import jieba.posseg as pseg

    jieba.setLogLevel(60)

    def detect(text: str):
        out = list(base(text))
        pos = 0
        for w in pseg.cut(text, HMM=True):
            if w.flag == "nr" and len(w.word) >= 2:
                out.append((pos, pos + len(w.word)))
            pos += len(w.word)
        return out
    return detect


def presidio_detector(find_pii=None):
    """Presidio's analyzer on a blank spaCy ``xx`` pipeline (no NER model) with the CN phone region;
    with ``find_pii`` banklm's detectors are added as one more recognizer."""
    import logging

    import spacy
    import tldextract

    # Presidio's e-mail recognizer asks tldextract, which fetches the public suffix list on first use:
    # use the snapshot inside the package instead (no network here)
    tldextract.extract = tldextract.TLDExtract(suffix_list_urls=())
    from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerRegistry, RecognizerResult
    from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)

    class BlankSpacyEngine(SpacyNlpEngine):
        """A spaCy engine that loads nothing: ``spacy.blank('xx')`` (tokeniser only, offline)."""

        def __init__(self):
            super().__init__(models=[{"lang_code": "en", "model_name": "blank"}])

        def load(self) -> None:
            self.nlp = {"en": spacy.blank("xx")}

    class BanklmRecognizer(EntityRecognizer):
        def __init__(self):
            super().__init__(supported_entities=["BANKLM_PII"], name="banklm")

        def load(self) -> None:
            pass

        def analyze(self, text: str, entities, nlp_artifacts: NlpArtifacts = None):
            return [RecognizerResult("BANKLM_PII", s.start, s.end, 1.0) for s in find_pii(text)]

    engine = BlankSpacyEngine()
    engine.load()
    registry = RecognizerRegistry()
    registry.load_predefined_recognizers(nlp_engine=engine)
    registry.remove_recognizer("SpacyRecognizer")
    registry.remove_recognizer("PhoneRecognizer")
    registry.add_recognizer(PhoneRecognizer(supported_regions=("CN", "US", "GB")))
    if find_pii is not None:
        registry.add_recognizer(BanklmRecognizer())
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])

    def detect(text: str):
        return [(r.start, r.end) for r in analyzer.analyze(text, language="en", score_threshold=0.3)]
    return detect


# ------------------------------------------------------------------------------------------- timing

def prose_texts(total_bytes: int) -> list[str]:
    block = PROSE * (total_bytes // len(PROSE.encode("utf-8")) + 1)
    return [block[i:i + 600] for i in range(0, len(block), 600)]


def mb_per_s(detectors: dict, texts: list[str], repeat: int) -> dict[str, float]:
    """Best-of-``repeat`` MB/s per detector, the detectors taking turns in each round, so that load from
    other processes on the machine weighs on all of them alike and their ratio stays meaningful."""
    n = sum(len(t.encode("utf-8")) for t in texts)
    best = dict.fromkeys(detectors, float("inf"))
    for _ in range(repeat):
        for name, detect in detectors.items():
            t0 = time.perf_counter()
            for t in texts:
                detect(t)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: n / b / 1e6 for name, b in best.items()}


# ------------------------------------------------------------------------------------------- report

def table(results: dict[str, dict], which: str) -> str:
    cols = list(results)
    types_ = sorted({t for r in results.values() for t in r[which]["per_type"]})
    lines = [f"| {which} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for t in types_:
        cells = []
        for c in cols:
            v = results[c][which]["per_type"].get(t)
            cells.append(f"{ratio(v):.3f} ({v[0]}/{v[1]})" if v else "")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    for label, key in (("**names**", "names"), ("**overall recall**", "overall"), ("**keep rate**", "keep")):
        lines.append(f"| {label} | " + " | ".join(
            f"**{ratio(results[c][which][key]):.3f}** ({results[c][which][key][0]}/{results[c][which][key][1]})"
            for c in cols) + " |")
    lines.append("| other text replaced (chars outside PII labels) | " + " | ".join(
        f"{ratio(results[c][which]['over_redaction']):.4f}" for c in cols) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- fitting the scorer

def name_windows(records: list[dict]):
    """Every window the name scorer considers in ``records``, with its features and whether it is exactly a
    labelled Chinese person name."""
    from banklm.corpora.ops import namescore

    X, y = [], []
    for rec in records:
        text = rec["text"]
        names = {(lab["start"], lab["end"]) for lab in rec["pii"] if lab["type"] == "PERSON" and lab.get("kind") != "roman"}
        for i in namescore.candidate_starts(text):
            for s, j in namescore.candidates(text, i):
                X.append(namescore.features(text, i, j, s))
                y.append(1.0 if (i, j) in names else 0.0)
    return X, y


def fit_name_scorer(n: int, seed: int, dev_weight: int = 5, l2: float = 1.0, iters: int = 4000) -> list[float]:
    """Logistic regression of the scorer's weights (numpy, standardised features, L2, gradient descent) on the
    windows of ``n`` generated records, the held-out records of tests/test_pii.py and, ``dev_weight`` times
    over, tests/data/pii_heldout_dev.jsonl (the only realistic running text among them). Never the final set."""
    import numpy as np

    parts = [name_windows(load_benchmark(n, seed)), name_windows(load_heldout())]
    parts += [name_windows(load_heldout_file("dev"))] * dev_weight
    X = np.array([x for p in parts for x in p[0]])
    y = np.array([v for p in parts for v in p[1]])
    mu, sd = X.mean(0), X.std(0) + 1e-9
    mu[0], sd[0] = 0.0, 1.0
    Z = (X - mu) / sd
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-Z @ w))
        w -= Z.T @ (p - y) / len(y) + l2 * w / len(y)
    raw = w / sd
    raw[0] = w[0] - float(np.sum(w[1:] * mu[1:] / sd[1:]))
    print(f"fitted on {len(y)} windows, {int(y.sum())} names", file=sys.stderr)
    return [round(float(v), 2) for v in raw]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1200, help="generated records (default 1200)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    ap.add_argument("--prose-mb", type=float, default=2.0, help="MB of ordinary prose to time (default 2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--extras", type=Path, help="folder appended to sys.path for jieba / presidio")
    ap.add_argument("--no-extras", action="store_true", help="skip jieba and presidio even if importable")
    ap.add_argument("--show-misses", type=int, default=0, help="print up to N misses/destroyed per detector")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--heldout", nargs="*", default=[], metavar="NAME",
                    help="also score tests/data/pii_heldout_NAME.jsonl (dev, final)")
    ap.add_argument("--fit-names", action="store_true",
                    help="print refitted WEIGHTS for corpora/ops/namescore.py and exit")
    ap.add_argument("--fit-n", type=int, default=200, help="generated records in the fit (default 200)")
    args = ap.parse_args(argv)
    if args.fit_names:
        from banklm.corpora.ops.namescore import FEATURES

        w = fit_name_scorer(args.fit_n, args.seed)
        print("WEIGHTS = (" + ", ".join(map(str, w)) + ",)")
        for name, v in zip(FEATURES, w, strict=True):
            print(f"  {name:16s} {v:+.2f}", file=sys.stderr)
        return 0
    if args.extras:
        sys.path.append(str(args.extras))

    from banklm.corpora.ops.pii import find_pii

    base = load_baseline(args.baseline_commit)
    detectors = {"banklm": spans_of(find_pii), f"baseline {args.baseline_commit}": spans_of(base.find_pii)}
    skipped = {}
    if not args.no_extras:
        try:
            detectors["banklm+jieba nr"] = jieba_detector(spans_of(find_pii))
        except ImportError as e:
            skipped["banklm+jieba nr"] = f"jieba not importable ({e})"
        try:
            detectors["presidio (no NER)"] = presidio_detector()
            detectors["presidio+banklm"] = presidio_detector(find_pii)
        except ImportError as e:
            skipped["presidio"] = f"presidio-analyzer not importable ({e})"

    sets = {"benchmark": load_benchmark(args.n, args.seed), "held-out": load_heldout()}
    for name in args.heldout:
        sets[f"held-out {name}"] = load_heldout_file(name)
    prose = prose_texts(int(args.prose_mb * 1e6))
    prose_speed = mb_per_s(detectors, prose, args.repeat)
    records_speed = mb_per_s(detectors, [r["text"] for r in sets["benchmark"]], 1)
    results: dict[str, dict] = {}
    for name, det in detectors.items():
        res = {which: score(recs, det) for which, recs in sets.items()}
        res["prose_mb_s"] = prose_speed[name]
        res["records_mb_s"] = records_speed[name]
        results[name] = res
        print(f"{name}: " + "; ".join(
            f"{which} names {ratio(res[which]['names']):.3f}, overall {ratio(res[which]['overall']):.3f}, keep "
            f"{ratio(res[which]['keep']):.3f}" for which in sets) + f"; prose {res['prose_mb_s']:.2f} MB/s", file=sys.stderr)
        for which in sets:
            for kind, rows in (("miss", res[which]["misses"]), ("destroyed", res[which]["destroyed"])):
                for row in rows[:args.show_misses]:
                    print(f"  [{which} {kind}] {row[0]}: {row[1]!r} in …{row[2]}…", file=sys.stderr)

    for which in sets:
        print(f"\n{which}: {len(sets[which])} records, {sum(len(r['pii']) for r in sets[which])} PII spans, "
              f"{sum(len(r['keep']) for r in sets[which])} values to keep\n")
        print(table(results, which))
    print("\n| throughput | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    print("| ordinary prose, MB/s | " + " | ".join(f"{r['prose_mb_s']:.2f}" for r in results.values()) + " |")
    print("| benchmark records, MB/s | " + " | ".join(f"{r['records_mb_s']:.2f}" for r in results.values()) + " |")
    base_name = f"baseline {args.baseline_commit}"
    print(f"\nprose throughput banklm / baseline: {results['banklm']['prose_mb_s'] / results[base_name]['prose_mb_s']:.2f}")
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    if args.json:
        slim = {k: {w: ({kk: vv for kk, vv in r.items() if kk not in ("misses", "destroyed")} if isinstance(r, dict) else r)
                    for w, r in v.items()} for k, v in results.items()}
        args.json.write_text(json.dumps({"n": args.n, "seed": args.seed, "results": slim, "skipped": skipped},
                                        ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
