"""The commands that need the `train` extra (torch): train, export, prune, demo.

Their flags are generated in polysense.models / polysense.export from the options dataclasses, which import
torch, and the runtime imports neither. So their sub-parsers are CommandParsers whose arguments are defined when
the command is parsed (`polysense train ...`, `polysense train --help`), by a function loaded then: the tree is
one, each flag is defined once, and `polysense --help` or `polysense predict ...` never loads torch.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from polysense.errors import ConfigError, DependencyError

INSTALL = "pip install torch==2.13.0 && pip install 'polysense[train]'"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default where its text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        silent = action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
        if silent or "default" in text or text == argparse.SUPPRESS:
            return action.help
        return f"{text} (default {action.default})".lstrip()


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose arguments may be defined on first use: `define` names a function
    ("module:function") that adds them, called before the parser parses or formats its help.

    Sub-parsers of a CommandParser are CommandParsers (argparse makes them of their parent's class), so
    `commands.add_parser(name, define=...)` declares a deferred command."""

    def __init__(self, *args: Any, define: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._define = define

    def unrecognized(self, extras: list[str]) -> str:
        """What argparse says of arguments no command knows, with the nearest flag of this command (a typo)."""
        flags = [f for action in self._actions for f in action.option_strings if f.startswith("--")]
        near = difflib.get_close_matches(extras[0], flags, n=1) if extras[0].startswith("--") else []
        return f"unrecognized arguments: {' '.join(extras)}" + (f" (did you mean {near[0]}?)" if near else "")

    def parse_known_args(  # the overloads of ArgumentParser's, in one signature
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        self.define_arguments()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.define_arguments()
        return super().format_help()

    def define_arguments(self) -> None:
        """Add the deferred arguments now, once. Raises DependencyError when their module cannot be imported."""
        if self._define is not None:
            module, function = self._define.split(":")
            self._define = None
            getattr(training_module(module), function)(self)


def training_module(name: str) -> ModuleType:
    """Training commands live in polysense.models and polysense.export (torch). The runtime never imports them
    statically, so an edge install without torch still has a working `polysense` command; here one is loaded
    on demand."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise DependencyError(
            f"this command needs the training extra ({error}); install it with: {INSTALL}"
        ) from error


def add_train(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "train",
        help="train a multimodal classifier (needs the train extra: torch)",
        define="polysense.models.training.cli:add_train_arguments",
    )


def add_export(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "export",
        help="export a trained run to a verified ONNX bundle (needs torch)",
        define="polysense.export.cli:add_export_arguments",
    )


def add_prune(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "prune",
        help="prune a trained run's encoders (heads, units, channels) and fine-tune it briefly (needs torch)",
        define="polysense.models.training.prune:add_prune_arguments",
    )


def add_demo(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="the main job: built-in data, train, export, runtime eval, predict"
    )
    demo.add_argument("--out", default="runs/demo", help="run folder (must not exist; default runs/demo)")
    demo.add_argument("--n", type=int, default=3000, help="built-in samples (default 3000)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    demo = training_module("polysense.export.demo")  # without torch, that is what to fix first
    out = Path(args.out)
    # The demo always starts a new run (it has no --resume): say so before anything is written.
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {out} exists; the demo writes a new run: remove it first (rm -rf {out}, as make demo does) "
            "or choose another --out"
        )
    result: int = demo.run_demo(args)
    return result
