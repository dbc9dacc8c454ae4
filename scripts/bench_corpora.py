"""Benchmark the private-corpus pipeline: normalise -> PII -> exact dedup -> near dedup -> quality.

    python scripts/bench_corpora.py --docs 200000 --num-proc 1 2 [--baselines datatrove loop] [--json out.json]

1. Generates ``--docs`` synthetic ~1 KB Chinese bank documents (credit notes, call transcripts and
   tickets full of fake PII, from ``corpora/samples/make_private.py``, plus a narrative paragraph;
   5% exact and 5% near duplicates, 2% junk) into 8 JSONL shards (not timed).
2. Runs each configuration in a fresh child process, sampling the resident memory of the child and
   all its workers (psutil, every 50 ms) for the peak:
   - ``banklm``: ``banklm.corpora.sources.read_sources`` + ``banklm.corpora.ops.run_steps`` (HF datasets), ``num_proc`` 1, 2;
   - ``datatrove``: the same steps from datatrove blocks (JsonlReader, formatters calling the same
     ``normalize_text``/``scrub_text``, ExactDedupSignature/FindDedups/Filter on the same dedup key,
     MinhashDedupSignature/Buckets/Cluster/Filter on character 5-grams, a filter calling the same
     quality rules, JsonlWriter), ``workers`` 1, 2 over 8 tasks; when datatrove is installed;
   - ``loop``: a plain-Python loop of the same functions (no datasets, one process).
3. Prints a Markdown table (documents per second over the whole pipeline including reading, speed-up
   over the baseline measured in the same run, peak memory, documents kept) and writes ``--json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARDS = 8

INDUSTRIES = ["农产品批发", "餐饮连锁", "建材销售", "物流运输", "服装加工", "电子元件", "家具制造", "乡村旅游", "水产养殖",
              "汽车维修", "医药零售", "印刷包装", "茶叶种植", "五金机电", "跨境电商", "教育培训"]
PLACES = ["城东", "城南", "开发区", "高新区", "老城区", "滨江", "北郊", "工业园", "镇中心", "县城西门"]
NARRATIVE = [
    "客户主营{ind}，经营年限{y}年，{year}年营业收入约{a}万元，同比{updown}{p}%。",
    "经实地走访{place}经营场所，库存{ind}相关商品约{a}万元，雇员{n}人，水电费缴纳记录正常。",
    "征信报告显示近{y}年{ov}，对外担保余额{a}万元，资产负债率{p}%。",
    "客户经理建议每{m}个月回访一次，重点关注{ind}行业景气度及应收账款{a}万元的回收情况。",
    "本笔业务用于{use}，预计{m}个月内形成回款，第一还款来源为经营收入，第二还款来源为{coll}。",
    "近{m}个月对公流水合计{a}万元，其中前五大交易对手占比{p}%，未发现与{ind}无关的大额往来。",
    "{place}网点于{year}年{m}月受理该客户开户申请，此后累计办理结算业务{n}笔。",
    "抵押物为位于{place}的{coll}，评估价值{a}万元，抵押率{p}%。",
    "反洗钱筛查：客户风险等级{risk}，近{m}个月现金交易{n}笔，{aml}。",
    "审查意见：{ind}行业{trend}，建议授信额度{a}万元，期限{m}个月，{cond}。",
]
FILL = {"ind": INDUSTRIES, "place": PLACES, "updown": ["增长", "下降", "持平，波动"],
        "ov": ["无逾期记录", "有1次30天以内逾期，已结清", "无不良记录，查询次数{n}次"],
        "use": ["购置原材料", "支付货款", "设备更新", "店面装修", "季节性备货", "偿还他行到期贷款"],
        "coll": ["商业用房一套", "住宅一套", "机器设备", "应收账款质押", "保证人代偿", "存单质押"],
        "risk": ["低", "中", "较高"], "aml": ["未见拆分交易特征", "已提示关注分散转入集中转出", "交易与经营规模匹配"],
        "trend": ["整体平稳", "竞争加剧", "受季节影响明显", "处于恢复期"],
        "cond": ["按月付息到期还本", "等额本息还款", "追加实际控制人连带责任保证", "放款后三十日内核查资金流向"]}
JUNK = ["点击领取新人红包！！！\n扫码关注，好礼送不停\n广告合作请联系", "★★★★☆☆ ###### |||||| ====== ****** >>>>>>",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.",
        "见附件。"]


# ------------------------------------------------------------------------------------------------ data

def _fill(rng: random.Random, template: str) -> str:
    def val(key: str) -> str:
        if key in FILL:
            return _fill(rng, rng.choice(FILL[key]))
        return str({"y": rng.randint(1, 15), "year": rng.randint(2018, 2024), "a": rng.randint(5, 5000),
                    "p": rng.randint(1, 95), "n": rng.randint(2, 300), "m": rng.randint(1, 12)}[key])

    import re

    return re.sub(r"\{(\w+)\}", lambda m: val(m.group(1)), template)


def generate(n: int, out_dir: Path, seed: int = 0) -> dict:
    spec = importlib.util.spec_from_file_location("make_private", REPO / "corpora" / "samples" / "make_private.py")
    mp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mp)
    g = mp.Gen(seed)
    rng = random.Random(seed)
    makers = [mp.credit_note, mp.call_transcript, mp.ticket]
    out_dir.mkdir(parents=True, exist_ok=True)
    fhs = [open(out_dir / f"shard-{i:02d}.jsonl", "w", encoding="utf-8") for i in range(SHARDS)]
    made: list[str] = []
    total_bytes = 0
    kinds = {"unique": 0, "exact_dup": 0, "near_dup": 0, "junk": 0}
    for i in range(n):
        u = rng.random()
        if made and u < 0.05:
            text, kind = rng.choice(made), "exact_dup"
        elif made and u < 0.10:
            base = rng.choice(made)
            pos = rng.randrange(len(base) - 5)
            text, kind = base[:pos] + rng.choice("的了和与及") + base[pos + 1:], "near_dup"
        elif u < 0.12:
            text, kind = rng.choice(JUNK), "junk"
        else:
            rec = makers[i % 3](g, f"d{i}", {})
            text = rec["text"] + "\n" + "".join(_fill(rng, t) for t in rng.sample(NARRATIVE, 3))
            kind = "unique"
            if len(made) < 5000:
                made.append(text)
            elif rng.random() < 0.1:
                made[rng.randrange(5000)] = text
        kinds[kind] += 1
        line = json.dumps({"id": f"bench-{i:07d}", "text": text}, ensure_ascii=False) + "\n"
        total_bytes += len(line.encode("utf-8"))
        fhs[i % SHARDS].write(line)
    for fh in fhs:
        fh.close()
    return {"docs": n, "bytes": total_bytes, "mean_bytes": round(total_bytes / max(n, 1)), **kinds}


# ------------------------------------------------------------------------------------------------ runners

def _steps():
    from banklm.corpora.ops import ExactDedup, NearDedup, Normalize, QualityFilter, ScrubPII

    return [Normalize(), ScrubPII(mode="placeholder"), ExactDedup(), NearDedup(), QualityFilter()]


def run_banklm(data: Path, num_proc: int) -> dict:
    import datasets
    from banklm.corpora.ops import run_steps
    from banklm.corpora.sources import read_sources

    datasets.disable_progress_bars()
    datasets.disable_caching()
    t0 = time.perf_counter()
    ds, _, _ = read_sources([{"path": str(data)}])
    t_read = time.perf_counter() - t0
    ds = ds.flatten_indices()
    n_in = len(ds)
    out, stats = run_steps(ds, _steps(), num_proc=num_proc)
    total = time.perf_counter() - t0
    return {"in": n_in, "kept": len(out), "seconds": total, "read_seconds": t_read,
            "steps": {s["step"]: {"seconds": s["seconds"], "dropped": s["dropped"]} for s in stats}}


def run_loop(data: Path) -> dict:
    """The same functions in plain Python loops: no datasets, one process."""
    import numpy as np
    from banklm.corpora.ops.dedup import _crc32, char_ngrams, dedup_key, text_hash
    from banklm.corpora.ops.normalize import normalize_text
    from banklm.corpora.ops.pii import scrub_text
    from banklm.corpora.ops.quality import QualityFilter, is_junk_line
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    t0 = time.perf_counter()
    docs = []
    for f in sorted(data.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            docs += [json.loads(line) for line in fh]
    n_in = len(docs)
    steps = {}
    t = time.perf_counter()
    for d in docs:
        d["text"] = normalize_text(d["text"])
    steps["normalize"] = time.perf_counter() - t
    t = time.perf_counter()
    for d in docs:
        d["text"] = scrub_text(d["text"])[0]
    steps["pii"] = time.perf_counter() - t
    t = time.perf_counter()
    seen, kept = set(), []
    for d in docs:
        h = text_hash(d["text"])
        if h not in seen:
            seen.add(h)
            kept.append(d)
    docs = kept
    steps["exact_dedup"] = time.perf_counter() - t
    t = time.perf_counter()
    perms = MinHash(num_perm=128, seed=42).permutations
    lsh = MinHashLSH(threshold=0.8, num_perm=128, weights=(0.1, 0.9))
    sigs, kept = [], []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=128, seed=42, hashfunc=_crc32, permutations=perms, scheme="affine32")
        m.update_batch([g.encode("utf-8") for g in char_ngrams(dedup_key(d["text"]), 5)])
        lm = LeanMinHash(m)
        sigs.append(lm.hashvalues)
        # a verified candidate (estimated Jaccard >= threshold), as corpora.ops.dedup.NearDedup does
        dup = any(np.count_nonzero(sigs[j] == lm.hashvalues) >= 0.8 * 128 for j in lsh.query(lm))
        lsh.insert(i, lm, check_duplication=False)
        if not dup:
            kept.append(d)
    docs = kept
    steps["near_dedup"] = time.perf_counter() - t
    t = time.perf_counter()
    q = QualityFilter()
    kept = []
    for d in docs:
        text = d["text"]
        r = q.reason(text)
        if r is None:
            lines = text.split("\n")
            lines2 = [ln for ln in lines if not is_junk_line(ln)]
            if len(lines2) != len(lines):
                r = q.reason("\n".join(lines2).strip())
        if r is None:
            kept.append(d)
    steps["quality"] = time.perf_counter() - t
    return {"in": n_in, "kept": len(kept), "seconds": time.perf_counter() - t0,
            "steps": {k: {"seconds": round(v, 3)} for k, v in steps.items()}}


def run_datatrove(data: Path, workers: int, work: Path) -> dict:
    from banklm.corpora.ops.dedup import dedup_key
    from banklm.corpora.ops.normalize import normalize_text
    from banklm.corpora.ops.pii import scrub_text
    from banklm.corpora.ops.quality import QualityFilter, is_junk_line
    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters.base_filter import BaseFilter
    from datatrove.pipeline.formatters.base import BaseFormatter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    # datatrove's JsonlReader/JsonlWriter need orjson (the "io" extra), which this venv does not
    # install: two minimal blocks with the same file-per-rank layout, reading with the stdlib json
    class JsonlReader(PipelineStep):
        name = "reader"

        def __init__(self, folder, glob_pattern="*.jsonl", compression=None):
            super().__init__()
            self.folder, self.pattern = Path(folder), glob_pattern

        def run(self, data=None, rank=0, world_size=1):
            for f in sorted(self.folder.glob(self.pattern))[rank::world_size]:
                with open(f, encoding="utf-8") as fh:
                    for line in fh:
                        d = json.loads(line)
                        self.stat_update("documents")
                        yield Document(text=d["text"], id=d["id"], metadata={})

    class JsonlWriter(PipelineStep):
        name = "writer"

        def __init__(self, folder, output_filename="${rank}.jsonl", compression=None):
            super().__init__()
            self.folder = Path(folder)

        def run(self, data, rank=0, world_size=1):
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / f"{rank:05d}.jsonl", "w", encoding="utf-8") as fh:
                for doc in data:
                    fh.write(json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n")
                    yield doc

    class Norm(BaseFormatter):
        name = "normalize"

        def format(self, text):
            return normalize_text(text)

    class PII(BaseFormatter):
        name = "pii"

        def format(self, text):
            return scrub_text(text)[0]

    class Quality(BaseFilter):
        name = "quality"

        def __init__(self):
            super().__init__()
            self.q = QualityFilter()

        def filter(self, doc):
            r = self.q.reason(doc.text)
            if r is None:
                lines = doc.text.split("\n")
                kept = [ln for ln in lines if not is_junk_line(ln)]
                if len(kept) != len(lines):
                    doc.text = "\n".join(kept).strip()
                    r = self.q.reason(doc.text)
            return True if r is None else (False, r)

    class Chars(WordTokenizer):
        def word_tokenize(self, text):
            return list(dedup_key(text))

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    # sha1 hashing: the xxhash package (datatrove's default) is not installed here
    exact_cfg = ExactDedupConfig(content_getter=lambda doc: dedup_key(doc.text),
                                 hash_config=HashConfig(precision=64, hash_fc="sha1"))
    # 10 bands of 12 rows: the LSH S-curve's midpoint is (1/10)^(1/12) = 0.83, near banklm's threshold 0.8
    # (datatrove does not verify candidates: a band collision is a duplicate)
    mh_cfg = MinhashConfig(n_grams=5, num_buckets=10, hashes_per_bucket=12,
                           norm_config=TextNormConfig(remove_punctuation=False, norm_numbers=False,
                                                      norm_unicode_diacritics=False),
                           hash_config=HashConfig(precision=64, hash_fc="sha1"))
    w, logs = str(work), str(work / "logs")
    common = {"workers": workers, "start_method": "fork", "skip_completed": False}
    s1 = LocalPipelineExecutor([JsonlReader(str(data), glob_pattern="*.jsonl"), Norm(), PII(),
                                JsonlWriter(f"{w}/s1", output_filename="${rank}.jsonl", compression=None),
                                ExactDedupSignature(f"{w}/exact_sigs", exact_cfg)],
                               tasks=SHARDS, logging_dir=f"{logs}/s1", **common)
    s2 = LocalPipelineExecutor([ExactFindDedups(f"{w}/exact_sigs", f"{w}/exact_dups", exact_cfg)],
                               tasks=1, logging_dir=f"{logs}/s2", depends=s1, **common)
    s3 = LocalPipelineExecutor([JsonlReader(f"{w}/s1", compression=None), ExactDedupFilter(f"{w}/exact_dups", exact_cfg),
                                JsonlWriter(f"{w}/s3", output_filename="${rank}.jsonl", compression=None),
                                MinhashDedupSignature(f"{w}/mh_sigs", mh_cfg, language=Chars())],
                               tasks=SHARDS, logging_dir=f"{logs}/s3", depends=s2, **common)
    s4 = LocalPipelineExecutor([MinhashDedupBuckets(f"{w}/mh_sigs", f"{w}/mh_buckets", config=mh_cfg)],
                               tasks=mh_cfg.num_buckets, logging_dir=f"{logs}/s4", depends=s3, **common)
    s5 = LocalPipelineExecutor([MinhashDedupCluster(f"{w}/mh_buckets", f"{w}/mh_remove", config=mh_cfg)],
                               tasks=1, logging_dir=f"{logs}/s5", depends=s4, **common)
    s6 = LocalPipelineExecutor([JsonlReader(f"{w}/s3", compression=None), MinhashDedupFilter(f"{w}/mh_remove"),
                                Quality(), JsonlWriter(f"{w}/out", output_filename="${rank}.jsonl", compression=None)],
                               tasks=SHARDS, logging_dir=f"{logs}/s6", depends=s5, **common)
    t0 = time.perf_counter()
    s6.run()
    total = time.perf_counter() - t0
    kept = sum(sum(1 for _ in open(f, encoding="utf-8")) for f in (work / "out").glob("*.jsonl"))
    n_in = sum(sum(1 for _ in open(f, encoding="utf-8")) for f in data.glob("*.jsonl"))
    return {"in": n_in, "kept": kept, "seconds": total}


# ------------------------------------------------------------------------------------------------ driver

def child(args) -> None:
    data = Path(args.data)
    if args.child == "banklm":
        res = run_banklm(data, args.procs)
    elif args.child == "loop":
        res = run_loop(data)
    else:
        from loguru import logger  # datatrove's logger: keep the child quiet

        logger.remove()
        with tempfile.TemporaryDirectory(prefix="dt-") as work:
            res = run_datatrove(data, args.procs, Path(work))
    Path(args.result).write_text(json.dumps(res), encoding="utf-8")


def measure(kind: str, procs: int, data: Path) -> dict:
    import psutil

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
        result = Path(tf.name)
    cmd = [sys.executable, __file__, "--child", kind, "--procs", str(procs), "--data", str(data),
           "--result", str(result)]
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    import resource

    def busy() -> float:
        c = psutil.cpu_times()
        return c.user + c.system + getattr(c, "nice", 0) + getattr(c, "irq", 0) + getattr(c, "softirq", 0)

    ru0, busy0 = resource.getrusage(resource.RUSAGE_CHILDREN), busy()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(p.pid)
    peak = 0
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    err = p.stderr.read()
    wall = time.perf_counter() - t0
    ru1, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), busy()
    tree_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    # CPU the rest of the machine used meanwhile (other users' jobs compete for the same cores)
    other_cores = max(0.0, (busy1 - busy0) - tree_cpu) / wall
    if p.returncode != 0:
        raise RuntimeError(f"{kind} num_proc={procs} failed:\n{err[-3000:]}")
    res = json.loads(result.read_text(encoding="utf-8"))
    result.unlink()
    res.update(kind=kind, procs=procs, wall_with_startup=round(wall, 2), cpu_seconds=round(tree_cpu, 1),
               other_load_cores=round(other_cores, 2),
               peak_rss_mb=round(peak / 2**20), docs_per_s=round(res["in"] / res["seconds"], 1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--baselines", nargs="*", default=["datatrove", "loop"], choices=["datatrove", "loop"])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    baselines = list(args.baselines)
    if "datatrove" in baselines and importlib.util.find_spec("datatrove") is None:
        print("datatrove is not installed: using the plain-Python loop as the baseline", file=sys.stderr)
        baselines = [b for b in baselines if b != "datatrove"] or ["loop"]
    with tempfile.TemporaryDirectory(prefix="bench-corpora-") as tmp:
        data = Path(tmp) / "data"
        t = time.perf_counter()
        corpus = generate(args.docs, data, args.seed)
        print(f"generated {corpus} in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        results = []
        plan = [("banklm", n) for n in args.num_proc]
        plan += [("datatrove", n) for n in args.num_proc if "datatrove" in baselines]
        plan += [("loop", 1)] if "loop" in baselines else []
        for kind, n in plan:
            r = measure(kind, n, data)
            print(f"{kind} num_proc={n}: {r['docs_per_s']} docs/s, {r['seconds']:.1f} s, peak {r['peak_rss_mb']} MB, "
                  f"kept {r['kept']}", file=sys.stderr, flush=True)
            results.append(r)
    base_kind = "datatrove" if "datatrove" in baselines else "loop"
    base = {r["procs"]: r for r in results if r["kind"] == base_kind}
    one = next((r for r in results if r["kind"] == "banklm" and r["procs"] == 1), None)
    lines = [f"| pipeline | num_proc | docs/s | seconds | vs {base_kind} (same num_proc) | scaling vs num_proc 1 | "
             f"peak RSS (MB, all processes) | docs kept | CPU used by other jobs (cores) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = base.get(r["procs"]) or base.get(1)
        ratio = f"{r['docs_per_s'] / b['docs_per_s']:.2f}x" if b else "-"
        same = [x for x in results if x["kind"] == r["kind"] and x["procs"] == 1]
        scale = f"{r['docs_per_s'] / same[0]['docs_per_s']:.2f}x" if same else "-"
        lines.append(f"| {r['kind']} | {r['procs']} | {r['docs_per_s']:,.0f} | {r['seconds']:.1f} | {ratio} | {scale} | "
                     f"{r['peak_rss_mb']:,} | {r['kept']:,} | {r['other_load_cores']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if one:
        print("\nbanklm num_proc=1 seconds per step: "
              + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in one["steps"].items())
              + f" (reading {one['read_seconds']:.1f})")
    if args.json:
        from banklm.io import atomic_write_json

        atomic_write_json(args.json, {"corpus": corpus, "results": results, "table": table,
                                      "command": " ".join([Path(sys.executable).name, *sys.argv]),
                                      "cpu_count": os.cpu_count()})


if __name__ == "__main__":
    main()
