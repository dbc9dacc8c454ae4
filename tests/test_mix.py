from collections import Counter

import pytest
from banklm.corpora.mix import mix, split
from datasets import Dataset


def _ds(prefix, n, labels=None):
    return Dataset.from_list([{"id": f"{prefix}{i}", "text": f"{prefix} 文档 {i}",
                               **({"label": labels[i % len(labels)]} if labels else {})} for i in range(n)])


def test_mix_hits_target_proportions_with_up_and_down_sampling():
    data = {"general": _ds("g", 1000), "vertical": _ds("v", 300), "scenario": _ds("s", 50)}
    out, st = mix(data, {"general": 0.5, "vertical": 0.3, "scenario": 0.2}, total=1000, seed=1)
    counts = Counter(out["source"])
    assert counts == {"general": 500, "vertical": 300, "scenario": 200}
    for k, p in {"general": 0.5, "vertical": 0.3, "scenario": 0.2}.items():
        assert abs(st["actual_proportions"][k] - p) <= 0.01
    assert st["sources"]["scenario"]["upsampled"] and st["sources"]["scenario"]["epochs"] == 4.0
    assert len(set(out["id"])) == 1000 and "s0#4" in out["id"]  # upsampled copies keep unique ids
    assert len(set(i for i in out["id"] if i.startswith("g"))) == 500  # downsampling: no repeats
    again, _ = mix(data, {"general": 0.5, "vertical": 0.3, "scenario": 0.2}, total=1000, seed=1)
    assert again["id"] == out["id"]
    other, _ = mix(data, {"general": 0.5, "vertical": 0.3, "scenario": 0.2}, total=1000, seed=2)
    assert other["id"] != out["id"]


def test_mix_default_total_needs_no_upsampling():
    data = {"a": _ds("a", 100), "b": _ds("b", 40)}
    out, st = mix(data, {"a": 3, "b": 1}, seed=0)  # weights are normalised
    assert Counter(out["source"]) == {"a": 100, "b": 33}
    assert not any(s["upsampled"] for s in st["sources"].values())


def test_mix_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown datasets: c"):
        mix({"a": _ds("a", 5)}, {"c": 1.0})
    with pytest.raises(ValueError, match="share no content column"):
        mix({"a": _ds("a", 5), "b": Dataset.from_list([{"id": "x", "other": "y"}])}, {"a": 1, "b": 1})


def test_stratified_split_keeps_label_proportions():
    labels = ["通过"] * 6 + ["拒绝"] * 3 + ["人工复核"]  # 60% / 30% / 10%
    ds = _ds("r", 2000, labels)
    dd, st = split(ds, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=0)
    assert st["sizes"] == {"train": 1600, "validation": 200, "test": 200} and st["stratified_by"] == "label"
    for part in dd.values():
        c = Counter(part["label"])
        assert c == {"通过": int(0.6 * len(part)), "拒绝": int(0.3 * len(part)), "人工复核": int(0.1 * len(part))}
    ids = [set(p["id"]) for p in dd.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]) and len(set.union(*ids)) == 2000
    again, _ = split(ds, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=0)
    assert again["test"]["id"] == dd["test"]["id"]


def test_split_without_label_and_small_groups():
    dd, st = split(_ds("x", 101), seed=3)
    assert st["stratified_by"] is None and sum(st["sizes"].values()) == 101
    assert st["sizes"] == {"train": 91, "validation": 5, "test": 5}
    dd, st = split(_ds("y", 7, ["a", "a", "a", "a", "a", "b", "c"]), {"train": 0.5, "test": 0.5}, seed=0)
    assert sum(st["sizes"].values()) == 7 and st["by_label"]["train"]["a"] + st["by_label"]["test"]["a"] == 5
