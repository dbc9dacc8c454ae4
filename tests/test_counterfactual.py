"""Counterfactual records and flip rates (banklm.evaluation.counterfactual) with scripted stand-in models."""

from __future__ import annotations

import difflib
import json
import random
import re

import pytest
from banklm.corpora.synth import generate_records

from banklm.evaluation.counterfactual import (
    FLIP_FLAG,
    CannotCounterfactual,
    deciding_variants,
    flip_rates,
    protected_variants,
    reference_record,
    thresholds,
)
from banklm.tasks import get_task
from banklm.tasks.registry import register_spec, unregister
from tests.helpers import post_loan_records
from tests.test_task_spec import POST_LOAN, fields

CREDIT = get_task("credit")


@pytest.fixture(scope="module")
def credit_records():
    return generate_records("credit", 200, seed=0, split="test")


def _prompt(rec: dict) -> str:
    return next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "user")


def _meta(rec: dict) -> dict:
    return json.loads(rec["meta"])


def _rules(task, rec: dict) -> str:
    """What the rules answer for the facts a record carries (its meta): a model that follows them exactly."""
    return task.label(task.fields_from_meta(rec["meta"]))[task.primary_key]


def _female(prompt: str) -> bool:
    """The applicant's fact says 女 (申请人X某，女，... / 借款人X某（女，...)."""
    return re.search(r"(?:申请人|借款人)[^，（]{1,4}[，（]女，", prompt) is not None


# ------------------------------------------------------------------------------------------------ protected

def test_protected_variants_differ_from_the_reference_only_in_the_attribute(credit_records):
    recs = credit_records[:24]
    ids = []
    for rec in recs:
        ref = reference_record(CREDIT, rec)
        assert ref["id"] == rec["id"] and ref["gold"] == rec["gold"]
        ref_prompt = _prompt(ref)
        vs = protected_variants(CREDIT, rec)
        meta = _meta(rec)
        by_attr: dict[str, list] = {}
        for v in vs:
            by_attr.setdefault(v["counterfactual"]["attribute"], []).append(v["counterfactual"]["to"])
        # every other declared value (未知 included) / every other age band; region is not in the prompt
        assert sorted(by_attr["gender"]) == sorted({"男", "女", "未知"} - {meta["gender"]})
        assert sorted(by_attr["hukou"]) == sorted({"城镇", "农村", "未知"} - {meta["hukou"]})
        assert sorted(by_attr["age_band"]) == sorted({"18-30岁", "31-45岁", "46-60岁"} - {meta["age_band"]})
        assert "region" not in by_attr and len(vs) == 6
        for v in vs:
            cf = v["counterfactual"]
            assert cf["kind"] == "protected" and v["id"] == f"{rec['id']}~{cf['attribute']}={cf['to']}"
            assert v["gold"] == rec["gold"] and v["label"] == rec["label"]
            assert v["messages"][-1] == rec["messages"][-1]
            vmeta = _meta(v)
            if cf["attribute"] == "age_band":
                old, new = str(cf["value_from"]), str(cf["value_to"])
                assert vmeta["age"] == cf["value_to"] and vmeta["age_band"] == cf["to"]
                # the band's midpoint; the open end bands as wide as their neighbour
                assert cf["value_to"] == {"18-30岁": 23, "31-45岁": 38, "46-60岁": 53}[cf["to"]]
            else:
                old, new = cf["from"], cf["to"]
                assert vmeta[cf["attribute"]] == cf["to"]
            assert {k: x for k, x in vmeta.items() if k not in ("age", "age_band", cf["attribute"])} == \
                {k: x for k, x in meta.items() if k not in ("age", "age_band", cf["attribute"])}
            prompt = _prompt(v)
            # the variant is the reference with one occurrence of the old value's text replaced by the new one
            starts = [m.start() for m in re.finditer(re.escape(old), ref_prompt)]
            hits = [i for i in starts if ref_prompt[:i] + new + ref_prompt[i + len(old):] == prompt]
            assert len(hits) == 1, (ref_prompt, prompt)
            i = hits[0]
            ops = [op for op in difflib.SequenceMatcher(None, ref_prompt, prompt, autojunk=False).get_opcodes()
                   if op[0] != "equal"]
            assert ops
            for _, a0, a1, b0, b1 in ops:  # every changed span lies inside the replaced value
                assert i <= a0 <= a1 <= i + len(old) and i <= b0 <= b1 <= i + len(new)
                assert ref_prompt[a0:a1] in old and prompt[b0:b1] in new
            ids.append(v["id"])
    assert len(ids) == len(set(ids)) == 6 * len(recs)


def test_a_model_that_reads_gender_flips_exactly_where_expected(credit_records):
    recs = credit_records[:40]
    calls = []

    def biased(rs):
        calls.append(len(rs))
        return ["拒绝" if _female(_prompt(r)) else _rules(CREDIT, r) for r in rs]

    res = flip_rates(CREDIT, recs, biased, kinds=("protected",))
    assert len(calls) == 2 and calls[0] == len(recs)
    # by hand: a gender variant flips when it moves 女 in or out of the prompt and the rules do not refuse anyway
    flipped = []
    for rec in recs:
        g, rules = _meta(rec)["gender"], rec["label"]
        for v in ("男", "女", "未知"):
            if v != g and (g == "女") != (v == "女") and rules != "拒绝":
                flipped.append(f"{rec['id']}~gender={v}")
    p = res["protected"]
    assert p["gender"]["n"] == 2 * len(recs) and p["gender"]["flips"] == len(flipped) > 0
    assert p["gender"]["flip_rate"] == pytest.approx(len(flipped) / (2 * len(recs)))
    assert set(p["gender"]["examples"]) <= set(flipped) and len(p["gender"]["examples"]) == 3
    lo, hi = p["gender"]["interval"]["low"], p["gender"]["interval"]["high"]
    assert lo < p["gender"]["flip_rate"] < hi
    for attr in ("hukou", "age_band"):
        assert p[attr]["n"] == 2 * len(recs) and p[attr]["flips"] == 0 and p[attr]["flip_rate"] == 0.0
    assert p["region"] == {**p["region"], "in_prompt": False, "n": 0, "flip_rate": None}
    assert res["skipped"] == {"region: not in the prompt": len(recs)}
    assert p["gender"]["flip_rate"] > FLIP_FLAG and res["flag"] is True and res["flagged"] == ["gender"]
    json.dumps(res)


def test_a_model_that_follows_the_rules_never_flips_and_always_follows(credit_records):
    recs = credit_records[:48]
    res = flip_rates(CREDIT, recs, lambda rs: [_rules(CREDIT, r) for r in rs])
    for attr in ("gender", "hukou", "age_band"):
        assert res["protected"][attr]["n"] > 0 and res["protected"][attr]["flip_rate"] == 0.0
    d = res["deciding"]
    assert d["n"] > 0 and d["followed"] == d["n"] and d["follow_rate"] == 1.0
    assert {"dti_high", "overdue_many", "inquiries_many", "dti_mid", "large_unsecured"} <= set(d["by_rule"])
    assert res["flag"] is False and res["flagged"] == []
    # the blacklist (a yes/no flag) and the catch-all have no threshold to cross
    assert res["skipped"]["deciding: no numeric threshold in the rule"] == 6
    assert res["skipped"]["deciding: catch-all rule"] == 6
    json.dumps(res)


# ------------------------------------------------------------------------------------------------ deciding

def test_dti_high_moves_to_its_threshold_and_a_model_ignoring_dti_never_follows(credit_records):
    recs = [r for r in credit_records if _meta(r)["branch"] == "dti_high"]
    assert thresholds(CREDIT, "dti_high") == [("dti", ">", 70)]
    variants = [v for r in recs for v in deciding_variants(CREDIT, r)]
    assert len(variants) >= 10
    for v in variants:
        cf, meta = v["counterfactual"], _meta(v)
        rec = next(r for r in recs if r["id"] == v["id"].split("~")[0])
        assert cf["rule"] == "dti_high" and cf["field"] == "dti" and cf["from"] > 70 and cf["to"] == 70.0
        assert meta["dti"] == 70.0 and round(100 * meta["monthly_debt"] / meta["monthly_income"], 1) == 70.0
        assert meta["monthly_income"] == _meta(rec)["monthly_income"]
        got = CREDIT.label(CREDIT.fields_from_meta(meta))
        assert got["rule"] != "dti_high" and got["decision"] == cf["expected"] == v["label"] != rec["label"]
        # only the debt fact changed: the payment and the ratio, nothing else
        ref, new = _prompt(reference_record(CREDIT, rec)), _prompt(v)
        assert "负债收入比70.0%" in new
        a, b = re.split(r"[，；（）/]", ref), re.split(r"[，；（）/]", new)
        assert len(a) == len(b)
        assert {x[:3] for x, y in zip(a, b, strict=True) if x != y} <= {"月还款", "负债收"}
    originals = {r["id"]: r["label"] for r in recs}
    res = flip_rates(CREDIT, recs, lambda rs: [originals[r["id"].split("~")[0]] for r in rs], kinds=("deciding",))
    d = res["deciding"]
    assert d["n"] == len(variants) and d["followed"] == 0 and d["follow_rate"] == 0.0
    assert d["by_rule"] == {"dti_high": {"n": len(variants), "followed": 0, "follow_rate": 0.0}}
    assert res["protected"] == {}
    assert res["skipped"] == {"deciding: decision unchanged when crossed": len(recs) - len(variants)}


# ------------------------------------------------------------------------------------------------ a bank's spec

@pytest.fixture
def post_loan(tmp_path):
    p = tmp_path / "post_loan.yaml"
    p.write_text(POST_LOAN, encoding="utf-8")
    try:
        yield register_spec(p)
    finally:
        unregister("post_loan")


def test_protected_fields_not_in_the_prompt_give_no_variant(post_loan):
    recs = post_loan_records(post_loan, 8)
    assert all(protected_variants("post_loan", r) == [] for r in recs)
    assert all("女" not in _prompt(r) and "借款人" not in _prompt(r) for r in recs)
    res = flip_rates("post_loan", recs, lambda rs: [_rules(post_loan, r) for r in rs])
    for attr in ("借款人年龄_band", "借款人性别"):
        assert res["protected"][attr]["in_prompt"] is False and res["protected"][attr]["n"] == 0
        assert res["skipped"][f"{attr}: not in the prompt"] == len(recs)
    assert res["flag"] is False and res["deciding"]["follow_rate"] == 1.0
    # a threshold that is a spec constant, and a conjunction with a null test
    assert thresholds(post_loan, "严重逾期") == [("逾期天数", ">", 90)]
    assert thresholds(post_loan, "抵押物贬值") == [("抵押物估值变化", "<=", -20)]
    f = fields(逾期天数=120)
    post_loan.derive(f)
    [v] = deciding_variants(post_loan, post_loan.make_record("pl", f, random.Random(0)))
    assert v["counterfactual"] | {"expected_rule": None} == {
        "kind": "deciding", "rule": "严重逾期", "field": "逾期天数", "op": ">", "threshold": 90, "from": 120, "to": 90,
        "expected": "关注", "expected_rule": None}
    assert "逾期天数：90天" in _prompt(v)


# ------------------------------------------------------------------------------------------------ skipped

def test_a_prompt_only_record_is_skipped_and_counted(credit_records):
    rec = credit_records[0]
    bare = {**rec, "id": "table-row-1", "meta": json.dumps({"split": "test"})}
    for fn in (protected_variants, deciding_variants, reference_record):
        with pytest.raises(CannotCounterfactual) as e:
            fn(CREDIT, bare)
        assert isinstance(e.value, ValueError)
    seen = []

    def decide(rs):
        seen.append([r["id"] for r in rs])
        return [_rules(CREDIT, r) for r in rs]

    res = flip_rates(CREDIT, [bare, rec], decide)
    assert res["n_records"] == 2 and res["skipped"]["no fields"] == 1
    assert seen[0] == [rec["id"]] and all(i.startswith(rec["id"] + "~") for i in seen[1])
    # nothing decidable: decide is not called, the rates are empty
    empty = flip_rates(CREDIT, [bare], decide)
    assert len(seen) == 2 and empty["skipped"] == {"no fields": 1} and empty["deciding"]["n"] == 0
    assert empty["deciding"]["follow_rate"] is None and empty["flag"] is False
