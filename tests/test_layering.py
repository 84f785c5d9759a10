"""Imports point down: every import statement of a package (module level or inside a function)
is read from its source, so a lazy import up the stack is found too."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> the top-level packages of this project it must never import
NEVER = {
    "launchers": {"recipes"},
    "bitnet": {"recipes", "launchers"},
}


def _imported_top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(NEVER))
def test_package_never_imports_up(package):
    found = {
        str(path.relative_to(REPO)): sorted(_imported_top_level_names(path) & NEVER[package])
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert {path: names for path, names in found.items() if names} == {}


def test_the_reader_sees_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from recipes.api import run\n    import launchers.slurm\n")
    assert _imported_top_level_names(source) == {"os", "recipes", "launchers"}
