"""Command-line flags generated from an options dataclass, so each option is written once: the flag's name,
type, default and choices come from the field, its help text from the field's trailing comment.

    batch_size: int = 64  # samples per step              ->  --batch-size BATCH_SIZE   (int, default 64)
    finetune: bool = False  # train the encoders too      ->  --finetune                (store_true)
    progress: bool = True  # progress bars                ->  --no-progress             (store_false)
    modalities: tuple[str, ...] | None = None  # subset   ->  --modalities MODALITIES   (comma-separated)
    data: str  # manifest                                 ->  --data DATA               (required)

A field's metadata may rename its flag: `n: int = field(default=3, metadata={"flag": "--n"})  # ...`.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, fields


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` (the last comment within its definition) in the source of `cls`."""
    source = textwrap.dedent(inspect.getsource(cls))
    (class_def,) = ast.parse(source).body
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    found = {}
    for node in class_def.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            # The formatter may wrap a long field over several lines; its comment is the last one inside.
            inside = [
                comments[line] for line in range(node.lineno, node.end_lineno + 1) if comments.get(line)
            ]
            if inside:
                found[node.target.id] = inside[-1]
    return found


def flag_name(field: Field) -> str:
    """--batch-size for batch_size; --no-progress for a bool that defaults to True; metadata["flag"] if set."""
    if "flag" in field.metadata:
        return field.metadata["flag"]
    name = field.name.replace("_", "-")
    return f"--no-{name}" if field.default is True else f"--{name}"


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, choices: Mapping[str, Sequence[str]] | None = None
) -> None:
    """One flag per field of the dataclass `cls`; `choices` lists the allowed values of some fields.

    Raises TypeError for a field without a trailing comment (its help text) or of a type with no flag rule.
    """
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    for field in fields(cls):
        if not field.init:
            continue
        if not comments.get(field.name):
            raise TypeError(
                f"{cls.__name__}.{field.name} has no trailing # comment; write one, it is the flag's help text"
            )
        allowed = (choices or {}).get(field.name)
        kwargs = _flag_settings(field, hints[field.name], comments[field.name], allowed)
        parser.add_argument(flag_name(field), dest=field.name, **kwargs)


def options_from_args(args: argparse.Namespace, cls: type) -> typing.Any:
    """The dataclass `cls` from a namespace parsed with the flags of add_arguments (extra attributes ignored)."""
    return cls(**{field.name: getattr(args, field.name) for field in fields(cls) if field.init})


def _default(field: Field) -> typing.Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return MISSING


def _flag_settings(field: Field, hint: typing.Any, comment: str, allowed: Sequence[str] | None) -> dict:
    """add_argument's keywords for one field."""
    help_text = comment.replace("%", "%%")  # argparse %-formats help strings
    default = _default(field)
    kind = _strip_optional(hint)
    if kind is bool:
        if default is MISSING:
            raise TypeError(f"bool field {field.name} needs a default: its flag switches away from it")
        if default:
            return {"action": "store_false", "help": f"turn off: {help_text}"}
        return {"action": "store_true", "help": help_text}
    settings: dict = {"type": _value_parser(field.name, kind)}
    if default is MISSING:
        settings["required"] = True
    else:
        settings["default"] = default
        if default not in (None, ""):  # None or "": the comment says what deciding later means
            help_text += f" (default: {_shown(default)})"
    if allowed is not None:
        settings["choices"] = tuple(allowed)
    else:
        settings["metavar"] = flag_name(field).lstrip("-").replace("-", "_").upper()
    settings["help"] = help_text
    return settings


def _strip_optional(hint: typing.Any) -> typing.Any:
    """X for `X | None` (and Optional[X]); the hint itself otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        remaining = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(remaining) == 1:
            return remaining[0]
    return hint


def _value_parser(name: str, kind: typing.Any) -> Callable[[str], typing.Any]:
    if kind in (int, float, str):
        return kind
    if typing.get_origin(kind) is tuple:
        item_type = typing.get_args(kind)[0]
        if item_type in (int, float, str):
            return _comma_separated(item_type)
    raise TypeError(f"field {name}: no command-line rule for type {kind!r}")


def _comma_separated(item_type: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item_type(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma-separated {item_type.__name__}"  # argparse names it in its error messages
    return parse


def _shown(value: typing.Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value)
