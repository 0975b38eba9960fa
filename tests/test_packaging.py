"""Every package in the tree is declared in pyproject, so the wheel contains it (CI imports them), and every
dependency has a tested range that the lock satisfies."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"vlbridge": "vlbridge", "vlbridge.eval": "eval", "vlbridge.serve": "serve"}


def test_every_package_dir_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == MAPPED
    found = set()
    for package, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found == set(config["packages"])


def test_torch_is_pinned_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = [*project["dependencies"], *(r for rs in project["optional-dependencies"].values() for r in rs)]
    return [Requirement(r) for r in listed]


def test_every_dependency_has_a_tested_range_that_the_lock_satisfies():
    """Lower bound (the lowest CI leg), upper bound (below the release after the newest tested one), and the
    lock's exact version inside it, for every direct dependency."""
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[canonicalize_name(name)] = version
    for requirement in _requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert operators in ({"=="}, {">=", "<"}), f"{requirement}: give a range >=low,<high (or ==)"
        name = canonicalize_name(requirement.name)
        if name == "flash-attn":  # cannot build without CUDA: never installed here, so never locked
            continue
        assert name in lock, f"{requirement.name} is not in constraints.txt: run scripts/lock.sh"
        locked = lock[name]
        assert locked in requirement.specifier, f"constraints.txt's {name}=={locked} is not in {requirement}"


def test_the_core_never_imports_the_app_layer():
    """vlbridge/ (but the CLI, which dispatches to every command) never imports vlbridge.eval or .serve."""
    upward = []
    for path in (ROOT / "vlbridge").rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            top = path.relative_to(ROOT / "vlbridge").parts[:-1]  # the package a relative import starts from
            for name in names:
                if name.startswith("."):
                    level = len(name) - len(name.lstrip("."))
                    base = ("vlbridge", *top[: len(top) - level + 1])
                    name = ".".join((*base, name.lstrip("."))).rstrip(".")
                if name.startswith(("vlbridge.eval", "vlbridge.serve")):
                    upward.append(f"{path.relative_to(ROOT)}: {name}")
    assert upward == []
