"""The import graph of the code itself: no loop between files, and the layers import downwards only.

The graph is read from the source with :mod:`ast` (every ``import`` and ``from ... import``, those inside
functions included, since a lazy import is still a dependency), not from what an import happens to load:

* no cycle between files (a parser that imports its checker which imports the parser is one module in two files);
* ``fuse_optim`` (the optimizer) imports nothing from ``fuse_tune`` or ``dashboards``;
* ``dashboards`` imports from fuse_tune only the torch-free modules listed in :data:`DASHBOARDS_MAY_IMPORT`
  (the rest of fuse_tune pulls torch);
* ``fuse_tune`` imports ``dashboards`` only in the command-line entry points listed in :data:`CLI_TO_DASHBOARDS`.

And parsing a study file needs no torch: ``import fuse_tune.spec`` in a fresh interpreter loads neither torch
nor the trial module that checks a parsed study against the real constructors.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fuse_optim", "fuse_tune", "dashboards")

#: what dashboards may import from fuse_tune -> why (each imports no torch: tests/fuse_tune/test_records.py)
DASHBOARDS_MAY_IMPORT = {
    "fuse_tune.records": "the vocabulary of what runs record: the dashboards read what the trackers wrote",
    "fuse_tune.errors": "the user-error type: no experiment, no runs, a missing extra are one line, exit 2",
    "fuse_tune.storage": "`fuse-tune report` re-opens a study's Optuna storage the way the backends open it",
}

#: (importer, imported) -> why: the only places fuse_tune depends on dashboards
CLI_TO_DASHBOARDS = {
    ("fuse_tune.cli", "dashboards.report"): "`fuse-tune report` builds the HTML report of a study's runs",
    ("fuse_tune.cli", "dashboards.data"): "`fuse-tune compare` reads the rerun runs back as a tidy table",
    ("fuse_tune.cli", "dashboards.tables"): "`fuse-tune compare` prints the comparison and paired-seed tables",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(path)] = path
    return found


def _imported(module: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file (``from pkg import sub`` counts as ``pkg.sub``
    when ``sub`` is a module, else as ``pkg``)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1 more
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                     for alias in node.names]
        else:
            continue
        for name in names:
            # ``import a.b.c`` depends on a.b.c; walk up to the deepest part that is one of our files
            parts = name.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != module:
                targets.add(".".join(parts))
    return targets


def import_graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    return {module: _imported(module, path, modules) for module, path in sources.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _edges(graph: dict[str, set[str]], source: str, target: str) -> set[tuple[str, str]]:
    """Edges from package ``source`` to package ``target``."""
    return {(a, b) for a, targets in graph.items() for b in targets
            if a.split(".")[0] == source and b.split(".")[0] == target}


def test_the_graph_sees_every_package_and_lazy_imports():
    graph = import_graph()
    assert {"fuse_optim.fuse", "fuse_tune.spec", "fuse_tune.trial", "fuse_tune.cli", "dashboards.report"} <= set(graph)
    assert "fuse_tune.trial" in graph["fuse_tune.cli"]  # imported inside a function
    assert "fuse_tune.spec" in graph["fuse_tune.trial"]


def test_no_import_cycle_between_files():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles (modules that import each other, directly or around a loop): " + "; ".join(
        " <-> ".join(cycle) for cycle in cycles)


def test_cycle_detection_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_optimizer_imports_nothing_from_the_layers_above():
    graph = import_graph()
    assert not _edges(graph, "fuse_optim", "fuse_tune") | _edges(graph, "fuse_optim", "dashboards")


def test_dashboards_import_only_torch_free_modules_of_fuse_tune():
    imported = {b for _, b in _edges(import_graph(), "dashboards", "fuse_tune")}
    assert imported <= set(DASHBOARDS_MAY_IMPORT), sorted(imported - set(DASHBOARDS_MAY_IMPORT))


def test_fuse_tune_imports_dashboards_only_in_its_command_line_entry_points():
    edges = _edges(import_graph(), "fuse_tune", "dashboards")
    assert edges == set(CLI_TO_DASHBOARDS), {"not allowed": sorted(edges - set(CLI_TO_DASHBOARDS)),
                                             "allowed but gone (drop from the list)": sorted(
                                                 set(CLI_TO_DASHBOARDS) - edges)}


def test_parsing_a_study_file_imports_no_torch():
    script = ("import json, sys\n"
              "import fuse_tune.spec\n"
              "print(json.dumps(sorted(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    heavy = {"torch", "fuse_optim", "fuse_tune.trial", "fuse_tune.train", "fuse_tune.optimizers", "fuse_tune.workloads"}
    assert not heavy & loaded, sorted(heavy & loaded)
