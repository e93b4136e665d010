"""Dependencies point one way (docs/development.md, Layout): each component imports only the
components below it. Read from the source (every import statement, those inside functions too),
so a lazy import cannot hide a leak."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = "sencache"
"""The command line's folder: `sencache.cli`, `sencache.demo`, ... and the package root's lazy
Python API (`sencache.Engine`); nothing below the command imports them."""

ALLOWED = {
    "kernels": {"kernels"},
    "runtime": {"runtime", "kernels"},
    "console": {"console", "runtime"},
    "data": {"data", "runtime"},
    "calibration": {"calibration", "console", "data", "runtime", "kernels"},
    "engine_builder": {"engine_builder", "console", "data", "runtime", "kernels"},
    "serving": {"serving", "runtime"},
    "benchmarks": {
        "benchmarks",
        "calibration",
        "console",
        "data",
        "engine_builder",
        "kernels",
        "runtime",
        "serving",
    },
    "capi": {"capi", "runtime", CLI},
}
"""The components each component may import (by folder); the command's folder may import all."""
LEAVES = ("console/output.py",)
"""Modules that import nothing of sencache."""


def _folders() -> set[str]:
    return {path.parent.name for path in ROOT.glob("*/__init__.py")} - {"tests"}


def imported(path: Path) -> set[str]:
    """The folders of the sencache modules `path` imports (CLI for the command's modules and the
    package root's API; the root's `__version__` is no component)."""
    folders = _folders()
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "sencache":
            modules = [f"sencache.{alias.name}" for alias in node.names if alias.name != "__version__"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "sencache":
                found.add(parts[1] if len(parts) > 1 and parts[1] in folders else CLI)
    return found


def test_every_component_has_its_rule():
    assert _folders() == set(ALLOWED) | {CLI}


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_component_imports_only_the_layers_below(component):
    leaks = {
        f"{path.relative_to(ROOT)} imports {', '.join(sorted(extra))}"
        for path in sorted((ROOT / component).rglob("*.py"))
        if (extra := imported(path) - ALLOWED[component])
    }
    assert not leaks, "\n".join(sorted(leaks))


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_imports_nothing_of_sencache(leaf):
    assert imported(ROOT / leaf) == set()


def test_the_check_sees_lazy_and_root_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import sencache\nfrom sencache import __version__\n"
        "def f():\n    from sencache.engine_builder import builder\n    import sencache.cli\n"
    )
    assert imported(module) == {CLI, "engine_builder"}
