"""The package's shape: the CLI is a layer on top of the library, and the library's modules import each other
without cycles, so any of them can be imported (and tested) on its own."""

import ast
import json
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "efm_cli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _loaded(node: ast.Import | ast.ImportFrom) -> set[str]:
    """The efm_cli modules an import statement loads (`from a import b` loads a.b when b is a module)."""
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        names = {node.module or ""} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in MODULES}


def imports(module: str, *, when_imported: bool) -> set[str]:
    """The efm_cli modules `module` imports anywhere, or (`when_imported`) only those loaded as it is imported:
    not inside functions, not under `if TYPE_CHECKING:`."""
    found: set[str] = set()
    pending: list[ast.AST] = [ast.parse(MODULES[module].read_text())]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found |= _loaded(node)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        elif not (when_imported and isinstance(node, FUNCTIONS)):
            pending.extend(ast.iter_child_nodes(node))
    return found - {module}


def test_the_import_scan_sees_the_imports_it_checks() -> None:
    """Guards the checks below against a scanner that finds nothing."""
    assert "efm_cli.capacitor.format" in imports("efm_cli.capacitor.model", when_imported=True)
    assert "efm_cli.training.run" not in imports("efm_cli.cli.train", when_imported=True)
    assert "efm_cli.training.run" in imports("efm_cli.cli.train", when_imported=False)


def test_only_the_cli_imports_the_cli() -> None:
    library = [name for name in MODULES if not name.startswith("efm_cli.cli") and name != "efm_cli.__main__"]
    upward = {
        name: sorted(m for m in imports(name, when_imported=False) if m.startswith("efm_cli.cli")) for name in library
    }
    assert len(library) > 20 and {name: found for name, found in upward.items() if found} == {}


def test_modules_import_each_other_without_cycles() -> None:
    graph = {name: imports(name, when_imported=True) for name in MODULES}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")
    assert set(order) == set(MODULES)


_WITHOUT_HEAVY = """
import json, sys
for name in ("torch", "torchvision", "numpy", "scipy"):
    sys.modules[name] = None
import efm_cli.capacitor.format, efm_cli.capacitor.hub, efm_cli.capacitor.registry, efm_cli.devices
from efm_cli.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


def test_listing_and_the_hub_side_of_capacitors_need_no_torch(run_python) -> None:
    """`efm models` and the Hub modules run in an install whose torch is broken, and start fast."""
    result = run_python(_WITHOUT_HEAVY, "models", "--json")
    assert result.returncode == 0, result.stderr
    names = {model["name"] for model in json.loads(result.stdout)["models"]}
    assert {"digits-2to3", "horse2zebra"} <= names
