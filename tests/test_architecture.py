"""The dependency rules of the code base (DESIGN.md), checked on the sources and in a fresh process.

- runtime/ (`polysense`) imports neither torch, onnx, polysense.models nor polysense.export;
- models/ (`polysense.models`) does not import polysense.export;
- each group of modules (a subpackage, or the ground modules at the top of `polysense`) imports only the groups
  LAYERS allows it, so imports flow one way: ground -> preprocess -> modalities -> bundle -> inference -> tools ->
  serving, datasets -> cli, and models/export on top;
- no import cycle between polysense modules, counting every import statement (inside functions and under
  TYPE_CHECKING too);
- functions stay under MAX_FUNCTION_LINES. A module holds one concept, whatever its length (docs/architecture.md).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "polysense", "models": "polysense.models", "export": "polysense.export"}
HEAVY = ("torch", "onnx", "onnxscript")
MAX_FUNCTION_LINES = 60

# Which groups each group may import (besides itself). A group is a subpackage of polysense, or "ground" for the
# modules at the top of the runtime that everything may use (errors, limits, privacy, optional, machine).
LAYERS = {
    "ground": set(),
    "polysense.preprocess": {"ground"},
    "modalities": {"ground", "polysense.preprocess"},
    "polysense.bundle": {"ground", "polysense.preprocess", "modalities"},
    "polysense.inference": {"ground", "polysense.preprocess", "modalities", "polysense.bundle"},
    "polysense.tools": {
        "ground",
        "polysense.preprocess",
        "modalities",
        "polysense.bundle",
        "polysense.inference",
    },
    "polysense.serving": {
        "ground",
        "polysense.preprocess",
        "modalities",
        "polysense.bundle",
        "polysense.inference",
    },
    "polysense.datasets": {"ground", "polysense.preprocess", "modalities", "polysense.tools"},
    "polysense.deid": {"ground", "polysense.preprocess", "modalities", "polysense.tools"},
}
# The package itself re-exports the public API; the command line and training may use it.
LAYERS["polysense"] = set(LAYERS)
RUNTIME_GROUPS = set(LAYERS)
LAYERS["polysense.cli"] = RUNTIME_GROUPS
LAYERS["polysense.models"] = RUNTIME_GROUPS | {"polysense.models.encoders"}
LAYERS["polysense.models.encoders"] = RUNTIME_GROUPS | {"polysense.models"}
LAYERS["polysense.models.training"] = RUNTIME_GROUPS | {"polysense.models", "polysense.models.encoders"}
LAYERS["polysense.export"] = RUNTIME_GROUPS | {
    "polysense.models",
    "polysense.models.encoders",
    "polysense.models.training",
}


def _modules() -> dict[str, Path]:
    """polysense module name -> source file, for every module of the three packages."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports anywhere in its body (absolute names)."""
    is_package = path.name == "__init__.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(MODULES)
            # `from package import module` imports that module; the package itself only for other names
            imported.update(submodules)
            if len(submodules) < len(node.names):
                imported.add(base)
    return imported


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def group_of(module: str) -> str:
    """The group a polysense module belongs to (a key of LAYERS)."""
    parts = module.split(".")
    if module in ("polysense", "polysense.__main__"):
        return "polysense" if module == "polysense" else "polysense.cli"
    if parts[1] in ("models", "export"):
        nested = len(parts) > 3 or (len(parts) == 3 and f"{module}" in PACKAGE_MODULES)
        return ".".join(parts[:3]) if parts[1] == "models" and nested else ".".join(parts[:2])
    if len(parts) > 2 or module in PACKAGE_MODULES:
        return ".".join(parts[:2])
    return "modalities" if parts[1] == "modalities" else "ground"


PACKAGE_MODULES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_three_packages_are_found():
    assert {"polysense.inference.pipeline", "polysense.datasets.builtin", "polysense.models.model"} <= set(
        MODULES
    )
    assert "polysense.export.writer" in MODULES


@pytest.mark.parametrize("name", [n for n, p in MODULES.items() if p.is_relative_to(ROOT / "runtime")])
def test_runtime_imports_neither_torch_onnx_models_nor_export(name):
    bad = [m for m in GRAPH[name] if _is_under(m, (*HEAVY, "polysense.models", "polysense.export"))]
    assert not bad, f"{MODULES[name]} imports {bad}"


@pytest.mark.parametrize("name", [n for n, p in MODULES.items() if p.is_relative_to(ROOT / "models")])
def test_models_do_not_import_export(name):
    bad = [m for m in GRAPH[name] if _is_under(m, ("polysense.export",))]
    assert not bad, f"{MODULES[name]} imports {bad}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_one_way(name):
    group = group_of(name)
    assert group in LAYERS, f"{MODULES[name]} is in a group ({group}) that LAYERS does not know; add it there"
    allowed = LAYERS[group] | {group}
    bad = sorted(m for m in GRAPH[name] if m in MODULES and group_of(m) not in allowed)
    assert not bad, f"{MODULES[name]} ({group}) imports {bad}: {group} may import only {sorted(allowed)}"


def test_the_layer_check_can_fail():
    """The preprocessing may not reach up to the pipeline."""
    assert group_of("polysense.preprocess.audio") == "polysense.preprocess"
    assert "polysense.inference" not in LAYERS[group_of("polysense.preprocess.audio")]
    assert group_of("polysense.models.training.distributed.launch") == "polysense.models.training"
    assert group_of("polysense.errors") == "ground"


def _find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(m for m in GRAPH[node] if m in GRAPH):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = _find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail():
    """Guard against a check that cannot fail: a made-up mutual import is found."""
    GRAPH["polysense.errors"].add("polysense.inference.pipeline")
    try:
        assert _find_cycle() is not None
    finally:
        GRAPH["polysense.errors"].discard("polysense.inference.pipeline")


def test_runtime_process_loads_neither_torch_nor_onnx():
    runtime = [n for n, p in MODULES.items() if p.is_relative_to(ROOT / "runtime")]
    code = (
        f"import sys, {', '.join(runtime)}\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r} "
        "or m.startswith(('polysense.models', 'polysense.export'))]\n"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_stay_small(name):
    path = MODULES[name]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name}() has {length} lines"
