"""The house rules that keep sfdabench a harness: it knows no method by name."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO
from sfdabench.harness.plugins import get_registry

HARNESS = REPO / "sfdabench"


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (prose may cite a method; code may not)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def names_in_code(path: Path) -> list[tuple[int, str]]:
    """(line, word) of every identifier and every word of a string constant (docstrings excepted)."""
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", node.value)
        elif isinstance(node, ast.Name):
            words = [node.id]
        elif isinstance(node, ast.Attribute):
            words = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words = [node.name]
        elif isinstance(node, ast.arg):
            words = [node.arg]
        elif isinstance(node, ast.keyword) and node.arg:
            words = [node.arg]
        elif isinstance(node, ast.alias):
            words = node.name.split(".") + ([node.asname] if node.asname else [])
        else:
            continue
        found += [(getattr(node, "lineno", 0), w) for w in words]
    return found


def test_no_module_of_the_harness_names_a_registered_method():
    methods = set(get_registry().names("methods"))
    assert {"source_only", "dfg", "oracle"} <= methods          # the built-ins are registered and checked
    hits = [f"{path.relative_to(REPO)}:{line}: {word}" for path in sorted(HARNESS.rglob("*.py"))
            for line, word in names_in_code(path) if word in methods]
    assert not hits, "the harness names methods (declare it on the method instead):\n" + "\n".join(hits)


def test_the_scan_finds_a_method_name_in_code(tmp_path):
    """The check above can fail: a string constant, a name and an import are all seen; a docstring is not."""
    path = tmp_path / "probe.py"
    path.write_text('"""Cites dfg in prose."""\nLOWER = "source_only"\nfrom x import oracle\ndfg = 1\n')
    words = {w for _, w in names_in_code(path)}
    assert {"source_only", "oracle", "dfg"} <= words
    path.write_text('"""Cites dfg in prose."""\n')
    assert "dfg" not in {w for _, w in names_in_code(path)}


def harness_imports(root: Path, package: str = "sfdabench") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, at any depth (lazy imports in functions included)."""
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join((package, *path.relative_to(root).with_suffix("").parts))
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name and t != package}
        graph[name] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan): each is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_harness_has_no_import_circle():
    """config <- launch/prepare/ablate/source_cli, never the other way: an import circle (even through a lazy
    import) means two modules that cannot be read, tested or replaced alone."""
    assert import_cycles(harness_imports(HARNESS)) == []


def test_the_circle_check_finds_a_lazy_circle(tmp_path):
    (tmp_path / "a.py").write_text("import sfdabench.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from sfdabench.c import g\n")
    (tmp_path / "c.py").write_text("def g():\n    from sfdabench import a\n")
    (tmp_path / "d.py").write_text("from sfdabench import a\n")
    assert import_cycles(harness_imports(tmp_path)) == [["sfdabench.a", "sfdabench.b", "sfdabench.c"]]


def imported_test_modules(source: str, filename: str = "<string>") -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every import of a test module (``test_*``) in this source, at any depth (lazy
    imports in functions included); name is None for ``import test_x``, a relative module starts with dots."""
    def is_test(module: str) -> bool:
        return any(part.startswith("test_") for part in module.split("."))

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if is_test(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")     # also: from tests import test_x
            found += [(node.lineno, module, a.name) for a in node.names if is_test(module) or is_test(a.name)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and is_test(node.args[0].value) \
                and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("import_module", "__import__"):
            found.append((node.lineno, node.args[0].value, None))
    return sorted(found, key=lambda hit: (hit[0], hit[1], hit[2] or ""))


def test_no_test_module_imports_another():
    """What test modules share lives in tests/helpers_*.py (plain helpers) and tests/conftest.py (fixtures): a
    test module imported by another couples the two (running one runs the other's module code, an imported
    fixture needs a noqa, an imported ``test_`` function is collected twice)."""
    tests = REPO / "tests"
    hits = [f"tests/{path.name}:{line}: " + (f"from {module} import {name}" if name else f"import {module}")
            for path in sorted(tests.glob("*.py"))
            for line, module, name in imported_test_modules(path.read_text(), str(path))]
    assert not hits, ("test modules import other test modules (move what they share to tests/helpers_*.py or, "
                      "for fixtures, tests/conftest.py):\n" + "\n".join(hits))


def test_the_scan_finds_an_import_of_a_test_module():
    """The check above can fail: from-, plain, relative and lazy imports and import_module are all seen."""
    source = ("from test_dfg import x, y\nimport test_box_search as tb\nfrom tests import test_cli\n"
              "def f():\n    from .test_prepare import z\n    importlib.import_module('test_leaderboard')\n")
    assert imported_test_modules(source) == [
        (1, "test_dfg", "x"), (1, "test_dfg", "y"), (2, "test_box_search", None), (3, "tests", "test_cli"),
        (5, ".test_prepare", "z"), (6, "test_leaderboard", None)]
    shared = "import conftest\nfrom conftest import REPO\nfrom helpers_methods import ORGANS\nimport pytest\n"
    assert imported_test_modules(shared) == []
