"""The distribution as users install it: the optimizer needs torch only, the tuning layer is an extra."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]


def _requirement_name(requirement: str) -> str:
    """``"scikit-learn>=1.4"`` -> ``"scikit-learn"`` (PEP 503-normalised)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def test_distribution_name_is_not_the_unrelated_fuse_on_pypi():
    assert _project()["name"] == "fuse-optim"


def test_base_install_depends_on_torch_only():
    assert [_requirement_name(requirement) for requirement in _project()["dependencies"]] == ["torch"]


def test_tuning_extra_brings_what_fuse_tune_needs_and_the_makefile_installs_it():
    tuning = {_requirement_name(requirement) for requirement in _project()["optional-dependencies"]["tuning"]}
    assert {"torchvision", "numpy", "scikit-learn", "pyyaml", "tqdm", "optuna", "mlflow"} <= tuning
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r'pip install -q -e "\.\[([a-z,]+)\]"', makefile)
    assert installs and "tuning" in installs[0].split(",")


def _absolute_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports anywhere in ``path`` (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_fuse_optim_imports_only_torch_and_the_standard_library():
    files = sorted((ROOT / "fuse_optim").rglob("*.py"))
    assert files
    allowed = {"torch", "fuse_optim"} | set(sys.stdlib_module_names)
    foreign = {str(path.relative_to(ROOT)): sorted(_absolute_imports(path) - allowed) for path in files}
    assert {path: names for path, names in foreign.items() if names} == {}
