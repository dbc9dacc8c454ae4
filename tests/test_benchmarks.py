"""The benchmark scripts keep running (a smoke run on a tiny input; the figures live in BENCHMARKS.md)."""

import json
import subprocess
import sys


def test_bench_corpora_smoke(repo, tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "bench_corpora.py"), "--docs", "400",
                           "--num-proc", "1", "--baselines", "loop", "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text(encoding="utf-8"))
    kinds = {(r["kind"], r["procs"]) for r in res["results"]}
    assert kinds == {("banklm", 1), ("loop", 1)}
    banklm = next(r for r in res["results"] if r["kind"] == "banklm")
    loop = next(r for r in res["results"] if r["kind"] == "loop")
    assert banklm["kept"] == loop["kept"] > 0  # the same steps keep the same documents
    assert "| banklm | 1 |" in proc.stdout
