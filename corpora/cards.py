"""Dataset cards: the ``card.md`` of every built corpus, rendered from its ``stats.json`` (docs/corpora.md).

:func:`text_card` for the raw-text / instruction corpora (general, vertical, private), :func:`scenario_card`
for the scenario corpus and :func:`mix_card` for ``corpora/mix/``. Each is a pure function of the stats the
builders in ``banklm.corpora.build`` write; no detected PII value ever reaches a card (the stats hold counts).
"""

from __future__ import annotations

import json

KNOWN_LIMITS = {
    "general": ["Quality rules are heuristics tuned for Chinese text; the general defaults relax the CJK and "
                "digit ratios so that arithmetic and English answers stay."],
    "vertical": ["Boilerplate is found by lines recurring in many documents: a disclaimer used in only one "
                 "or two documents stays."],
    "private": ["PII detection is rule-based (checksums, context words, a surname lexicon; docs/pii.md): a "
                "name without a context word or a free-form address can be missed. Review samples before "
                "training and keep the raw files inside the bank.",
                "Pseudonyms are keyed by the environment variable named in the recipe; the key is never stored."],
}


def _md_cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ⏎ ")


def text_card(stats: dict) -> str:
    kind = stats["kind"]
    src_rows = "\n".join(
        f"| {_md_cell(s['name'])} | `{_md_cell(s['path'])}` | {s['format']} | {s['weight']} | {s['files']} | "
        f"{s['records_read']} | {s['valid']} | {s['quarantined_records']} | {s['bad_files']} | "
        f"{_md_cell(s['licence'])} |" for s in stats["sources"])
    step_rows = "\n".join(
        f"| {st['step']} | {st['in']} | {st['kept']} | {st['dropped']} | {st['quarantined']} | "
        f"{_md_cell(', '.join(f'{k} {v}' for k, v in (st.get('reasons') or st.get('quarantine_reasons') or {}).items()) or '-')} |"
        for st in stats["steps"])
    ex_lines = []
    for st in stats["steps"]:
        for reason, exs in (st.get("examples") or {}).items():
            for ex in exs[:2]:
                ex_lines.append(f"- {st['step']} / {reason} / `{_md_cell(ex['id'])}`: {_md_cell(ex['text'][:160])}")
    rewrites = []
    for st in stats["steps"]:
        parts = [f"{k.replace('_', ' ')} {st[k]}" for k in ("records_changed", "lines_removed", "junk_lines_removed")
                 if st.get(k)]
        if parts:
            rewrites.append(f"- {st['step']}: {', '.join(parts)}")
        if st.get("top_lines"):
            rewrites.append(f"  (recurring lines removed, e.g. {'; '.join(_md_cell(t) for t in st['top_lines'][:5])})")
    pii = stats.get("pii")
    if pii:
        pii_text = (f"Mode: {pii['mode']}; records with PII: {pii['records_with_pii']}.\n\n| type | replaced |\n|---|---|\n"
                    + "\n".join(f"| {t} | {n} |" for t, n in sorted(pii["counts"].items()))
                    + "\n\nCounts only: no detected value is written to the stats, the card or the quarantine.")
    else:
        pii_text = "No `pii` step in this corpus."
    d = stats["dedup"]
    dedup = (f"- exact duplicates removed: {d['exact_removed'] if d['exact_removed'] is not None else 'step not run'}"
             f" ({d['exact_duplicate_groups'] or 0} groups)\n"
             f"- near duplicates removed: {d['near_removed'] if d['near_removed'] is not None else 'step not run'}; "
             f"cluster sizes (size: clusters): {json.dumps(d['near_cluster_size_histogram'] or {})}")
    dc = stats["decontamination"]
    splits = "\n".join(f"| {k} | {v} | {stats['lengths']['out'][k].get('p50', '-')} | "
                       f"{stats['lengths']['out'][k].get('max', '-')} |" for k, v in stats["splits"].items())
    if stats.get("empty_splits"):
        splits += f"\n\nEmpty (too few records for their fraction, not saved): {', '.join(stats['empty_splits'])}."
    li = stats["lengths"]["in"]
    hist = " ".join(f"{k}: {v}" for k, v in li.get("histogram", {}).items() if v)
    enc = ", ".join(f"{k} x{v}" for k, v in stats["encodings"].items()) or "-"
    notes = "\n".join(f"- `{n['file']}`: {n['encoding']}, {n['note']}" for n in stats["encoding_notes"][:20])
    tok = stats["tokens"]
    tok_text = (f"{tok['total']} tokens ({', '.join(f'{k} {v}' for k, v in tok['by_split'].items())}) with "
                f"`{tok['tokenizer']}`" if tok.get("available") else f"Not available: {tok['reason']}.")
    limits = "\n".join(f"- {t}" for t in [*KNOWN_LIMITS.get(kind, []),
                                            "Near deduplication is probabilistic (MinHash LSH): a few pairs just "
                                            "above the threshold can be missed.",
                                            "Decontamination only covers this run's scenario test prompts, not "
                                            "benchmarks the model may meet elsewhere."])
    return f"""# Dataset card: {kind} corpus

## Sources
| name | path | format | weight | files | records read | valid | quarantined | bad files | licence |
|---|---|---|---|---|---|---|---|---|---|
{src_rows}

Corpus licence: {stats['licence']}

## Steps applied
Every step: in = kept + dropped + quarantined.

| step | in | kept | dropped | quarantined | reasons |
|---|---|---|---|---|---|
{step_rows}

## Examples of removed records
{chr(10).join(ex_lines) or "None removed."}

## Rewritten records
{chr(10).join(rewrites) or "None."}

## PII
{pii_text}

## Deduplication
{dedup}

## Decontamination
{'Status: ' + dc['status']}; n = {dc['n']} characters; evaluation prompts: {dc['eval_prompts']}; removed: {dc['removed']}.

## Splits
| split | records | median chars | max chars |
|---|---|---|---|
{splits}

## Lengths and encodings
Characters per record read: {json.dumps({k: v for k, v in li.items() if k != 'histogram'})}; histogram: {hist or '-'}.

Encodings: {enc}.
{notes}

## Tokens
{tok_text}

## Quarantine
{stats['quarantined']} entries in `quarantine.jsonl` (file, line and reason, or record id, step and reason; never content).

## Known limits
{limits}
"""


def scenario_card(stats: dict, licence: str) -> str:
    rows = "\n".join(f"| {s} | {n} | {json.dumps(stats['by_task'][s], ensure_ascii=False)} |"
                     for s, n in stats["splits"].items())
    steps = "\n".join(f"| {st['step']} | {st['in']} | {st['kept']} | {st['dropped']} | {st['quarantined']} | "
                      f"{st.get('reason') or ', '.join(f'{k} {v}' for k, v in st.get('reasons', {}).items()) or '-'} |"
                      for st in stats["steps"])
    sources = "\n".join(
        f"- generator `{s['task']}`: train {s.get('train', 0)}, validation {s.get('validation', 0)}, "
        f"test {s.get('test', 0)}, difficulty {s.get('difficulty', 0.0)}" if s["type"] == "synth" else
        f"- bank table `{s['path']}` ({s['task']}): {s['records']} records, {s.get('unlabelled', 0)} unlabelled "
        f"(distillation prompts only), {s.get('quarantined', 0)} quarantined, split {s['split']}, licence {s['licence']}"
        for s in stats["sources"])
    tok = stats.get("tokens") or {}
    tok_text = (f"{tok['total']} tokens with `{tok['tokenizer']}`" if tok.get("available")
                else f"Not available: {tok.get('reason', 'no tokenizer given')}.")
    return f"""# Dataset card: scenario corpus

## Sources
{sources}

Licence: {licence or "not given in the recipe"}

## Splits
| split | records | by task |
|---|---|---|
{rows}

## Steps applied
| step | in | kept | dropped | quarantined | reason |
|---|---|---|---|---|---|
{steps}

## Tokens
{tok_text}

## Known limits
- Generated records follow the documented labelling rules in `docs/tasks.md`; they show the model the
  task format and the rules, not the distribution of a real bank's customers.
- Protected attributes in credit profiles (gender, region, age band) are sampled independently of the
  label so that fairness can be measured; real data will not be so balanced.
"""


def mix_card(stats: dict) -> str:
    rows = []
    for split, st in stats["splits"].items():
        if "skipped" in st:
            rows.append(f"| {split} | - | - | - | {st['skipped']} |")
            continue
        for k, s in st["sources"].items():
            rows.append(f"| {split} | {k} | {s['target_proportion']} | {st['actual_proportions'].get(k, 0)} | "
                        f"{s['taken']} of {s['available']} ({s['epochs']} epochs{', upsampled' if s['upsampled'] else ''}) |")
    cols = ("`text` and `messages` (each row fills one)" if stats["both_columns"]
            else f"`{stats['content'][0]}`")
    return f"""# Dataset card: mix

Training mix of the run's corpora by target proportions (seed {stats['seed']}); content column: {cols};
`source` names each record's corpus. See the cards of the mixed corpora for sources, licences and steps.

| split | corpus | target | actual | records |
|---|---|---|---|---|
{chr(10).join(rows)}

## Known limits
- Upsampled records are exact copies (ids end in `#2`, `#3`...): many epochs of a small corpus overfit it.
"""
