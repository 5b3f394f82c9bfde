"""Imports go one way: errors, version, config, assets ← model ← calib ← quant ← export, eval ← runtime ← cli, demo.

A module may import its own layer and the layers below, never one above (function-local imports
included: a deferred import is still a dependency), and the parts (packages, top-level modules)
import each other without a cycle."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "dist_ptq"
LAYERS = [{"errors", "version", "config", "assets"}, {"model"}, {"calib"}, {"quant"}, {"export", "eval"},
          {"runtime"}, {"cli", "demo", "__init__", "__main__"}]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def part(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for n in names:
            bits = n.split(".")
            if bits[0] == "dist_ptq":
                out.add(bits[1] if len(bits) > 1 else "__init__")
    return out


SOURCES = sorted(p for p in PKG.rglob("*.py"))


def test_every_part_has_a_layer():
    assert {part(p) for p in SOURCES} <= set(RANK), {part(p) for p in SOURCES} - set(RANK)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    me = part(path)
    up = sorted(t for t in imported(path) - {me} if RANK[t] > RANK[me])
    assert up == [], f"{path.relative_to(PKG)} ({me}) imports {up} from a layer above"


def test_parts_import_each_other_without_a_cycle():
    deps: dict[str, set[str]] = {}
    for p in SOURCES:
        deps.setdefault(part(p), set()).update(imported(p) - {part(p)})
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join(path + (node,))}"
        if node not in done:
            for dep in sorted(deps.get(node, ())):
                visit(dep, path + (node,))
            done.add(node)

    for node in sorted(deps):
        visit(node, ())
