"""The package layering: every module imports in a fresh interpreter, and the import graph between
k2jax's packages — imports inside functions counted — has no cycle and never points up LAYERS.

A node is a subpackage of k2jax (k2jax.model, k2jax.train, k2jax.sharding, ...) or a top-level
module (k2jax.api, k2jax.cli, ...). An arrow u → v is any `import` or `from ... import` in a file of
u that names v, wherever the statement sits: a lazy import hides a cycle from Python's import
machinery, not from this test. The package façades' lazy name tables (`k2jax/__init__.py`'s
`_LAZY` and friends) load modules of their own package only, so they are not arrows.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import ROOT

# Bottom to top. An arrow may stay in its layer or go down, never up; a new package or top-level
# module must be placed here (the test says so).
LAYERS = (
    ("configs", "logs", "sharding", "quant", "config"),  # primitives: import nothing above
    ("paths", "lora", "ops", "data", "optim"),
    ("model",),
    ("conversion", "generate"),
    ("train", "testing"),
    ("api",),
    ("chat", "demo", "demo_images", "cli"),  # the commands
)
# Installed as k2jax.X (pyproject.toml's package-dir) but kept at the top of the repository.
TOP_LEVEL_PACKAGES = {"k2jax.sharding": ROOT / "sharding", "k2jax.conversion": ROOT / "conversion"}


def _modules(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name → file, for every .py under the packages (key: the dotted prefix)."""
    out = {}
    for prefix, folder in package_dirs.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


def _imported(module: str, file: Path, node: ast.AST) -> list[str]:
    """The dotted names an import statement of `module` names (absolute, as resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module.split(".")
    if node.level:  # relative: from the package of `module`
        keep = len(base) - node.level + (1 if file.name == "__init__.py" else 0)
        base = base[:keep]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph(root: str, package_dirs: dict[str, Path]) -> dict[str, dict[str, list[str]]]:
    """node → {node it imports → ["file:line", ...]}; a node is `root.X`'s X. Importing `root`
    itself (the façade) is an arrow to `root`."""
    modules = _modules(package_dirs)
    graph: dict[str, dict[str, list[str]]] = {}
    for module, file in modules.items():
        parts = module.split(".")
        if len(parts) == 1:
            continue  # the façade's own lazy table
        u = parts[1]
        graph.setdefault(u, {})
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(module, file, node):
                p = name.split(".")
                if p[0] != root:
                    continue
                v = p[1] if len(p) > 1 else root
                if v != u and (v == root or f"{root}.{v}" in modules):
                    where = file.relative_to(ROOT) if file.is_relative_to(ROOT) else file
                    graph[u].setdefault(v, []).append(f"{where}:{node.lineno}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(u):
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, {})):
            if state.get(v) == 1:
                return [*path[path.index(v) :], v]
            if v not in state and (c := visit(v)):
                return c
        path.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (c := visit(u)):
            return c
    return None


def _describe(graph, cycle) -> str:
    return "; ".join(f"{a} → {b} at {graph[a][b][0]}" for a, b in itertools.pairwise(cycle))


def _k2jax_graph():
    return import_graph("k2jax", {"k2jax": ROOT / "k2jax", **TOP_LEVEL_PACKAGES})


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(
        m
        for m in _modules({"k2jax": ROOT / "k2jax", **TOP_LEVEL_PACKAGES})
        if not m.startswith("k2jax.data.make_demo_chats")  # a script (run as __main__)
    )
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    r = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]


def test_package_graph_has_no_cycle_and_follows_the_layers():
    graph = _k2jax_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle {' → '.join(cycle)}: {_describe(graph, cycle)}"
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    for u, targets in graph.items():
        assert u in layer, f"k2jax.{u} is in no layer: add it to tests/test_layering.LAYERS"
        for v, where in targets.items():
            assert v != "k2jax", f"k2jax.{u} imports the package façade `k2jax` at {where[0]}"
            assert layer[v] <= layer[u], (
                f"k2jax.{u} (layer {layer[u]}) imports k2jax.{v} (layer {layer[v]}) at {where[0]}"
            )
    assert not graph["sharding"], f"sharding must import nothing else of k2jax: {graph['sharding']}"


def test_a_reintroduced_cycle_is_found(tmp_path):
    """The checker sees a cycle made by an import inside a function (as a lazy import would
    hide it), and names the file and line of each arrow."""
    pkg = tmp_path / "pkg"
    for sub, body in {
        "low/__init__.py": """
            def f():
                from pkg.high import thing  # a lazy import back up
                return thing
        """,
        "high/__init__.py": "from pkg.low import f\nthing = 1\n",
        "top.py": "import pkg.high\n",
    }.items():
        (pkg / sub).parent.mkdir(parents=True, exist_ok=True)
        (pkg / sub).write_text(textwrap.dedent(body))
    (pkg / "__init__.py").write_text("")
    graph = import_graph("pkg", {"pkg": pkg})
    assert graph["top"] == {"high": [f"{pkg / 'top.py'}:1"]}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"low", "high"}
    assert "low/__init__.py:3" in _describe(graph, cycle)
    del graph["low"]["high"]
    assert find_cycle(graph) is None
