"""Imports point one way: no module of src/fvg imports a layer above its own.

`LAYERS` is the table (README's Layout section shows it). Every import statement counts,
at module level and inside functions (a lazy import is still a dependency), and so does
`if TYPE_CHECKING:`. A module may import its own layer and the layers below it; the units
(top-level modules and subpackages, MiniWorld split in two) must also not import each
other in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom first. An entry names a module or a package (and everything under it); the
# longest entry that matches a module decides its layer. "fvg" is the root package alone:
# its names load lazily from the pipeline, so only the top may import from it.
MINIWORLD_TRAINING = tuple(f"fvg.miniworld.{m}" for m in (
    "models", "settings", "loop", "sink", "stages", "reuse", "train", "curves", "diagnose", "cli"))
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("io", ("fvg.io",)),
    ("base", ("fvg.console", "fvg.parallel", "fvg.provenance", "fvg.presets", "fvg.residency", "fvg.speed",
              "fvg.tiny", "fvg.weight_storage", "fvg.storage_sizes",
              "fvg.miniworld")),  # the world: spec, grammar, render, score, suite, dataset
    ("method", ("fvg.plan", "fvg.anchor", "fvg.animate", "fvg.families")),
    ("orchestration", ("fvg.memory", "fvg.pipeline", "fvg.train")),
    ("applications", ("fvg.eval", "fvg.studio", *MINIWORLD_TRAINING)),
    ("cli", ("fvg.cli", "fvg.__main__", "fvg")),
)


def _entry(module: str) -> tuple[int, str] | None:
    """(layer index, table entry) of `module`, or None if the table does not place it."""
    best = None
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            matches = module == entry or (entry != "fvg" and module.startswith(entry + "."))
            if matches and (best is None or len(entry) > len(best[1])):
                best = (index, entry)
    return best


def layer_of(module: str) -> int:
    found = _entry(module)
    if found is None:
        raise KeyError(f"{module} has no layer in tests/test_layering.py LAYERS")
    return found[0]


def unit_of(module: str) -> str:
    """What the circle check compares: the top-level module or subpackage, MiniWorld's two halves apart."""
    if module.startswith("fvg.miniworld"):
        return "fvg.miniworld-training" if _entry(module)[1] in MINIWORLD_TRAINING else "fvg.miniworld"
    return ".".join(module.split(".")[:2])


def package_modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of the fvg package by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in sorted((src / "fvg").rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported fvg module) for every import statement in `source`, relative ones resolved.

    `from pkg import name` counts as importing `pkg.name` when that is a module, else `pkg`.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target))
    return list(dict.fromkeys((line, name) for line, name in found if name == "fvg" or name.startswith("fvg.")))


def violations(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Each import of a layer above the importer's, as `module:line imports target (layer > layer)`."""
    names = [name for name, _ in LAYERS]
    found = []
    for module, imported in graph.items():
        for line, target in imported:
            if layer_of(target) > layer_of(module):
                found.append(f"{module}:{line} imports {target} "
                             f"({names[layer_of(target)]} is above {names[layer_of(module)]})")
    return found


def unit_edges(graph: dict[str, list[tuple[int, str]]]) -> dict[str, set[str]]:
    """The package-level graph: which units each unit imports."""
    edges: dict[str, set[str]] = {}
    for module, imported in graph.items():
        for _, target in imported:
            if unit_of(target) != unit_of(module):
                edges.setdefault(unit_of(module), set()).add(unit_of(target))
    return edges


def unit_cycles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Circles among units (depth-first search over the unit graph), each as its list of units."""
    edges = unit_edges(graph)
    cycles, state = [], {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = "open"
        for nxt in sorted(edges.get(unit, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[unit] = "done"

    for unit in sorted(edges):
        if unit not in state:
            visit(unit, [unit])
    return cycles


def import_graph() -> dict[str, list[tuple[int, str]]]:
    modules = package_modules()
    known = set(modules)
    return {name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
            for name, path in modules.items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in package_modules() if _entry(m) is None]
    assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 100  # the parser sees the package's imports
    assert not violations(graph), "\n".join(violations(graph))


def test_units_do_not_import_each_other_in_a_circle():
    assert not unit_cycles(import_graph())


def test_the_checks_catch_planted_violations():
    known = set(package_modules())
    # A lazy, relative import in a function counts, and resolves to the module it names.
    planted = imports_of("def f():\n    from ..pipeline import FactorizedPipeline\n", "fvg.plan.rules", False, known)
    assert planted == [(2, "fvg.pipeline")]
    assert imports_of("from . import stages\n", "fvg.miniworld.train", False, known) == [(1, "fvg.miniworld.stages")]
    assert imports_of("from .. import io\nimport numpy\n", "fvg.plan", True, known) == [(1, "fvg.io")]
    graph = {
        "fvg.plan.rules": planted,  # method -> orchestration: up
        "fvg.miniworld.grammar": [(3, "fvg.train.trainer")],  # MiniWorld's world -> training: up
        "fvg.miniworld.stages": [(4, "fvg.train.trainer")],  # MiniWorld's training -> train: down, fine
        "fvg.pipeline": [(5, "fvg.plan"), (6, "fvg.io")],  # down, fine
        "fvg.io": [(7, "fvg")],  # the root re-exports the pipeline: only the top may import it
    }
    found = violations(graph)
    assert [v.split(" ")[0] for v in found] == ["fvg.plan.rules:2", "fvg.miniworld.grammar:3", "fvg.io:7"]
    assert "orchestration is above method" in found[0]
    assert unit_cycles({"fvg.plan.base": [(1, "fvg.anchor")], "fvg.anchor": [(2, "fvg.plan.cache")]}) == [
        ["fvg.anchor", "fvg.plan", "fvg.anchor"]]
    assert unit_cycles({"fvg.pipeline": [(1, "fvg.plan")]}) == []
    with pytest.raises(KeyError, match="fvg.newthing"):
        layer_of("fvg.newthing")


if __name__ == "__main__":  # `python tests/test_layering.py`: the package-level import graph, top layer first
    graph = import_graph()
    layer = {unit_of(m): layer_of(m) for m in graph}
    for unit, targets in sorted(unit_edges(graph).items(), key=lambda kv: (-layer[kv[0]], kv[0])):
        print(f"{LAYERS[layer[unit]][0]:>13}  {unit} -> {', '.join(sorted(targets, key=lambda u: -layer[u]))}")
    print("\n".join(violations(graph)) or "no import goes up a layer")
