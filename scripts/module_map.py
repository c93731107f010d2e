#!/usr/bin/env python3
"""The package's module map: lines, imports inside the package (module level and inside functions), import cycles,
environment reads outside `config`, and the longest exported notebook cells. `python scripts/module_map.py`."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "spam_mlops"
GENERATED = {"_modidx"}


def modules() -> dict[str, ast.Module]:
    "Every module of the package (generated index files left out), parsed."
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PKG.glob("*.py"))
            if p.stem not in GENERATED and p.stem != "__init__"}


def imports(tree: ast.Module, names: set[str]) -> set[str]:
    "Modules of the package that `tree` imports anywhere (`from .x`, `from spam_mlops.x`, `from spam_mlops import x`)."
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 and mod: found.add(mod.split(".")[0])
            elif node.level == 1 or mod == "spam_mlops": found.update(a.name for a in node.names)
            elif mod.startswith("spam_mlops."): found.add(mod.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("spam_mlops."))
    return found & names


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(t, set(mods)) - {m} for m, t in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    "Every elementary cycle found by a depth-first search (each reported once, from its smallest module)."
    found = []
    def walk(start, node, path):
        for nxt in sorted(g.get(node, ())):
            if nxt == start: found.append([*path, start])
            elif nxt > start and nxt not in path: walk(start, nxt, [*path, nxt])
    for m in sorted(g): walk(m, m, [m])
    return found


def env_reads() -> list[str]:
    "`os.environ` reads (get, [], copies) and `os.getenv` calls outside config, as file:line."
    out = []
    for p in sorted(PKG.glob("*.py")):
        if p.stem in GENERATED or p.stem == "config": continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                f = node.func
                if f.attr == "getenv" and getattr(f.value, "id", "") == "os": out.append(f"{p.name}:{node.lineno}")
                if (f.attr in ("get", "copy", "items") and isinstance(f.value, ast.Attribute)
                        and f.value.attr == "environ"): out.append(f"{p.name}:{node.lineno}")
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and \
                    isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
                out.append(f"{p.name}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "dict" and node.args and \
                    isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "environ":
                out.append(f"{p.name}:{node.lineno}")
    return out


def exported_cells() -> list[tuple[int, str]]:
    "(lines, notebook#cell) of every exported cell, longest first."
    out = []
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        for c in json.loads(nb.read_text())["cells"]:
            src = "".join(c["source"])
            if c["cell_type"] == "code" and src.lstrip().startswith(("#| export", "#|export")):
                out.append((len(src.splitlines()), f"{nb.name}#{c.get('id')}"))
    return sorted(out, reverse=True)


def main() -> int:
    g = graph()
    for m in sorted(g, key=lambda m: (len(g[m]), m)):
        lines = len((PKG / f"{m}.py").read_text().splitlines())
        print(f"{m:16} {lines:5} lines  imports: {', '.join(sorted(g[m])) or '-'}")
    cyc = cycles(g)
    print(f"\ncycles: {len(cyc)}" + "".join(f"\n  {' -> '.join(c)}" for c in cyc))
    env = env_reads()
    print(f"environment reads outside config: {len(env)}" + (f" ({', '.join(env)})" if env else ""))
    cells = exported_cells()
    print(f"exported cells: {len(cells)}, mean {sum(n for n, _ in cells) / max(len(cells), 1):.1f} lines; longest:")
    for n, where in cells[:5]: print(f"  {n:4} {where}")
    return 1 if cyc or env else 0


if __name__ == "__main__":
    sys.exit(main())
