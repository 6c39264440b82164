"""Module-level import cycles of the project's packages under a root folder, as JSON (run as a script,
so the packages are found fresh under that root and never mix with the ones a test process imported)."""

from __future__ import annotations

import json
import sys

import grimp

PACKAGES = ("alignfed", "coordinator", "dashboard", "demo", "edge", "export", "runtime", "simulator")


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def module_cycles() -> list[list[str]]:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    # a package's __init__ importing its own modules is not a cycle between modules
    for mod in sorted(graph.modules):
        for child in graph.find_modules_directly_imported_by(mod):
            if child.startswith(mod + "."):
                graph.remove_import(importer=mod, imported=child)
    return _cycles(graph)


if __name__ == "__main__":
    json.dump(module_cycles(), sys.stdout)
