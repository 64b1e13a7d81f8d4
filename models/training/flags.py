"""Command-line flags generated from an options dataclass, so each option is written once: the flag's name,
type, default and choices come from the field, its help text from the field's metadata["help"].

    batch_size: int = option(64, help="samples per step")              ->  --batch-size BATCH_SIZE (int)
    epochs: int | None = option(None, help="...; default: the family's")  ->  --epochs EPOCHS (None: not given)
    finetune: bool = option(False, help="train the encoders too")      ->  --finetune               (store_true)
    progress: bool = option(True, help="progress bars", flag="--no-progress")  ->  --no-progress (store_false)
    modalities: tuple[str, ...] | None = option(None, help="subset")   ->  --modalities MODALITIES  (comma-separated)
    data: str = option(help="manifest")                                ->  --data DATA              (required)

The contract, which generated documentation relies on: every field of an options dataclass given to
add_arguments has metadata["help"] (plain text), and its flag is `--` + the field name with `_` -> `-`, unless
metadata["flag"] names another (a bool that defaults to True must: `--no-...`). Nothing here reads source code,
and nothing imports torch, so the flags can be built wherever the dataclass can be imported.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, field, fields

# The namespace attribute that holds the names of the fields given on the command line (see given_options).
_GIVEN = "_given_options"


def option(default: typing.Any = MISSING, *, help: str, flag: str | None = None) -> typing.Any:
    """A dataclass field that is also a command-line flag: `help` is the flag's help text (plain text, one or
    more sentences); `flag` renames the flag (default: --field-name). No default: the flag is required."""
    metadata = {"help": help, **({"flag": flag} if flag else {})}
    return field(default=default, metadata=metadata)


def flag_name(field: Field) -> str:
    """--batch-size for batch_size; metadata["flag"] if set (--no-progress, --n)."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def undocumented_fields(cls: type) -> list[str]:
    """The fields of `cls` that would become flags without help text (a docs generator shows every help)."""
    return [
        f.name
        for f in fields(cls)
        if f.init and not (isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip())
    ]


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, choices: Mapping[str, Sequence[str]] | None = None
) -> None:
    """One flag per field of the dataclass `cls`; `choices` lists the allowed values of some fields.

    Raises TypeError for a field without metadata["help"], a bool defaulting to True without a --no- flag, or a
    field of a type with no flag rule.
    """
    missing = undocumented_fields(cls)
    if missing:
        raise TypeError(
            f"{cls.__name__}.{missing[0]} has no help text; declare it with "
            f'option(default, help="...") (field metadata "help"), it is the flag\'s help'
        )
    hints = typing.get_type_hints(cls)
    for field_ in fields(cls):
        if field_.init:
            allowed = (choices or {}).get(field_.name)
            settings = _flag_settings(field_, hints[field_.name], allowed)
            parser.add_argument(flag_name(field_), dest=field_.name, action=_Given, **settings)


def options_from_args(args: argparse.Namespace, cls: type) -> typing.Any:
    """The dataclass `cls` from a namespace parsed with the flags of add_arguments (extra attributes ignored)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.init})


def given_options(args: argparse.Namespace) -> frozenset[str]:
    """The fields whose flags were on the command line (not those left at their defaults)."""
    return getattr(args, _GIVEN, frozenset())


def arguments_for(cls: type, values: Mapping[str, typing.Any]) -> list[str]:
    """Command-line arguments that give the fields named in `values` those values (add_arguments' inverse,
    for a command that starts itself again, `polysense train --nproc N`)."""
    arguments = []
    for field_ in fields(cls):
        if field_.name not in values:
            continue
        value = values[field_.name]
        if isinstance(value, bool):
            if value != _default(field_):
                arguments.append(flag_name(field_))
        elif value is not None:
            shown = _shown(value)
            # --flag value, as people write it; --flag=value where the value would read as a flag.
            arguments += (
                [f"{flag_name(field_)}={shown}"] if shown.startswith("-") else [flag_name(field_), shown]
            )
    return arguments


class _Given(argparse.Action):
    """argparse's store (or, with nargs=0, store-a-constant) action that also notes the field as given."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: typing.Any) -> None:
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: typing.Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, _GIVEN, given_options(namespace) | {self.dest})


def _default(field_: Field) -> typing.Any:
    if field_.default is not MISSING:
        return field_.default
    if field_.default_factory is not MISSING:
        return field_.default_factory()
    return MISSING


def _flag_settings(field_: Field, hint: typing.Any, allowed: Sequence[str] | None) -> dict:
    """add_argument's keywords for one field."""
    help_text = field_.metadata["help"].replace("%", "%%")  # argparse %-formats help strings
    default = _default(field_)
    kind = _strip_optional(hint)
    if kind is bool:
        if default is MISSING:
            raise TypeError(f"bool field {field_.name} needs a default: its flag switches away from it")
        if default and not flag_name(field_).startswith("--no-"):
            raise TypeError(
                f"bool field {field_.name} defaults to True: name its flag with "
                f'option(True, help=..., flag="--no-{field_.name.replace("_", "-")}")'
            )
        prefix = "turn off: " if default else ""
        return {"nargs": 0, "const": not default, "default": default, "help": prefix + help_text}
    settings: dict = {"type": _value_parser(field_.name, kind)}
    if default is MISSING:
        settings["required"] = True
    else:
        settings["default"] = default
        if default is not None:  # None: the help text says who decides
            help_text += f" (default: {_shown(default)})"
    if allowed is not None:
        # kept as given: a family list also holds onnx:PATH names (polysense.models.registry.FamilyNames)
        settings["choices"] = allowed if isinstance(allowed, tuple) else tuple(allowed)
    else:
        settings["metavar"] = flag_name(field_).lstrip("-").replace("-", "_").upper()
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
