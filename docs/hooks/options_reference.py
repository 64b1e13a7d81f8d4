"""mkdocs hook: the options reference pages, generated from the options dataclasses.

A page asks for a table with a marker line:

    <!-- options: models/training/options.py TrainOptions -->

and gets one row per field of that dataclass: its flag, type, default and help. The help is the field's
`metadata["help"]` only (what `dataclasses.fields(cls)[i].metadata["help"]` gives; the same text the command
line shows); a field without one fails the build with a message naming it. The flag is `--` + the field name
with `_` -> `-` unless `metadata["flag"]` names another.

The options module is not imported: it imports torch (through the encoder registry), and the docs build must
not need it. Its source is parsed with `ast` instead, and each field's value expression (`field(...)`, or a
helper that makes one, such as `polysense.models.training.flags.option`, loaded from its own file, which needs
only the standard library) is evaluated with the module's constants into the dataclasses.Field the class would
hold; defaults and metadata are read from that Field. Choices are read
the same way: from the module's `option_choices()` when it has one, whose values are tuples of constants,
constants imported from polysense modules, or the encoder and fusion registries (every
`@register_encoder(modality, name)` / `@register_fusion(name)` in models/).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- options: (?P<path>\S+) (?P<cls>\w+) -->$", re.MULTILINE)
# setuptools' package-dir (pyproject.toml): import name -> folder
PACKAGE_DIRS = {"polysense.models": "models", "polysense.export": "export", "polysense": "runtime"}
REQUIRED = object()


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return MARKER.sub(lambda match: options_table(match["path"], match["cls"]), markdown)


def options_table(path: str, cls_name: str) -> str:
    source_file = ROOT / path
    if not source_file.is_file():
        raise PluginError(f"options reference: {path} does not exist (marker for {cls_name})")
    module = ast.parse(source_file.read_text(), str(source_file))
    constants = _constants(module, source_file)
    choices = _choices(module, constants, source_file)
    rows = [
        "| flag | type | default | help |",
        "|---|---|---|---|",
    ]
    for field in _fields(module, cls_name, path, constants):
        name = field["name"]
        metadata = field["metadata"]
        help_text = metadata.get("help")
        if not isinstance(help_text, str) or not help_text.strip():
            raise PluginError(
                f"options reference: {cls_name}.{name} ({path}) has no metadata['help']; declare the field with "
                f'its help (field(..., metadata={{"help": "..."}})): it is the flag\'s help text and this table\'s'
            )
        default = field["default"]
        flag = metadata.get("flag") or f"--{name.replace('_', '-')}"
        kind = _kind(field["annotation"], default, choices.get(name))
        rows.append(
            f"| `{flag}` | {_cell(kind)} | {_cell(_shown_default(default))} | {_cell(help_text.strip())} |"
        )
    return "\n".join(rows)


def _fields(module: ast.Module, cls_name: str, path: str, constants: dict) -> list[dict]:
    """Each init field of the dataclass `cls_name`: its value expression is evaluated into what the dataclass
    itself would hold (a dataclasses.Field from `field(...)` or a helper such as flags.option, or a plain
    default), and the metadata is read from that Field, as dataclasses.fields(cls)[i].metadata would give."""
    cls = next(
        (node for node in module.body if isinstance(node, ast.ClassDef) and node.name == cls_name), None
    )
    if cls is None:
        raise PluginError(f"options reference: no class {cls_name} in {path}")
    namespace = {**constants, "field": dataclasses.field, "dataclasses": dataclasses}
    found = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        annotation = ast.unparse(node.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        name = node.target.id
        where = f"{cls_name}.{name} ({path})"
        default: Any = REQUIRED
        metadata: Any = {}
        if node.value is not None:
            _load_helpers(module, node.value, namespace)
            value = _evaluate(node.value, namespace, where, fallback=not isinstance(node.value, ast.Call))
            if isinstance(value, dataclasses.Field):
                if not value.init:
                    continue
                if value.default is not dataclasses.MISSING:
                    default = value.default
                elif value.default_factory is not dataclasses.MISSING:
                    default = _Shown(f"{getattr(value.default_factory, '__name__', 'factory')}()")
                metadata = value.metadata
            else:
                default = value
        found.append({"name": name, "annotation": annotation, "default": default, "metadata": metadata})
    return found


def _load_helpers(module: ast.Module, expression: ast.expr, namespace: dict) -> None:
    """Put into `namespace` the functions `expression` calls that the options module imports from a polysense
    module (flags.option): that module is loaded from its file alone, so only if it needs no torch."""
    called = {
        node.func.id
        for node in ast.walk(expression)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in namespace
    }
    for node in module.body:
        if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("polysense")):
            continue
        for alias in node.names:
            local = alias.asname or alias.name
            if local in called:
                helper = getattr(_isolated_module(node.module), alias.name, None)
                if helper is not None:
                    namespace[local] = helper


@functools.cache
def _isolated_module(dotted: str) -> Any:
    path = _module_file(dotted)
    if path is None:
        raise PluginError(f"options reference: cannot find the source of {dotted}")
    spec = importlib.util.spec_from_file_location(f"_options_reference_{dotted.replace('.', '_')}", path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses and typing look modules up by name
    try:
        spec.loader.exec_module(loaded)
    except ImportError as error:
        raise PluginError(
            f"options reference: {dotted} cannot be loaded on its own ({error}); the docs build reads the options "
            "without torch, so the helpers that declare options must import only the standard library"
        ) from None
    return loaded


class _Shown(str):
    """A default shown as written in the source (an expression the hook does not evaluate)."""


def _evaluate(node: ast.expr, namespace: dict, where: str, fallback: bool = False) -> Any:
    """The value of an expression of the options module's own source: literals, its constants, and the
    field-declaring functions in `namespace` (no builtins)."""
    try:
        code = compile(ast.Expression(node), where, "eval")
        return eval(code, {"__builtins__": {}}, dict(namespace))
    except Exception as error:
        if fallback:
            return _Shown(ast.unparse(node))
        raise PluginError(
            f"options reference: cannot read {ast.unparse(node)!r} of {where} without importing it ({error}); "
            "write it with literals and module constants"
        ) from None


def _constants(module: ast.Module, source_file: Path, follow_imports: bool = True) -> dict:
    """Module-level NAME = literal assignments, and names imported from other polysense modules' constants."""
    found: dict = {}
    for node in module.body:
        if (
            isinstance(node, ast.ImportFrom)
            and follow_imports
            and (node.module or "").startswith("polysense")
        ):
            other = _module_file(node.module)
            if other is None:
                continue
            other_constants = _constants(ast.parse(other.read_text()), other, follow_imports=False)
            for alias in node.names:
                if alias.name in other_constants:
                    found[alias.asname or alias.name] = other_constants[alias.name]
        targets = []
        if isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            targets = [node.target.id]
        if targets:
            value = node.value
            try:
                literal = eval(
                    compile(ast.Expression(value), str(source_file), "eval"),
                    {"__builtins__": {}},
                    dict(found),
                )
            except Exception:
                continue
            for target in targets:
                found[target] = literal
    return found


def _module_file(dotted: str) -> Path | None:
    for package, folder in PACKAGE_DIRS.items():
        if dotted == package or dotted.startswith(package + "."):
            rest = dotted[len(package) :].lstrip(".").split(".") if dotted != package else []
            base = ROOT / folder / Path(*rest) if rest else ROOT / folder
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
            return None
    return None


def _registries() -> dict[str, tuple[str, ...]]:
    """Every registered encoder family per modality ("image_encoder": (...)) and fusion head ("fusion")."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            for decorator in node.decorator_list:
                if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Name)):
                    continue
                args = [a.value for a in decorator.args if isinstance(a, ast.Constant)]
                if decorator.func.id == "register_encoder" and len(args) == 2:
                    found.setdefault(f"{args[0]}_encoder", []).append(args[1])
                elif decorator.func.id == "register_fusion" and len(args) == 1:
                    found.setdefault("fusion", []).append(args[0])
    return {key: tuple(dict.fromkeys(names)) for key, names in found.items()}


def _choices(module: ast.Module, constants: dict, source_file: Path) -> dict[str, tuple]:
    """The fields with a fixed set of values, from the module's option_choices() if it has one."""
    function = next(
        (n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "option_choices"), None
    )
    if function is None:
        return {}
    returned = next((n.value for n in ast.walk(function) if isinstance(n, ast.Return)), None)
    if not isinstance(returned, ast.Dict):
        return {}
    found: dict[str, tuple] = {}
    for key, value in zip(returned.keys, returned.values):
        if key is None:  # **{f"{m}_encoder": tuple(ENCODERS[m]) for m in MODALITIES}: the registries
            found.update({k: v for k, v in _registries().items() if k.endswith("_encoder")})
        elif isinstance(key, ast.Constant) and isinstance(value, ast.Name) and value.id in constants:
            found[key.value] = tuple(constants[value.id])
        elif isinstance(key, ast.Constant) and key.value == "fusion":
            found["fusion"] = _registries().get("fusion", ())
    return found


def _kind(annotation: str, default: Any, choices: tuple | None) -> str:
    if choices:
        return " | ".join(f"`{c}`" for c in choices)
    plain = re.sub(r"\s*\|\s*None$", "", annotation)
    if plain == "bool":
        return "switch"
    if plain.startswith("tuple["):
        item = plain[len("tuple[") :].split(",")[0].strip()
        return f"comma-separated list of {item}"
    return plain


def _shown_default(default: Any) -> str:
    if default is REQUIRED:
        return "required"
    if isinstance(default, _Shown):
        return f"`{default}`"
    if default is True:
        return "on (the flag turns it off)"
    if default is False:
        return "off"
    if default is None:
        return "unset"
    if default == "":
        return 'unset (`""`)'
    if isinstance(default, tuple):
        return f"`{','.join(str(item) for item in default)}`"
    return f"`{default}`"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: | escaped, no line breaks."""
    return text.replace("\n", " ").replace("|", "\\|")
