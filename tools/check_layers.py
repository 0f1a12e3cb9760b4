#!/usr/bin/env python3
"""Check the import structure of src/interplab: layers, circles and imports hidden in function bodies.

    python tools/check_layers.py [SRC]        (default: src/interplab next to this folder)

Every `import` and `from ... import` in every file is read (top-level and inside functions alike). It fails (exit 1)
and prints one line per problem when
- a package imports a package of a higher layer (LAYERS below: base helpers, then models and data, activations,
  sae, the other methods, dashboard and report, and the command line on top);
- packages, or files, import each other in a circle of any length;
- a function body imports something other than an optional heavy dependency (OPTIONAL_DEPENDENCIES), which would
  hide an arrow from the reader of the file's top.
It only reads the files; nothing is imported or run.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

LAYERS: list[set[str]] = [
    {"errors"},
    {"config", "fileio", "dtypes", "plotting", "runs", "distributed", "demo_config"},
    {"models", "data"},
    {"activations"},
    {"sae"},
    {"synth", "evals", "probes", "weights", "lens", "beliefs", "toy", "circuits", "graphs", "decompose"},
    {"dashboard", "report"},
    {"demo", "cli", "__main__"},
]
"""Packages (and top-level modules) by layer, lowest first: each may import its own layer and those below it."""
OPTIONAL_DEPENDENCIES = ("s3fs", "playwright", "sae_lens", "nnsight", "transformer_lens", "wandb", "botocore", "datasets",
                         "pyarrow")
"""Modules that may be imported inside a function: optional extras, and the HF datasets stack (slow to import, needed
only for hf: and parquet corpora), loaded only by the code that needs them."""

Module = str  # dotted name, e.g. interplab.sae.topk


def module_files(src: Path) -> dict[Module, Path]:
    """Every module under `src` (the interplab package folder) by dotted name."""
    files = {}
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def imported_names(module: Module, path: Path, tree: ast.AST) -> list[tuple[ast.stmt, list[str]]]:
    """Each import statement of the file with the absolute module names it may load."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.append((node, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node, [base] + [f"{base}.{alias.name}" for alias in node.names]))
    return found


def package_of(module: Module) -> str:
    """interplab.sae.topk -> sae; interplab.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def function_body_imports(tree: ast.AST) -> list[ast.stmt]:
    """Import statements inside a function or method body."""
    inner = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    inner.append(child)
    return inner


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted: every import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def check(src: Path) -> list[str]:
    """Every layering problem of the package at `src`, one line each."""
    files = module_files(src)
    root = src.parent.parent  # the repository: paths in the report are relative to it
    layer_of = {name: i for i, names in enumerate(LAYERS) for name in names}
    problems: list[str] = []
    file_edges: dict[str, set[str]] = defaultdict(set)
    package_edges: dict[str, set[str]] = defaultdict(set)
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        path = path.relative_to(root)
        for node in function_body_imports(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
            if not all(n.split(".")[0] in OPTIONAL_DEPENDENCIES for n in names):
                problems.append(f"import inside a function: {path}:{node.lineno} imports {', '.join(names)}")
        for node, targets in imported_names(module, path, tree):
            for target in targets:
                if target not in files or target == module or target == "interplab":
                    continue
                file_edges[module].add(target)
                a, b = package_of(module), package_of(target)
                if a == b:
                    continue
                package_edges[a].add(b)
                if a not in layer_of or b not in layer_of:
                    problems.append(f"no layer: {path}:{node.lineno}: add {a if a not in layer_of else b} to LAYERS")
                elif layer_of[b] > layer_of[a]:
                    problems.append(f"climbs: {path}:{node.lineno}: {a} (layer {layer_of[a]}) imports {target} "
                                    f"(layer {layer_of[b]})")
    problems += [f"package circle: {' <-> '.join(c)}" for c in circles(package_edges)]
    problems += [f"file circle: {' <-> '.join(c)}" for c in circles(file_edges)]
    return sorted(set(problems))


def main(argv: list[str]) -> int:
    src = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "src" / "interplab"
    problems = check(src)
    for line in problems:
        print(line)
    print(f"check_layers: {len(problems)} problems in {len(module_files(src))} files under {src}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
