"""The stage runner with small fake stages: reuse, re-run on change, locking, failure handling."""

import pytest

from banklm.ledger import Ledger, verify_run
from banklm.pipeline import RunLock, RunLocked, Stage, StageError, run_stages
from banklm.recipe import validate_recipe

CALLS: list[str] = []


def _recipe(**over):
    data = {"name": "fake", "seed": 1, "base": {"path": "/nowhere"}, "train": {"lr": 0.01}}
    data.update(over)
    return validate_recipe(data)


def _write_stage(name, text_of, inputs=lambda ctx: []):
    def run(ctx):
        CALLS.append(name)
        out = ctx.path(name)
        out.mkdir(exist_ok=True)
        (out / "out.txt").write_text(text_of(ctx), encoding="utf-8")
        return [out]
    return Stage(name, lambda r: True, lambda r: {"lr": r.train.lr} if name == "b" else {"seed": r.seed},
                 inputs, run)


STAGES = [
    _write_stage("a", lambda ctx: f"a seed={ctx.recipe.seed}"),
    _write_stage("b", lambda ctx: (ctx.path("a", "out.txt").read_text() + f" lr={ctx.recipe.train.lr}"),
                 inputs=lambda ctx: [ctx.path("a")]),
]


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()


def test_runs_in_order_and_records(tmp_path):
    rd = run_stages(_recipe(), STAGES, run_dir=tmp_path / "runs" / "fake" / "r1")
    assert CALLS == ["a", "b"]
    entries = Ledger(rd).entries()
    assert [(e["stage"], e["status"]) for e in entries] == [("a", "done"), ("b", "done")]
    assert entries[1]["inputs"][0]["path"] == "a/out.txt"
    assert (rd / "recipe.yaml").read_text().startswith("name: fake")
    assert verify_run(rd) == []
    assert (rd.parent / "latest").resolve() == rd.resolve()


def test_second_run_reuses_everything_in_a_new_folder(tmp_path):
    r1 = run_stages(_recipe(), STAGES, run_dir=tmp_path / "fake" / "r1")
    CALLS.clear()
    r2 = run_stages(_recipe(), STAGES, run_dir=tmp_path / "fake" / "r2")
    assert CALLS == []
    entries = Ledger(r2).entries()
    assert [e["status"] for e in entries] == ["reused", "reused"]
    first = Ledger(r1).entries()
    # the reused entry names its source and keeps the time the stage took when it ran
    assert entries[0]["reused_from"] == {"run": "r1", "seq": 1, "wall_s": first[0]["wall_s"]}
    r3 = run_stages(_recipe(), STAGES, run_dir=tmp_path / "fake" / "r3")  # reused from a reused entry: still that time
    assert Ledger(r3).entries()[1]["reused_from"]["wall_s"] == first[1]["wall_s"]
    assert (r2 / "b" / "out.txt").read_text() == (r1 / "b" / "out.txt").read_text()
    assert verify_run(r2) == []


def test_changed_param_reruns_only_that_stage(tmp_path):
    run_stages(_recipe(), STAGES, run_dir=tmp_path / "fake" / "r1")
    CALLS.clear()
    r2 = run_stages(_recipe(train={"lr": 0.5}), STAGES, run_dir=tmp_path / "fake" / "r2")
    assert CALLS == ["b"]
    assert (r2 / "b" / "out.txt").read_text() == "a seed=1 lr=0.5"


def test_changed_input_reruns_downstream(tmp_path):
    run_stages(_recipe(), STAGES, run_dir=tmp_path / "fake" / "r1")
    CALLS.clear()
    run_stages(_recipe(seed=2), STAGES, run_dir=tmp_path / "fake" / "r2")
    assert CALLS == ["a", "b"]  # a's params changed, so b's input hash changed


def test_in_place_rerun_reuses_and_tampered_output_reruns(tmp_path):
    rd = tmp_path / "fake" / "r1"
    run_stages(_recipe(), STAGES, run_dir=rd)
    CALLS.clear()
    run_stages(_recipe(), STAGES, run_dir=rd)
    assert CALLS == []
    (rd / "b" / "out.txt").write_text("tampered", encoding="utf-8")
    CALLS.clear()
    run_stages(_recipe(), STAGES, run_dir=rd)
    assert CALLS == ["b"]
    assert verify_run(rd) == []


def test_failed_stage_names_itself_and_records_nothing(tmp_path):
    def boom(ctx):
        raise ValueError("bad input file x.jsonl")
    stages = [STAGES[0], Stage("b", lambda r: True, lambda r: {}, lambda ctx: [], boom)]
    rd = tmp_path / "fake" / "r1"
    with pytest.raises(StageError, match="stage 'b' failed: ValueError: bad input file x.jsonl"):
        run_stages(_recipe(), stages, run_dir=rd)
    assert [e["stage"] for e in Ledger(rd).entries()] == ["a"]
    assert not (rd / ".lock").exists()


def test_upto_and_disabled(tmp_path):
    run_stages(_recipe(), STAGES, run_dir=tmp_path / "r", upto="a")
    assert CALLS == ["a"]
    off = Stage("c", lambda r: False, lambda r: {}, lambda ctx: [], lambda ctx: CALLS.append("c") or [])
    CALLS.clear()
    run_stages(_recipe(), [*STAGES, off], run_dir=tmp_path / "r2")
    assert "c" not in CALLS


def test_lock_refuses_second_process_and_takes_over_stale(tmp_path):
    rd = tmp_path / "r"
    rd.mkdir()
    with RunLock(rd):
        with pytest.raises(RunLocked, match="another banklm process"):
            run_stages(_recipe(), STAGES, run_dir=rd)
    (rd / ".lock").write_text("999999999")  # a pid that does not exist: stale
    run_stages(_recipe(), STAGES, run_dir=rd)
    assert CALLS == ["a", "b"] and not (rd / ".lock").exists()


def test_rerun_in_latest_folder_through_symlink_keeps_files(tmp_path):
    """Re-running into the folder `latest` points at must not hard-link a file onto itself (deleting it)."""
    run_stages(_recipe(), STAGES, run_dir=tmp_path / "fake" / "r1")
    (tmp_path / "fake" / "r1" / "b" / "out.txt").write_text("tampered", encoding="utf-8")
    CALLS.clear()
    rd = run_stages(_recipe(), STAGES, run_dir=tmp_path / "fake" / "latest")
    assert CALLS == ["b"]
    assert (rd / "b" / "out.txt").read_text() == "a seed=1 lr=0.01"
    assert verify_run(tmp_path / "fake" / "r1") == []


def test_stage_key_changes_with_the_source_code(monkeypatch, tmp_path):
    """An edited generator or trainer must not reuse outputs the old code made."""
    from banklm import pipeline

    before = pipeline.stage_key("corpus", {"a": 1}, [])
    assert before == pipeline.stage_key("corpus", {"a": 1}, [])
    assert len(pipeline.source_digest()) == 64
    monkeypatch.setattr(pipeline, "source_digest", lambda: "0" * 64)
    assert pipeline.stage_key("corpus", {"a": 1}, []) != before


# ----------------------------------------------------------------------------------------- multi-process launch

class FakeChannel:
    """Stands in for RankChannel: rank 0 records what it sends; another rank reads a scripted list."""

    sent: list = []
    script: list = []
    rank = 0

    def __init__(self, cpu=False):
        self.rank = FakeChannel.rank

    def send(self, msg):
        FakeChannel.sent.append(msg)

    def receive(self):
        return FakeChannel.script.pop(0)


def _dist_stage(name, fail=False):
    def run(ctx):
        CALLS.append(name)
        if fail:
            raise RuntimeError("boom")
        out = ctx.path(name)
        out.mkdir(exist_ok=True)
        (out / "out.txt").write_text(name, encoding="utf-8")
        return [out]
    return Stage(name, lambda r: True, lambda r: {"seed": r.seed}, lambda ctx: [], run, distributed=True)


@pytest.fixture
def launched(monkeypatch):
    import banklm.pipeline as pipeline

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(pipeline, "RankChannel", FakeChannel)
    FakeChannel.sent, FakeChannel.script, FakeChannel.rank = [], [], 0
    return FakeChannel


def test_rank0_leads_the_others_into_distributed_stages_only(tmp_path, launched):
    stages = [STAGES[0], _dist_stage("t"), STAGES[1]]
    rd = run_stages(_recipe(), stages, run_dir=tmp_path / "fake" / "r1")
    assert CALLS == ["a", "t", "b"]
    assert launched.sent == [{"run_dir": str(rd)}, {"stage": "t"}, {"done": True}]
    assert [e["stage"] for e in Ledger(rd).entries()] == ["a", "t", "b"]
    # a reused distributed stage needs nobody: the others hear only the run folder and "done"
    launched.sent.clear()
    CALLS.clear()
    rd2 = run_stages(_recipe(), stages, run_dir=tmp_path / "fake" / "r2")
    assert CALLS == [] and launched.sent == [{"run_dir": str(rd2)}, {"done": True}]


def test_rank0_failure_outside_training_releases_the_waiting_ranks(tmp_path, launched):
    bad = _write_stage("c", lambda ctx: 1 / 0)
    with pytest.raises(StageError):
        run_stages(_recipe(), [STAGES[0], _dist_stage("t"), bad], run_dir=tmp_path / "fake" / "r1")
    assert launched.sent[1:] == [{"stage": "t"}, {"failed": "StageError"}]


def test_rank0_failure_inside_training_sends_nothing_more(tmp_path, launched):
    """The other ranks are inside training collectives then; the launcher stops them when rank 0 exits."""
    with pytest.raises(StageError):
        run_stages(_recipe(), [STAGES[0], _dist_stage("t", fail=True)], run_dir=tmp_path / "fake" / "r1")
    assert launched.sent[1:] == [{"stage": "t"}]


def test_rank0_bad_run_folder_stops_the_others(tmp_path, launched):
    from banklm.pipeline import RunDirError

    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError):
        run_stages(_recipe(), STAGES, run_dir=tmp_path / "file")
    assert list(launched.sent[0]) == ["failed"]


def test_other_rank_runs_what_rank0_announces_and_writes_no_ledger(tmp_path, launched):
    from banklm.pipeline import FollowerStopped

    rd = tmp_path / "fake" / "r1"
    rd.mkdir(parents=True)
    launched.rank = 1
    launched.script = [{"run_dir": str(rd)}, {"stage": "t"}, {"done": True}]
    assert run_stages(_recipe(), [STAGES[0], _dist_stage("t"), STAGES[1]], run_dir=None) == rd
    assert CALLS == ["t"] and not (rd / "ledger.jsonl").exists() and not (rd / "recipe.yaml").exists()
    launched.script = [{"run_dir": str(rd)}, {"failed": "StageError"}]
    with pytest.raises(FollowerStopped, match="rank 0 stopped the run"):
        run_stages(_recipe(), [STAGES[0], _dist_stage("t")])
    launched.script = [{"failed": "RunDirError: x"}]
    with pytest.raises(FollowerStopped, match="could not start"):
        run_stages(_recipe(), STAGES)


def test_distillation_is_refused_under_a_launch_before_anything_runs(tmp_path, launched):
    from banklm.pipeline import LaunchError

    distill = _write_stage("distill", lambda ctx: "x")
    with pytest.raises(LaunchError, match="banklm distill RECIPE"):
        run_stages(_recipe(), [STAGES[0], distill], run_dir=tmp_path / "r")
    assert CALLS == [] and launched.sent == [] and not (tmp_path / "r").exists()
