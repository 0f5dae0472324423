#!/usr/bin/env python3
"""Code-size and coupling figures of a cellkit tree (issue 17's "Must hold" counts).

Prints, for the package under ``--root`` (default: this checkout's ``cellkit/``):

* ``statements``: the number of ``ast.stmt`` nodes (issue 17's count: comments and blank lines are not statements;
  a docstring is an ``Expr`` statement and counts), and the same without docstrings;
* ``functions over 60 code lines``: functions whose body has more than 60 lines holding code (not blank, not a
  comment, not docstring lines), with their names;
* ``private-API lines``: code lines that import an underscore name from a module outside the package, import a
  ``*.internal``/``_*`` module of another package, or read an ``obj._name`` attribute whose name is defined nowhere in
  the package (so it belongs to a library), outside modules whose name contains ``compat``;
* ``import circles``: strongly connected components of the package's module import graph (imports inside functions
  included).

Usage:
    python benchmarks/code_stats.py [--root cellkit] [--json]
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from pathlib import Path


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                ids.add(id(body[0]))
    return ids


def code_lines(source: str, tree: ast.AST) -> set[int]:
    """Line numbers holding code: tokens other than comments/newlines, minus docstring lines."""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.ENDMARKER):
            continue
        for ln in range(tok.start[0], tok.end[0] + 1):
            lines.add(ln)
    for node in ast.walk(tree):
        if id(node) in _DOCS:
            lines -= set(range(node.lineno, node.end_lineno + 1))
    return lines


_DOCS: set[int] = set()


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(mod: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "cellkit"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    pkg = root.name
    files = sorted(root.rglob("*.py"))
    trees = {}
    for f in files:
        src = f.read_text()
        trees[f] = (src, ast.parse(src, str(f)))
    defined: set[str] = set()
    for _, (src, tree) in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
    statements = 0
    raw_statements = 0
    long_funcs = []
    private = []
    graph: dict[str, set[str]] = {}
    modules = {module_name(f, root) for f in files}
    for f, (src, tree) in trees.items():
        global _DOCS
        _DOCS = _docstring_nodes(tree)
        raw = sum(isinstance(n, ast.stmt) for n in ast.walk(tree))
        raw_statements += raw
        statements += raw - len(_DOCS)
        lines = code_lines(src, tree)
        rel = f.relative_to(root.parent)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = set(range(node.body[0].lineno, node.end_lineno + 1)) & lines
                if len(body) > 60:
                    long_funcs.append((len(body), f"{rel}:{node.lineno} {node.name}"))
        mod = module_name(f, root)
        deps = graph.setdefault(mod, set())
        compat = "compat" in f.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == pkg:
                        deps.add(a.name)
                    elif not compat and any(p.startswith("_") or p == "internal" for p in a.name.split(".")[1:]):
                        private.append(f"{rel}:{node.lineno} import {a.name}")
            elif isinstance(node, ast.ImportFrom):
                target = resolve(mod, node, f.name == "__init__.py")
                if target.split(".")[0] == pkg:
                    deps.add(target)
                    for a in node.names:
                        if f"{target}.{a.name}" in modules:
                            deps.add(f"{target}.{a.name}")
                elif not compat:
                    parts = target.split(".")[1:]
                    if any(p.startswith("_") or p == "internal" for p in parts) or any(
                            a.name.startswith("_") and not a.name.startswith("__") for a in node.names):
                        private.append(f"{rel}:{node.lineno} from {target} import ...")
            elif (not compat and isinstance(node, ast.Attribute) and node.attr.startswith("_")
                  and not node.attr.startswith("__") and node.attr not in defined):
                private.append(f"{rel}:{node.lineno} .{node.attr}")
    for mod, deps in graph.items():
        graph[mod] = {d for d in deps if d in modules and d != mod}
    circles = [c for c in _scc(graph) if len(c) > 1]
    private_lines = sorted(set(p.split(" ")[0] for p in private))
    result = {
        "files": len(files),
        "statements": raw_statements,
        "statements_without_docstrings": statements,
        "functions_over_60": [n for _, n in sorted(long_funcs, reverse=True)],
        "private_api_lines": len(private_lines),
        "private_api": sorted(set(private)),
        "import_circles": [sorted(c) for c in circles],
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"files: {result['files']}")
    print(f"statements: {raw_statements} (without docstrings: {statements})")
    print(f"functions over 60 code lines: {len(long_funcs)}")
    for n, name in sorted(long_funcs, reverse=True):
        print(f"  {n:4d} {name}")
    print(f"private-API code lines outside *compat*: {len(private_lines)}")
    for p in result["private_api"]:
        print(f"  {p}")
    print(f"import circles: {len(circles)}")
    for c in circles:
        print("  " + " <-> ".join(sorted(c)))
    return 0


def _scc(graph: dict[str, set[str]]) -> list[set[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
