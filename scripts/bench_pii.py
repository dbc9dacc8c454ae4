"""Benchmark the PII step: recall per type, keep rate and MB/s, against the previous version and Presidio.

    python scripts/bench_pii.py --n 1200 [--baseline-commit a3d5591] [--json out.json] [--extras DIR]
                                [--heldout dev final final2] [--lac-everywhere]
    python scripts/bench_pii.py --fit-names      # refit the weights of corpora/ops/namescore.py

1. Generates ``--n`` labelled records with ``scripts/make_pii_bench.py`` (which does not import the
   detectors) and loads the held-out hand-written records of ``tests/test_pii.py`` (``HELDOUT``).
   ``--heldout dev final final2`` also scores ``tests/data/pii_heldout_{dev,final,final2}.jsonl`` (hand-written
   records in styles of their own; a ``final`` set is for the one score at the end of a change, never for
   tuning).
2. Scores each detector on every set: a labelled PII span is *caught* when every non-space character of
   it lies inside a detected span (any type: what matters is that the value is gone); a labelled value to
   keep is *kept* when no detected span touches it. Recall per type, overall recall (all PII spans) and
   keep rate (all keep spans); for banklm also how many characters went through LAC.
3. Times each detector on ordinary banking prose (no PII, a few numbers; one paragraph repeated, the
   figure of the issue), best of ``--repeat`` runs, in MB/s of UTF-8 input; on *varied* prose (the unique
   sentences of ``corpora/samples/vertical`` plus ``VARIED_PROSE``, in documents of ~600 characters; LAC's
   cache is emptied before every round, so repetition cannot help it); and on the benchmark records
   themselves (PII every ~20 characters; one round, LAC's cache emptied first).
4. Times LAC alone (``corpora/ops/lacner.py``): characters/s on the held-out sentences one at a time and in
   batches of equal length, with 1 and 2 ONNX Runtime threads.

Detectors:
  ``banklm``     ``banklm.corpora.ops.pii.find_pii`` (the working tree; LAC reviews doubtful names in texts
                 about people, ``BANKLM_LAC`` unset);
  ``banklm without LAC``  the same with LAC off (``BANKLM_LAC=off``);
  ``banklm, LAC on every text``  with ``--lac-everywhere`` (``BANKLM_LAC=all``);
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
# ordinary banking prose without names, written for the varied-prose timing (with the unique sentences of
# corpora/samples/vertical): how often would LAC run on text that is not about people?
VARIED_PROSE = (
    "中国人民银行决定自下月起下调金融机构存款准备金率0.5个百分点，释放长期资金约1万亿元，以保持流动性合理充裕，支持实体经济恢复发展。"
    "此次降准后，金融机构加权平均存款准备金率约为7.0%，有助于降低银行资金成本，推动社会综合融资成本稳中有降。"
    "存款保险实行限额偿付，最高偿付限额为人民币50万元，同一存款人在同一家投保机构所有被保险存款账户的本金和利息合并计算。"
    "根据《金融机构反洗钱和反恐怖融资监督管理办法》，银行应当建立健全内部控制制度，对高风险客户采取强化的尽职调查措施。"
    "信用卡账单日后的免息还款期最长为56天，持卡人可选择全额还款或最低还款额还款，选择最低还款的，不再享受免息待遇。"
    "个人住房贷款利率以最近一个月相应期限的贷款市场报价利率为定价基准，加点幅度在合同期内保持不变，借款人可申请提前还款。"
    "报告期内，本行实现营业收入1,432.6亿元，同比增长3.8%；归属于本行股东的净利润512.3亿元，同比增长5.1%；不良贷款率较上年末下降0.04个百分点。"
    "绿色信贷余额突破6,000亿元，重点投向清洁能源、节能环保和基础设施绿色升级等领域，碳减排支持工具运用规模持续扩大。"
    "本行持续推进数字化转型，手机银行月活跃用户数达到8,600万户，线上业务替代率超过95%，柜面业务量进一步下降。"
    "为提升服务质量，本行将于本周六凌晨零时至六时进行系统升级，届时网上银行、手机银行及自助设备将暂停服务，敬请谅解。"
    "金融消费者享有财产安全权、知情权、自主选择权、公平交易权、依法求偿权、受教育权、受尊重权和信息安全权。"
    "近期电信网络诈骗案件高发，不法分子常冒充公检法机关、电商客服或贷款平台工作人员，诱导受害人转账汇款，请广大客户提高警惕。"
    "人民币贷款利率已实现市场化，贷款市场报价利率由各报价行按公开市场操作利率加点形成，每月二十日公布。"
    "小微企业普惠型贷款余额同比增长25%，高于各项贷款平均增速，首贷户数量和信用贷款占比均有所提高，综合融资成本保持低位。"
    "围绕乡村振兴战略，本行在县域地区新设网点42家，推出特色农业产业贷款，支持粮食生产、畜牧养殖和农产品加工。"
    "理财产品不等于存款，产品过往业绩不代表其未来表现，投资者应当充分了解产品风险等级，审慎作出投资决策。"
    "经常项目外汇收支实行意愿结售汇制度，企业可根据经营需要自主保留外汇收入，个人年度便利化结售汇额度为等值五万美元。"
    "养老金融是金融五篇大文章之一，本行推出个人养老金账户，缴存、投资、领取全流程线上办理，享受税收优惠。"
    "供应链金融以核心企业信用为依托，为上下游中小企业提供应收账款融资、订单融资和存货质押等服务，缓解融资难题。"
    "代理保险业务应当遵守销售行为可回溯管理要求，对六十周岁以上客户销售投资型保险产品时须进行录音录像。"
    "营业网点应当在显著位置公示服务价格、营业时间和投诉电话，对老年客户、残障人士提供绿色通道和上门服务。"
    "资本充足率、一级资本充足率和核心一级资本充足率分别为17.2%、14.1%和11.8%，均满足监管要求，资本实力稳步增强。"
    "流动性覆盖率为146%，净稳定资金比例为128%，本行坚持审慎的流动性管理策略，优质流动性资产储备充足。"
    "房地产贷款集中度管理制度实施以来，本行房地产贷款和个人住房贷款占比均控制在监管上限以内，结构持续优化。"
    "对于逾期贷款，本行将按照合同约定计收罚息和复利，并将逾期信息报送金融信用信息基础数据库，影响借款人信用记录。"
    "跨境人民币业务稳步发展，全年办理跨境人民币结算量同比增长31%，服务进出口企业超过两万家。"
    "科技金融方面，本行为专精特新企业提供知识产权质押融资和投贷联动服务，科技型企业贷款余额较年初增长近三成。"
    "新市民金融服务持续深化，针对进城务工人员、新就业大学生推出专属信用贷款和住房租赁金融产品。"
    "内部审计部门每年至少开展一次全面审计，对发现的问题建立整改台账，实行销号管理，整改完成率达到百分之百。"
    "数据安全管理方面，本行按照分类分级原则管理客户信息，严格控制数据访问权限，防止个人信息泄露和滥用。"
    "票据贴现利率受市场资金面影响较大，月末和季末时点贴现利率通常有所上行，企业可合理安排融资时间。"
    "大额存单起存金额为20万元，可在二级市场转让，也可办理质押贷款，是稳健型投资者配置的重要工具。"
    "本行积极参与地方政府专项债券承销，支持交通、水利、保障性住房等重大项目建设，发挥金融服务实体经济的作用。"
    "年末，全行员工总数为3.6万人，其中本科及以上学历占比89%，金融科技人才数量同比增长18%。"
    "客户在办理开户业务时，应当出示本人有效身份证件，银行将通过联网核查系统核验身份信息的真实性。"
    "同业业务应当严格执行穿透管理原则，准确识别底层资产和最终债务人，防止资金空转和监管套利。"
    "汇率风险中性理念逐步深入人心，越来越多的进出口企业运用远期结售汇和期权工具管理汇率波动风险。"
    "信用风险仍是本行面临的主要风险，本行持续完善统一授信管理，加强对集团客户和关联交易的风险监测。"
    "对公存款日均余额增长较快，其中结算性存款占比提升，负债结构进一步优化，付息率同比下降十二个基点。"
    "营业部大堂经理负责客户分流引导，对于排队等候时间较长的情况，应当及时增开窗口或引导客户使用自助设备。"
    "本次发行的二级资本债券期限为十年，在第五年末附有条件的发行人赎回权，募集资金将依据适用法律补充二级资本。"
    "长江经济带和粤港澳大湾区是本行区域发展的重点，上述地区贷款增量占全行新增贷款的六成以上。"
    "黄金积存业务支持按克数或按金额定期积存，客户可随时赎回或兑换实物黄金，交易价格参照上海黄金交易所行情。"
    "高新技术企业认定后可享受所得税优惠，本行对此类企业的授信审批开辟绿色通道，缩短办理时限。"
    "向阳面的房屋通常采光更好，评估价值也相对较高，抵押物评估时应综合考虑楼层、朝向和周边配套。"
    "华北地区冬季供暖期间，燃气和热力企业的资金需求明显上升，本行提前做好专项额度安排。"
    "常年在外务工的客户可以通过手机银行办理大部分业务，无需往返户籍所在地网点。"
    "文明规范服务是网点考核的重要内容，考核结果与网点负责人绩效挂钩。"
    "石油化工行业受国际油价波动影响较大，授信时应重点关注企业的库存管理和套期保值安排。"
    "金融市场业务收入同比增长，主要得益于债券投资收益增加和交易性金融资产公允价值变动。")


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


def varied_prose_docs(doc_chars: int = 600) -> list[str]:
    """``VARIED_PROSE`` and the unique sentences of ``corpora/samples/vertical`` (regulations, manuals, reports,
    tips), joined into documents of about ``doc_chars`` characters."""
    import html
    import re

    texts = [VARIED_PROSE]
    for path in sorted((REPO / "corpora" / "samples" / "vertical").rglob("*")):
        if not path.is_file() or path.name == "README":
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("gb18030")
        if path.suffix == ".jsonl":
            texts += [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
        else:
            texts.append(html.unescape(re.sub(r"<[^>]+>", "\n", text)) if path.suffix == ".html" else text)
    sentences = dict.fromkeys(m.group().strip() for t in texts for m in re.finditer(r"[^。！？\n]+[。！？]?", t))
    docs, cur = [], ""
    for sent in (x for x in sentences if len(x) >= 8):
        cur += sent
        if len(cur) >= doc_chars:
            docs.append(cur)
            cur = ""
    return docs + ([cur] if cur else [])


def with_lac(find_pii, mode: str):
    """``find_pii`` run with LAC ``off``, ``gated`` (the default) or ``all`` (every text reviewed)."""
    from banklm.corpora.ops import lacner

    def detect(text: str):
        lacner.set_enabled(mode != "off", everywhere=mode == "all")
        return [(s.start, s.end) for s in find_pii(text)]
    return detect


def lac_speed(records: list[dict], repeat: int = 3) -> dict[str, float]:
    """LAC alone: characters/s over the clauses of ``records`` (4-40 characters), one at a time and in
    batches of equal length, with 1 and 2 ONNX Runtime threads (best of ``repeat``)."""
    import re

    from banklm.corpora.ops import lacner

    clauses = list(dict.fromkeys(c for r in records for c in re.split(r"[。！？；\n\t|，]", r["text"]) if 4 <= len(c) <= 40))
    n = sum(map(len, clauses))
    out = {"clauses": len(clauses), "mean_chars": n / max(1, len(clauses))}
    for threads in (1, 2):
        eng = lacner._Engine(lacner.model_dir(), threads)
        eng.tag(clauses[:20])
        for label, batches in (("one_at_a_time", [[c] for c in clauses]), ("batched", [clauses])):
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                for b in batches:
                    eng.tag(b)
                best = min(best, time.perf_counter() - t0)
            out[f"{label}_threads{threads}_chars_s"] = n / best
    return out


def mb_per_s(detectors: dict, texts: list[str], repeat: int, before_round=None) -> dict[str, float]:
    """Best-of-``repeat`` MB/s per detector, the detectors taking turns in each round, so that load from
    other processes on the machine weighs on all of them alike and their ratio stays meaningful."""
    n = sum(len(t.encode("utf-8")) for t in texts)
    best = dict.fromkeys(detectors, float("inf"))
    for _ in range(repeat):
        for name, detect in detectors.items():
            if before_round is not None:
                before_round()
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
                    help="also score tests/data/pii_heldout_NAME.jsonl (dev, final, final2)")
    ap.add_argument("--lac-everywhere", action="store_true",
                    help="also run banklm with LAC reviewing every text (BANKLM_LAC=all)")
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

    from banklm.corpora.ops import lacner
    from banklm.corpora.ops.pii import find_pii

    base = load_baseline(args.baseline_commit)
    lac = lacner.model_dir() is not None
    detectors = {"banklm": with_lac(find_pii, "gated") if lac else spans_of(find_pii)}
    if lac:
        detectors["banklm without LAC"] = with_lac(find_pii, "off")
        if args.lac_everywhere:
            detectors["banklm, LAC on every text"] = with_lac(find_pii, "all")
    detectors[f"baseline {args.baseline_commit}"] = spans_of(base.find_pii)
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
    for det in detectors.values():  # warm-up: jieba's tables, the LAC session, Presidio's registry
        det(sets["benchmark"][0]["text"])
    prose_speed = mb_per_s(detectors, prose, args.repeat)
    varied = varied_prose_docs()
    varied_speed = mb_per_s(detectors, varied, args.repeat, before_round=lacner.clear_cache)
    lacner.clear_cache()
    records_speed = mb_per_s(detectors, [r["text"] for r in sets["benchmark"]], 1, before_round=lacner.clear_cache)
    results: dict[str, dict] = {}
    lac_chars: dict[str, dict[str, int]] = {}
    for name, det in detectors.items():
        res = {}
        for which, recs in sets.items():
            lacner.clear_cache()
            before = lacner.stats()
            res[which] = score(recs, det)
            if name == "banklm":
                lac_chars[which] = {k: lacner.stats()[k] - before[k] for k in ("segments", "chars")}
                lac_chars[which]["text_chars"] = sum(len(r["text"]) for r in recs)
        res["prose_mb_s"] = prose_speed[name]
        res["varied_prose_mb_s"] = varied_speed[name]
        res["records_mb_s"] = records_speed[name]
        results[name] = res
    lacner.set_enabled(None)
    lac_alone = lac_speed(sets.get("held-out dev", sets["held-out"])) if lac else {}
    for name, res in results.items():
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
    print(f"| varied prose ({len(varied)} documents, unique sentences), MB/s | "
          + " | ".join(f"{r['varied_prose_mb_s']:.2f}" for r in results.values()) + " |")
    print("| benchmark records, MB/s | " + " | ".join(f"{r['records_mb_s']:.2f}" for r in results.values()) + " |")
    base_name = f"baseline {args.baseline_commit}"
    print(f"\nprose throughput banklm / baseline: {results['banklm']['prose_mb_s'] / results[base_name]['prose_mb_s']:.2f}"
          f" (varied prose: {results['banklm']['varied_prose_mb_s'] / results[base_name]['varied_prose_mb_s']:.2f})")
    if lac:
        print("\ncharacters through LAC (banklm, cache emptied per set): " + "; ".join(
            f"{w} {v['chars']:,} of {v['text_chars']:,} ({v['chars'] / max(1, v['text_chars']):.1%}) in {v['segments']:,} segments"
            for w, v in lac_chars.items()))
        print("LAC alone, characters/s over {clauses} clauses of {mean_chars:.0f} characters: ".format(**lac_alone) + ", ".join(
            f"{k.replace('_chars_s', '')} {v:,.0f}" for k, v in lac_alone.items() if k.endswith("_chars_s")))
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    if args.json:
        slim = {k: {w: ({kk: vv for kk, vv in r.items() if kk not in ("misses", "destroyed")} if isinstance(r, dict) else r)
                    for w, r in v.items()} for k, v in results.items()}
        args.json.write_text(json.dumps({"n": args.n, "seed": args.seed, "results": slim, "skipped": skipped,
                                         "lac_chars": lac_chars, "lac_alone": lac_alone},
                                        ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
