"""The `polysense` command. Subcommands import their heavy parts lazily, so `polysense --help` is instant
and the runtime-only commands work without torch."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from polysense.bundle.schema import PRECISIONS
from polysense.cli.bundle import add_bundle, add_edge, add_info, add_keygen, add_tune
from polysense.cli.data import add_data
from polysense.cli.predict import DEVICE_HELP, add_eval, add_predict, add_stream, add_voice, non_negative
from polysense.cli.serve import add_serve
from polysense.cli.training import CommandParser, add_demo, add_export, add_prune, add_train
from polysense.errors import ConfigError, DependencyError, PolysenseError
from polysense.inference.sessions import DEVICES

log = logging.getLogger("polysense")


def _add_bench(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="latency, throughput, cold start, memory and size of a bundle")
    bench.add_argument("bundle")
    bench.add_argument("--device", choices=DEVICES, default="cpu", help=DEVICE_HELP)
    bench.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto", help="(default auto)")
    bench.add_argument(
        "--threads",
        type=non_negative,
        default=0,
        help="onnxruntime threads per model run (default 0: one per core)",
    )
    bench.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    bench.add_argument(
        "--plot",
        metavar="OUT.png",
        help="write a figure of stage latencies and throughput (.png, .svg or .pdf)",
    )
    bench.add_argument("--quick", action="store_true", help="few runs (a smoke test, not a measurement)")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from polysense.tools.bench import BenchOptions, format_report, plot_report, run_bench

    _check_outputs(args.json, args.plot)
    make = BenchOptions.quick if args.quick else BenchOptions
    options = make(device=args.device, precision=args.precision, threads=args.threads)
    report = run_bench(args.bundle, options, progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_report(report, args.plot)
    return 0


PLOT_FORMATS = (".png", ".svg", ".pdf")  # what --plot writes; matplotlib picks the format by the suffix


def _check_outputs(json_path: str | None, plot_path: str | None) -> None:
    """Before the benchmark runs: where its results go must exist, and --plot needs matplotlib."""
    for path in (p for p in (json_path, plot_path) if p):
        if not Path(path).parent.is_dir():
            raise ConfigError(
                f"{path}: the folder {Path(path).parent} does not exist; create it or choose another"
            )
    if plot_path and Path(plot_path).suffix.lower() not in PLOT_FORMATS:
        raise ConfigError(
            f"--plot {plot_path}: name a {', '.join(PLOT_FORMATS)} file (the suffix picks the format), "
            f"e.g. --plot {Path(plot_path).with_suffix('.png')}"
        )
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        raise DependencyError("--plot needs matplotlib: pip install 'polysense[plot]' (or leave out --plot)")


QUIET_HELP = "only warnings and errors on stderr, no progress bars (anywhere; before or after the command)"


def build_parser() -> CommandParser:
    """The whole `polysense` command line, one tree. The train and export commands' flags are defined when
    those commands are parsed (polysense.cli.training), so building it imports no training code."""
    parser = CommandParser(prog="polysense", description="Multimodal classifiers, trained and served.")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    from polysense.version import __version__

    parser.add_argument("--version", action="version", version=f"polysense {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data(commands)
    add_train(commands)
    add_export(commands)
    add_prune(commands)
    add_demo(commands)
    add_predict(commands)
    add_eval(commands)
    add_info(commands)
    add_bundle(commands)
    add_keygen(commands)
    add_edge(commands)
    add_tune(commands)
    add_stream(commands)
    add_voice(commands)
    _add_bench(commands)
    add_serve(commands)
    # A global flag is accepted after the command too; it is documented once, in `polysense --help`.
    for command in _command_parsers(parser):
        command.add_argument(
            "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def _command_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every sub-parser under `parser`, at any depth (`data`, `data builtin`, ...)."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in dict.fromkeys(action.choices.values()):  # once each, aliases or not
                found += [command, *_command_parsers(command)]
    return found


def _parse(parser: CommandParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, where an unknown one is refused by the command it was given to (its usage, and the
    nearest flag), not by `polysense` (whose usage says nothing of the command's flags)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = _chosen_command(parser, args)
        command.error(command.unrecognized(extras))
    return args


def _chosen_command(parser: CommandParser, args: argparse.Namespace) -> CommandParser:
    """The deepest sub-parser the parsed `args` went through (`polysense data builtin`: data's builtin)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if isinstance(chosen, CommandParser):
                return _chosen_command(chosen, args)
    return parser


def _progress_wanted(quiet: bool) -> bool:
    """Progress bars on a terminal only (a log file would fill with carriage returns), unless forced with
    POLYSENSE_PROGRESS=1; never with --quiet."""
    return not quiet and (sys.stderr.isatty() or os.environ.get("POLYSENSE_PROGRESS") == "1")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one `warning:` line on stderr: the user needs its message, not the source line it came from."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores the default display when main returns (tests call main)
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    try:
        # Parsing a training command loads its flags, which needs torch: a DependencyError if missing.
        args = _parse(build_parser(), argv)
        _settle_output(args)
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            code: int = args.run(args)
            return code
    except PolysenseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`polysense info --json | head`): stop quietly, as shell tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("interrupted; a training run continues with --resume", file=sys.stderr)
        return 130


class _CliFormatter(logging.Formatter):
    """Log records as the CLI shows them: the message alone, a warning as one `warning:` line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)  # "%(message)s", with a traceback where one was logged
        return f"warning: {text}" if record.levelno == logging.WARNING else text


def _settle_output(args: argparse.Namespace) -> None:
    """--quiet: warnings and errors only. Progress bars off with --quiet or off a terminal: --no-progress for
    the commands that have it (`progress` False for train, whose flag is TrainOptions.progress)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_CliFormatter())
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, handlers=[handler])
    if not _progress_wanted(args.quiet):
        if hasattr(args, "no_progress"):
            args.no_progress = True
        if hasattr(args, "progress"):
            args.progress = False


if __name__ == "__main__":
    sys.exit(main())
