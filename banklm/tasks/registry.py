"""The task registry: a task's name -> its :class:`~banklm.tasks.base.Task`.

``TASKS`` holds the built-in tasks (``credit``, ``aml``, ``audit``: specs shipped in the package plus their
Python samplers). A bank's own tasks are specs (YAML) registered at run time: ``register_spec(path)`` (a
recipe's ``tasks: {name: path}``), or found by :func:`resolve_task` (``--tasks``: a built-in name, then the
specs a model folder or export bundle carries in ``tasks/<name>.yaml``, then ``NAME=PATH``). A spec named
like a built-in is an error. ``get_task(name)`` finds built-in and registered tasks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from banklm.io import atomic_write_bytes
from banklm.tasks.aml import AML
from banklm.tasks.audit import AUDIT
from banklm.tasks.base import Sampler, Task
from banklm.tasks.credit import CREDIT
from banklm.tasks.spec import BUILTIN_NAMES, SpecError, TaskSpec, load_spec

TASKS: dict[str, Task] = {"credit": CREDIT, "aml": AML, "audit": AUDIT}
assert tuple(TASKS) == BUILTIN_NAMES

#: the bank's tasks registered in this process (name -> Task)
_REGISTERED: dict[str, Task] = {}

#: where a model folder or export bundle keeps the specs of its tasks
SPECS_FOLDER = "tasks"


def task_from_spec(spec: TaskSpec | str | os.PathLike, sampler: Sampler | None = None) -> Task:
    """A Task from a checked spec or a spec file (not registered)."""
    if not isinstance(spec, TaskSpec):
        spec = load_spec(spec)
    return Task(spec, sampler)


def register_spec(spec: Task | TaskSpec | str | os.PathLike, *, replace: bool = False) -> Task:
    """Register a bank's task (a spec file, a checked spec, or a Task built from one) under its name.

    A built-in name is refused; registering the same spec text again returns the registered task; another
    spec under a registered name is refused unless ``replace``. Raises :class:`SpecError`."""
    if isinstance(spec, Task):
        task = spec
    else:
        task = task_from_spec(spec)
    name = task.name
    if name in TASKS:
        raise SpecError(f"{task.spec.source}: name: {name!r} is a built-in task; give the bank's task another name "
                        f"(built-ins: {', '.join(TASKS)})")
    old = _REGISTERED.get(name)
    if old is not None and not replace:
        if old.spec.text == task.spec.text:
            return old
        raise SpecError(f"{task.spec.source}: name: the task {name!r} is already registered from "
                        f"{old.spec.source} with another spec")
    _REGISTERED[name] = task
    return task


def unregister(name: str) -> None:
    """Forget a registered task (no error when it is not registered)."""
    _REGISTERED.pop(name, None)


def registered() -> dict[str, Task]:
    """The bank's tasks registered in this process."""
    return dict(_REGISTERED)


def all_tasks() -> dict[str, Task]:
    """Built-in and registered tasks."""
    return {**TASKS, **_REGISTERED}


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (a Task passes through); ValueError listing the allowed names."""
    if isinstance(name, Task):
        return name
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        pass
    try:
        return _REGISTERED[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(all_tasks())}") from None


def is_builtin(name: str) -> bool:
    return name in TASKS


def carried_specs(folder: str | os.PathLike) -> dict[str, Path]:
    """The spec files a model folder or export bundle carries: ``<folder>/tasks/<name>.yaml`` by name."""
    d = Path(folder) / SPECS_FOLDER
    if not d.is_dir():
        return {}
    return {p.stem: p for p in sorted(d.glob("*.yaml")) if p.is_file()}


def carry_specs(folder: str | os.PathLike, tasks: Iterable[str | Task]) -> list[Path]:
    """Write the specs of ``tasks`` into ``<folder>/tasks/<name>.yaml`` (atomically, the spec's text byte for
    byte, so the file's sha256 is ``task.spec.sha256``): what a model folder or export bundle carries so it can
    be evaluated and served without its recipe. Returns the files written."""
    out: list[Path] = []
    seen: set[str] = set()
    for t in tasks:
        task = get_task(t)
        if task.name in seen:
            continue
        seen.add(task.name)
        out.append(atomic_write_bytes(Path(folder) / SPECS_FOLDER / f"{task.name}.yaml",
                                      task.spec_text.encode("utf-8")))
    return out


def resolve_task(arg: str, folders: Sequence[str | os.PathLike] = ()) -> Task:
    """One ``--tasks`` entry: a built-in name; a registered task; a spec carried by one of ``folders`` (a model
    folder or export bundle: ``tasks/<name>.yaml``, registered on the way); or ``NAME=PATH`` (the spec at PATH,
    whose ``name`` must be NAME). Raises :class:`SpecError` (bad spec) or ValueError (unknown name)."""
    if "=" in arg:
        name, _, path = arg.partition("=")
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"--tasks {arg!r}: write NAME=PATH (e.g. post_loan=specs/post_loan.yaml)")
        if name in TASKS:
            raise SpecError(f"{path}: {name!r} is a built-in task; give the bank's task another name")
        task = task_from_spec(path)
        if task.name != name:
            raise SpecError(f"{path}: name: the spec is called {task.name!r}, not {name!r}")
        return register_spec(task)
    if arg in TASKS:
        return TASKS[arg]
    if arg in _REGISTERED:
        return _REGISTERED[arg]
    for folder in folders:
        path = carried_specs(folder).get(arg)
        if path is not None:
            task = task_from_spec(path)
            if task.name != arg:
                raise SpecError(f"{path}: name: the spec is called {task.name!r}, not {arg!r} (its file name)")
            return register_spec(task)
    where = f"; specs carried by {', '.join(str(f) for f in folders)}: " + \
        (", ".join(sorted({n for f in folders for n in carried_specs(f)})) or "none") if folders else ""
    raise ValueError(f"unknown task {arg!r}; allowed: {', '.join(all_tasks())}{where} (or NAME=PATH for a spec file)")


def resolve_tasks(args: Iterable[str], folders: Sequence[str | os.PathLike] = ()) -> list[Task]:
    """Several ``--tasks`` entries (:func:`resolve_task` each), in order, without repeats."""
    out: list[Task] = []
    for a in args:
        t = resolve_task(a, folders)
        if all(t is not o for o in out):
            out.append(t)
    return out
