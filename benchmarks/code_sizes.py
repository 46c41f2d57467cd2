#!/usr/bin/env python3
"""Module and function sizes of ``medvae/`` at a git revision (the redesign's before/after figures).

Usage: python benchmarks/code_sizes.py [REV ...]   (default: HEAD)

For each revision: the number of modules and functions, the functions over 80 lines, and the six largest
modules, read with ``git show REV:path`` and measured with :mod:`ast` (a function's size is its line span,
decorators excluded, docstring included).
"""

from __future__ import annotations

import ast
import subprocess
import sys

LIMIT = 80


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def sizes(rev: str) -> None:
    """Print the size figures of ``medvae/`` at ``rev``."""
    files = [f for f in _git("ls-tree", "-r", "--name-only", rev, "medvae").split() if f.endswith(".py")]
    modules: list[tuple[int, str]] = []
    big: list[tuple[int, str, str]] = []
    n_functions = 0
    for f in files:
        src = _git("show", f"{rev}:{f}")
        modules.append((len(src.splitlines()), f))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n_functions += 1
                span = (node.end_lineno or node.lineno) - node.lineno + 1
                if span > LIMIT:
                    big.append((span, f, node.name))
    modules.sort(reverse=True)
    print(f"{rev}: {len(modules)} modules, {n_functions} functions, {len(big)} over {LIMIT} lines")
    print("  largest modules: " + ", ".join(f"{f} {n}" for n, f in modules[:6]))
    print(
        "  over the limit: "
        + (", ".join(f"{f}:{name} {n}" for n, f, name in sorted(big, reverse=True)) or "none")
    )


if __name__ == "__main__":
    for rev in sys.argv[1:] or ["HEAD"]:
        sizes(rev)
