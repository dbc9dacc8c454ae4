"""The wheel installs one import name, `banklm`, with every package and the bundled samples, and works from it.

Built and installed (not editable) into a folder outside the repository, then imported from there in a
subprocess whose working directory is that folder: nothing can come from the checkout.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.test_layers import FOLDERS


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("banklm-*.whl")
    return whl


def _repo_packages() -> set[str]:
    """Every folder of the repository that is a Python package, by the name it installs under."""
    out = set()
    for folder, pkg in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            out.add(".".join([pkg, *rel]))
    return out


def wheel_problems(names: list[str], packages: set[str]) -> list[str]:
    """What is wrong with a wheel's file list: other top-level names, missing or extra packages, samples."""
    problems = []
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    if top != {"banklm"}:
        problems.append(f"top-level names {sorted(top)}, want ['banklm']")
    found = {"/".join(n.split("/")[:-1]).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    if found != packages:
        problems.append(f"packages missing {sorted(packages - found)}, extra {sorted(found - packages)}")
    if not any(n.startswith("banklm/corpora/samples/private/") for n in names):
        problems.append("no bundled samples")
    problems += [f"{n}: a sample generator installed as a module" for n in names
                 if n.startswith("banklm/corpora/samples/") and n.endswith(".py")]
    return problems


def test_wheel_has_one_top_level_name_every_package_and_the_samples(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert wheel_problems(names, _repo_packages()) == []
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "Requires-Python: >=3.11" in text and "Requires-Dist: rich" not in text


def test_wheel_check_fails_on_planted_violations():
    good = ["banklm/__init__.py", "banklm/corpora/__init__.py", "banklm/corpora/samples/private/r.jsonl",
            "banklm-0.1.0.dist-info/METADATA"]
    assert wheel_problems(good, {"banklm", "banklm.corpora"}) == []
    assert wheel_problems(good + ["corpora/__init__.py"], {"banklm", "banklm.corpora"})  # a second top-level name
    assert wheel_problems(good, {"banklm", "banklm.corpora", "banklm.corpora.ops"})     # a package left out
    assert wheel_problems(good + ["banklm/corpora/samples/make_private.py"], {"banklm", "banklm.corpora"})


def test_installed_wheel_imports_the_stages_and_resolves_samples(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = (
        "import banklm, banklm.corpora, banklm.finetune, banklm.distill, banklm.export\n"
        "from banklm.corpora.build import resolve_source_path\n"
        "import os\n"
        "p = resolve_source_path('samples:private/records.jsonl')\n"
        "print(banklm.__file__); print(banklm.corpora.__file__); print(p); print(os.path.isfile(p))\n"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    pkg_file, corpora_file, sample, exists = out.stdout.split()
    for f in (pkg_file, corpora_file, sample):
        assert Path(f).is_relative_to(site), f
    assert exists == "True"
