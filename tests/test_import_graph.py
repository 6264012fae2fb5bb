"""The package's import graph has no cycles, and its bottom layer and `maskrcnn.config` stay light.

The graph is read from the source with `ast` (nothing is imported to build it). An edge A -> B means
that A imports B: at module level ("module") or inside a function ("function", run on first use).
Importing `maskrcnn.a.b` also runs the package `maskrcnn/a/__init__.py`, so A then depends on what
that package imports at module level too (not on what its functions import lazily).

Print the graph and its cycles with:  python tests/test_import_graph.py [--all]
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "maskrcnn"

# Cycles that remain only through function-level imports, each with why and when it goes (none is left).
ALLOWED_CYCLES: set[frozenset[str]] = set()
# Test modules that still import another one, each with why (the checked rule: none does).
ALLOWED_TEST_IMPORTS: set[tuple[str, str]] = set()
# Modules at the bottom: they import nothing from maskrcnn, so every other module may use them.
BOTTOM = ("maskrcnn.errors", "maskrcnn.fileio", "maskrcnn.renaming")

# The layers of docs/ARCHITECTURE.md, lowest first: a module imports only from its own layer and those below.
# A name stands for the module and everything under it; the longest matching name decides.
LAYERS = [
    ["maskrcnn", "maskrcnn.errors", "maskrcnn.fileio", "maskrcnn.renaming"],
    ["maskrcnn.config_schema", "maskrcnn.config_checks", "maskrcnn.config_merge"],
    ["maskrcnn.structures", "maskrcnn.rle", "maskrcnn.visualize"],
    ["maskrcnn.data"],
    ["maskrcnn.modeling", "maskrcnn.tiling"],
    # maskrcnn.config (load_config) reads our YAML files and Detectron2's: above both readers.
    ["maskrcnn.modeling.torchvision_import", "maskrcnn.detectron2", "maskrcnn.config"],
    ["maskrcnn.checkpoint", "maskrcnn.zoo"],
    ["maskrcnn.engine", "maskrcnn.distributed", "maskrcnn.export", "maskrcnn.export_cache", "maskrcnn.onnx_backends",
     "maskrcnn.onnx_model", "maskrcnn.quantize", "maskrcnn.api", "maskrcnn.loading"],
    ["maskrcnn.commands", "maskrcnn.cli", "maskrcnn.serve", "maskrcnn.video"],
]
# Imports that point up a layer, each with why.
ALLOWED_UPWARD = {
    # modeling/__init__ (build_model, import_state_dict) hands foreign state dicts to the adapters.
    ("maskrcnn.modeling", "maskrcnn.modeling.torchvision_import"),
    ("maskrcnn.modeling", "maskrcnn.detectron2.weights"),
}


def module_name(path: Path) -> str:
    """Return the dotted module name of a file under the package (a package's __init__ is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Return every module of the package by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.AST, name: str, is_package: bool, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """Return (imported maskrcnn module, "module" or "function") for each import in a module's tree.

    Imports under `if TYPE_CHECKING:` are left out: they never run.
    """
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else kind
            if isinstance(child, ast.Import):
                found.extend((alias.name, kind) for alias in child.names if alias.name.split(".")[0] == "maskrcnn")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == "maskrcnn":
                    for alias in child.names:  # `from pkg import submodule` imports the submodule
                        sub = f"{base}.{alias.name}"
                        found.append((sub if sub in modules else base, kind))
            visit(child, inner)

    visit(tree, "module")
    return found


def import_graph() -> dict[str, dict[str, set[str]]]:
    """Return {module: {imported module: {"module", "function"}}} for the whole package."""
    modules = package_modules()
    direct = {name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", modules)
              for name, path in modules.items()}
    graph: dict[str, dict[str, set[str]]] = {name: {} for name in modules}
    for name, imports in direct.items():
        for target, kind in imports:
            # The target, plus what each enclosing package (outside `name`'s own) imports at module level.
            parts = target.split(".")
            packages = [".".join(parts[:i]) for i in range(1, len(parts))]
            reached = [target] + [t for p in packages if not name.startswith(p + ".") and p != name
                                  for t, k in direct.get(p, []) if k == "module"]
            for t in reached:
                if t in modules and t != name and not name.startswith(t + "."):
                    graph[name].setdefault(t, set()).add(kind)
    return graph


def cycles(graph: dict[str, dict[str, set[str]]], kinds: set[str]) -> list[frozenset[str]]:
    """Return the strongly connected components of more than one module, following edges of `kinds`."""
    edges = {a: [b for b, k in targets.items() if k & kinds] for a, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_imports(graph):
    """Each module imports on its own (in this process: catches broken or circular module-level imports)."""
    optional = {"maskrcnn.serve.app"}  # needs fastapi, an optional extra
    for name in sorted(graph):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if name in optional and not (e.name or "").startswith("maskrcnn"):
                continue
            raise


def test_no_cycle_at_module_level(graph):
    assert cycles(graph, {"module"}) == []


def test_no_cycle_through_lazy_imports_either_except_the_allowed_ones(graph):
    found = cycles(graph, {"module", "function"})
    assert [sorted(c) for c in found if c not in ALLOWED_CYCLES] == []


def layer(name: str) -> int:
    """Return the index in LAYERS of a module's layer."""
    matches = [(len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
               if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1]


def test_imports_point_down_the_layers(graph):
    upward = [(a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a)]
    assert sorted(set(upward) - ALLOWED_UPWARD) == []
    assert set(upward) == ALLOWED_UPWARD, "an allowed upward import is gone: remove it from ALLOWED_UPWARD"


def test_bottom_layer_imports_nothing_from_the_package(graph):
    for name in BOTTOM:
        assert graph[name] == {}, f"{name} imports {sorted(graph[name])}"


def test_the_graph_sees_lazy_and_package_imports(graph):
    """The reader itself: a function-level import, and a package __init__'s imports reached through it."""
    assert graph["maskrcnn.config"]["maskrcnn.detectron2.config"] == {"function"}
    assert graph["maskrcnn.detectron2.weights"]["maskrcnn.renaming"] == {"module"}
    # serve.app imports only maskrcnn.data.image_io (in a function), which runs maskrcnn/data/__init__.py
    assert graph["maskrcnn.serve.app"]["maskrcnn.data.coco"] == {"function"}
    # ...but a module's own packages are no edge of it: modeling/__init__ imports torchvision_import
    assert "maskrcnn.modeling" not in graph["maskrcnn.modeling.torchvision_import"]
    # and a package's lazy imports are not reached through it (detectron2/__init__ imports on first use)
    assert "maskrcnn.detectron2.weights" not in graph["maskrcnn.detectron2.config"]


def test_no_test_module_imports_another_or_conftest():
    """Shared test code lives in support modules (tests/support.py, ...), not in test modules or conftest.py."""
    found = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(path.name, n) for n in names if n.split(".")[0].startswith("test_") or n == "conftest"]
    assert sorted(set(found) - ALLOWED_TEST_IMPORTS) == []


def test_config_does_not_load_torch():
    code = "import sys, maskrcnn.config; print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def main(argv: list[str]) -> int:
    """Print each module's maskrcnn imports (function-level ones marked) and the cycles found."""
    graph = import_graph()
    for name in sorted(graph):
        targets = [t + ("" if "module" in k else " (lazy)") for t, k in sorted(graph[name].items())]
        if targets or "--all" in argv:
            print(f"{name} -> {', '.join(targets) or '-'}")
    print(f"{len(graph)} modules, {sum(len(t) for t in graph.values())} edges")
    for label, kinds in (("module-level", {"module"}), ("with lazy imports", {"module", "function"})):
        found = cycles(graph, kinds)
        print(f"cycles {label}: " + ("none" if not found else "; ".join(" <-> ".join(sorted(c)) for c in found)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
