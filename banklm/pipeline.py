"""The stage runner: run the enabled stages in order, reuse what is unchanged, record everything.

A stage is reused when an earlier entry (in this run folder, or in the newest earlier run of the
same recipe name) has the same *key*: the hash of the stage name, its parameters, the hashes of
its inputs and the banklm version. Reused outputs from another run are hard-linked (copied across
filesystems) into this run folder and re-hashed, so every run folder is complete on its own.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from banklm import __version__
from banklm.chain import ChainError, canonical_json
from banklm.finetune.models import pick_device
from banklm.io import atomic_write_text, sha256_file
from banklm.ledger import Ledger, code_version, file_records, host_info, now_iso
from banklm.recipe import Recipe, dump_recipe

log = logging.getLogger("banklm")


class StageError(RuntimeError):
    """A stage failed; the message names the stage and the cause."""


class CheckFailed(RuntimeError):
    """A stage ran but a check it makes (e.g. export parity) failed: exit code 1."""


class RunLocked(RuntimeError):
    """Another banklm process holds the run folder."""


class RunDirError(ValueError):
    """The run folder cannot be used (a file, someone else's non-empty folder, not writable): exit 2."""


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    notes: dict = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)


@dataclass
class Stage:
    """One step of the pipeline. ``run`` returns the files/folders it wrote (relative to nothing: paths)."""

    name: str
    enabled: Callable[[Recipe], bool]
    params: Callable[[Recipe], dict]
    inputs: Callable[[RunContext], list[Path]]
    run: Callable[[RunContext], list[Path]]
    cacheable: bool = True
    distributed: bool = False   # under a multi-process launch every rank runs it (training); else rank 0 only


# ----------------------------------------------------------------------------------------- run folder

def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def default_run_dir(recipe: Recipe, runs_root: Path = Path("runs")) -> Path:
    return runs_root / recipe.name / new_run_id()


class RunLock:
    """An exclusive ``flock`` on ``<run folder>/.lock``, which holds the owner's pid for the message.

    The kernel drops the lock when its process dies, even by SIGKILL, so a crashed run never blocks the
    next one (no stale-lock guessing from pids, which the OS reuses). After locking, the lock file must
    still be the one at the path (another process may have removed it on exit meanwhile): else retry.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        for _ in range(20):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = _read_pid(self.path)
                raise RunLocked(f"{self.path.parent}: another banklm process (pid {pid or '?'}) is using this run "
                                "folder; wait for it or choose another --run-dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its owner had just removed: take the lock again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._fd = fd
            return self
        raise RunLocked(f"{self.path}: could not take the run folder lock")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # still locked: nobody can take it between unlink and close
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------- reuse

@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 over banklm's own source files (every package of the pipeline) and the built-in task specs.

    Part of every stage key: an edited generator, trainer, converter or built-in spec must not reuse outputs
    made by the old code even when the version number did not move (a stale reuse is worse than a recompute).
    A recipe's own specs are inputs of the stages that use them (``banklm.stages``)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in ("banklm", "corpora", "finetune", "distill", "export"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    for f in sorted((root / "banklm" / "tasks" / "specs").glob("*.yaml")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def stage_key(stage: str, params: dict, inputs: list[dict]) -> str:
    material = {"stage": stage, "params": params, "banklm": __version__, "source": source_digest(),
                "inputs": [(r["path"], r["sha256"]) for r in inputs]}
    return hashlib.sha256(canonical_json(material)).hexdigest()


def _outputs_intact(run_dir: Path, outputs: list[dict]) -> bool:

    for rec in outputs:
        p = run_dir / rec["path"]
        if not p.is_file() or p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
            return False
    return True


def _find_reusable(run_dir: Path, name: str, key: str) -> tuple[Path, dict] | None:
    """Newest intact entry with this key: this run folder first, then sibling runs, newest first."""
    candidates = [run_dir]
    parent = run_dir.parent
    if parent.is_dir():
        here = run_dir.resolve()
        siblings = [d for d in parent.iterdir() if d.is_dir() and not d.is_symlink() and d.resolve() != here
                    and (d / "ledger.jsonl").exists()]  # never 'latest' or this run: linking onto itself deletes
        candidates += sorted(siblings, key=lambda d: (d / "ledger.jsonl").stat().st_mtime, reverse=True)
    for cand in candidates:
        try:
            entries = Ledger(cand).entries()
        except ChainError:
            continue
        for entry in reversed(entries):
            if entry.get("stage") == name and entry.get("key") == key and _outputs_intact(cand, entry["outputs"]):
                return cand, entry
    return None


def _link_outputs(src_dir: Path, dst_dir: Path, outputs: list[dict]) -> None:
    for rec in outputs:
        src, dst = src_dir / rec["path"], dst_dir / rec["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copy2(src, dst)


# ----------------------------------------------------------------------------------------- running

RUN_MARKERS = ("ledger.jsonl", "recipe.yaml", ".lock", "logs")


def prepare_run_dir(run_dir: Path) -> Path:
    """Create (or check) the run folder; raise :class:`RunDirError` naming it when it cannot be one.

    An existing folder is used only when it is empty or already a run folder: banklm never mixes its
    outputs into a folder of other files (``--run-dir ~`` or ``--run-dir /etc`` are refused).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir}: exists and is not a folder")
    if run_dir.is_dir():
        names = {p.name for p in run_dir.iterdir()}
        if names and not names & set(RUN_MARKERS):
            raise RunDirError(f"--run-dir {run_dir}: folder is not empty and is not a banklm run folder (no "
                              "ledger.jsonl or recipe.yaml); choose a new or empty folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"--run-dir {e.filename or run_dir}: cannot write here ({e.strerror})") from None
    return run_dir.resolve()  # `--run-dir runs/x/latest` means the run it points at, not a new link


def clean_stale_temp(run_dir: Path) -> list[Path]:
    """Remove what interrupted writers left (``banklm.io`` temporaries); returns what was removed.

    Called with the run lock held, so no other banklm process is writing here: every temporary is
    stale. A folder swap cut between its two renames leaves ``.<name>.old-<pid>`` and no ``<name>``:
    that old folder is the last complete one and is put back.
    """
    removed = []
    for root, dirs, files in os.walk(run_dir):
        for name in [*dirs, *files]:
            m = _TEMP_RE.match(name)
            if not m:
                continue
            p = Path(root) / name
            target = Path(root) / m.group(1)
            if m.group(2) == "old" and p.is_dir() and not target.exists():
                os.replace(p, target)
                log.warning("restored %s: an interrupted run had moved it aside", target)
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        dirs[:] = [d for d in dirs if not _TEMP_RE.match(d)]
    return removed


# atomic_dir: .<name>.tmp-<pid> / .<name>.old-<pid>; atomic_open: .<name>.<random>.tmp; latest link:
# .latest.tmp-<pid>; GGUF re-quantization source: .<name>.src-<pid>.gguf
_TEMP_RE = re.compile(r"^\.(.+?)\.(?:(tmp|old|src)-\d+(?:\.\w+)?|[^.]+\.tmp)$")


def _setup_file_log(run_dir: Path) -> logging.Handler:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / "banklm.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def run_stages(recipe: Recipe, stages: list[Stage], run_dir: Path | None = None, upto: str | None = None,
               only: set[str] | None = None) -> Path:
    """Run the enabled stages (all, up to and including ``upto``, or just ``only``) into ``run_dir``.

    Under ``accelerate launch``/``torchrun`` (``WORLD_SIZE`` > 1) rank 0 runs the pipeline and keeps the
    ledger; the other ranks join only the ``distributed`` stages (see :class:`RankChannel`)."""
    selected = []
    for st in stages:
        if only is not None and st.name not in only:
            continue
        if st.enabled(recipe):
            selected.append(st)
        if upto is not None and st.name == upto:
            break
    if launched_world_size() > 1:
        return _run_stages_launched(recipe, selected, run_dir)
    return _run_stages_here(recipe, selected, prepare_run_dir(Path(run_dir) if run_dir else default_run_dir(recipe)))


def _run_stages_here(recipe: Recipe, selected: list[Stage], run_dir: Path,
                     on_stage_run: Callable[[Stage, bool], None] | None = None) -> Path:
    handler = _setup_file_log(run_dir)
    _quiet_libraries()
    try:
        with RunLock(run_dir):
            for p in clean_stale_temp(run_dir):
                log.warning("removed %s, left by an interrupted run", p)
            atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
            _update_latest_link(run_dir)
            ctx = RunContext(recipe, run_dir)
            log.info("run folder: %s", run_dir)
            for st in selected:
                _run_one(ctx, st, on_stage_run)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    return run_dir


# ----------------------------------------------------------------------------------------- several processes

DIST_TIMEOUT_ENV = "BANKLM_DIST_TIMEOUT_MIN"
DIST_TIMEOUT_MIN = 720   # the other ranks wait while rank 0 builds corpora, evaluates and exports: hours


def launched_world_size() -> int:
    """Processes started together by ``accelerate launch`` or ``torchrun`` (1 for a plain ``banklm run``)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process's rank under ``accelerate launch`` or ``torchrun`` (0 for a plain ``banklm run``)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


class LaunchError(RuntimeError):
    """The recipe cannot run under a multi-process launch as it stands; the message says what to do."""


class FollowerStopped(RuntimeError):
    """Rank 0 stopped the run (its own error is reported there); this rank exits with code 1."""


class RankChannel:
    """Rank 0 tells the other ranks what to do next, over accelerate's process group.

    Messages: ``{"run_dir": str}`` first, then ``{"stage": name}`` before each distributed stage that must
    run (not reused), then ``{"done": True}`` or ``{"failed": reason}``. A waiting rank blocks in a
    broadcast, so the group's timeout (``BANKLM_DIST_TIMEOUT_MIN``, default 12 h) bounds how long rank 0
    may spend on the single-process stages (corpus, eval, export) between two messages.
    """

    def __init__(self, cpu: bool = False):
        from datetime import timedelta

        from accelerate import PartialState

        minutes = float(os.environ.get(DIST_TIMEOUT_ENV, DIST_TIMEOUT_MIN))
        # the process group the trainer joins later (PartialState is shared): gloo on CPU, NCCL on GPUs
        self.state = PartialState(cpu=cpu, timeout=timedelta(minutes=minutes))
        self.rank = self.state.process_index
        if self.state.num_processes != launched_world_size():
            raise LaunchError(f"{launched_world_size()} processes were launched but accelerate joined "
                              f"{self.state.num_processes}: is there a GPU for each process?")

    def send(self, msg: dict) -> None:
        self._broadcast([msg])

    def receive(self) -> dict:
        box = [None]
        self._broadcast(box)
        return box[0]

    @staticmethod
    def _broadcast(box: list) -> None:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box, from_process=0)


def _run_stages_launched(recipe: Recipe, selected: list[Stage], run_dir: Path | None) -> Path:
    """Rank 0 runs the pipeline as usual and keeps the only ledger; every rank trains together.

    Stages that train with ``accelerate`` (``distributed=True``: cpt, train) run on every rank: each rank
    reads the inputs rank 0 wrote (one machine, or a shared filesystem) and only rank 0 writes outputs.
    The rest (corpus, tokenizer, eval, export, report) run on rank 0 while the others wait for its word.
    A stage that trains but is not distributed (distillation) is refused before anything runs.
    """
    refused = [st.name for st in selected if st.name == "distill"]
    if refused:
        raise LaunchError("distillation runs in one process: launch the training with accelerate "
                          "(banklm train RECIPE, or distill.enabled=false), then run `banklm distill RECIPE "
                          "--run-dir <that run folder>` without a launcher; finished stages are reused")

    channel = RankChannel(cpu=pick_device(recipe.device) == "cpu")
    if channel.rank != 0:
        return _follow(recipe, selected, channel)
    try:
        run_dir = prepare_run_dir(Path(run_dir) if run_dir else default_run_dir(recipe))
    except Exception as e:
        channel.send({"failed": f"{type(e).__name__}: {e}"})
        raise
    channel.send({"run_dir": str(run_dir)})
    in_distributed_stage = False

    def on_stage_run(st: Stage, starting: bool) -> None:
        nonlocal in_distributed_stage
        if st.distributed:
            if starting:
                channel.send({"stage": st.name})
            in_distributed_stage = starting

    try:
        _run_stages_here(recipe, selected, run_dir, on_stage_run=on_stage_run)
    except BaseException as e:
        # inside a distributed stage the other ranks are in training collectives, not listening: the
        # launcher stops them when this process exits; elsewhere they wait for this word
        if not in_distributed_stage:
            channel.send({"failed": f"{type(e).__name__}"})
        raise
    channel.send({"done": True})
    return run_dir


def _follow(recipe: Recipe, selected: list[Stage], channel: RankChannel) -> Path:
    """A rank other than 0: run the distributed stages rank 0 announces, nothing else, write nothing."""
    _quiet_libraries()
    by_name = {st.name: st for st in selected}
    first = channel.receive()
    if "failed" in first:
        raise FollowerStopped(f"rank 0 could not start the run ({first['failed']})")
    ctx = RunContext(recipe, Path(first["run_dir"]))
    while True:
        msg = channel.receive()
        if "done" in msg:
            return ctx.run_dir
        if "failed" in msg:
            raise FollowerStopped(f"rank 0 stopped the run ({msg['failed']}); its log: "
                                  f"{ctx.run_dir / 'logs' / 'banklm.log'}")
        st = by_name[msg["stage"]]
        log.info("[%s] rank %d joins", st.name, channel.rank)
        st.run(ctx)


def _quiet_libraries() -> None:
    """Per-file weight-loading bars and CPU-kernel notices bury the stage lines; training keeps its own log."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _update_latest_link(run_dir: Path) -> None:
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.tmp-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)


def _run_one(ctx: RunContext, st: Stage, on_stage_run: Callable[[Stage, bool], None] | None = None) -> None:
    """Reuse or run one stage and append its ledger entry. ``on_stage_run(stage, starting)`` is called just
    before and just after the stage's own work when it really runs (rank 0 uses it to lead the others)."""
    params = st.params(ctx.recipe)
    inputs = file_records(st.inputs(ctx), ctx.run_dir)
    key = stage_key(st.name, params, inputs)
    common = {"key": key, "code": code_version(), "seed": ctx.recipe.seed, "host": host_info()}
    ledger = Ledger(ctx.run_dir)
    if st.cacheable:
        found = _find_reusable(ctx.run_dir, st.name, key)
        if found is not None:
            src_dir, entry = found
            t0 = now_iso()
            if src_dir != ctx.run_dir:
                _link_outputs(src_dir, ctx.run_dir, entry["outputs"])
            outputs = file_records([ctx.run_dir / r["path"] for r in entry["outputs"]], ctx.run_dir)
            ledger.append(st.name, params=params, inputs=inputs, outputs=outputs, started_at=t0,
                          finished_at=now_iso(), status="reused", wall_s=0.0,
                          reused_from={"run": src_dir.name, "seq": entry["seq"],
                                       # the time the stage took when it ran (a reused source carries it on)
                                       "wall_s": (entry.get("reused_from") or {}).get("wall_s", entry.get("wall_s"))},
                          device=entry.get("device"), notes=entry.get("notes"), **common)
            log.info("[%s] reused from run %s (ledger entry %s)", st.name, src_dir.name, entry["seq"])
            _say(f"[{st.name}] unchanged: reused (run {src_dir.name}, entry {entry['seq']})")
            return
    _say(f"[{st.name}] running ...")
    if on_stage_run is not None:
        on_stage_run(st, True)
    ctx.notes.pop("device", None)  # each stage records the device it used itself (none: CPU only)
    t0, started = time.perf_counter(), now_iso()
    try:
        produced = st.run(ctx)
        if on_stage_run is not None:
            on_stage_run(st, False)
    except (CheckFailed, RunLocked):
        raise
    except OSError as e:  # disk full, read-only or permission denied: say which path
        log.exception("stage %s failed", st.name)
        where = e.filename or f"a file in {ctx.run_dir}"
        raise StageError(f"stage '{st.name}' failed: {where}: {e.strerror or e} (errno {e.errno})") from e
    except Exception as e:
        log.exception("stage %s failed", st.name)
        raise StageError(f"stage '{st.name}' failed: {type(e).__name__}: {e}") from e
    wall = time.perf_counter() - t0
    outputs = file_records(produced, ctx.run_dir)
    ledger.append(st.name, params=params, inputs=inputs, outputs=outputs, started_at=started,
                  finished_at=now_iso(), status="done", wall_s=round(wall, 3), reused_from=None,
                  device=ctx.notes.pop("device", None) or "cpu", notes=ctx.notes.pop(st.name, None), **common)
    log.info("[%s] done in %.1f s", st.name, wall)
    _say(f"[{st.name}] done in {wall:.1f} s")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
