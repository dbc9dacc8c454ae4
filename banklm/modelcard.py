"""MODEL_CARD.md: the disclosure document of one run, for a bank's model-risk reviewer.

Headings are Chinese + English; the body is Chinese (``report.language: zh``) or English (``en``).
It covers what JR/T 0287-2023 asks an algorithm disclosure to state: use and out-of-scope use, the
responsible entity, base model and licence, training data by corpus kind, de-identification,
training method, evaluation, quantization effects, exported files (with sha256, checked by
``banklm verify``), limitations with failure examples, changes since the previous run, traceability.
Every number is read from the run folder; free text the recipe does not give is marked to be filled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from banklm.compare import NotARun, compare_runs, data_rows, previous_run, recipe_rows, score_rows
from banklm.evaluation.confidence import ECE_FLAG
from banklm.ledger import card_artefacts_section, file_records
from banklm.recipe import TO_BE_FILLED
from banklm.results import distill_tables, flags, read_json, task_rows
from banklm.tasks import TASKS, get_task

PII_TYPES_ZH = {"ID_CARD": "身份证号", "PHONE": "电话号码", "BANK_CARD": "银行卡号", "ACCOUNT": "账号",
                "USCC": "统一社会信用代码", "PASSPORT": "护照号", "PLATE": "车牌号", "EMAIL": "电子邮箱",
                "PERSON": "姓名", "ADDRESS": "地址"}

DEFAULT_USE = {
    "zh": "银行内部的决策辅助：信贷审批初审、反洗钱可疑交易初筛、审计底稿初筛。模型给出结论、等级和理由，"
          "均为建议，须由有资质的业务人员复核后方可采用。",
    "en": "Internal decision support at a bank: first-pass credit approval, AML suspicious-transaction screening "
          "and audit working-paper screening. The model's conclusion, grade and reason are suggestions for a "
          "qualified reviewer.",
}
DEFAULT_OUT_OF_SCOPE = {
    "zh": "不得用于无人工复核的自动拒贷、自动上报或直接答复客户；不得用于信贷、反洗钱、审计三项任务以外的业务；"
          "评估分数来自按规则生成的测试数据，不代表在真实客户上的表现。",
    "en": "Not for automatic loan refusal, automatic regulatory filing or customer-facing answers without human "
          "review; not for work outside the credit, AML and audit tasks; the scores come from rule-generated test "
          "data and do not promise performance on real customers.",
}

# the same defaults for a run with a bank's own task: the run's task titles instead of the built-ins' uses
DEFAULT_USE_TASKS = {
    "zh": "银行内部的决策辅助：{titles}。模型给出的结论和理由均为建议，须由有资质的业务人员复核后方可采用。",
    "en": "Internal decision support at a bank: {titles}. The model's conclusions and reasons are suggestions for "
          "a qualified reviewer.",
}
DEFAULT_OUT_OF_SCOPE_TASKS = {
    "zh": "不得用于无人工复核的自动决策、自动上报或直接答复客户；不得用于以下任务以外的业务：{titles}；"
          "评估分数来自本次运行的测试集，不代表在全部真实客户上的表现。",
    "en": "Not for automatic decisions, automatic regulatory filing or customer-facing answers without human "
          "review; not for work outside these tasks: {titles}; the scores come from this run's test split and do "
          "not promise performance on every real customer.",
}


class _Lang:
    def __init__(self, lang: str):
        self.lang = lang

    def __call__(self, zh: str, en: str) -> str:
        return zh if self.lang == "zh" else en


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and abs(v) < 10 ** -digits:
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def _cfg(v: Any) -> str:
    """A configured value as written (1e-3, 3, 0.05), not rounded like a measurement."""
    return f"{v:g}" if isinstance(v, float) else ("–" if v is None else str(v))


def _cell(v: Any) -> str:
    return _num(v).replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- sections

def _header(d: dict, recipe, t: _Lang) -> list[str]:
    entries = d["entries"]
    code = (entries[-1].get("code") if entries else None) or {}
    commit = code.get("git_commit")
    git = (f", git {commit[:10]}" + (t("（有未提交的改动）", " (uncommitted changes)") if code.get("git_dirty") else "")
           if commit else t("，非 git 检出", ", not a git checkout"))
    final = next(iter(d["eval"]), None)
    ov = (d["eval"].get(final) or {}).get("overall", {}) if final else {}
    lines = [f"# 模型卡 Model card: {recipe.name}", "",
             f"- {t('运行', 'Run')}: `{d['run_dir'].name}`" + (f" · {t('完成于', 'finished')} {entries[-1].get('finished_at')}"
                                                             if entries else ""),
             f"- {t('配方', 'Recipe')}: `{recipe.name}`" + (f" — {recipe.description}" if recipe.description else ""),
             f"- {t('代码版本', 'Code version')}: banklm {code.get('banklm', '?')}{git}"]
    if final:
        lines.append(f"- {t('最终模型', 'Final model')}: `{final}` ({_num(ov.get('parameters'))} "
                     f"{t('参数', 'parameters')}, {_num(ov.get('model_bytes'))} {t('字节', 'bytes')})")
    return lines


def _run_tasks(recipe) -> list:
    """The run's tasks (``Recipe.task_names``) that can be looked up."""
    out = []
    for name in recipe.task_names():
        try:
            out.append(get_task(name))
        except ValueError:
            continue
    return out


def _use(recipe, t: _Lang) -> list[str]:
    rep = recipe.report
    note = t("（默认文本；可在配方 report.{} 中改写）", " (default text; set report.{} in the recipe)")
    use_text, oos_text = DEFAULT_USE[t.lang], DEFAULT_OUT_OF_SCOPE[t.lang]
    tasks = _run_tasks(recipe)
    if any(task.name not in TASKS for task in tasks):  # a bank's own task: name the run's tasks, not the built-ins
        titles = t("、", ", ").join(f"{task.title}（{task.name}）" if t.lang == "zh" else f"{task.title} ({task.name})"
                                    for task in tasks)
        use_text, oos_text = DEFAULT_USE_TASKS[t.lang].format(titles=titles), \
            DEFAULT_OUT_OF_SCOPE_TASKS[t.lang].format(titles=titles)
    use = rep.intended_use or use_text + note.format("intended_use")
    oos = rep.out_of_scope or oos_text + note.format("out_of_scope")
    return ["## 预期用途 Intended use", "", use, "", "## 不适用范围 Out-of-scope use", "", oos]


def _tasks(recipe, t: _Lang) -> list[str]:
    """The run's tasks with the sha256 of their specs: what the model folders and the export bundle carry."""
    tasks = _run_tasks(recipe)
    if not tasks:
        return []
    rows = [[f"`{task.name}`", task.title, t("内置", "built-in") if task.name in TASKS else t("本行自定义", "bank's own"),
             f"`{task.spec.sha256}`"] for task in tasks]
    return ["## 任务 Tasks", "",
            t("每个模型目录和导出包都携带其任务的规格 `tasks/<name>.yaml`（字段、提示、答案格式、规则；见 docs/tasks.md），"
              "无需配方即可评估和部署；文件的 sha256 即下表所列（导出包另见 SHA256SUMS）：",
              "Every model folder and the export bundle carry the specs of their tasks as `tasks/<name>.yaml` "
              "(fields, prompt, answer layout, rules; docs/tasks.md), so the model can be evaluated and served "
              "without its recipe; each file's sha256 is listed below (the bundle's also in SHA256SUMS):"), "",
            md_table([t("任务 task", "task"), t("名称 title", "title"), t("来源 kind", "kind"),
                      t("规格 sha256 spec sha256", "spec sha256")], rows)]


def _responsible(recipe, t: _Lang) -> list[str]:
    rep = recipe.report

    def filled(v: str, key: str) -> str:
        return v + (t(f"（请在配方 report.{key} 中填写）", f" (fill in report.{key} in the recipe)")
                    if v == TO_BE_FILLED else "")

    return ["## 责任主体与联系方式 Responsible entity and contact", "",
            f"- {t('责任主体', 'Responsible entity')}: {filled(rep.owner, 'owner')}",
            f"- {t('联系方式', 'Contact')}: {filled(rep.contact, 'contact')}"]


def _base_model(d: dict, recipe, t: _Lang) -> list[str]:
    b = recipe.base
    if b.path:
        what = f"`{b.path}`" + t("（本地模型目录）", " (local model folder)")
    else:
        c = b.build
        what = t(f"从配置构建的微型 {c.arch} 模型（hidden {c.hidden_size}，{c.num_layers} 层，{c.num_heads} 个注意力头，"
                 f"FFN {c.intermediate_size}），从随机初始化开始训练；分词器为本次运行语料上训练的 SentencePiece BPE"
                 f"（词表 {recipe.tokenizer.vocab_size}）",
                 f"a tiny {c.arch} built from a config (hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} "
                 f"heads, FFN {c.intermediate_size}), trained from random initialisation; tokenizer: SentencePiece BPE "
                 f"trained on this run's corpora (vocabulary {recipe.tokenizer.vocab_size})")
    licence = b.licence or t("配方中未给出（base.licence）", "not given in the recipe (base.licence)")
    return ["## 基础模型与许可 Base model and licence", "", f"- {t('基础模型', 'Base model')}: {what}",
            f"- {t('许可', 'Licence')}: {licence}",
            f"- trust_remote_code: {b.trust_remote_code}; {t('仅加载 safetensors 权重', 'safetensors weights only')}"
            + ("" if not b.allow_pickle else t("（配方允许 pickle）", " (the recipe allows pickles)"))]


def _source_summary(st: dict) -> tuple[str, str]:
    names, licences = [], []
    for s in st.get("sources") or []:
        if s.get("type") == "synth":
            names.append(f"synth:{s.get('task')}")
        else:
            names.append(str(s.get("name") or s.get("path")))
        if s.get("licence"):
            licences.append(s["licence"])
    if st.get("licence") and st["licence"] != "not given in the recipe":
        licences.append(st["licence"])
    return ", ".join(names), "; ".join(dict.fromkeys(licences))


def _training_data(d: dict, recipe, t: _Lang) -> list[str]:
    lines = ["## 训练数据 Training data", ""]
    if not d["corpora"]:
        return lines + [t("本次运行没有语料阶段。", "No corpus stage in this run.")]
    tokens = (read_json(d["run_dir"] / "corpora" / "token_counts.json") or {}).get("corpus_tokens", {})
    rows = []
    for kind, st in d["corpora"].items():
        if not st:
            continue
        splits = st.get("splits") or {}

        def n(s, splits=splits):
            v = splits.get(s)
            return v.get("total") if isinstance(v, dict) else v

        names, licences = _source_summary(st)
        if kind == "scenario" and not licences:
            licences = recipe.corpora.scenario.licence if recipe.corpora.scenario else ""
        rows.append([kind, n("train"), n("validation"), n("test"), (tokens.get(kind, {}).get("train") or {}).get("tokens"),
                     names or "–", licences or t("未给出", "not given"), f"[card.md](corpora/{kind}/card.md)"])
    lines.append(md_table([t("语料 corpus", "corpus"), t("训练 train", "train"), t("验证 validation", "validation"),
                           t("测试 test", "test"), t("训练 token 数 train tokens", "train tokens"),
                           t("来源 sources", "sources"), t("许可 licence", "licence"), t("数据卡 card", "card")], rows))
    uses = []
    if recipe.cpt.enabled:
        uses.append(t(f"继续预训练（CPT）使用：{', '.join(recipe.cpt.corpora)}（训练集）",
                      f"continued pre-training (CPT) used: {', '.join(recipe.cpt.corpora)} (train splits)"))
    if recipe.train.enabled:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in recipe.train.mix.shares().items())
        uses.append(t("监督微调（SFT）使用：scenario 训练集" + (f"，混入指令数据（占训练样本）：{shares}" if shares else "")
                      + "；验证集用于 eval loss",
                      "supervised fine-tuning (SFT) used: the scenario train split"
                      + (f", mixed with instruction data (share of the training examples): {shares}" if shares else "")
                      + " (validation splits likewise, for eval loss)"))
    if recipe.eval.enabled:
        uses.append(t("评估使用：scenario 测试集（其提示已从其他语料中去污染）；general / private 测试集中的指令记录",
                      "evaluation used: the scenario test split (its prompts decontaminated from the other corpora); "
                      "the instruction records of the general / private test splits"))
    return lines + [""] + [f"- {u}" for u in uses]


def _deid(d: dict, t: _Lang) -> list[str]:
    lines = ["## 去标识化 De-identification", ""]
    rows, without = [], []
    for kind, st in d["corpora"].items():
        if not st:
            continue
        pii = st.get("pii")
        if isinstance(pii, dict):
            counts = pii.get("counts") or {}
            rows.append([kind, pii.get("mode"), pii.get("records_with_pii"), sum(counts.values()),
                         ", ".join(f"{t(PII_TYPES_ZH.get(k, k), k)} {v}" for k, v in sorted(counts.items())) or "–"])
        else:
            without.append(kind)
    if rows:
        lines.append(md_table([t("语料 corpus", "corpus"), t("方式 mode", "mode"),
                               t("含个人信息的记录 records with PII", "records with PII"),
                               t("替换总数 replaced", "replaced"), t("按类型 by type", "by type")], rows))
        lines += ["", t("只记录数量与类型，任何检测到的值都不会写入统计、数据卡、台账或本模型卡。",
                        "Only counts and types are kept: no detected value is written to stats, cards, the ledger or "
                        "this card.")]
    if without:
        lines += ["", t(f"未执行个人信息替换的语料：{', '.join(without)}（合成数据或公开样例，配方未启用 pii 步骤）。",
                        f"Corpora without the PII step: {', '.join(without)} (generated data or public samples; the "
                        "recipe does not enable the pii step).")]
    return lines


def _training(d: dict, recipe, t: _Lang) -> list[str]:
    lines = ["## 训练方法与超参数 Training method and hyper-parameters", ""]
    rows = []
    for name, s in d["summaries"].items():
        if not s:
            continue
        sec = recipe.cpt if name == "cpt" else recipe.train
        lora = s.get("lora") or {}
        lora_txt = (f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}"
                    if s.get("method") in ("lora", "qlora") and lora else "–")
        rows.append([name, s.get("method"), _cfg(s.get("lr")), _cfg(sec.epochs), _cfg(sec.time_budget_s),
                     f"{s.get('batch_size')}×{s.get('grad_accum')}", s.get("max_length"), _cfg(sec.warmup_ratio),
                     s.get("scheduler"), lora_txt, s.get("steps"), s.get("tokens_seen"), s.get("final_loss"),
                     s.get("eval_loss"), s.get("seconds"), s.get("device"), s.get("stopped_by"), s.get("seed")])
    if not rows:
        return lines + [t("本次运行没有训练阶段。", "No training stage in this run.")]
    lines.append(md_table(["stage", t("方法 method", "method"), "lr", "epochs", t("时间预算 s", "time budget s"),
                           "batch×accum", "max length", "warmup", "scheduler", "LoRA", "steps",
                           t("训练 token tokens", "tokens"), "final loss", "eval loss", t("秒 s", "seconds"),
                           t("设备 device", "device"), "stopped by", "seed"], rows))
    lines += ["", t("完整的已解析配方见 recipe.yaml；每个阶段的参数记录在 ledger.jsonl。",
                    "The fully resolved recipe is recipe.yaml; every stage's parameters are in ledger.jsonl.")]
    return lines


def _evaluation(d: dict, t: _Lang) -> list[str]:
    lines = ["## 评估结果 Evaluation results", ""]
    if not d["eval"]:
        return lines + [t("本次运行未评估。", "Not evaluated in this run.")]
    final, res = next(iter(d["eval"].items()))
    tasks = res.get("tasks", {})
    dec = res.get("decoding", "free")
    lines += [t(f"最终模型 `{final}` 在 scenario 测试集上的结果（模型生成文本，经任务解析器解析后评分；无法解析计为错误；"
                f"解码方式 {dec}）：",
                f"Final model `{final}` on the scenario test split (generated text parsed by the task parser; "
                f"unparseable answers count as wrong; decoding: {dec}):"), ""]
    rows = task_rows(tasks)  # a task scored on bank and synthetic rows gets a row per source too
    ov = res.get("overall", {})
    rows.append([t("合计 overall", "overall"), ov.get("n"), ov.get("accuracy"), None, None,
                 ov.get("format_compliance"), None, None, None])
    lines.append(md_table(["task", "n", t("准确率 accuracy", "accuracy"), "macro-F1", "MCC",
                           t("格式合规 format compliance", "format compliance"),
                           t("忠实性：幻觉率 faithfulness: hallucination rate", "faithfulness: hallucination rate"),
                           t("无依据数字率 unsupported-number rate", "unsupported-number rate"),
                           t("字段错配率 field-binding error rate", "field-binding error rate")], rows))
    detect = [[task, f"{p['key']}={p['value']}", p.get("recall"), p.get("false_positive_rate"), p.get("n_positive"),
               p.get("n_true_positive"), json.dumps(p.get("detail_accuracy_tp") or {}, ensure_ascii=False)]
              for task, r in tasks.items() if (p := r.get("positive"))]
    if detect:
        lines += ["", f"### {t('检出 Detection', 'Detection')}", "",
                  md_table(["task", t("检出目标 target", "target"), t("召回率 recall", "recall"),
                            t("误报率 false-positive rate", "false-positive rate"),
                            t("目标样本数 positive cases", "positive cases"),
                            t("命中数 true positives", "true positives"),
                            t("命中中其余字段正确率 other keys' accuracy (TP)", "other keys' accuracy among TP")],
                           detect)]
    lines += _confidence(res, t)
    lines += _evidence(d, t)
    fair = [[task, attr, f.get("ratio"), f.get("accuracy_gap"), "FLAG" if f.get("flag") else "ok",
             json.dumps(f.get("counts", {}), ensure_ascii=False)]
            for task, r in tasks.items() for attr, f in (r.get("fairness") or {}).items() if isinstance(f, dict)]
    if fair:
        lines += ["", f"### {t('公平性 Fairness', 'Fairness')}", "",
                  t("比例 = 各组有利结果（任务规格的 favourable，如通过）比例的最小值 / 最大值（< 0.8 标记）；"
                    "准确率差 = 组间准确率最大差。",
                    "ratio = lowest group rate of the favourable outcome (the task spec's answer.favourable, e.g. "
                    "通过) / highest (< 0.8 flagged); accuracy gap = largest difference "
                    "in accuracy between groups."), "",
                  md_table(["task", t("受保护属性 attribute", "attribute"), t("比例 ratio", "ratio"),
                            t("准确率差 accuracy gap", "accuracy gap"), "flag", t("样本数 counts", "counts")], fair)]
    if res.get("robustness"):
        lines += ["", f"### {t('稳健性 Robustness', 'Robustness')}", "",
                  md_table([t("扰动 perturbation", "perturbation"), t("准确率 accuracy", "accuracy"),
                            t("下降 drop vs clean", "drop vs clean")],
                           [[k, v.get("accuracy"), v.get("drop")] for k, v in res["robustness"].items()])]
    if len(d["eval"]) > 1:
        names = sorted({tk for r in d["eval"].values() for tk in (r or {}).get("tasks", {})})
        rows = [[name, *[((r or {}).get("tasks", {}).get(tk) or {}).get("accuracy") for tk in names],
                 (r or {}).get("overall", {}).get("accuracy")] for name, r in d["eval"].items()]
        lines += ["", f"### {t('模型对比 Models compared (accuracy)', 'Models compared (accuracy)')}", "",
                  md_table(["model", *names, "overall"], rows)]
    rt = d.get("retention")
    if rt:
        lines += ["", f"### {t('通用能力保持 General-ability retention', 'General-ability retention')}", "",
                  md_table([t("模型 model", "model"), t("困惑度 perplexity", "perplexity"), "tokens"],
                           [[rt["before"]["model"], rt["before"]["perplexity"], rt["before"]["tokens"]],
                            [rt["after"]["model"], rt["after"]["perplexity"], rt["after"]["tokens"]]]),
                  "", t(f"困惑度变化 {rt['change_pct']:+.1f}%（{rt['corpus']}）",
                        f"perplexity change {rt['change_pct']:+.1f}% ({rt['corpus']})")]
    headers, rows = instruction_rows(d)
    if rows:
        chars = next(r.get("exact_match_max_chars") for r in d["instructions"].values() if r)
        title = t("行内指令数据（留出）Instruction data held out (the bank's own)",
                  "Instruction data held out (the bank's own)")
        what = t("general / private 语料测试集中的指令记录：答案损失 = 答案词元（与 SFT 训练的词元相同）的平均负对数似然；"
                 f"精确匹配仅对参考答案不超过 {chars} 个字符的记录计算（贪心解码）。",
                 "Instruction records of the general / private corpora's test splits: answer loss = mean negative "
                 "log-likelihood per answer token (the tokens SFT trains on); exact match of the greedy answer only "
                 f"for records whose reference answer has at most {chars} characters.")
        lines += ["", f"### {title}", "", what, "", md_table(headers, rows)]
    return lines


def instruction_rows(d: dict) -> tuple[list[str], list[list[Any]]]:
    """One row per evaluated model and held-out instruction corpus (``eval/<model>/instructions.json``), in the
    order of the task results; a corpus that could not be scored gets a row saying why."""
    found = d.get("instructions") or {}
    chars = next((r.get("exact_match_max_chars") for r in found.values() if r), None)
    headers = ["model", "corpus", "n", "answer loss", "exact match", f"n exact-match eligible (<= {chars} chars)"]
    rows = []
    for name in [*d.get("eval", {}), *sorted(set(found) - set(d.get("eval", {})))]:
        res = found.get(name)
        if not res:
            continue
        for kind, sc in res.get("corpora", {}).items():
            rows.append([name, kind, sc.get("n"), sc.get("answer_loss"), sc.get("exact_match"),
                         sc.get("n_exact_match")])
        for kind, why in res.get("not_scored", {}).items():
            rows.append([name, kind, 0, None, None, f"not scored: {why}"])
    return headers, rows


def interval_text(x: dict | None) -> str:
    """``0.750 [0.690, 0.805]`` from an interval dict (estimate, low, high); ``–`` without an estimate."""
    if not x or x.get("estimate") is None:
        return "–"
    return f"{x['estimate']:.3f} [{_num(x.get('low'))}, {_num(x.get('high'))}]"


def _evidence(d: dict, t: _Lang) -> list[str]:
    """Intervals, baselines and counterfactual flips of the final model (eval/evidence.json)."""
    ev = d.get("evidence")
    if not ev:
        return []
    final = ev.get("final")
    iv = (ev.get("intervals") or {}).get(final) or {}
    lines = ["", f"### {t('区间、基线与反事实 Intervals, baselines and counterfactuals', 'Intervals, baselines and counterfactuals')}",
             "", t("95% 自助法区间（2000 次重抽样，种子 0）；基线在同一批测试记录上评分（规则引擎与 scikit-learn 评分卡，"
                   "训练于 train 切分）；McNemar 检验比较模型与基线。",
                   "95% bootstrap intervals (2000 resamples, seed 0); baselines scored on the same test records (the "
                   "rule engine and scikit-learn scorecards trained on the train split); McNemar's test compares the "
                   "model with each baseline."), ""]
    rows = []
    for task, v in iv.items():
        base = (ev.get("baselines") or {}).get(task) or {}
        best = max(((n, b) for n, b in base.items() if b.get("available")), default=None,
                   key=lambda nb: nb[1]["baseline"]["accuracy"])
        rows.append([task, v.get("n"), interval_text(v.get("accuracy")), interval_text(v.get("macro_f1")),
                     f"{best[0]} {best[1]['baseline']['accuracy']:.3f}" if best else "–",
                     ("WORSE" + (" (p < 0.05)" if best[1].get("significantly") else "")) if best and
                     best[1]["model_worse"] else ("better or equal" if best else "–")])
    lines.append(md_table(["task", "n", t("准确率 accuracy [95% CI]", "accuracy [95% CI]"), "macro-F1 [95% CI]",
                           t("最强基线 strongest baseline", "strongest baseline"),
                           t("模型相对最强基线 model vs strongest baseline", "model vs strongest baseline")], rows))
    cf = [[task, f"swap {attr}", p.get("n"), p.get("flips"), _num(p.get("flip_rate")), "FLAG" if attr in c.get("flagged", [])
           else "ok"] for task, c in (ev.get("counterfactual") or {}).items()
          for attr, p in c.get("protected", {}).items() if p.get("in_prompt")]
    if cf:
        lines += ["", t("受保护属性互换（其余不变）后决策改变的比例（> 2% 标记）：",
                        "Share of decisions that change when only a protected attribute is swapped (> 2% flagged):"),
                  "", md_table(["task", t("属性 attribute", "attribute"), t("变体数 variants", "variants"),
                                t("改变数 flips", "flips"), t("改变率 flip rate", "flip rate"), "flag"], cf)]
    return lines


def _confidence(res: dict, t: _Lang) -> list[str]:
    """The abstention rule the model ships with, the coverage it implies, and calibration (flagged when ECE exceeds
    :data:`~banklm.evaluation.confidence.ECE_FLAG`)."""
    conf = {task: r["confidence"] for task, r in res.get("tasks", {}).items() if r.get("confidence")}
    if not conf:
        return []
    op = res.get("operating_point") or {}
    rule = next(iter(op.get("tasks", {}).values()), {}).get("rule")
    handoff = next(iter(conf.values()))["abstention"].get("abstain_value")
    lines = ["", f"### {t('置信度与转人工 Confidence and abstention', 'Confidence and abstention')}", "",
             t(f"置信度 = 标签打分下所答主标签的概率（在验证集上做温度缩放）。规则：置信度低于阈值的案件改答“{handoff}”，不计为作答；"
               f"阈值为{rule or '未设定'}。覆盖率 = 作答案件 / 全部案件。阈值随模型导出（operating_point.json）。",
               f"confidence = label scoring's probability of the answered primary label (temperature-scaled on the "
               f"validation split). Rule: a case whose confidence is below the threshold is answered \"{handoff}\" "
               f"and not counted as answered; threshold: {rule or 'none'}. Coverage = answered / all cases. The "
               f"threshold ships with the model (operating_point.json)."), ""]
    rows = []
    for task, c in conf.items():
        cal, ab = c["calibration"], c["abstention"]
        val = (op.get("tasks", {}).get(task) or {}).get("validation") or {}
        rows.append([task, ab.get("threshold"), c.get("temperature"), ab.get("coverage"), ab.get("accuracy"),
                     val.get("coverage"), val.get("accuracy"), cal.get("ece"), cal.get("roc_auc"),
                     f"ECE > {ECE_FLAG:g}" if cal.get("flag") else "ok"])
    lines.append(md_table(["task", t("阈值 threshold", "threshold"), t("温度 temperature", "temperature"),
                           t("覆盖率 coverage", "coverage"), t("作答准确率 accuracy answered", "accuracy answered"),
                           t("验证集覆盖率 validation coverage", "validation coverage"),
                           t("验证集作答准确率 validation accuracy", "validation accuracy answered"), "ECE", "ROC-AUC",
                           t("校准 calibration", "calibration")], rows))
    flags = [task for task, c in conf.items() if c["calibration"].get("flag")]
    if flags:
        lines += ["", t(f"**校准不足**：{', '.join(flags)} 的期望校准误差超过 {ECE_FLAG:g}，置信度不宜直接作为概率使用。",
                        f"**Miscalibrated**: the expected calibration error of {', '.join(flags)} exceeds {ECE_FLAG:g}; its "
                        "confidences should not be read as probabilities.")]
    return lines


def _quantization(d: dict, t: _Lang) -> list[str]:
    lines = ["## 量化前后对比 Before/after quantization", ""]
    checks = [(fmt, c) for fmt, cs in (d.get("export") or {}).items() if isinstance(cs, list)
              for c in cs if isinstance(c, dict)]
    if not checks:
        return lines + [t("本次运行未导出。", "Not exported in this run.")]
    final = next(iter(d["eval"]), None)
    ref_bytes = (d["eval"].get(final) or {}).get("overall", {}).get("model_bytes") if final else None
    rows = []
    for fmt, c in checks:
        lg, size, te = c.get("logits") or {}, c.get("bytes"), c.get("task_eval") or {}
        drop = te.get("accuracy_drop")
        rows.append([c.get("file"), fmt, c.get("type"), size,
                     (size / ref_bytes) if isinstance(size, int) and ref_bytes else None,
                     lg.get("max_abs"), lg.get("mean_abs"), lg.get("top1_agreement"),
                     (c.get("tokenizer") or {}).get("ids_equal"), (c.get("generation") or {}).get("equal"),
                     te.get("accuracy"), 0.0 - drop if isinstance(drop, (int, float)) else None,
                     "pass" if c.get("passed") else "FAIL"])
    lines += [t("与导出前的 PyTorch 模型（safetensors）在测试提示上逐位置比较；任务准确率为导出文件在其运行时中生成、解析后的得分：",
                "Compared position by position with the PyTorch model before export (safetensors) on test prompts; "
                "task accuracy is scored from what the exported file generates in its runtime:"),
              "", md_table(["file", t("格式 format", "format"), t("类型 type", "type"), t("字节 bytes", "bytes"),
                            t("相对原模型大小 size vs original", "size vs original"), "max |Δlogit|", "mean |Δlogit|",
                            t("top-1 一致率 agreement", "top-1 agreement"), t("分词一致 token ids equal", "token ids equal"),
                            t("贪心生成一致 greedy equal", "greedy equal"), t("任务准确率 task accuracy", "task accuracy"),
                            t("准确率变化 Δ accuracy vs PyTorch", "Δ accuracy vs PyTorch"), t("结论 verdict", "verdict")],
                           rows)]
    before = ((d.get("export") or {}).get("task_eval") or {}).get("pytorch") or {}
    if ref_bytes:
        lines += ["", t(f"原模型（{final}）大小 {ref_bytes} 字节", f"Original model ({final}): {ref_bytes} bytes")
                  + (t(f"，导出前任务准确率 {_num(before.get('accuracy'))}（{before.get('n')} 条测试记录）。",
                       f"; task accuracy before export {_num(before.get('accuracy'))} ({before.get('n')} test records).")
                     if "accuracy" in before else t("。", "."))]
    return lines + _decoding(d, t) + _thresholds(d, t)


DECODING_ORDER = ("free", "constrained")
DECODING_FIGURES = (("accuracy", "accuracy"), ("format_compliance", "strict format compliance"),
                    ("unsupported_number_rate", "unsupported-number rate"))


def decoding_rows(d: dict) -> tuple[list[str], list[list[Any]]]:
    """Free vs constrained decoding side by side, from the export stage's task evaluation (the same test records
    decoded both ways): one row per model (PyTorch, each artefact) and task, each figure free then constrained.
    No rows unless a model was scored both ways."""
    v = d.get("export") or {}
    te = v.get("task_eval") or {}
    models = [("PyTorch", te.get("pytorch") or {})]
    models += [(f"{fmt} {c.get('type')}", c.get("task_eval") or {}) for fmt in ("gguf", "onnx")
               for c in v.get(fmt, []) if isinstance(c, dict)]
    headers = ["model", "task", *[f"{label} ({dec})" for _, label in DECODING_FIGURES for dec in DECODING_ORDER]]
    rows = []
    for name, summary in models:
        by = summary.get("by_decoding") or {}
        if not all(dec in by for dec in DECODING_ORDER):
            continue
        for task in sorted({t for dec in DECODING_ORDER for t in (by[dec].get("tasks") or {})}):
            rows.append([name, task, *[((by[dec].get("tasks") or {}).get(task) or {}).get(key)
                                       for key, _ in DECODING_FIGURES for dec in DECODING_ORDER]])
    return headers, rows


def threshold_rows(d: dict) -> tuple[list[str], list[list[Any]]]:
    """Coverage and accuracy on the answered cases at the bundle's operating point, per model (PyTorch, each
    artefact) and task, from the decoding with label scores (constrained): quantization shifts confidences."""
    v = d.get("export") or {}
    op = v.get("operating_point") or {}
    te = v.get("task_eval") or {}
    models = [("PyTorch", te.get("pytorch") or {})]
    models += [(f"{fmt} {c.get('type')}", c.get("task_eval") or {}) for fmt in ("gguf", "onnx")
               for c in v.get(fmt, []) if isinstance(c, dict)]
    rows = []
    for name, summary in models:
        for dec, res in (summary.get("by_decoding") or {}).items():
            for task, r in sorted((res.get("tasks") or {}).items()):
                if r.get("coverage") is not None:
                    rows.append([name, dec, task, (op.get("tasks", {}).get(task) or {}).get("threshold"),
                                 r.get("accuracy"), r.get("coverage"), r.get("answered_accuracy")])
    return ["model", "decoding", "task", "threshold", "accuracy (all)", "coverage", "accuracy answered"], rows


def _thresholds(d: dict, t: _Lang) -> list[str]:
    headers, rows = threshold_rows(d)
    if not rows:
        return []
    return ["", f"### {t('导出后阈值处的覆盖率 Coverage at the threshold after export', 'Coverage at the threshold after export')}",
            "", t("导出包携带的阈值（operating_point.json）在每个导出文件上的覆盖率与作答准确率（量化会改变置信度）。",
                  "The bundle's threshold (operating_point.json) applied to each exported file: coverage and accuracy "
                  "on the answered cases (quantization shifts confidences)."), "", md_table(headers, rows)]


def _decoding(d: dict, t: _Lang) -> list[str]:
    headers, rows = decoding_rows(d)
    if not rows:
        return []
    n = ((d.get("export") or {}).get("task_eval") or {}).get("records")
    return ["", f"### {t('自由解码与约束解码 Free vs constrained decoding', 'Free vs constrained decoding')}", "",
            t(f"同一批 {n} 条测试记录分别以自由贪心解码和约束解码（按任务答案语法：格式、标签集合、理由中只能引用提示里的数字）"
              "生成；格式合规为严格解析器接受的比例，无依据数字率为理由中引用了输入里没有的数字的答案比例。",
              f"The same {n} test records decoded freely (greedy) and constrained (under the task's answer "
              "grammar: layout, label sets, a reason citing only numbers of the prompt); format compliance is the "
              "share the strict parser accepts, the unsupported-number rate the share of reasons citing a number "
              "the input does not hold."), "", md_table(headers, rows)]


def export_records(d: dict) -> list[dict]:
    """The exported files the ledger recorded, hashed as they are now (when the card is written)."""
    paths = sorted({r["path"] for e in d["entries"] for r in e.get("outputs", []) if r["path"].startswith("export/")})
    paths = [p for p in paths if (d["run_dir"] / p).is_file()]
    return file_records([d["run_dir"] / p for p in paths], d["run_dir"])


def _artefacts(d: dict, t: _Lang) -> list[str]:
    recs = export_records(d)
    checked = {c["file"]: c.get("bytes") for cs in (d.get("export") or {}).values() if isinstance(cs, list)
               for c in cs if isinstance(c, dict) and "file" in c}
    have = {r["path"]: r["bytes"] for r in recs}
    if checked and any(have.get(f) != n for f, n in checked.items()):
        # written while the export is still being built (the card inside export/): not in the ledger yet;
        # the task answer grammars (grammar/<task>.gbnf) are listed with the artefacts
        grammars = {g["file"]: g.get("bytes") for g in ((d.get("export") or {}).get("grammars") or {}).values()}
        return ["## 导出文件 Exported artefacts", "",
                md_table(["file", "bytes"], [[f, n] for f, n in sorted({**checked, **grammars}.items())]), "",
                t("各文件的 sha256 见导出目录中的 SHA256SUMS（`cd export && sha256sum -c SHA256SUMS`）；运行目录的 "
                  "MODEL_CARD.md 列出台账记录的 sha256，由 `banklm verify` 检查。",
                  "The sha256 of every file is in the export folder's SHA256SUMS (`cd export && sha256sum -c "
                  "SHA256SUMS`); the run folder's MODEL_CARD.md lists the ledger's sha256, checked by `banklm verify`.")]
    if not recs:
        return ["## 导出文件 Exported artefacts", "", t("本次运行未导出文件。", "No exported files in this run.")]
    return [card_artefacts_section(recs), "",
            t("`banklm verify` 检查这里列出的每个文件与台账记录及磁盘上的文件一致（sha256）。",
              "`banklm verify` checks that every file listed here is the one the ledger recorded and the one on "
              "disk (sha256).")]


def failure_examples(run_dir: Path, model: str, n: int, mask_pii: Callable[[str], str] | None) -> list[list[Any]]:
    """Up to ``n`` wrong predictions, taken in turn from each task; outputs cut short and PII-masked."""
    path = run_dir / "eval" / model / "predictions.jsonl"
    if n <= 0 or not path.is_file():
        return []
    by_task: dict[str, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            p = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not p.get("correct"):
            by_task.setdefault(p.get("task", "?"), []).append(p)
    picked: list[dict] = []
    while len(picked) < n and any(by_task.values()):
        for task in sorted(by_task):
            if by_task[task] and len(picked) < n:
                picked.append(by_task[task].pop(0))
    rows = []
    for p in picked:
        out = " ".join(str(p.get("output", "")).split())
        out = out[:80] + ("…" if len(out) > 80 else "")
        if mask_pii is not None:
            out = mask_pii(out)
        rows.append([p.get("id"), p.get("task"), p.get("label"), p.get("pred_label") or "(unparsed)", out])
    return rows


def _limitations(d: dict, recipe, t: _Lang, mask_pii) -> list[str]:
    lines = ["## 局限与失败案例 Known limitations and failure examples", "",
             "- " + t("训练与测试数据由 banklm.tasks 的成文规则生成（docs/tasks.md），分数不代表在本行真实客户数据上的表现；"
                      "上线前须在本行数据上复核。",
                      "Training and test data are generated from the written rules in banklm.tasks (docs/tasks.md); "
                      "the scores do not measure performance on the bank's real customers: re-check on the bank's own "
                      "data before use.")]
    if d["eval"]:
        final, res = next(iter(d["eval"].items()))
        tasks = res.get("tasks", {})
        if tasks:
            worst = min(tasks, key=lambda k: tasks[k].get("accuracy") or 0.0)
            lines.append("- " + t(f"最弱任务：{worst}（准确率 {_num(tasks[worst].get('accuracy'))}）。",
                                  f"Weakest task: {worst} (accuracy {_num(tasks[worst].get('accuracy'))})."))
        branches = sorted(((b["accuracy"], task, name, b["n"]) for task, r in tasks.items()
                           for name, b in (r.get("per_branch") or {}).items()
                           if isinstance(b, dict) and b.get("accuracy") is not None), key=lambda x: (x[0], x[1], x[2]))
        if branches:
            weak = ", ".join(f"{task}/{name} {_num(acc)} (n={n})" for acc, task, name, n in branches[:3])
            lines.append("- " + t(f"最弱的规则分支：{weak}。", f"Weakest rule branches: {weak}."))
        fc = res.get("overall", {}).get("format_compliance")
        if isinstance(fc, float) and fc < 1.0:
            lines.append("- " + t(f"{(1 - fc) * 100:.1f}% 的回答不符合答案格式（计为错误）。",
                                  f"{(1 - fc) * 100:.1f}% of answers do not follow the answer format (counted wrong)."))
        fair = [f"{task}/{attr}" for task, r in tasks.items() for attr, f in (r.get("fairness") or {}).items()
                if isinstance(f, dict) and f.get("flag")]
        lines.append("- " + (t(f"公平性标记：{', '.join(fair)}（比例 < 0.8）。",
                               f"Fairness flags: {', '.join(fair)} (ratio < 0.8).") if fair else
                             t("公平性：所有受保护属性的比例均不低于 0.8。",
                               "Fairness: every protected attribute's ratio is at least 0.8.")))
        skipped = [f"{task}: {r['fairness_skipped']}" for task, r in tasks.items() if r.get("fairness_skipped")]
        if skipped:
            lines.append("- " + t(f"未做公平性分析：{'; '.join(skipped)}。",
                                  f"Fairness not analysed: {'; '.join(skipped)}."))
        for f in flags(d):  # the report's verdict flags (faithfulness, calibration, baselines, counterfactuals...)
            if f["kind"] not in ("fairness", "reused stages"):
                lines.append("- " + t(f"标记（{f['kind']}）：{f['what']}", f"Flag ({f['kind']}): {f['what']}"))
        drops = [(k, v.get("drop")) for k, v in (res.get("robustness") or {}).items()
                 if isinstance(v.get("drop"), (int, float)) and v["drop"] > 0.05]
        if drops:
            lines.append("- " + t("扰动后准确率下降超过 5 个百分点：", "Accuracy drops by more than 5 points under: ")
                         + ", ".join(f"{k} ({_num(v)})" for k, v in drops))
        rt = d.get("retention")
        if rt and rt.get("change_pct", 0) > 10:
            lines.append("- " + t(f"微调后通用文本困惑度上升 {rt['change_pct']:.1f}%：通用能力有所下降。",
                                  f"General-text perplexity rose {rt['change_pct']:.1f}% after fine-tuning: some "
                                  "general ability was lost."))
        rows = failure_examples(d["run_dir"], final, recipe.report.failure_examples, mask_pii)
        lines += ["", f"### {t('失败案例 Failure examples', 'Failure examples')}", ""]
        if rows:
            lines += [t(f"取自 eval/{final}/predictions.jsonl 的错误预测（输出截断；个人信息检测器命中处已遮蔽）：",
                        f"Wrong predictions from eval/{final}/predictions.jsonl (outputs cut short; anything the PII "
                        "detector flags is masked):"), "",
                      md_table(["id", "task", t("正确标签 gold", "gold"), t("预测 predicted", "predicted"),
                                t("模型输出 output", "output")], rows)]
        else:
            lines.append(t("测试集上没有错误预测。", "No wrong prediction on the test split."))
    return lines


def _change_log(d: dict, recipe, t: _Lang) -> list[str]:
    """This run against the previous run of the recipe; parameters from the ledgers (banklm.compare)."""
    lines = ["## 变更记录 Change log", ""]
    prev = previous_run(d["run_dir"], recipe.name)
    if prev is None:
        return lines + [t(f"本配方的首次运行（{d['run_dir'].parent} 中没有更早的 {recipe.name} 运行）。",
                          f"First run of this recipe (no earlier {recipe.name} run in {d['run_dir'].parent}).")]
    try:
        diff = compare_runs(prev, d["run_dir"])
    except NotARun as e:
        return lines + [t(f"无法与上一次运行比较：{e}", f"Cannot compare with the previous run: {e}")]
    this = t("本次 this run", "this run")
    lines += [t(f"与上一次运行 `{prev.name}` 相比（`banklm compare {prev} {d['run_dir']}`）：",
                f"Compared with the previous run `{prev.name}` (`banklm compare {prev} {d['run_dir']}`):"), ""]
    for side, name in (("a", f"`{prev.name}`"), ("b", t("本次运行", "this run"))):
        lines += [f"- **{t('警告', 'Warning')}** {name}: {w}" for w in diff["warnings"][side]]
    if any(diff["warnings"].values()):
        lines.append("")
    lines += [f"### {t('参数 Parameters', 'Parameters')}", "",
              t("各阶段最新台账记录中的参数（即产生当前输出所用的参数）；标为 recipe.yaml (not recorded) 的键只见于 "
                "recipe.yaml：每次调用都会重写该文件，台账不记录这些键，其值未必是产生输出时所用的值。",
                "The parameters each stage's newest ledger entry recorded (what its current outputs were made "
                "with); keys marked recipe.yaml (not recorded) are only in recipe.yaml, which every call rewrites "
                "and no ledger entry records: they may not be the values the outputs were made with."), ""]
    rows = recipe_rows(diff)
    lines.append(md_table(["key", prev.name, this, t("记录于 recorded by", "recorded by")], rows) if rows
                 else t("已记录的参数无变化。", "No recorded parameter changed."))
    lines += ["", f"### {t('数据 Data', 'Data')}", ""]
    rows = [r for r in data_rows(diff) if r[4] not in ("0", "–")]
    lines.append(md_table(["corpus", "split", prev.name, this, t("变化 change", "change")], rows)
                 if rows else t("各语料各划分的记录数与内容均无变化。", "Records per corpus and split unchanged (counts and content)."))
    lines += ["", f"### {t('分数 Scores', 'Scores')}", ""]
    rows = [r for r in score_rows(diff) if r[3] not in ("0", "–")]
    lines.append(md_table(["model/task/metric", prev.name, this, t("变化 change", "change")], rows)
                 if rows else t("分数无变化。", "No score changed."))
    return lines


def _traceability(d: dict, t: _Lang) -> list[str]:
    entries = d["entries"]
    lines = ["## 可追溯性 Traceability", ""]
    if not entries:
        return lines + [t("没有台账。", "No ledger.")]
    status = (t("台账链与所有记录文件在生成本卡时完好", "chain and every recorded file intact when this card was written")
              if not d["problems"] else t("检查失败：", "CHECK FAILED: ") + d["problems"][0])
    last = entries[-1]
    versions = ", ".join(f"{k} {v}" for k, v in (last.get("versions") or {}).items())
    host = last.get("host") or {}
    lines += [f"- {t('台账', 'Ledger')}: ledger.jsonl, {len(entries)} {t('条记录', 'entries')}, "
              f"{t('链尾哈希', 'head hash')} `{last.get('hash', '')[:16]}`; {status}",
              f"- {t('库版本', 'Library versions')}: {versions}",
              f"- {t('主机', 'Host')}: {host.get('platform', '?')}, {host.get('cpu_count', '?')} CPU, "
              f"CUDA: {', '.join(host.get('cuda') or []) or t('无', 'none')}",
              f"- {t('随机种子', 'Seed')}: {last.get('seed')}", "",
              md_table(["seq", "stage", "status", t("耗时 s", "wall s"), t("设备 device", "device"), "started",
                        t("输出文件 files", "output files")],
                       [[e.get("seq"), e.get("stage"), e.get("status"), e.get("wall_s"), e.get("device"),
                         e.get("started_at"), len(e.get("outputs", []))] for e in entries]),
              "", t("复核：`banklm verify <运行目录>` 重新计算每个文件的哈希并检查台账链。",
                    "To re-check: `banklm verify <run folder>` re-hashes every file and checks the chain.")]
    return lines


def _distillation(d: dict, t: _Lang) -> list[str]:
    """Teacher vs student vs the student trained without the teacher (only when the run distilled)."""

    st = d.get("distill")
    if not st:
        return []
    lines = ["## 蒸馏 Distillation", ""]
    init = st.get("student_init") or {}
    lines.append(t(f"学生模型初始化方式：{init.get('from')}；方法：{st.get('method')}；教师模型：`{st.get('teacher')}`。"
                   "基线 = 同一学生模型、同样数据和同样步数，但不使用教师。",
                   f"Student initialised from: {init.get('from')}; method: {st.get('method')}; teacher: "
                   f"`{st.get('teacher')}`. Baseline = the same student, same data and same number of steps, "
                   "without the teacher."))
    size_h, size_rows, task_h, task_rows = distill_tables(d)
    if not size_rows:
        return lines + ["", t("教师、学生与基线未在本次运行中评估。", "Teacher, student and baseline were not evaluated "
                                                           "in this run.")]
    lines += ["", md_table(size_h, size_rows), "", md_table(task_h, task_rows)]
    seq = st.get("seqkd")
    if seq:
        lines += ["", t(f"序列级蒸馏：教师回答 {seq['prompts']} 条，保留 {seq['kept']} 条（{seq['yield']:.1%}）；"
                        f"剔除原因 {json.dumps(seq['rejected'], ensure_ascii=False)}。",
                        f"Sequence-level KD: the teacher answered {seq['prompts']} prompts, {seq['kept']} kept "
                        f"({seq['yield']:.1%}); rejections {json.dumps(seq['rejected'], ensure_ascii=False)}.")]
    return lines


def render_model_card(d: dict, recipe, mask_pii: Callable[[str], str] | None = None) -> str:
    """The card's Markdown, from ``banklm.results.collect(run_dir)`` and the run's recipe."""
    t = _Lang(recipe.report.language)
    sections = [_header(d, recipe, t), _use(recipe, t), _tasks(recipe, t), _responsible(recipe, t),
                _base_model(d, recipe, t),
                _training_data(d, recipe, t), _deid(d, t), _training(d, recipe, t), _evaluation(d, t),
                _distillation(d, t), _quantization(d, t), _artefacts(d, t), _limitations(d, recipe, t, mask_pii),
                _change_log(d, recipe, t), _traceability(d, t)]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"
