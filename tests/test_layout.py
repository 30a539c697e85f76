"""The repository's layout: no module the project runs can shadow an installed package, and the wheel installs no
top-level package but ``vtc``.

``python benchmarks/e2e.py`` puts benchmarks/ first on sys.path, ``python -m training.organisms`` the repository root:
a ``benchmarks/kernels.py`` then hides Hugging Face's ``kernels`` package from transformers, which imports it. A
shipped top-level ``eval`` or ``demo`` would do the same in every user's site-packages (``eval`` is a builtin).
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = {".git", ".venv", "build", "dist", "__pycache__"}


def script_folders() -> list[Path]:
    """Folders that land first on sys.path when the project's code runs: the root (``python -m ...``) and the
    folder of every file run by its path (a ``__main__`` guard, other than a package's ``__main__.py``)."""
    folders = {ROOT}
    for path in ROOT.rglob("*.py"):
        if path.name == "__main__.py" or not SKIPPED.isdisjoint(path.relative_to(ROOT).parts):
            continue
        if re.search(r"^if __name__ == .__main__.:", path.read_text(), flags=re.MULTILINE):
            folders.add(path.parent)
    return sorted(folders)


def module_names(folder: Path) -> set[str]:
    """The top-level import names a folder on sys.path offers: its .py files and its folders of them."""
    names = {path.stem for path in folder.glob("*.py")}
    names |= {path.name for path in folder.iterdir() if path.is_dir() and any(path.glob("*.py"))}
    return names - SKIPPED


def installed_names() -> set[str]:
    """Top-level import names of the standard library and of every installed distribution but vtc."""
    names = set(sys.stdlib_module_names)
    for name, distributions in importlib.metadata.packages_distributions().items():
        if set(distributions) - {"vtc"}:
            names.add(name)
    return names


def clashes(folders: list[Path], root: Path = ROOT) -> dict[str, str]:
    """'folder/name' -> name for every module in those folders whose name an installed package uses."""
    taken = installed_names()
    found = {f"{folder.relative_to(root)}/{name}": name for folder in folders for name in module_names(folder)}
    return {where: name for where, name in found.items() if name in taken}


def test_no_script_folder_shadows_an_installed_package():
    assert {ROOT, ROOT / "benchmarks", ROOT / "training", ROOT / "vtc" / "eval"} <= set(script_folders())
    assert {"e2e", "kernel_ops", "layerwise", "selection"} <= module_names(ROOT / "benchmarks")
    found = clashes(script_folders())
    assert not found, f"these modules would hide installed packages of the same name when run as scripts: {found}"


def test_the_check_finds_a_module_named_like_a_dependency(tmp_path):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    for name in ("transformers.py", "json.py", "timing.py"):  # as benchmarks/kernels.py was to transformers 5.25
        (folder / name).write_text("")
    assert clashes([folder], root=tmp_path) == {"benchmarks/transformers": "transformers", "benchmarks/json": "json"}


def shipped_packages(pyproject: Path) -> list[str]:
    """The packages setuptools puts in the wheel, found as the build finds them from ``pyproject``."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    return apply_configuration(Distribution(), pyproject).packages


def test_the_wheel_ships_only_the_vtc_package_and_the_vtc_command():
    from setuptools.config.pyprojecttoml import read_configuration

    packages = shipped_packages(ROOT / "pyproject.toml")
    assert {"vtc", "vtc.eval", "vtc.eval.tasks", "vtc.demo", "vtc.organisms"} <= set(packages)
    assert {name.split(".")[0] for name in packages} == {"vtc"}, packages
    assert read_configuration(ROOT / "pyproject.toml")["project"]["scripts"] == {"vtc": "vtc.cli:main"}


def test_the_wheel_check_finds_a_second_top_level_package(tmp_path):
    for package in ("vtc", "eval"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "vtc"\nversion = "0"\n\n[tool.setuptools.packages.find]\ninclude = ["vtc*", "eval*"]\n'
    )
    assert sorted(shipped_packages(tmp_path / "pyproject.toml")) == ["eval", "vtc"]
