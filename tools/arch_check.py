#!/usr/bin/env python3
"""Architecture health of the raypo checkout: import cycles, private imports across modules,
module and function sizes. Reads the code as text (ast); runs nothing of the project.

    python tools/arch_check.py            # from the project root; prints a report
    python tools/arch_check.py --strict   # exit 1 when any finding is present

Findings:
  cycle          two or more raypo modules (or subpackages) that import each other, at module
                 level or inside functions (a lazy import still ties the two together)
  private        code that imports a leading-underscore name from another raypo module
                 (benchmarks/ and raypo/ only; tests may reach into internals on purpose)
  module-size    a raypo/ module over 600 lines
  function-size  a raypo/ function over 80 lines
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

MODULE_LINES = 600
FUNCTION_LINES = 80


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, current: str, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported raypo module, names taken, line) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "raypo":
                    out.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node, current, path.name == "__init__.py")
            if not target or target.split(".")[0] != "raypo":
                continue
            names = [a.name for a in node.names]
            # `from raypo.train import loop` imports the module raypo.train.loop
            for name in names:
                if f"{target}.{name}" in known:
                    out.append((f"{target}.{name}", [], node.lineno))
            out.append((target, [n for n in names if f"{target}.{n}" not in known], node.lineno))
    return out


def in_type_checking_block(path: Path) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks (imports there tie nothing at run time)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                result.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return result


def main() -> int:
    strict = "--strict" in sys.argv
    root = Path.cwd()
    pkg = root / "raypo"
    if not pkg.is_dir():
        print("arch_check: run it from the project root (no raypo/ here)")
        return 2
    files = sorted(pkg.rglob("*.py"))
    known = {module_name(f, root) for f in files}
    graph: dict[str, set[str]] = defaultdict(set)
    findings: list[str] = []

    def owner(module: str) -> str:
        """The module itself if it is a known file module, else its closest known parent."""
        while module and module not in known:
            module = module.rpartition(".")[0]
        return module

    for f in files:
        me = module_name(f, root)
        skip = in_type_checking_block(f)
        for target, names, line in imports_of(f, me, known):
            if line in skip:
                continue
            dest = owner(target)
            if (
                dest
                and dest != me
                and not me.startswith(dest + ".")
                and not dest.startswith(me + ".")
            ):
                graph[me].add(dest)
            for n in names:
                if n.startswith("_") and not n.startswith("__") and dest != me:
                    findings.append(
                        f"private        {f.relative_to(root)}:{line} imports {n} from {target}"
                    )

    for cycle in strongly_connected(graph):
        findings.append("cycle          modules " + " <-> ".join(cycle))

    # subpackage level: raypo.train <-> raypo.eval
    def package(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 else m

    pgraph: dict[str, set[str]] = defaultdict(set)
    for a, outs in graph.items():
        for b in outs:
            if package(a) != package(b):
                pgraph[package(a)].add(package(b))
    for cycle in strongly_connected(pgraph):
        if all(c.count(".") == 1 for c in cycle) and any(
            (root / c.replace(".", "/")).is_dir() for c in cycle
        ):
            findings.append("cycle          packages " + " <-> ".join(cycle))

    bench = root / "benchmarks"
    if bench.is_dir():
        for f in sorted(bench.rglob("*.py")):
            for target, names, line in imports_of(f, "benchmarks." + f.stem, known):
                for n in names:
                    if n.startswith("_") and not n.startswith("__"):
                        findings.append(
                            f"private        {f.relative_to(root)}:{line} imports {n} from {target}"
                        )

    for f in files:
        text = f.read_text(encoding="utf-8")
        n = text.count("\n")
        if n > MODULE_LINES:
            findings.append(
                f"module-size    {f.relative_to(root)} has {n} lines (> {MODULE_LINES})"
            )
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > FUNCTION_LINES:
                    findings.append(
                        f"function-size  {f.relative_to(root)}:{node.lineno} {node.name} "
                        f"has {size} lines (> {FUNCTION_LINES})"
                    )

    for line in findings:
        print(line)
    kinds = defaultdict(int)
    for line in findings:
        kinds[line.split()[0]] += 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"
    print(
        f"arch_check: {len(files)} modules, {sum(len(v) for v in graph.values())} import "
        f"edges; findings: {summary}"
    )
    return 1 if (strict and findings) else 0


if __name__ == "__main__":
    sys.exit(main())
