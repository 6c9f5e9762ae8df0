"""docs/architecture.md's module map is the code's: every module under src/gere is named, nothing named is
gone, and a module imports only modules in rows above its own (or its own row)."""

from __future__ import annotations

import re
from pathlib import Path

from test_layout import SRC, _imports

DOC = SRC.parent.parent / "docs" / "architecture.md"


def _modules() -> dict[str, Path]:
    """Module name (``gere.store.format``) -> file, for every module under src/gere."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _map_rows() -> list[list[str]]:
    """The module map's rows, each the module paths (``store/format.py``) it names, in the document's order."""
    text = DOC.read_text()
    table = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = [
        line.split("|")[2] for line in table.splitlines() if line.startswith("|") and line.count("|") >= 4
    ]
    return [re.findall(r"`([\w/]+\.py)`", cell) for cell in rows[2:]]  # past the header and its rule


def _name(path: str) -> str:
    parts = ["gere", *Path(path).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_is_in_the_map_and_nothing_more():
    named = [_name(p) for row in _map_rows() for p in row]
    modules = _modules()
    assert sorted(set(modules) - set(named)) == [], "add these modules to docs/architecture.md's module map"
    assert sorted(set(named) - set(modules)) == [], "these modules in docs/architecture.md are gone"
    assert len(named) == len(set(named)), "a module is named twice in the map"


def test_a_module_imports_only_modules_above_it_in_the_map():
    rows = _map_rows()
    row_of = {_name(p): i for i, row in enumerate(rows) for p in row}
    modules = _modules()
    late = []
    for name, path in modules.items():
        for dep in _imports(path) & set(modules):
            if dep not in (name, "gere") and row_of.get(dep, -1) > row_of.get(name, -1):
                late.append(f"{name} imports {dep}")
    assert sorted(late) == [], "reorder docs/architecture.md's module map (or the imports)"
