"""The layer rules of docs/architecture.md, checked on the source: each layer imports only the layers
below it (every import, also the ones inside functions), and the server names no method."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "leanserve"

# layer -> the other layers it may import (cli may import everything)
ALLOWED = {
    "errors": set(),
    "atomic": set(),
    "runtime": {"errors"},
    "kernels": set(),
    "data": {"errors", "atomic", "runtime"},
    "models": {"errors", "atomic", "runtime", "kernels"},
    "eval": {"errors", "atomic", "runtime", "kernels", "data", "models", "server"},
    "trainers": {"errors", "atomic", "runtime", "kernels", "data", "models", "eval"},
    "compressors": {"errors", "atomic", "runtime", "kernels", "data", "models", "eval", "trainers"},
    "server": {"errors", "atomic", "runtime", "kernels", "models"},
}


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return "leanserve" if parts[0] == "__init__" else parts[0]


def leanserve_imports(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        layers |= {name.split(".")[1] for name in names if name.startswith("leanserve.")}
    return layers


def test_every_module_belongs_to_a_known_layer():
    layers = {layer_of(p) for p in PACKAGE.rglob("*.py")}
    assert layers <= set(ALLOWED) | {"cli", "leanserve"}, layers - set(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer):
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if layer_of(path) != layer:
            continue
        for target in leanserve_imports(path) - ALLOWED[layer] - {layer}:
            bad.append(f"{path.relative_to(PACKAGE.parent)} imports leanserve.{target}")
    assert not bad, "\n".join(bad)


def test_server_names_no_method():
    """A method plugs in through models/ (methods.py, attention/, the pipelines' check_inputs); the
    server batches and runs whatever it is given."""
    method = re.compile(r"\b(sid|SiD|dpm[-_]ot|DPM[-_]OT|moa|MoA|moepp|MoE\+\+|sgld|ensemble)\b")
    hits = [f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
            for p in sorted((PACKAGE / "server").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if method.search(line) and "zoo/" not in line]
    assert not hits, "\n".join(hits)
